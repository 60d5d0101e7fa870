"""Device meshes and the one table that maps logical axis names to mesh axes.

Every param declares logical names (`embed`, `mlp`, `q_heads`, ...) and every large activation is
constrained with `activation_*` names; `LOGICAL_RULES` is the only place that says which mesh axis
shards which name. The same model code runs on 1 CPU, 8 fake CPU devices, a GPU mesh or a TPU pod.

Mesh axes (`MESH_AXES`):
  data     pure data parallel: batch rows split, params replicated
  fsdp     data parallel with params / grads / optimizer state split (ZeRO-3 style)
  context  sequence (context) parallel: activations split along the token dim; attention runs in a
           shard_map over this axis (`layers/context_parallel.py`): each device keeps its own queries
           and mask rows, all-gathers K/V (`activation_kv_length` is replicated) and the backward
           reduce-scatters their gradients; streams that do not divide fall back to GSPMD
  tensor   Megatron-style: heads and MLP columns split

Presets live in `configs/mesh/*.py` (`load_mesh_config`, `mesh_from_config`). `validate_mesh` says
exactly what does not divide (batch by data x fsdp, heads by tensor, sequence by context). Params
whose dims a mesh axis does not divide are replicated along that axis only where that is intended
(`INTENDED_REPLICATION`: 2 GQA kv heads on a wider tensor axis); every such fallback is logged and
listed by `replication_report`; `param_shardings(..., strict=True)` raises on unintended ones.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: tuple[tuple[str, object], ...] = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "context"),  # queries, residual stream, MLP hidden: split over context
    ("activation_kv_length", None),  # keys / values: all-gathered over context inside the attention shard_map
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # params
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("latent", None),
    ("time_freq", None),
    # vision tower
    ("qkv", None),
    ("patch_channel", None),
    ("patch_time", None),
    ("patch_row", None),
    ("patch_col", None),
    # VAE convolutions (one name per kernel axis: flax rejects repeated names in a spec)
    ("conv_time", None),
    ("conv_row", None),
    ("conv_col", None),
    ("conv_in", None),
    ("conv_out", None),
)

# Logical param axes whose indivisibility is expected and handled by replication: Lance has 2 kv heads
# (GQA), so a tensor axis wider than 2 replicates the K/V projections (standard Megatron GQA practice).
INTENDED_REPLICATION = frozenset({"kv_heads", "activation_kv_heads"})


# ----------------------------------------------------------------------------------------------
# Meshes
# ----------------------------------------------------------------------------------------------


def resolve_mesh_shape(shape: dict[str, int] | None, num_devices: int) -> dict[str, int]:
    """Axis sizes by name for `num_devices` devices (missing axes 1, at most one -1 = the rest)."""
    shape = dict(shape or {"fsdp": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; known: {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive (or one -1), got {shape}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices do not split into mesh {shape}: {num_devices} is not a "
                             f"multiple of the fixed axes' product {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {num_devices}")
    return dict(zip(MESH_AXES, sizes))


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over `devices` (default: all) with axes MESH_AXES; sizes given by name, -1 = the rest."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape, len(devices))
    return Mesh(np.asarray(devices).reshape([sizes[a] for a in MESH_AXES]), MESH_AXES)


MESH_PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "mesh")


def load_mesh_config(path_or_name: str):
    """A mesh preset (ml-collections ConfigDict with `shape`, `num_devices`, `platform`, `description`).

    Accepts a file path (`configs/mesh/h100x8.py`), a preset name (`h100x8`), and an optional
    `:variant` suffix passed to `get_config(variant)` (e.g. `configs/mesh/h100x8.py:infer`).
    """
    import importlib.util

    path, _, variant = path_or_name.partition(":")
    if not path.endswith(".py"):
        path = os.path.join(MESH_PRESET_DIR, path + ".py")
    if not os.path.isfile(path):
        presets = sorted(f[:-3] for f in os.listdir(MESH_PRESET_DIR) if f.endswith(".py") and not f.startswith("_"))
        raise FileNotFoundError(f"mesh preset {path_or_name!r} not found; presets: {presets}")
    spec = importlib.util.spec_from_file_location("lance_mesh_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def mesh_from_config(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh for a preset ConfigDict (or a plain {axis: size} dict)."""
    shape = mesh_cfg.get("shape", mesh_cfg) if hasattr(mesh_cfg, "get") else mesh_cfg
    shape = dict(shape.to_dict() if hasattr(shape, "to_dict") else shape)
    devices = list(jax.devices() if devices is None else devices)
    want = mesh_cfg.get("num_devices", None) if hasattr(mesh_cfg, "get") else None
    if want and want != len(devices):
        raise ValueError(f"mesh preset needs {want} devices, {len(devices)} are visible "
                         "(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax)")
    return make_mesh(shape, devices)


def validate_mesh(mesh: Mesh, cfg=None, *, batch: int | None = None, seq_lens: dict[str, int] | None = None,
                  allow_kv_head_replication: bool = True) -> list[str]:
    """Raise ValueError listing everything that does not divide; return notes on intended replication.

    batch: global rows (must divide by data x fsdp); seq_lens: {name: length} of every token dim that is
    split over `context` (e.g. {'und capacity': Cu, 'gen capacity': Cg}); cfg: a ModelConfig (q heads and
    MLP width must divide by tensor; kv heads may replicate when `allow_kv_head_replication`).
    """
    s = mesh.shape
    errors, notes = [], []
    dp = s.get("data", 1) * s.get("fsdp", 1)
    if batch is not None and batch % dp:
        errors.append(f"batch {batch} is not divisible by data x fsdp = {s.get('data', 1)} x {s.get('fsdp', 1)} = {dp}")
    ctx = s.get("context", 1)
    for name, n in (seq_lens or {}).items():
        if n % ctx:
            errors.append(f"{name} {n} is not divisible by context = {ctx} (round the capacity up to a multiple)")
    if cfg is not None:
        tp = s.get("tensor", 1)
        if cfg.num_heads % tp:
            errors.append(f"num_heads {cfg.num_heads} is not divisible by tensor = {tp}")
        if cfg.intermediate_size % tp:
            errors.append(f"intermediate_size {cfg.intermediate_size} is not divisible by tensor = {tp}")
        if cfg.vocab_size % tp:
            errors.append(f"vocab_size {cfg.vocab_size} is not divisible by tensor = {tp}")
        if cfg.num_kv_heads % tp:
            msg = f"num_kv_heads {cfg.num_kv_heads} is not divisible by tensor = {tp}"
            if allow_kv_head_replication:
                notes.append(msg + ": K/V projections replicated over tensor (intended, GQA)")
            else:
                errors.append(msg)
        fs = s.get("fsdp", 1)
        if cfg.hidden_size % fs:
            errors.append(f"hidden_size {cfg.hidden_size} is not divisible by fsdp = {fs} (params split on embed)")
    if errors:
        raise ValueError(f"mesh {dict(s)} does not fit:\n  " + "\n  ".join(errors))
    for n in notes:
        log.info("%s", n)
    return notes


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=LOGICAL_RULES):
    """Make `mesh` current and activate the rules table for `nn.with_logical_constraint` in model code."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


# ----------------------------------------------------------------------------------------------
# Param and batch shardings
# ----------------------------------------------------------------------------------------------


def _fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, dropped: list | None = None) -> PartitionSpec:
    """Drop mesh axes from dims they do not divide (e.g. 2 kv heads on a 4-way tensor axis).

    Each drop is appended to `dropped` as (dim index, dim size, mesh axis, axis size).
    """
    fitted = []
    for i, (dim, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
        if axes is None:
            fitted.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        kept = []
        for a in axes:
            if dim % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
                kept.append(a)
            elif dropped is not None:
                dropped.append((i, dim, a, mesh.shape[a]))
        fitted.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return PartitionSpec(*fitted)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def replication_report(abstract_params, mesh: Mesh, rules=LOGICAL_RULES) -> list[dict]:
    """Every param dim a rule would shard but the mesh axis does not divide (so it is replicated instead).

    Rows: {param, logical, dim, size, mesh_axis, axis_size, intended}; `intended` = the logical name is in
    INTENDED_REPLICATION.
    """
    logical = nn.get_partition_spec(abstract_params)
    mesh_specs = nn.logical_to_mesh(logical, rules)
    shapes = nn.unbox(abstract_params)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    flat_l = jax.tree_util.tree_flatten_with_path(logical, is_leaf=is_spec)[0]
    flat_m = jax.tree.leaves(mesh_specs, is_leaf=is_spec)
    flat_s = jax.tree.leaves(shapes)
    rows = []
    for (path, lspec), mspec, leaf in zip(flat_l, flat_m, flat_s):
        dropped = []
        _fit_spec(mspec, leaf.shape, mesh, dropped)
        for i, dim, axis, size in dropped:
            name = tuple(lspec)[i] if i < len(lspec) else None
            rows.append(dict(param=_path_str(path), logical=name, dim=i, size=dim, mesh_axis=axis, axis_size=size,
                             intended=name in INTENDED_REPLICATION))
    return rows


def param_shardings(abstract_params, mesh: Mesh, rules=LOGICAL_RULES, *, strict: bool = False):
    """NamedSharding pytree for a (boxed, from `jax.eval_shape(model.init, ...)`) param tree.

    Dims a mesh axis does not divide are replicated along it; each case is logged (info if intended,
    warning otherwise). strict=True raises ValueError listing the unintended ones instead.
    """
    report = replication_report(abstract_params, mesh, rules)
    unintended = [r for r in report if not r["intended"]]
    lines = [f"{r['param']} dim {r['dim']} ({r['logical']}={r['size']}) not divisible by {r['mesh_axis']}="
             f"{r['axis_size']}: replicated" for r in report]
    if strict and unintended:
        raise ValueError("params do not divide the mesh:\n  " + "\n  ".join(
            ln for ln, r in zip(lines, report) if not r["intended"]))
    for ln, r in zip(lines, report):
        (log.info if r["intended"] else log.warning)("%s", ln)
    specs = nn.get_partition_spec(abstract_params)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = jax.tree.map(lambda x: x.shape, nn.unbox(abstract_params))
    return jax.tree.map(
        lambda spec, shape: NamedSharding(mesh, _fit_spec(spec, shape, mesh)),
        mesh_specs,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def spec_table(shardings) -> dict[str, list]:
    """{param path: partition spec as a JSON-able list} for golden files."""
    out = {}
    for path, sh in jax.tree_util.tree_flatten_with_path(shardings)[0]:
        out[_path_str(path)] = [list(a) if isinstance(a, tuple) else a for a in sh.spec]
    return out


def batch_sharding(mesh: Mesh, ndim: int, batch_size: int) -> NamedSharding:
    """Shard the leading (batch) dim over data x fsdp where it divides, replicate the rest.

    Replication of a batch that does not divide is intended for inference (2 CFG rows on 8 devices) and
    silent; training checks `validate_mesh(batch=...)` first.
    """
    spec = PartitionSpec(BATCH_AXES, *([None] * (ndim - 1)))
    return NamedSharding(mesh, _fit_spec(spec, (batch_size,) + (1,) * (ndim - 1), mesh))


# ----------------------------------------------------------------------------------------------
# Sharded initialisation and restore: no process ever holds a full copy
# ----------------------------------------------------------------------------------------------


def abstract_params(cfg, example_batch=None):
    """Boxed abstract params (ShapeDtypeStruct leaves with logical names) from shapes only."""
    from lance_jax import packing
    from lance_jax.models.lance import init_params

    batch = packing.dummy_stream_batch(cfg) if example_batch is None else example_batch
    return jax.eval_shape(lambda r: init_params(cfg, r, batch), jax.random.PRNGKey(0))


def param_plan(cfg, mesh: Mesh, *, strict: bool = False, example_batch=None):
    """(boxed abstract params, NamedSharding tree): the one plan shared by init, restore and AOT compiles."""
    boxed = abstract_params(cfg, example_batch)
    return boxed, param_shardings(boxed, mesh, strict=strict)


def sharded_abstract(abstract_tree, shardings):
    """ShapeDtypeStruct leaves carrying their shardings (for `jit(...).lower` without allocating)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(abstract_tree),
                        shardings)


def init_params_sharded(cfg, mesh: Mesh, rng, *, example_batch=None):
    """Random params materialised directly in their shards: `jit(init, out_shardings=...)`; each device only
    ever allocates its own slice (XLA partitions the initialiser), no host holds the full tree."""
    from lance_jax import packing
    from lance_jax.models.lance import init_params

    boxed, shardings = param_plan(cfg, mesh, example_batch=example_batch)
    batch = packing.dummy_stream_batch(cfg) if example_batch is None else example_batch
    with use_mesh(mesh):
        params = jax.jit(lambda r: nn.unbox(init_params(cfg, r, batch)), out_shardings=shardings)(rng)
    return params, shardings


def restore_params_sharded(ckpt: str, cfg, mesh: Mesh, *, items: Sequence[str] = ("lance",)):
    """Params of a converted (orbax) checkpoint, every device reading only its own shard from disk.

    Uses the same `param_plan` as `init_params_sharded`, so restored and fresh params shard identically.
    """
    from lance_jax.convert.converter import restore_params

    _, shardings = param_plan(cfg, mesh)
    out = restore_params(ckpt, {"lance": shardings})
    return {k: v for k, v in out.items() if k in items}, shardings


# ----------------------------------------------------------------------------------------------
# Multi-host
# ----------------------------------------------------------------------------------------------


def initialize_distributed(env=None) -> bool:
    """`jax.distributed.initialize` from the environment; a no-op (False) for a single process.

    Reads LANCE_COORDINATOR (host:port), LANCE_NUM_PROCESSES, LANCE_PROCESS_ID, optionally
    LANCE_LOCAL_DEVICE_IDS (comma list). Without LANCE_COORDINATOR but on a cluster JAX can detect
    (TPU pods, SLURM, ...), LANCE_DISTRIBUTED=auto calls `initialize()` with no arguments.
    Must run before anything touches a JAX backend.
    """
    env = os.environ if env is None else env
    addr = env.get("LANCE_COORDINATOR")
    if not addr:
        if env.get("LANCE_DISTRIBUTED", "") == "auto":
            jax.distributed.initialize()
            return True
        return False
    n = int(env["LANCE_NUM_PROCESSES"])
    pid = int(env["LANCE_PROCESS_ID"])
    local = env.get("LANCE_LOCAL_DEVICE_IDS")
    kw = dict(local_device_ids=[int(x) for x in local.split(",")]) if local else {}
    jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid, **kw)
    return True


def host_local_batch_slice(global_batch: int) -> slice:
    """Rows of the global batch this process loads (contiguous, process-major like `jax.devices()`)."""
    n, i = jax.process_count(), jax.process_index()
    if global_batch % n:
        raise ValueError(f"global batch {global_batch} is not divisible by {n} processes")
    per = global_batch // n
    return slice(i * per, (i + 1) * per)


def global_batch_from_local(local: dict, mesh: Mesh, global_batch: int) -> dict:
    """Assemble global jax.Arrays from each process's rows (`host_local_batch_slice`)."""
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        sh = batch_sharding(mesh, v.ndim, global_batch)
        out[k] = jax.make_array_from_process_local_data(sh, v, (global_batch,) + v.shape[1:])
    return out
