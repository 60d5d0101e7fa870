"""Rotary position embedding: 1-D RoPE and the 3-axis MaPE/MRoPE variant, rotate-half convention.

A token with ids (T, H, W) takes, for frequency j of the Dh/2 frequencies, the angle p_axis(j)*inv_freq[j]
with axis(j) = T for the first mrope_section[0] frequencies, H for the next, W for the last
(20-positions §2.1). With T = H = W this is ordinary 1-D RoPE.
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np


def inv_frequencies(head_dim: int, theta: float, bf16_round: bool = False) -> np.ndarray:
    """(head_dim/2,) float32 theta^(-2j/head_dim).

    `bf16_round` reproduces the released model, whose `inv_freq` buffer is cast to bf16 with the rest of
    the module and then up-cast for the angle product: this moves angles by O(1) rad at ids ~1000.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (1.0 / (np.float64(theta) ** exponents.astype(np.float64))).astype(np.float32)
    if bf16_round:
        inv = inv.astype(ml_dtypes.bfloat16).astype(np.float32)
    return inv


def frequency_axes(mrope_section) -> np.ndarray:
    """(Dh/2,) int: which position row (0=T, 1=H, 2=W) drives each frequency."""
    return np.repeat(np.arange(len(mrope_section)), np.asarray(mrope_section))


def rotary_cos_sin(position_ids, inv_freq: np.ndarray, mrope_section=None, dtype=jnp.float32):
    """Rotary tables for a sequence.

    position_ids: (B, 3, N) int for MaPE (with `mrope_section`), or (B, N) for 1-D RoPE.
    Returns cos, sin: (B, N, Dh) in `dtype`; channel c and c + Dh/2 share a frequency.
    """
    pos = jnp.asarray(position_ids).astype(jnp.float32)
    if mrope_section is None:
        angles = pos[..., None] * inv_freq  # (B, N, Dh/2)
    else:
        per_freq = pos[:, frequency_axes(mrope_section), :]  # (B, Dh/2, N)
        angles = jnp.swapaxes(per_freq, 1, 2) * inv_freq
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x, cos, sin):
    """x (B, N, heads, Dh) rotated by cos/sin (B, N, Dh), computed in x.dtype."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin
