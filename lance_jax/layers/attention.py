"""Joint attention over a packed multimodal sequence, masked by the predicate of `masking.py`.

Two implementations share the predicate:

* `dense_attention` builds the (B, Nq, Nk) bool mask and the full score matrix. Reference path for
  tests and short sequences.
* `blockwise_attention` is flash-attention style: queries are processed block by block (`lax.map`),
  keys are scanned block by block with online-softmax accumulators, and the mask of each tile is
  recomputed on the fly from the ints. No N x N array exists in the forward or the backward pass (a
  `jax.custom_vjp` recomputes the tiles from the saved log-sum-exp, FlashAttention-2 style).
  Reverse-mode only (`jax.grad`/`vjp`); forward-mode through it is not supported by `custom_vjp`.
  With `skip_empty_tiles`, tiles that cannot hold an allowed pair (`live_tiles`) are branched around.

Numerics for both: scores and softmax statistics in float32 whatever the input dtype; matmuls take
the input dtype with `preferred_element_type=float32`; probabilities are cast to the value dtype
before the PV matmul; output is cast back to `q.dtype`. Query rows with no allowed key give 0.

Shapes: q (B, Nq, Nh, Dh); k, v (B, Nk, Nkv, Dh), Nh % Nkv == 0, query head h uses kv head
h // (Nh // Nkv) (contiguous grouping, as HF `repeat_kv`). Token ints are int32 (B, Nq) / (B, Nk)
(a leading batch dim of 1 is broadcast). Nq may differ from Nk (KV-cache chunk queries against
cache + chunk keys); causality compares `order` only, so array positions never matter.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lance_jax.layers.masking import MODE_CAUSAL, MODE_FULL, MODE_NOISE, MaskTokens, broadcast_tokens, allowed_mask

# ----------------------------------------------------------------------------------------------
# Dense reference
# ----------------------------------------------------------------------------------------------


def _check_shapes(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("q, k, v must be (B, N, heads, head_dim)")
    B, _, Nh, Dh = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape")
    if k.shape[0] != B or k.shape[3] != Dh:
        raise ValueError(f"incompatible q {q.shape} and k {k.shape}")
    Nkv = k.shape[2]
    if Nh % Nkv:
        raise ValueError(f"num query heads {Nh} not a multiple of num kv heads {Nkv}")
    return B, q.shape[1], k.shape[1], Nh, Nkv, Dh


def dense_attention(q, k, v, q_tokens: MaskTokens, k_tokens: MaskTokens, *, scale=None):
    """Reference attention with a materialised (B, Nq, Nk) mask."""
    B, Nq, Nk, Nh, Nkv, Dh = _check_shapes(q, k, v)
    G = Nh // Nkv
    scale = 1.0 / math.sqrt(Dh) if scale is None else float(scale)
    mask = allowed_mask(broadcast_tokens(q_tokens, B, Nq), broadcast_tokens(k_tokens, B, Nk))
    mask = mask[:, None, None]  # (B, 1, 1, Nq, Nk)
    qg = q.reshape(B, Nq, Nkv, G, Dh)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)  # exactly 0 where masked (exp(-inf)); no NaN in value or gradient
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l > 0, l, 1.0)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(B, Nq, Nh, Dh).astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# Blockwise (flash) path
# ----------------------------------------------------------------------------------------------


def _block_q(x, nb, bs):
    """(B, nb*bs, ...) -> (nb, B, bs, ...)."""
    B = x.shape[0]
    return jnp.swapaxes(x.reshape((B, nb, bs) + x.shape[2:]), 0, 1)


def _varying_axes(a) -> frozenset:
    """Manual mesh axes `a` varies over (its aval's `manual_axis_type.varying`; `vma` before jax 0.10)."""
    aval = jax.typeof(a)
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def _vary_like(x, *refs):
    """`x` (a fresh scan carry) marked as varying over every manual mesh axis some of `refs` vary over.

    Inside `jax.shard_map` (context parallelism) a scan's carry must have the same varying-axes type
    in and out; the loop's outputs vary like its inputs, so the zeros / -inf inits must too. Outside
    a shard_map every vma is empty and this returns `x` unchanged.
    """
    want = frozenset().union(*(_varying_axes(r) for r in jax.tree.leaves(refs)))
    missing = tuple(sorted(want - _varying_axes(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _tile_scores(qi, kj, qti, ktj, scale):
    """Masked fp32 scores of one tile: (B, Nkv, G, bq, bk), -inf where not allowed."""
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qi, kj, preferred_element_type=jnp.float32) * scale
    mask = allowed_mask(qti, ktj)[:, None, None]
    return jnp.where(mask, s, -jnp.inf)


def _ranges(values, valid):
    """(nb, B, bs) ints -> lowest and highest valid value of every block, (nb, B) each (none valid: lo > hi)."""
    big = jnp.iinfo(jnp.int32).max
    return jnp.min(jnp.where(valid, values, big), axis=-1), jnp.max(jnp.where(valid, values, -big), axis=-1)


def _overlap(a, b):
    """Ranges (lo, hi) of query blocks (nq, B) and key blocks (nk, B) -> (nq, nk, B): do they intersect."""
    return jnp.maximum(a[0][:, None], b[0][None]) <= jnp.minimum(a[1][:, None], b[1][None])


def live_tiles(q_blocks: MaskTokens, k_blocks: MaskTokens):
    """(nq, nk) bool from block-split mask ints ((nb, B, bs) each): tiles that may hold an allowed pair.

    A pair is allowed only within one sample, and only if the key is not later than the query or both
    are in the same full/noise split (`masking.allowed_mask`). A tile fails that for every pair when its
    query and key blocks share no sample id, or when every key is later than every query and the blocks
    share no full split; its contribution is exactly zero. Conservative: a live tile may still be fully
    masked; its mask is applied as usual.
    """
    def stats(t):
        real = t.sample >= 0
        fn = jnp.where((t.mode == MODE_FULL) | (t.mode == MODE_NOISE), t.split, -1)
        return _ranges(t.sample, real), _ranges(t.order, real), _ranges(fn, real & (fn >= 0))

    (qs, qo, qf), (ks, ko, kf) = stats(q_blocks), stats(k_blocks)
    earlier_key = ko[0][None] <= qo[1][:, None]  # some key not later than some query
    return jnp.any(_overlap(qs, ks) & (earlier_key | _overlap(qf, kf)), axis=-1)


def _tile_or_skip(skip, live, body, carry, xs):
    """`body(carry, xs)`, or `carry` unchanged for a dead tile when skipping (a real branch on CPU/TPU)."""
    if not skip:
        return body(carry, xs)
    return jax.lax.cond(live, body, lambda c, _: c, carry, xs)


def _flash_fwd_impl(q, k, v, qt, kt, scale, bq, bk, skip):
    """q (B, Nq, Nkv, G, Dh), k/v (B, Nk, Nkv, Dh); Nq % bq == Nk % bk == 0.

    Returns out (B, Nq, Nkv, G, Dh) in q.dtype and lse (nq, B, Nkv, G, bq) fp32 (0 for empty rows).
    """
    B, Nq, Nkv, G, Dh = q.shape
    Nk = k.shape[1]
    nq, nk = Nq // bq, Nk // bk
    qb, qtb = _block_q(q, nq, bq), MaskTokens(*(_block_q(a, nq, bq) for a in qt))
    kb, vb = _block_q(k, nk, bk), _block_q(v, nk, bk)
    ktb = MaskTokens(*(_block_q(a, nk, bk) for a in kt))
    live = live_tiles(qtb, ktb) if skip else jnp.ones((nq, nk), bool)

    def q_block(args):
        qi, qti, live_i = args

        def k_step(carry, xs):
            return _tile_or_skip(skip, xs[-1], k_tile, carry, xs[:-1]), None

        def k_tile(carry, xs):
            acc, m, l = carry
            kj, vj, ktj = xs
            s = _tile_scores(qi, kj, qti, ktj, scale)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            alpha = jnp.exp(m - m_safe)  # m = -inf -> 0
            p = jnp.exp(s - m_safe[..., None])  # masked -> 0
            l = alpha * l + jnp.sum(p, axis=-1)
            pv = jnp.einsum(
                "bhgqk,bkhd->bhgqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32
            )
            acc = alpha[..., None] * acc + pv
            return acc, m_new, l

        init = tuple(_vary_like(a, qi, qti, kb, vb, ktb) for a in (
            jnp.zeros((B, Nkv, G, bq, Dh), jnp.float32),
            jnp.full((B, Nkv, G, bq), -jnp.inf, jnp.float32),
            jnp.zeros((B, Nkv, G, bq), jnp.float32),
        ))
        (acc, m, l), _ = jax.lax.scan(k_step, init, (kb, vb, ktb, live_i))
        nonempty = l > 0
        l_safe = jnp.where(nonempty, l, 1.0)
        o = acc / l_safe[..., None]
        lse = jnp.where(nonempty, m + jnp.log(l_safe), 0.0)
        return jnp.transpose(o, (0, 3, 1, 2, 4)).astype(q.dtype), lse  # (B, bq, Nkv, G, Dh)

    ob, lse = jax.lax.map(q_block, (qb, qtb, live))
    out = jnp.swapaxes(ob, 0, 1).reshape(B, Nq, Nkv, G, Dh)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, qt, kt, scale, bq, bk, skip):
    return _flash_fwd_impl(q, k, v, qt, kt, scale, bq, bk, skip)[0]


def _flash_fwd(q, k, v, qt, kt, scale, bq, bk, skip):
    out, lse = _flash_fwd_impl(q, k, v, qt, kt, scale, bq, bk, skip)
    return out, (q, k, v, qt, kt, out, lse)


def _flash_bwd(scale, bq, bk, skip, res, dout):
    q, k, v, qt, kt, out, lse = res
    B, Nq, Nkv, G, Dh = q.shape
    Nk = k.shape[1]
    nq, nk = Nq // bq, Nk // bk
    # D_i = sum_d dO_i * O_i  (= sum_j P_ij dP_ij), fp32, laid out like lse: (nq, B, Nkv, G, bq)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # (B,Nq,Nkv,G)
    delta = jnp.transpose(_block_q(delta, nq, bq), (0, 1, 3, 4, 2))
    qb, dob = _block_q(q, nq, bq), _block_q(dout.astype(q.dtype), nq, bq)
    qtb = MaskTokens(*(_block_q(a, nq, bq) for a in qt))
    kb, vb = _block_q(k, nk, bk), _block_q(v, nk, bk)
    ktb = MaskTokens(*(_block_q(a, nk, bk) for a in kt))
    live = live_tiles(qtb, ktb) if skip else jnp.ones((nq, nk), bool)

    def k_block(dq_all, xs):
        kj, vj, ktj, live_j = xs

        def q_step(carry, xs2):
            (dk, dv), dqi = _tile_or_skip(skip, xs2[-1], q_tile, (carry, xs2[-2]), xs2[:-2])
            return (dk, dv), dqi

        def q_tile(carry, xs2):
            (dk, dv), dqi = carry
            qi, doi, lsei, di, qti = xs2
            s = _tile_scores(qi, kj, qti, ktj, scale)
            p = jnp.exp(s - lsei[..., None])  # (B, Nkv, G, bq, bk); masked -> 0
            dv = dv + jnp.einsum(
                "bhgqk,bqhgd->bkhd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32
            )
            dp = jnp.einsum("bqhgd,bkhd->bhgqk", doi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - di[..., None]) * scale
            dqi = dqi + jnp.einsum(
                "bhgqk,bkhd->bqhgd", ds.astype(kj.dtype), kj, preferred_element_type=jnp.float32
            )
            dk = dk + jnp.einsum(
                "bhgqk,bqhgd->bkhd", ds.astype(qi.dtype), qi, preferred_element_type=jnp.float32
            )
            return (dk, dv), dqi

        zeros_kv = _vary_like(jnp.zeros((B, bk, Nkv, Dh), jnp.float32), kj, vj, ktj, qb, dob, lse, delta, qtb)
        (dk, dv), dq_all = jax.lax.scan(
            q_step, (zeros_kv, zeros_kv), (qb, dob, lse, delta, qtb, dq_all, live_j)
        )
        return dq_all, (dk, dv)

    dq0 = _vary_like(jnp.zeros((nq, B, bq, Nkv, G, Dh), jnp.float32), qb, dob, lse, delta, qtb, kb, vb, ktb)
    dqb, (dkb, dvb) = jax.lax.scan(k_block, dq0, (kb, vb, ktb, live.T))
    dq = jnp.swapaxes(dqb, 0, 1).reshape(q.shape).astype(q.dtype)
    dk = jnp.swapaxes(dkb, 0, 1).reshape(k.shape).astype(k.dtype)
    dv = jnp.swapaxes(dvb, 0, 1).reshape(v.shape).astype(v.dtype)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_tokens(t: MaskTokens, n_pad: int) -> MaskTokens:
    if n_pad == 0:
        return t
    pad = lambda a, val: jnp.pad(a, ((0, 0), (0, n_pad)), constant_values=val)  # noqa: E731
    # sample -1 matches nothing (the predicate requires sample >= 0)
    return MaskTokens(
        order=pad(t.order, 0), sample=pad(t.sample, -1), split=pad(t.split, -1),
        mode=pad(t.mode, MODE_CAUSAL),
    )


def _round_up(n, m):
    return -(-n // m) * m


def blockwise_attention(
    q, k, v, q_tokens: MaskTokens, k_tokens: MaskTokens, *, scale=None, block_q=512, block_k=512,
    skip_empty_tiles=False,
):
    """Memory-bounded attention: online softmax over key blocks, tile masks from the ints.

    Block sizes are clamped to the sequence lengths; Nq / Nk are padded internally up to a
    multiple of the block size with tokens of sample id -1 (never attended, output dropped).
    `skip_empty_tiles`: branch around tiles whose query and key blocks share no sample id (`live_tiles`),
    forward and backward. Same result; on packed rows of several samples most tiles are such. A
    `lax.cond` per tile is a real branch on CPU and TPU; on GPU it syncs the predicate to the host, so
    leave it off there.
    """
    B, Nq, Nk, Nh, Nkv, Dh = _check_shapes(q, k, v)
    G = Nh // Nkv
    scale = 1.0 / math.sqrt(Dh) if scale is None else float(scale)
    if block_q < 1 or block_k < 1:
        raise ValueError("block sizes must be positive")
    bq, bk = min(int(block_q), Nq), min(int(block_k), Nk)
    if Nq == 0:
        return jnp.zeros(q.shape, q.dtype)
    if Nk == 0:
        return jnp.zeros(q.shape, q.dtype)
    Nqp, Nkp = _round_up(Nq, bq), _round_up(Nk, bk)
    qt = _pad_tokens(broadcast_tokens(q_tokens, B, Nq), Nqp - Nq)
    kt = _pad_tokens(broadcast_tokens(k_tokens, B, Nk), Nkp - Nk)
    qg = q.reshape(B, Nq, Nkv, G, Dh)
    if Nqp != Nq:
        qg = jnp.pad(qg, ((0, 0), (0, Nqp - Nq), (0, 0), (0, 0), (0, 0)))
    if Nkp != Nk:
        kv_pad = ((0, 0), (0, Nkp - Nk), (0, 0), (0, 0))
        k, v = jnp.pad(k, kv_pad), jnp.pad(v, kv_pad)
    # Tie the mask ints to the queries. Under a scan over layers (tokens broadcast, i.e. scan consts), JAX's
    # scan partial eval hoists every computation that depends on consts only out of the loop, and inside the
    # kernel's own loops that stacks the mask of every (query block, key block) tile: an Nq x Nk x heads bool
    # array live across the layer loop (64-128 GiB per device in the 3B train plans). After the barrier the
    # ints depend on q (a loop value), so each tile's mask is recomputed in the loops as intended. A no-op on
    # values and gradients (tests/test_context_parallel.py checks the differentiated jaxpr).
    qg, qt, kt = jax.lax.optimization_barrier((qg, qt, kt))
    if skip_empty_tiles and B > 1:
        # one row at a time: a tile is then skipped when it is empty in its own row, not in every row
        def row(args):
            q1, k1, v1, qt1, kt1 = jax.tree.map(lambda x: x[None], args)
            return _flash(q1, k1, v1, qt1, kt1, scale, bq, bk, True)[0]

        out = jax.lax.map(row, (qg, k, v, qt, kt))
    else:
        out = _flash(qg, k, v, qt, kt, scale, bq, bk, bool(skip_empty_tiles))
    return out[:, :Nq].reshape(B, Nq, Nh, Dh)


# ----------------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------------


def attention(
    q, k, v, q_tokens: MaskTokens, k_tokens: MaskTokens, *, impl="auto", scale=None,
    block_q=512, block_k=512, dense_max_len=4096, skip_empty_tiles=False,
):
    """Joint masked attention.  ``impl``: 'dense', 'blockwise', or 'auto' (dense when
    Nq * Nk <= dense_max_len**2, else blockwise); `skip_empty_tiles` applies to blockwise."""
    if impl == "auto":
        impl = "dense" if q.shape[1] * k.shape[1] <= dense_max_len**2 else "blockwise"
    if impl == "dense":
        return dense_attention(q, k, v, q_tokens, k_tokens, scale=scale)
    if impl == "blockwise":
        return blockwise_attention(
            q, k, v, q_tokens, k_tokens, scale=scale, block_q=block_q, block_k=block_k,
            skip_empty_tiles=skip_empty_tiles,
        )
    raise ValueError(f"unknown attention impl {impl!r}; expected 'auto', 'dense' or 'blockwise'")
