"""The training loop behind `train.py`: config -> model, optimizer, state, data, checkpoints; resume.

Config sections (see configs/train/*.py): model (ModelConfig fields), init (params: '' random | reference
folder; ckpt: a `convert_weights.py to-jax` folder, whose model config and Lance params are used; then
`init.model_overrides` adjusts the config), optimizer, freeze, ema_decay, mesh, data (pipeline.make_dataset;
`data.prefetch`: batches built ahead in a background thread, 0 = none, see data/prefetch.py), train (steps, log_every,
save_every, keep, seed, timesteps). Re-running the same command with the same workdir resumes from the
latest checkpoint (params, optimizer, EMA, step, rng and the data iterator state). `workdir/run_config.json`
records the run's resolved model config and config sections: a resume under another model is refused by name,
other changed settings (more steps, another learning rate) are listed and taken.

Multi-host (`sharding.initialize_distributed` first, as `train.py` does): every process runs `run` with the
same config and workdir. Each reads its own slice of the data (`data.batch_size / process_count` rows per
step), the rows are assembled into global arrays over the (data, fsdp) axes, every process takes part in
each checkpoint save / restore (its own data-iterator state included), and process 0 alone writes
TensorBoard, the metric lines and the progress bar.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import flax.linen as nn
import jax
import numpy as np

from lance_jax import sharding as S
from lance_jax.config import model_config_from_dict
from lance_jax.data import media_records as MR
from lance_jax.data import pipeline as PL
from lance_jax.data import prefetch as PF
from lance_jax.models.lance import Lance
from lance_jax.train import checkpoint as C
from lance_jax.train import freeze as F
from lance_jax.train import metrics as MT
from lance_jax.train import optimizer as O
from lance_jax.train import state as St
from lance_jax.train import step as Sp

log = logging.getLogger("lance_jax.train")


def build(config, *, mesh=None):
    """(cfg, mesh, tx, schedule, mask, state, shardings, jitted step, data iterator, example batch abstract)."""
    timesteps = config.train.get("timesteps", "host")
    check_group_timesteps(config.data.get("groups", []) or [], timesteps)  # before any record is encoded
    cfg = model_config(config)
    mesh = mesh or S.make_mesh(dict(config.mesh))
    it = PL.make_iterator(data_config(config), cfg, process_index=jax.process_index(), process_count=jax.process_count())
    first = next(it)  # shapes; the iterator is rewound below
    it.set_state(_initial_state(config, cfg))
    # global shapes: each process's iterator yields batch_size / process_count of the rows
    batch_abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct((config.data.batch_size,) + x.shape[1:], x.dtype), first)
    check_batch_split(mesh, int(config.data.batch_size))
    example = jax.tree.map(lambda x: np.zeros((1,) + x.shape[1:], x.dtype), first)
    example.pop("gen_item", None)
    boxed = S.abstract_params(cfg, example)
    mask = F.trainable_mask(nn.unbox(boxed), config.freeze)
    tx, schedule = O.make_optimizer(config.optimizer, mask)
    params = None
    if config.init.get("ckpt", ""):
        from lance_jax.convert import converter

        params = converter.restore_params(config.init.ckpt)["lance"]
    elif config.init.get("params", ""):
        from lance_jax.convert import load_reference_params

        params = load_reference_params(config.init.params, cfg)
    ema = float(config.get("ema_decay", 0.0) or 0.0)
    state, shardings = St.create_state(cfg, tx, mesh, example, seed=int(config.train.seed), use_ema=ema > 0,
                                       params=params)
    fn = Sp.train_step_fn(Lance(cfg), tx, schedule, mask, ema_decay=ema or None, timesteps=timesteps)
    with S.use_mesh(mesh):
        jstep = Sp.jit_train_step(fn, mesh, shardings, batch_abstract)
    return dict(cfg=cfg, mesh=mesh, tx=tx, schedule=schedule, mask=mask, state=state, shardings=shardings,
                step=jstep, data=it, batch_abstract=batch_abstract)


def check_group_timesteps(groups, timesteps: str) -> None:
    """A group's own `timestep_shift` acts on the host-drawn logits; device-drawn ones would silently drop it."""
    shifted = [g.get("name", "?") for g in groups if MR.group_logit_offset(g) != 0.0]
    if shifted and timesteps != "host":
        raise ValueError(f"data groups {shifted} set timestep_shift, which needs train.timesteps='host' "
                         f"(got {timesteps!r})")


def model_config(config):
    """The ModelConfig: a converted checkpoint's (`init.ckpt`, with `init.model_overrides`) or `config.model`."""
    if config.init.get("ckpt", ""):
        from lance_jax.convert import converter

        return converter.checkpoint_config(config.init.ckpt, **dict(config.init.get("model_overrides", None) or {}))
    return model_config_from_dict(config.model)


def data_config(config):
    """config.data with '@init' in `tokenizer` / `encoder_ckpt` replaced by `init.ckpt`."""
    data = config.data
    if any(data.get(k, "") == "@init" for k in ("tokenizer", "encoder_ckpt")):
        ckpt = config.init.get("ckpt", "")
        if not ckpt:
            raise ValueError("data.tokenizer / data.encoder_ckpt = '@init' needs init.ckpt (a converted checkpoint)")
        data = data.copy_and_resolve_references()
        with data.unlocked():
            for k in ("tokenizer", "encoder_ckpt"):
                if data.get(k, "") == "@init":
                    data[k] = ckpt
    return data


def _initial_state(config, cfg):
    return PL.make_iterator(data_config(config), cfg, process_index=jax.process_index(),
                            process_count=jax.process_count()).get_state()


def check_batch_split(mesh, batch_size: int):
    """Raise unless the (data, fsdp) sharding of `batch_size` rows gives every process its own
    batch_size / process_count rows: each process feeds only the rows it read (`global_batch`), so a batch
    replicated across processes (it does not divide data x fsdp, or those axes stay inside a process)
    would be assembled from mismatched data."""
    n = jax.process_count()
    rows: dict[int, set] = {}
    for d, idx in S.batch_sharding(mesh, 1, batch_size).devices_indices_map((batch_size,)).items():
        rows.setdefault(d.process_index, set()).update(range(*idx[0].indices(batch_size)))
    sizes = [len(r) for r in rows.values()]
    if len(rows) != n or sizes != [batch_size // n] * n or len(set().union(*rows.values())) != batch_size:
        raise ValueError(f"data.batch_size {batch_size} on mesh {dict(mesh.shape)} does not split over the "
                         f"{n} processes (rows per process: {sizes}); make it divisible by data x fsdp and let "
                         "those axes span the processes")


def global_batch(batch, mesh, shardings_of, batch_size: int | None = None):
    """Host batch (this process's B / process_count rows) -> global (B, ...) jax arrays over (data, fsdp).

    batch_size: the global B; None infers it from the sharding (right for a single process)."""
    shape = lambda v: None if batch_size is None else (batch_size,) + v.shape[1:]  # noqa: E731
    return {k: jax.make_array_from_process_local_data(shardings_of[k], v, shape(v)) for k, v in batch.items()}


RUN_CONFIG = "run_config.json"


def run_record(config, cfg) -> dict:
    """What `run_config.json` holds: the resolved model config (after init.ckpt / overrides) and every config
    section, JSON-normalised."""
    sections = {k: config[k].to_dict() if hasattr(config[k], "to_dict") else config[k] for k in config.keys()}
    return json.loads(json.dumps(dict(model=dataclasses.asdict(cfg), config=sections), default=str))


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def changed_fields(old: dict, new: dict) -> dict:
    """{dotted key: (old value, new value)} of the leaves that differ (a missing side is None)."""
    a, b = _flat(old), _flat(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_resume(workdir: str, record: dict, console=print) -> None:
    """Refuse to resume `workdir` under another model config (the restored weights would be read as another
    model, or fail deep in the restore with a shape error); list the other settings that changed."""
    path = os.path.join(workdir, RUN_CONFIG)
    if not os.path.isfile(path):
        return  # a run from before run_config.json: nothing to compare with
    with open(path) as f:
        old = json.load(f)
    model = changed_fields(old.get("model", {}), record["model"])
    if model:
        raise ValueError(f"{workdir} holds a run of another model ({len(model)} field(s) differ: "
                         f"{_listed(dict(list(model.items())[:8]))}); use another --workdir, or remove its "
                         "checkpoints to start over")
    other = changed_fields(old.get("config", {}), record["config"])
    if other:
        console(f"resuming {workdir} with changed settings: {_listed(other)}")


def _listed(changes: dict) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())


def write_run_record(workdir: str, record: dict) -> None:
    tmp = os.path.join(workdir, RUN_CONFIG + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(workdir, RUN_CONFIG))


def run(config, workdir: str, *, progress: bool = True, console=print, mesh=None) -> dict:
    """Train until config.train.steps; returns the last logged metrics. mesh: default from config.mesh."""
    os.makedirs(workdir, exist_ok=True)
    b = build(config, mesh=mesh)
    mesh, state, jstep, it = b["mesh"], b["state"], b["step"], b["data"]
    ckpt = C.Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(config.train.keep))
    record = run_record(config, b["cfg"])
    if ckpt.latest_step() is not None:
        check_resume(workdir, record, console=console if jax.process_index() == 0 else (lambda *a: None))
        state, data_state, step = ckpt.restore(C.abstract_like(state, b["shardings"]))
        if data_state:
            it.set_state(data_state)
        console(f"resumed from step {step}")
    if jax.process_index() == 0:
        write_run_record(workdir, record)  # the settings the run goes on with
    writer = MT.MetricWriter(os.path.join(workdir, "tb") if jax.process_index() == 0 else None,
                             console=console if jax.process_index() == 0 else None)
    b_sh = Sp.batch_shardings(mesh, b["batch_abstract"])
    total = int(config.train.steps)
    start = int(jax.device_get(state.step))
    avg, last = MT.Average(), {}
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, dynamic_ncols=True)
    t0, tokens = time.time(), 0
    pending = None  # the previous step's metrics, read once the device has moved on to the next step
    # the iterator was restored above, before the prefetch thread takes it over
    with S.use_mesh(mesh), PF.prefetch(it, int(config.data.get("prefetch", 2))) as batches:
        for s in range(start, total):
            batch = next(batches)
            tokens += int((batch["sample"] >= 0).sum()) * jax.process_count()
            state, m = jstep(state, global_batch(batch, mesh, b_sh, int(config.data.batch_size)), Sp.step_rng(state))
            # Reading metrics waits for their step. Waiting for step s-1 while step s is queued keeps the
            # device busy and at most two steps in flight; only log steps wait for the step just dispatched.
            if pending is not None:
                avg.add(pending)
            pending = m
            done = s + 1
            if done % int(config.train.log_every) == 0 or done == total:
                avg.add(pending)
                pending = None
                vals = avg.result()
                dt = time.time() - t0
                vals.update(tokens_per_s=tokens / max(dt, 1e-9), steps_per_s=config.train.log_every / max(dt, 1e-9))
                # the consumed batches' counters: the live iterator belongs to the prefetch thread
                vals.update({f"data_{k}": v for k, v in PL.pack_stats(batches).items()
                             if isinstance(v, (int, float))})
                last = writer.write(done, vals)
                t0, tokens = time.time(), 0
                if bar is not None:
                    bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}")
            if done % int(config.train.save_every) == 0 or done == total:  # collective: every process saves
                ckpt.save(done, state, batches.get_state(), force=True)  # resumes after the last consumed batch
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    ckpt.close()
    writer.close()
    return last
