"""Norms and rotary embeddings against their definitions (10-backbone §2.4, §3.1; 20 §2.1)."""
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from lance_jax.layers import rotary
from lance_jax.layers.norms import RMSNorm


def test_rmsnorm_definition_and_cast_order():
    x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    w = np.linspace(0.5, 2, 8).astype(np.float32)
    norm = RMSNorm(eps=1e-6)
    out = norm.apply({"params": {"scale": w}}, x)
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(out, want, rtol=1e-6)
    xb = jnp.asarray(x, jnp.bfloat16)
    outb = norm.apply({"params": {"scale": w}}, xb)
    # reference: normalise in fp32, cast to bf16, *then* multiply by the (bf16) weight
    xf = np.asarray(xb, np.float32)
    normed = xf / np.sqrt((xf ** 2).mean(-1, keepdims=True) + np.float32(1e-6))
    expect = jnp.asarray(normed).astype(jnp.bfloat16) * jnp.asarray(w, jnp.bfloat16)
    assert outb.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(outb, np.float32), np.asarray(expect, np.float32))


def test_text_tokens_get_plain_1d_rope():
    inv = rotary.inv_frequencies(16, 1e6)
    pos = np.arange(7)[None]
    cos3, sin3 = rotary.rotary_cos_sin(np.stack([pos] * 3, axis=1), inv, (2, 3, 3))
    cos1, sin1 = rotary.rotary_cos_sin(pos, inv)
    np.testing.assert_array_equal(cos3, cos1)
    np.testing.assert_array_equal(sin3, sin1)


def test_mrope_sections_pick_axes():
    inv = rotary.inv_frequencies(16, 1e6)
    ids = np.array([[[5], [11], [23]]])  # T, H, W of one token
    cos, _ = rotary.rotary_cos_sin(ids, inv, (2, 3, 3))
    axis_pos = np.array([5] * 2 + [11] * 3 + [23] * 3)
    want = np.cos(axis_pos * inv.astype(np.float64))
    np.testing.assert_allclose(cos[0, 0, :8], want, atol=1e-6)
    np.testing.assert_array_equal(cos[0, 0, :8], cos[0, 0, 8:])  # channel c and c + Dh/2 share a frequency


def test_rotate_half_convention():
    x = np.arange(8, dtype=np.float32).reshape(1, 1, 1, 8)
    angle = 0.3
    cos = np.full((1, 1, 8), np.cos(angle), np.float32)
    sin = np.full((1, 1, 8), np.sin(angle), np.float32)
    out = np.asarray(rotary.apply_rotary(jnp.asarray(x), cos, sin))[0, 0, 0]
    x1, x2 = x[0, 0, 0, :4], x[0, 0, 0, 4:]
    np.testing.assert_allclose(out, np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                                                    x2 * np.cos(angle) + x1 * np.sin(angle)]), rtol=1e-6)


def test_bf16_inv_freq_option():
    exact = rotary.inv_frequencies(128, 1e6)
    rounded = rotary.inv_frequencies(128, 1e6, bf16_round=True)
    np.testing.assert_array_equal(rounded, exact.astype(ml_dtypes.bfloat16).astype(np.float32))
    # at the shifted ViT ids (~1000) the rounding moves mid-frequency angles by a lot (10-backbone §8)
    assert np.abs(1000 * (rounded - exact)).max() > 0.1
    np.testing.assert_array_equal(exact, (1.0 / 1e6 ** (np.arange(0, 128, 2) / 128)).astype(np.float32))
