"""Frozen media encoders for training data: the VAE (posterior sample) and the ViT of a converted checkpoint,
run host-side (jitted) once per record before packing ("precomputed latents" path, 50 §2.5).

Shared preprocessing (also what `pipelines.runner.LanceRunner._vae_frames` / `_vit_inputs` / `_vae_encode`
do at inference; the runner could call these and wrap ValueError in its InferenceError):
  * `vae_pixels(frames, side)`: uint8 (F, H, W, 3) -> (3, F', H', W') in [-1, 1] at the bucket of `side`,
    F' floored to 4k+1, H', W' multiples of 16;
  * `vit_inputs(frames, side)`: uint8 frames -> (patches, grid_thw (1, 3)) (images: frame duplicated);
  * `load_encoders(ckpt)`: (vit_cfg, vit_params, vae_cfg, vae_params) from a `convert_weights.py to-jax`
    folder's manifest + items.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from lance_jax import media as _media
from lance_jax import vision


def floor_frames(n: int) -> int:
    """Pixel frames floored to 4k+1 (VAE temporal stride 4)."""
    if n < 1:
        raise ValueError(f"need at least one frame, got {n}")
    return 4 * ((int(n) - 1) // 4) + 1


def vae_pixels(frames: np.ndarray, side: int) -> np.ndarray:
    """uint8 frames (F, H, W, 3) -> VAE input (3, F', H', W') in [-1, 1] (bucket of `side`, stride 16)."""
    frames = np.asarray(frames)
    frames = frames[: floor_frames(len(frames))]
    return _media.to_vae_pixels(vision.resize_frames(frames, side, divisor=16))


def vit_inputs(frames: np.ndarray, side: int):
    """uint8 frames (F, H, W, 3) -> (patches (N, patch_dim), grid_thw (1, 3) int32)."""
    frames = np.asarray(frames)
    if len(frames) == 1:
        patches, grid, _ = vision.preprocess_image(frames[0], side)
    else:
        patches, grid, _ = vision.preprocess_video(frames, side)
    return patches, grid


def load_encoders(ckpt: str, *, dtype: str | None = None):
    """(vit_cfg, vit_params, vae_cfg, vae_params) of a converted checkpoint (None, None for a missing item)."""
    from lance_jax.convert import converter, orbax_io
    from lance_jax.models.vae import VaeConfig
    from lance_jax.models.vit import VitConfig

    manifest = converter.read_manifest(ckpt)
    ref = manifest.get("reference", {})
    items = manifest.get("items", [])
    vit_cfg = vit_params = vae_cfg = vae_params = None
    if "vit" in items and ref.get("vit_config"):
        raw = dict(ref["vit_config"], fullatt_block_indexes=tuple(ref["vit_config"]["fullatt_block_indexes"]))
        if dtype:
            raw["dtype"] = dtype
        vit_cfg, vit_params = VitConfig(**raw), orbax_io.restore(os.path.join(ckpt, "vit"), None)
    if "vae" in items and ref.get("vae_config"):
        raw = dict(ref["vae_config"], **({"dtype": dtype} if dtype else {}))
        vae_cfg, vae_params = VaeConfig(**raw), orbax_io.restore(os.path.join(ckpt, "vae"), None)
    return vit_cfg, vit_params, vae_cfg, vae_params


class FrozenEncoders:
    """The frozen ViT and VAE of a converted checkpoint, host-side jitted calls (one record at a time)."""

    def __init__(self, ckpt: str, *, dtype: str | None = None):
        self.ckpt = ckpt
        self.vit_cfg, self.vit_params, self.vae_cfg, self.vae_params = load_encoders(ckpt, dtype=dtype)

    def vit(self, patches, grid) -> np.ndarray:
        """(N, patch_dim) patches of one item -> (N / merge², out_hidden) float32."""
        if self.vit_params is None:
            raise ValueError(f"checkpoint {self.ckpt} has no ViT")
        from lance_jax.models.vit import encode

        return np.asarray(jax.device_get(encode(self.vit_params, patches, grid, self.vit_cfg)), np.float32)

    def vae(self, pixels: np.ndarray, key=None) -> np.ndarray:
        """(3, F, H, W) in [-1, 1] -> (t, h, w, z_dim) float32: posterior sample with `key` (the reference's
        training `vae_encode`), or the mean when key is None."""
        if self.vae_params is None:
            raise ValueError(f"checkpoint {self.ckpt} has no VAE")
        from lance_jax.models import vae

        enc = vae.encode(self.vae_params, jnp.asarray(pixels), self.vae_cfg)
        z = vae.sample_latent(enc.mu, enc.logvar, key=key) if key is not None else jnp.moveaxis(enc.mu, 0, -1)
        return np.asarray(jax.device_get(z), np.float32)


@functools.lru_cache(maxsize=4)
def frozen_encoders(ckpt: str, dtype: str | None = None) -> FrozenEncoders:
    """Cached per (checkpoint, dtype): the pipeline may be built more than once per process."""
    return FrozenEncoders(ckpt, dtype=dtype)
