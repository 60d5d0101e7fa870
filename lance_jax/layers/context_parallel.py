"""Context-parallel attention: local queries against all-gathered keys / values, inside `jax.shard_map`.

With a mesh whose `context` axis is > 1, the token dim of every activation is split over `context`.
Left to GSPMD, the blockwise kernel of `attention.py` does not keep that split: its `lax.map` over
query blocks runs over a gathered dim, so every device holds full-length temporaries (and computes
every query row). Here the attention core runs under `jax.shard_map` with every mesh axis manual:

* queries (and their mask ints) stay local: each device attends with its own N / context rows;
* keys / values (and their mask ints) are `all_gather`ed over `context` inside the map, so the key
  order is exactly the single-device order (past cache rows first, then the pieces in order);
* the local kernel is the unchanged `attention.attention` (dense or blockwise, chosen on the local
  shapes: its `dense_max_len` budget is a per-call, hence per-device, budget);
* reverse mode differentiates `all_gather` into a reduce-scatter (`psum_scatter`) of dK / dV, so the
  backward moves the same bytes as the forward and holds only local dQ.

Sequences are given as *pieces* (the backbone's und and gen streams): each piece is split over
`context` on its own, the device's query block is the concatenation of its local slices of every
piece. That matches how the residual streams are sharded (each stream over `context` separately), so
no concatenate-then-reshard of the whole sequence is needed. Array positions never matter to the
mask predicate (causality compares `order`), only the key order matters for the fp32 summation order,
and it is the global one.

Other mesh axes: batch over the ('data', 'fsdp') axes that divide it (else replicated, e.g. 2 CFG rows
on 4-way fsdp), query heads over `tensor` when it divides them. GQA kv heads are split over `tensor`
when it divides them too; otherwise (2 kv heads on a 4-way tensor axis) K/V come in replicated over
`tensor` and each device slices the kv head its local query heads use (autodiff sums dK / dV over
`tensor`). A head layout that fits neither leaves heads unsplit (each tensor shard computes all heads).

Shapes: q pieces (B, n_i, Nh, Dh); k / v pieces (B, n_i, Nkv, Dh); token pieces MaskTokens of (B, n_i)
(a leading 1 is broadcast); `past` = (k, v, tokens) of (B, L, Nkv, Dh) / (B, L), replicated over
`context`. Every n_i must divide by the context size (`context_parallel_fits`).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lance_jax.layers.attention import attention
from lance_jax.layers.masking import MaskTokens, broadcast_tokens

CONTEXT = "context"
TENSOR = "tensor"
BATCH_AXES = ("data", "fsdp")


def context_size(mesh=None) -> int:
    """Size of the `context` axis of `mesh` (default: the current abstract mesh, `jax.set_mesh`); 1 if none."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty or CONTEXT not in mesh.axis_names:
        return 1
    return int(mesh.shape[CONTEXT])


def context_parallel_fits(lengths: Sequence[int], mesh=None) -> bool:
    """True when the current mesh has context > 1 and every (non-empty) piece length divides by it."""
    c = context_size(mesh)
    return c > 1 and all(n % c == 0 for n in lengths)


def _batch_spec(batch: int, mesh):
    """The ('data', 'fsdp') axes that split `batch` (in order, as `sharding.batch_sharding` keeps them)."""
    kept = []
    for a in BATCH_AXES:
        if a in mesh.axis_names and batch % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
            kept.append(a)
    return tuple(kept) if len(kept) > 1 else (kept[0] if kept else None)


def _head_layout(nh: int, nkv: int, mesh):
    """(q head spec, kv head spec, kv heads each device slices or 0): how heads split over `tensor`."""
    tp = int(mesh.shape[TENSOR]) if TENSOR in mesh.axis_names else 1
    if tp == 1 or nh % tp:
        return None, None, 0
    if nkv % tp == 0:
        return TENSOR, TENSOR, 0
    nh_local, group = nh // tp, nh // nkv
    if group % nh_local == 0:  # all local query heads share one kv head: slice it from the replicated K/V
        return TENSOR, None, 1
    return None, None, 0


def context_parallel_attention(
    q_parts: Sequence[jax.Array], k_parts: Sequence[jax.Array], v_parts: Sequence[jax.Array],
    token_parts: Sequence[MaskTokens], *, past: tuple[jax.Array, jax.Array, MaskTokens] | None = None,
    impl: str = "auto", scale=None, block_q: int = 512, block_k: int = 512, dense_max_len: int = 4096,
    skip_empty_tiles: bool = False, mesh=None,
) -> tuple[jax.Array, ...]:
    """Joint masked attention of the concatenated pieces (plus `past` keys) with queries split over `context`.

    Equals `attention(concat(q_parts), concat([past_k] + k_parts), ..., concat(token_parts),
    concat([past_tokens] + token_parts))` split back into pieces: returns one (B, n_i, Nh, Dh) array per
    piece, in q.dtype, sharded like its query piece. `mesh`: default the current abstract mesh.
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    c = context_size(mesh)
    if not (len(q_parts) == len(k_parts) == len(v_parts) == len(token_parts)) or not q_parts:
        raise ValueError("need one k, v and token piece per query piece (at least one)")
    lengths = [q.shape[1] for q in q_parts]
    if c == 1 or any(n % c for n in lengths):
        raise ValueError(f"piece lengths {lengths} do not split over context = {c} (check context_parallel_fits)")
    B, _, nh, dh = q_parts[0].shape
    nkv = k_parts[0].shape[2]
    keep = [i for i, n in enumerate(lengths) if n > 0]  # empty pieces (e.g. no gen tokens) take no part
    if not keep:
        return tuple(jnp.zeros(q.shape, q.dtype) for q in q_parts)
    qs = [q_parts[i] for i in keep]
    ks = [k_parts[i] for i in keep]
    vs = [v_parts[i] for i in keep]
    ts = [broadcast_tokens(token_parts[i], B, lengths[i]) for i in keep]

    b = _batch_spec(B, mesh)
    q_heads, kv_heads, kv_slice = _head_layout(nh, nkv, mesh)
    q_spec, kv_spec, t_spec = P(b, CONTEXT, q_heads, None), P(b, CONTEXT, kv_heads, None), P(b, CONTEXT)
    args = [qs, ks, vs, [MaskTokens(*t) for t in ts]]
    specs = [[q_spec] * len(qs), [kv_spec] * len(ks), [kv_spec] * len(vs), [MaskTokens(*[t_spec] * 4)] * len(ts)]
    if past is not None:
        pk, pv, pt = past
        args.append((pk, pv, broadcast_tokens(pt, B, pk.shape[1])))
        specs.append((P(b, None, kv_heads, None), P(b, None, kv_heads, None), MaskTokens(*[P(b, None)] * 4)))
    else:
        args.append(None)
        specs.append(None)
    nh_local = nh // mesh.shape[TENSOR] if q_heads else nh

    def local(qs, ks, vs, ts, past):
        gather = lambda a: jax.lax.all_gather(a, CONTEXT, axis=1, tiled=True)  # noqa: E731  (B, n_i, ...)
        q = jnp.concatenate(qs, axis=1)  # this device's query rows of every piece
        qt = MaskTokens(*(jnp.concatenate(a, axis=1) for a in zip(*ts)))
        k = [gather(a) for a in ks]
        v = [gather(a) for a in vs]
        kt = [MaskTokens(*(gather(a) for a in t)) for t in ts]
        if past is not None:
            k, v, kt = [past[0].astype(k[0].dtype)] + k, [past[1].astype(v[0].dtype)] + v, [past[2]] + kt
        k, v = jnp.concatenate(k, axis=1), jnp.concatenate(v, axis=1)
        kt = MaskTokens(*(jnp.concatenate(a, axis=1) for a in zip(*kt)))
        if kv_slice:  # replicated GQA kv heads: the one kv head of this device's query heads
            head = jax.lax.axis_index(TENSOR) * nh_local // (nh // nkv)
            k = jax.lax.dynamic_slice_in_dim(k, head, 1, axis=2)
            v = jax.lax.dynamic_slice_in_dim(v, head, 1, axis=2)
        out = attention(q, k, v, qt, kt, impl=impl, scale=scale, block_q=block_q, block_k=block_k,
                        dense_max_len=dense_max_len, skip_empty_tiles=skip_empty_tiles)
        ends = [sum(a.shape[1] for a in qs[: i + 1]) for i in range(len(qs) - 1)]  # local piece boundaries
        return tuple(jnp.split(out, ends, axis=1))

    outs = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=tuple([q_spec] * len(qs)))(*args)
    result = [jnp.zeros(q.shape, q.dtype) for q in q_parts]
    for i, o in zip(keep, outs):
        result[i] = o
    return tuple(result)
