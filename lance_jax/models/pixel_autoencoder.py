"""A parameter-free stand-in for the Wan 2.2 VAE (the CPU demo's codec, `ModelConfig.autoencoder='pixel'`).

Spatially a 4x4 space-to-depth of RGB: every latent token holds its 4x4 pixel patch, 4 * 4 * 3 = 48
channels -- exactly the Wan latent width, so the Lance backbone is unchanged. Channel order is
(row, column, rgb) within the patch. Temporally it keeps the VAE's 1 + 4k -> 1 + k frame contract by
keeping key frames 0, 4, 8, ...; decoding fills the three frames between two key frames by linear
interpolation (so motion renders as a cross-fade -- the demo's shapes move a few pixels per frame).

The interface mirrors `models/vae.py` (`encode` -> VaeEncoding with channel-first (48, t, h, w) means,
`decode` of channel-last latents, `sample_latent`), so callers swap codecs through `autoencoder.py`.
Latents are the pixels themselves in [-1, 1]: no normalisation, no posterior noise (logvar is None).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lance_jax.models.vae import VaeEncoding

PATCH = 4
TEMPORAL = 4


@dataclasses.dataclass(frozen=True)
class PixelAutoencoderConfig:
    """What callers read off a codec config: the latent width and compression factors."""

    kind: str = "pixel"
    z_dim: int = 3 * PATCH * PATCH
    downsample_spatial: int = PATCH
    downsample_temporal: int = TEMPORAL
    dtype: str = "float32"


def _check_video(video):
    if video.ndim not in (4, 5) or video.shape[-4] != 3:
        raise ValueError(f"pixel autoencoder: video must be (B, 3, T, H, W) or (3, T, H, W), got {video.shape}")
    t, h, w = video.shape[-3:]
    if (t - 1) % TEMPORAL or h % PATCH or w % PATCH:
        raise ValueError(f"pixel autoencoder: {t} frames of {h}x{w} px; need 1 + {TEMPORAL}k frames and sides "
                         f"divisible by {PATCH}")


def space_to_depth(frames):
    """(..., 3, t, H, W) -> (..., 48, t, H/4, W/4), channel = (row * 4 + column) * 3 + rgb."""
    *lead, c, t, H, W = frames.shape
    x = frames.reshape(*lead, c, t, H // PATCH, PATCH, W // PATCH, PATCH)
    n = len(lead)
    x = jnp.transpose(x, tuple(range(n)) + (n + 3, n + 5, n, n + 1, n + 2, n + 4))
    return x.reshape(*lead, PATCH * PATCH * c, t, H // PATCH, W // PATCH)


def depth_to_space(latent):
    """(..., t, h, w, 48) channel-last -> (..., 3, t, 4h, 4w): the inverse of `space_to_depth`."""
    *lead, t, h, w, _ = latent.shape
    x = latent.reshape(*lead, t, h, w, PATCH, PATCH, 3)
    n = len(lead)
    x = jnp.transpose(x, tuple(range(n)) + (n + 5, n, n + 1, n + 3, n + 2, n + 4))
    return x.reshape(*lead, 3, t, h * PATCH, w * PATCH)


def encode(params, video, cfg: PixelAutoencoderConfig = PixelAutoencoderConfig()) -> VaeEncoding:
    """video (B, 3, T, H, W) or (3, T, H, W) in [-1, 1], T = 1 + 4k -> VaeEncoding(mu, None, mu) with mu
    (B, 48, 1 + k, H/4, W/4) (or without B). `params` is ignored (there are none)."""
    del params
    video = jnp.asarray(video, jnp.float32)
    _check_video(video)
    mu = space_to_depth(video[..., ::TEMPORAL, :, :])
    return VaeEncoding(mu=mu, logvar=None, mu_raw=mu)


def _interpolated_frames(keys):
    """(..., t, C, H, W) key frames -> (..., 1 + 4(t-1), C, H, W): frame 4k + j = lerp(key k, key k+1, j/4)."""
    if keys.shape[-4] == 1:
        return keys
    a, b = keys[..., :-1, :, :, :], keys[..., 1:, :, :, :]
    w = jnp.arange(1, TEMPORAL + 1, dtype=keys.dtype) / TEMPORAL  # 1/4 .. 1: frames 4k+1 .. 4k+4
    w = w.reshape((TEMPORAL, 1, 1, 1))
    steps = a[..., None, :, :, :] * (1 - w) + b[..., None, :, :, :] * w  # (..., t-1, 4, C, H, W)
    steps = steps.reshape(*keys.shape[:-4], -1, *keys.shape[-3:])
    return jnp.concatenate([keys[..., :1, :, :, :], steps], axis=-4)


def decode(params, latent, cfg: PixelAutoencoderConfig = PixelAutoencoderConfig(), *, clamp: bool = True):
    """latent (B, t, h, w, 48) or (t, h, w, 48) -> video (B, 3, 1 + 4(t-1), 4h, 4w) (or without B) in
    [-1, 1] (clamped unless clamp=False)."""
    del params
    latent = jnp.asarray(latent, jnp.float32)
    if latent.ndim not in (4, 5) or latent.shape[-1] != cfg.z_dim:
        raise ValueError(f"pixel autoencoder: latent must be (B, t, h, w, {cfg.z_dim}) or (t, h, w, {cfg.z_dim}), "
                         f"got {latent.shape}")
    keys = depth_to_space(latent)  # (..., 3, t, H, W)
    frames = _interpolated_frames(jnp.moveaxis(keys, -4, -3))  # (..., T, 3, H, W)
    video = jnp.moveaxis(frames, -3, -4)
    return jnp.clip(video, -1.0, 1.0) if clamp else video
