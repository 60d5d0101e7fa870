"""orbax checkpoints: one step dir holds `state` (params, opt state, EMA, step, skipped, rng; sharded arrays)
and `data` (the data iterator state: one JSON file per process). Resume = re-run the same command: the latest
step is restored.

Multi-host: every process calls `save` and `restore` (orbax coordinates the array writes and the commit).
Each process reads its own slice of every data source (`pipeline.make_dataset`), so each has its own
iterator state: `data/process_{i}-of-{n}.json`, written by process i and read back by process i only.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


def process_file(index: int, count: int) -> str:
    """Name of process `index`'s data-state file in a run of `count` processes."""
    return f"process_{index}-of-{count}.json"


class PerProcessJsonHandler(ocp.CheckpointHandler):
    """A JSON dict per process: process i writes / reads `process_{i}-of-{n}.json` in the item directory.

    orbax's JsonCheckpointHandler writes on the primary host only, so every process would restore process 0's
    data state (and re-read or skip records of its own slice).
    """

    def save(self, directory: epath.Path, args: "PerProcessJsonSave"):
        path = epath.Path(directory) / process_file(jax.process_index(), jax.process_count())
        path.write_text(json.dumps(args.item))

    def restore(self, directory: epath.Path, args: "PerProcessJsonRestore | None" = None) -> dict:
        directory = epath.Path(directory)
        path = directory / process_file(jax.process_index(), jax.process_count())
        if not path.exists():
            saved = sorted(p.name for p in directory.glob("process_*.json"))
            # The records a process reads depend on (index, count), so states saved by another number of
            # processes do not apply to this run.
            raise FileNotFoundError(f"{path} not found; this checkpoint's data states are {saved} (saved by a "
                                    f"different number of processes than the {jax.process_count()} running now?)")
        return json.loads(path.read_text())


@ocp.args.register_with_handler(PerProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class PerProcessJsonSave(ocp.args.CheckpointArgs):
    item: dict


@ocp.args.register_with_handler(PerProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class PerProcessJsonRestore(ocp.args.CheckpointArgs):
    pass


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = False):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict | None = None, *, force: bool = False) -> bool:
        """Collective: every process calls it with the same step and its own `data_state` (JSON-able dict)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=PerProcessJsonSave(data_state or {}))
        return self.manager.save(int(step), args=args, force=force)

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict, int]:
        """abstract_state: ShapeDtypeStructs with `.sharding` (e.g. from `abstract_like`). -> (state, data, step).

        Collective; `data` is this process's own data state."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                  data=PerProcessJsonRestore()))
        return out["state"], dict(out["data"] or {}), step

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state, shardings):
    """ShapeDtypeStructs (with shardings) of a state: the restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
