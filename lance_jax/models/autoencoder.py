"""The pixel <-> latent codec a model config names (`ModelConfig.autoencoder`): the Wan 2.2 VAE or the
parameter-free pixel autoencoder. Callers (inference runner, training encoders) go through here so that
neither knows which codec it drives.

    ae_cfg, ae_params = codec(model_cfg, manifest_vae_config, params, dtype="float32")
    latent = encode_latent(ae_params, pixels, ae_cfg, key)   # (3, F, H, W) -> (t, h, w, 48)
    video = decode(ae_params, latent, ae_cfg)                 # (t, h, w, 48) -> (3, F, H, W)
"""
from __future__ import annotations

import jax.numpy as jnp

from lance_jax.models import pixel_autoencoder, vae


def _module(ae_cfg):
    return pixel_autoencoder if isinstance(ae_cfg, pixel_autoencoder.PixelAutoencoderConfig) else vae


def codec(model_cfg, vae_config: dict | None, params, *, dtype: str = "float32"):
    """(codec config, params) for `model_cfg.autoencoder`; (None, None) when a Wan VAE is named but the
    checkpoint has none. vae_config: the checkpoint manifest's `reference.vae_config`."""
    if model_cfg.autoencoder == "pixel":
        return pixel_autoencoder.PixelAutoencoderConfig(dtype=dtype), {}
    if params is None or not vae_config:
        return None, None
    return vae.VaeConfig(**dict(vae_config, dtype=dtype)), params


def encode(params, pixels, ae_cfg) -> vae.VaeEncoding:
    """(3, F, H, W) or (B, 3, F, H, W) in [-1, 1] -> VaeEncoding with channel-first means."""
    return _module(ae_cfg).encode(params, pixels, ae_cfg)


def encode_latent(params, pixels, ae_cfg, key=None):
    """(3, F, H, W) in [-1, 1] -> (t, h, w, z) float32: a posterior sample drawn with `key`, or the mean when
    key is None (the pixel codec is deterministic: always its mean)."""
    enc = encode(params, pixels, ae_cfg)
    if key is None or enc.logvar is None:
        return jnp.moveaxis(enc.mu, -4, -1)
    return vae.sample_latent(enc.mu, enc.logvar, key=key)


def decode(params, latent, ae_cfg):
    """(t, h, w, z) or (B, t, h, w, z) latents -> video (3, F, H, W) (or with B) in [-1, 1]."""
    return _module(ae_cfg).decode(params, latent, ae_cfg)
