"""Device meshes and the one table that maps logical axis names to mesh axes.

Every param declares logical names (`embed`, `mlp`, `q_heads`, ...) and every large activation is
constrained with `activation_*` names; `LOGICAL_RULES` is the only place that says which mesh axis
shards which name. The same model code runs on 1 CPU, 8 fake CPU devices, a GPU mesh or a TPU pod.
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, object], ...] = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
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


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over `devices` (default: all) with axes MESH_AXES; sizes given by name, -1 = the rest."""
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape or {"fsdp": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; known: {MESH_AXES}")
    sizes = [shape.get(a, 1) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into mesh {shape}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=LOGICAL_RULES):
    """Make `mesh` current and activate the rules table for `nn.with_logical_constraint` in model code."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def _fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes from dims they do not divide (e.g. 2 kv heads on a 4-way tensor axis)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fitted.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        kept = []
        for a in axes:
            if dim % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
                kept.append(a)
        fitted.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return PartitionSpec(*fitted)


def param_shardings(abstract_params, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedSharding pytree for a (boxed, from `jax.eval_shape(model.init, ...)`) param tree."""
    specs = nn.get_partition_spec(abstract_params)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = jax.tree.map(lambda x: x.shape, nn.unbox(abstract_params))
    return jax.tree.map(
        lambda spec, shape: NamedSharding(mesh, _fit_spec(spec, shape, mesh)),
        mesh_specs,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh: Mesh, ndim: int, batch_size: int) -> NamedSharding:
    """Shard the leading (batch) dim over data x fsdp where it divides, replicate the rest."""
    spec = PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1)))
    return NamedSharding(mesh, _fit_spec(spec, (batch_size,) + (1,) * (ndim - 1), mesh))
