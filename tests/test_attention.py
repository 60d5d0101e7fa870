"""Tests for lance_jax.layers.attention and masking: mask predicate, dense vs blockwise attention."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lance_jax.layers.attention import _block_q, _pad_tokens, attention, blockwise_attention, dense_attention, live_tiles
from lance_jax.layers.masking import MODE_CAUSAL, MODE_FULL, MODE_NOISE, MaskTokens, allowed_mask, mask_tokens_from_splits

jax.config.update("jax_default_matmul_precision", "highest")

# Tolerance for blockwise vs dense: both run in fp32 with 'highest' matmul precision, so they
# compute the same exact quantity and differ only by rounding: different summation order of the
# softmax denominator / PV products across key blocks and the online-softmax rescaling
# exp(m_old - m_new) (a few fp32 ulps per block step).  Measured ~1e-7 relative to max|out|
# (grads ~5e-7); 1e-5 leaves >10x margin while any masking mistake gives O(1e-1..1) differences.
RTOL = 1e-5

MODE_NAMES = ["causal", "full", "full_noise", "noise"]


def _batch(d: dict) -> MaskTokens:
    return MaskTokens(**{k: np.asarray(v)[None] for k, v in d.items()})


def _stack(ds: list[dict]) -> MaskTokens:
    return MaskTokens(**{k: np.stack([d[k] for d in ds]) for k in ds[0]})


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30)


def random_layout(rng: np.random.Generator, n: int) -> dict:
    """Random packed layout of exactly n tokens: random samples/splits/modes, then trailing
    pure-padding tokens (sample id -1)."""
    n_real = int(rng.integers(n // 2, n + 1))
    sample_lens, split_lens, modes = [], [], []
    left = n_real
    while left > 0:
        s_len = int(min(left, rng.integers(1, max(2, n_real // 2))))
        sample_lens.append(s_len)
        rem = s_len
        while rem > 0:
            sp = int(min(rem, rng.integers(1, 24)))
            split_lens.append(sp)
            modes.append(MODE_NAMES[int(rng.integers(len(MODE_NAMES)))])
            rem -= sp
        left -= s_len
    d = mask_tokens_from_splits(sample_lens, split_lens, modes)
    pad = n - n_real
    return {
        "order": np.concatenate([d["order"], np.arange(n_real, n, dtype=np.int32)]),
        "sample": np.concatenate([d["sample"], np.full(pad, -1, np.int32)]),
        "split": np.concatenate([d["split"], np.full(pad, -1, np.int32)]),
        "mode": np.concatenate([d["mode"], np.zeros(pad, np.int32)]),
    }


def random_qkv(rng, b, nq, nk, nh=4, nkv=2, dh=8):
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return f(b, nq, nh, dh), f(b, nk, nkv, dh), f(b, nk, nkv, dh)


# ------------------------------------------------------------------------------------------
# 1. golden mask
# ------------------------------------------------------------------------------------------


def test_golden_mask_matches_reference(golden):
    data = golden.arrays("train_forward")
    modes = golden.case_meta("train_forward")["attn_modes"]
    d = mask_tokens_from_splits(data["sample_lens"], data["split_lens"], modes)
    for v in d.values():
        assert v.dtype == np.int32 and v.shape == (int(data["sample_lens"].sum()),)
    got = np.asarray(allowed_mask(_batch(d), _batch(d)))[0]
    want = data["attention_mask_dense"]
    assert got.shape == want.shape
    assert np.array_equal(got, want), f"{np.sum(got != want)} mask entries differ"


def test_mask_tokens_from_splits_validation():
    d = mask_tokens_from_splits([3, 2], [1, 2, 2], ["causal", "full_noise", "noise"])
    np.testing.assert_array_equal(d["order"], np.arange(5))
    np.testing.assert_array_equal(d["sample"], [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(d["split"], [0, 1, 1, 2, 2])
    np.testing.assert_array_equal(d["mode"], [MODE_CAUSAL, MODE_FULL, MODE_FULL, MODE_NOISE, MODE_NOISE])
    d = mask_tokens_from_splits([2], [2], ["full_noise_target"])
    np.testing.assert_array_equal(d["mode"], [MODE_FULL, MODE_FULL])
    with pytest.raises(ValueError, match="bogus_mode"):
        mask_tokens_from_splits([2], [2], ["bogus_mode"])
    with pytest.raises(ValueError):
        mask_tokens_from_splits([3], [2], ["causal"])  # lengths disagree
    with pytest.raises(ValueError):
        mask_tokens_from_splits([2, 2], [1, 2, 1], ["causal"] * 3)  # split straddles samples


# ------------------------------------------------------------------------------------------
# 5. hand-checked predicate
# ------------------------------------------------------------------------------------------

# sample 0: T0 T1 | F2 F3 (full) | N4 N5 (noise) | T6 T7
# sample 1: T8 | N9 N10 (noise) | N11 (another noise split) | T12
# pure padding: P13 (sample -1)
HAND_EXPECTED = """
k: 0123456789abcd
0  1.............
1  11............
2  1111..........
3  1111..........
4  111111........
5  111111........
6  1111..1.......
7  1111..11......
8  ........1.....
9  ........111...
a  ........111...
b  ........1..1..
c  ........1...1.
d  ..............
"""


def _hand_tokens():
    d = mask_tokens_from_splits(
        [8, 5],
        [2, 2, 2, 2, 1, 2, 1, 1],
        ["causal", "full", "noise", "causal", "causal", "noise", "noise", "causal"],
    )
    d = {
        "order": np.append(d["order"], 13),
        "sample": np.append(d["sample"], -1),
        "split": np.append(d["split"], 8),
        "mode": np.append(d["mode"], MODE_CAUSAL),
    }
    return {k: v.astype(np.int32) for k, v in d.items()}


def test_predicate_hand_checked():
    rows = [r.split()[1] for r in HAND_EXPECTED.strip().splitlines()[1:]]
    want = np.array([[c == "1" for c in r] for r in rows])
    t = _batch(_hand_tokens())
    got = np.asarray(allowed_mask(t, t))[0]
    np.testing.assert_array_equal(got, want)
    # spot checks of the stated semantics
    assert not got[6, 4] and not got[7, 5]  # noise split invisible to later text
    assert got[2, 3] and got[3, 2]  # full split bidirectional
    assert got[4, 5] and got[5, 4]  # noise split bidirectional internally
    assert got[1, 0] and not got[0, 1]  # causal elsewhere
    assert not got[11, 9]  # a noise split cannot see another noise split
    assert not got[8:, :8].any() and not got[:8, 8:].any()  # samples isolated


def test_predicate_uses_order_not_position():
    t = _hand_tokens()
    perm = np.random.default_rng(0).permutation(len(t["order"]))
    tp = {k: v[perm] for k, v in t.items()}
    m = np.asarray(allowed_mask(_batch(t), _batch(t)))[0]
    mp = np.asarray(allowed_mask(_batch(tp), _batch(tp)))[0]
    np.testing.assert_array_equal(mp, m[np.ix_(perm, perm)])


# ------------------------------------------------------------------------------------------
# 2./3. blockwise == dense, forward and gradients
# ------------------------------------------------------------------------------------------

# (seed, n, block_q, block_k, permute, n_query) ; n_query < n means the queries are the last
# n_query tokens (a KV-cache chunk) against all n keys.
CASES = [
    (0, 203, 64, 48, False, None),
    (1, 150, 32, 64, True, None),
    (2, 257, 512, 512, False, None),  # blocks clamp to N: single tile
    (3, 190, 16, 40, False, 37),  # Nq != Nk
    (4, 177, 24, 32, True, 50),  # Nq != Nk with permuted order
]


def _case_inputs(seed, n, permute, n_query, b=2):
    rng = np.random.default_rng(seed)
    layouts = [random_layout(rng, n) for _ in range(b)]
    if permute:
        for i, d in enumerate(layouts):
            p = rng.permutation(n)
            layouts[i] = {k: v[p] for k, v in d.items()}
    kt = _stack(layouts)
    nq = n if n_query is None else n_query
    qt = MaskTokens(*(a[:, n - nq:] for a in kt))
    q, k, v = random_qkv(rng, b, nq, n)
    return q, k, v, qt, kt


@pytest.mark.parametrize("seed,n,bq,bk,permute,n_query", CASES)
def test_blockwise_matches_dense(seed, n, bq, bk, permute, n_query):
    q, k, v, qt, kt = _case_inputs(seed, n, permute, n_query)

    @jax.jit
    def run(q, k, v, qt, kt):
        ref = dense_attention(q, k, v, qt, kt)
        blk = blockwise_attention(q, k, v, qt, kt, block_q=bq, block_k=bk)
        # the dispatcher: 'auto' must pick blockwise here (Nq*Nk > 16**2)
        auto = attention(q, k, v, qt, kt, impl="auto", dense_max_len=16, block_q=bq, block_k=bk)
        return ref, blk, auto

    ref, blk, auto = run(q, k, v, qt, kt)
    assert blk.shape == q.shape and blk.dtype == q.dtype
    assert np.isfinite(np.asarray(blk)).all() and np.isfinite(np.asarray(ref)).all()
    assert _rel_err(ref, blk) <= RTOL
    assert np.array_equal(np.asarray(auto), np.asarray(blk))


@pytest.mark.parametrize("seed,n,bq,bk,permute,n_query", [CASES[0], CASES[4]])
def test_blockwise_gradients_match_dense(seed, n, bq, bk, permute, n_query):
    q, k, v, qt, kt = _case_inputs(seed, n, permute, n_query)
    ct = jnp.asarray(np.random.default_rng(100 + seed).normal(size=q.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, qt, kt) * ct)

    g_ref = jax.jit(jax.grad(loss(dense_attention), argnums=(0, 1, 2)))(q, k, v)
    blk = lambda *a: blockwise_attention(*a, block_q=bq, block_k=bk)  # noqa: E731
    g_blk = jax.jit(jax.grad(loss(blk), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", g_ref, g_blk):
        assert np.isfinite(np.asarray(b)).all(), name
        assert _rel_err(a, b) <= RTOL, name


@pytest.mark.parametrize("seed,n,bq,bk,permute,n_query", [CASES[0], CASES[1], CASES[3]])
def test_skipping_empty_tiles_matches_dense(seed, n, bq, bk, permute, n_query):
    """Forward and gradients with dead tiles skipped (per batch row) equal the dense reference."""
    q, k, v, qt, kt = _case_inputs(seed, n, permute, n_query)
    ct = jnp.asarray(np.random.default_rng(200 + seed).normal(size=q.shape), jnp.float32)
    skip = lambda *a: blockwise_attention(*a, block_q=bq, block_k=bk, skip_empty_tiles=True)  # noqa: E731
    assert _rel_err(jax.jit(dense_attention)(q, k, v, qt, kt), jax.jit(skip)(q, k, v, qt, kt)) <= RTOL

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, qt, kt) * ct)

    g_ref = jax.jit(jax.grad(loss(dense_attention), argnums=(0, 1, 2)))(q, k, v)
    g_skip = jax.jit(jax.grad(loss(skip), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", g_ref, g_skip):
        assert _rel_err(a, b) <= RTOL, name


def _tile_masks(qt, kt, bq, bk):
    """(exact nonempty tiles (B, nq, nk), live_tiles (nq, nk)) of token ints padded to the block sizes."""
    nq, nk = -(-qt.order.shape[1] // bq), -(-kt.order.shape[1] // bk)
    qp, kp = _pad_tokens(qt, nq * bq - qt.order.shape[1]), _pad_tokens(kt, nk * bk - kt.order.shape[1])
    exact = np.asarray(allowed_mask(qp, kp)).reshape(-1, nq, bq, nk, bk).any(axis=(2, 4))
    live = np.asarray(live_tiles(MaskTokens(*(_block_q(a, nq, bq) for a in qp)),
                                 MaskTokens(*(_block_q(a, nk, bk) for a in kp))))
    return exact, live


@pytest.mark.parametrize("seed,permute", [(0, False), (1, True), (2, False)])
def test_live_tiles_cover_every_allowed_pair(seed, permute):
    """A skipped tile must hold no allowed pair in any row; on packed layouts most empty tiles are found."""
    _, _, _, qt, kt = _case_inputs(seed, 256, permute, None)
    qt, kt = (MaskTokens(*(jnp.asarray(a) for a in t)) for t in (qt, kt))
    exact, live = _tile_masks(qt, kt, 16, 16)
    assert not (exact.any(0) & ~live).any()
    if not permute:  # samples in order: the sample-range test finds nearly every empty tile
        assert (~live).sum() >= 0.8 * (~exact.any(0)).sum() > 0
    for b in range(exact.shape[0]):  # per row, as the batched kernel maps rows
        _, live_b = _tile_masks(MaskTokens(*(a[b:b + 1] for a in qt)), MaskTokens(*(a[b:b + 1] for a in kt)), 16, 16)
        assert not (exact[b] & ~live_b).any()


def test_dense_equivariant_under_permutation():
    q, k, v, qt, kt = _case_inputs(5, 120, False, None, b=1)
    p = np.random.default_rng(7).permutation(120)
    dense = jax.jit(dense_attention)
    ref = np.asarray(dense(q, k, v, qt, kt))
    tp = MaskTokens(*(a[:, p] for a in qt))
    out = dense(q[:, p], k[:, p], v[:, p], tp, tp)
    np.testing.assert_allclose(np.asarray(out), ref[:, p], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------
# 4. padding rows
# ------------------------------------------------------------------------------------------


def test_padding_rows_zero_and_finite():
    t = _hand_tokens()  # last token is pure padding (sample -1)
    n = len(t["order"])
    t_all_pad = {**t, "sample": np.full(n, -1, np.int32)}  # a batch row with no allowed key at all
    tok = _stack([t, t_all_pad])
    q, k, v = random_qkv(np.random.default_rng(3), 2, n, n)
    for fn in (dense_attention, lambda *a: blockwise_attention(*a, block_q=4, block_k=6),
               lambda *a: blockwise_attention(*a, block_q=4, block_k=6, skip_empty_tiles=True)):
        out = np.asarray(jax.jit(fn)(q, k, v, tok, tok))
        assert np.isfinite(out).all()
        assert np.all(out[0, -1] == 0) and np.all(out[1] == 0)
        assert np.abs(out[0, :-1]).max() > 0
        loss = lambda q, k, v: jnp.sum(fn(q, k, v, tok, tok) ** 2)  # noqa: E731
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
        for g in grads:
            g = np.asarray(g)
            assert np.isfinite(g).all()
            assert np.all(g[1] == 0)  # all-padding batch row gets no gradient
        # the padding key (last) gets no gradient from the real queries
        assert np.all(np.asarray(grads[1])[0, -1] == 0) and np.all(np.asarray(grads[2])[0, -1] == 0)


# ------------------------------------------------------------------------------------------
# bounded memory: no N x N intermediate in the traced forward + backward
# ------------------------------------------------------------------------------------------


def _max_intermediate_size(jaxpr) -> int:
    best = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            shape = getattr(var.aval, "shape", ())
            best = max(best, int(np.prod(shape)) if shape else 1)
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    best = max(best, _max_intermediate_size(inner))
    return best


def test_blockwise_never_materialises_n_by_n():
    n, bq, bk = 1024, 64, 128
    q, k, v = random_qkv(np.random.default_rng(0), 1, n, n, nh=2, nkv=1, dh=4)
    t = _batch(random_layout(np.random.default_rng(0), n))

    def f(q, k, v):
        return jnp.sum(blockwise_attention(q, k, v, t, t, block_q=bq, block_k=bk) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, k, v).jaxpr
    biggest = _max_intermediate_size(jaxpr)
    assert biggest < n * n // 4, biggest  # tiles are 2 heads * 64 * 128 = n*n/64
    # sanity: the walker does see the dense path's n x n mask
    jd = jax.make_jaxpr(lambda q, k, v: dense_attention(q, k, v, t, t))(q, k, v).jaxpr
    assert _max_intermediate_size(jd) >= n * n
