"""The attention mask of a packed multimodal sequence as a predicate over per-token ints (10-backbone §5).

The mask is never passed around as a matrix. Every token carries four small ints (`MaskTokens`) and
the mask is a predicate over a (query token, key token) pair:

    FN(i) = split(i) if mode(i) in {FULL, NOISE} else -1
    NZ(i) = split(i) if mode(i) == NOISE else -1
    allowed(q, k) = (order(k) <= order(q)  or  (FN(q) == FN(k) and FN(q) >= 0))
                    and not (NZ(k) >= 0 and NZ(q) != NZ(k))
                    and sample(q) == sample(k) and sample(q) >= 0

i.e. causal by original sequence index, bidirectional inside `full`/`noise` splits, noisy-target
splits invisible to every other split, no attention across packed samples. The `sample >= 0` clause
is this port's padding convention: a token with a negative sample id is pure padding, attended by
nothing and attending to nothing. The reference's own trailing pad *sample* is an ordinary sample.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MODE_CAUSAL, MODE_FULL, MODE_NOISE = 0, 1, 2

# Split attention-mode strings (as in the reference data pipeline / cases.json) -> mode code.
# 'full_noise' is mapped to full by the reference training forward.  'full_noise_target' is only
# produced by inference helpers, which also map it to full (the training forward would not; it is
# never produced by training data, spec 10 §5.1).
ATTN_MODE_CODES: Mapping[str, int] = {
    "causal": MODE_CAUSAL,
    "full": MODE_FULL,
    "full_noise": MODE_FULL,
    "full_noise_target": MODE_FULL,
    "noise": MODE_NOISE,
}


class MaskTokens(NamedTuple):
    """Per-token ints (each int32, shape (B, N)) from which the attention mask is evaluated."""

    order: jax.Array  # original sequence index (causality compares this, never the array position)
    sample: jax.Array  # packed-sample (document) id; negative = pure padding
    split: jax.Array  # global split id
    mode: jax.Array  # MODE_CAUSAL / MODE_FULL / MODE_NOISE


# ----------------------------------------------------------------------------------------------
# Host-side layout helper
# ----------------------------------------------------------------------------------------------


def mask_tokens_from_splits(
    sample_lens: Sequence[int] | np.ndarray,
    split_lens: Sequence[int] | np.ndarray,
    attn_modes: Sequence[str],
) -> dict[str, np.ndarray]:
    """Per-token mask ints for one packed sequence (NumPy, host side).

    ``sample_lens``: tokens per packed sample (the reference's trailing pad sample included, it is
    a normal sample here).  ``split_lens``: tokens per split, global across samples (splits never
    straddle a sample boundary).  ``attn_modes``: one mode string per split.

    Returns ``{'order', 'sample', 'split', 'mode'}``, each an int32 array of shape (N,),
    N = sum(sample_lens).  ``MaskTokens(**{k: v[None] for k, v in d.items()})`` makes a batch of 1.
    """
    sample_lens = np.asarray(sample_lens, dtype=np.int64).reshape(-1)
    split_lens = np.asarray(split_lens, dtype=np.int64).reshape(-1)
    attn_modes = list(attn_modes)
    if len(attn_modes) != split_lens.size:
        raise ValueError(
            f"got {len(attn_modes)} attn_modes for {split_lens.size} splits"
        )
    if (sample_lens < 0).any() or (split_lens < 0).any():
        raise ValueError("sample_lens and split_lens must be non-negative")
    n = int(sample_lens.sum())
    if int(split_lens.sum()) != n:
        raise ValueError(
            f"sum(split_lens)={int(split_lens.sum())} != sum(sample_lens)={n}"
        )
    sample_ends = np.cumsum(sample_lens)
    split_ends = np.cumsum(split_lens)
    if not np.isin(sample_ends[sample_lens > 0], split_ends).all():
        raise ValueError("a split straddles a sample boundary")
    codes = []
    for m in attn_modes:
        if m not in ATTN_MODE_CODES:
            raise ValueError(
                f"unknown attention mode {m!r}; expected one of {sorted(ATTN_MODE_CODES)}"
            )
        codes.append(ATTN_MODE_CODES[m])
    codes = np.asarray(codes, dtype=np.int32)
    return {
        "order": np.arange(n, dtype=np.int32),
        "sample": np.repeat(np.arange(sample_lens.size, dtype=np.int32), sample_lens),
        "split": np.repeat(np.arange(split_lens.size, dtype=np.int32), split_lens),
        "mode": np.repeat(codes, split_lens),
    }


# ----------------------------------------------------------------------------------------------
# Predicate
# ----------------------------------------------------------------------------------------------


def broadcast_tokens(t: MaskTokens, batch: int, n: int) -> MaskTokens:
    return MaskTokens(
        *(jnp.broadcast_to(jnp.asarray(a, dtype=jnp.int32), (batch, n)) for a in t)
    )


def allowed_mask(q_tokens: MaskTokens, k_tokens: MaskTokens) -> jax.Array:
    """Dense (B, Nq, Nk) bool mask, True = query may attend to key.  Also used per tile."""
    q = MaskTokens(*(jnp.asarray(a) for a in q_tokens))
    k = MaskTokens(*(jnp.asarray(a) for a in k_tokens))

    def fn(t):
        return jnp.where((t.mode == MODE_FULL) | (t.mode == MODE_NOISE), t.split, -1)

    def nz(t):
        return jnp.where(t.mode == MODE_NOISE, t.split, -1)

    qc = lambda a: a[..., :, None]  # noqa: E731  (B, Nq, 1)
    kr = lambda a: a[..., None, :]  # noqa: E731  (B, 1, Nk)
    fn_q, fn_k, nz_q, nz_k = fn(q), fn(k), nz(q), nz(k)
    causal = kr(k.order) <= qc(q.order)
    same_full = (qc(fn_q) == kr(fn_k)) & (qc(fn_q) >= 0)
    hidden_noise = (kr(nz_k) >= 0) & (qc(nz_q) != kr(nz_k))
    same_sample = (qc(q.sample) == kr(k.sample)) & (qc(q.sample) >= 0)
    return (causal | same_full) & ~hidden_noise & same_sample
