"""Frozen media encoders for training data: the VAE (posterior sample) and the ViT of a converted checkpoint,
run host-side (jitted) once per record before packing ("precomputed latents" path, 50 §2.5).

Media -> encoder inputs is `vision.vae_pixels` / `vision.vit_inputs` (shared with inference);
`load_encoders(ckpt)` gives (vit_cfg, vit_params, vae_cfg, vae_params) from a converted checkpoint.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np



def load_encoders(ckpt: str, *, dtype: str | None = None):
    """(vit_cfg, vit_params, codec_cfg, codec_params) of a converted checkpoint (None, None for a missing item);
    the codec is the one its model config names (`autoencoder`: the Wan VAE or the pixel autoencoder)."""
    from lance_jax.config import model_config_from_dict
    from lance_jax.convert import converter, orbax_io
    from lance_jax.models.autoencoder import codec
    from lance_jax.models.vit import VitConfig

    manifest = converter.read_manifest(ckpt)
    ref = manifest.get("reference", {})
    items = manifest.get("items", [])
    vit_cfg = vit_params = None
    if "vit" in items and ref.get("vit_config"):
        raw = dict(ref["vit_config"], **({"dtype": dtype} if dtype else {}))
        vit_cfg, vit_params = VitConfig(**raw), orbax_io.restore(os.path.join(ckpt, "vit"), None)
    vae_params = orbax_io.restore(os.path.join(ckpt, "vae"), None) if "vae" in items else None
    vae_cfg, vae_params = codec(model_config_from_dict(manifest["model_config"]), ref.get("vae_config"), vae_params,
                                dtype=dtype or (ref.get("vae_config") or {}).get("dtype", "float32"))
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
        from lance_jax.models.autoencoder import encode_latent

        return np.asarray(jax.device_get(encode_latent(self.vae_params, jnp.asarray(pixels), self.vae_cfg, key)),
                          np.float32)


@functools.lru_cache(maxsize=4)
def frozen_encoders(ckpt: str, dtype: str | None = None) -> FrozenEncoders:
    """Cached per (checkpoint, dtype): the pipeline may be built more than once per process."""
    return FrozenEncoders(ckpt, dtype=dtype)
