"""Wan 2.2 video VAE (40-vae-and-vit Part A): config, Flax encoder/decoder, streaming encode/decode.

Public functions take the reference layout at the boundary and work channel-last inside:

    cfg = load_vae_config("…/vae_config.json")
    params = load_vae_params("…/Wan2.2_VAE.safetensors", cfg)          # or the torch .pth
    mu, logvar, mu_raw = encode(params, video, cfg)  # video (B,3,T,H,W) in [-1,1] -> (B,48,t,h,w) each
    latent = sample_latent(mu, logvar, eps=…)      # (B,t,h,w,48), mu + exp(logvar/2)*eps (Lance samples)
    video = decode(params, latent, cfg)            # (B,t,h,w,48) -> (B,3,1+4(t-1),16h,16w), clamped

Batch dims are optional (a (3,T,H,W) video gives (48,t,h,w) latents, and so on). Streaming (the
default, `stream=True`) follows the reference: the encoder sees pixel frame 0, then 4-frame chunks;
the decoder one latent frame at a time; chunk 0 is its own trace and all later chunks are one
`lax.scan` whose carry is the cache pytree (2-frame histories of every causal conv), so memory and
compile time do not grow with the number of frames. `stream=False` runs the whole clip at once with
the equivalent whole-sequence rules (§A.7.3).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lance_jax.convert.keys import check_reference_keys, params_from_tensors, tensors_from_params
from lance_jax.convert.vae_keys import vae_key_table
from lance_jax.convert.pth_io import read_pth
from lance_jax.convert.safetensors_io import read_tensors, safetensors_header
from lance_jax.models.vae_blocks import (
    AttentionBlock,
    CausalConv3d,
    Dense,
    Resample,
    ResidualBlock,
    RMSNorm,
    avg_down_3d,
    dup_up_3d,
    silu_f32,
)

# §A.8: per-channel latent statistics of Wan 2.2 (identical for the tiny goldens and the real model).
LATENT_MEAN = np.array([
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
], dtype=np.float32)
LATENT_STD = np.array([
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
], dtype=np.float32)
# The reference multiplies by 1/std (computed in the VAE dtype) on encode and divides by it on decode.
LATENT_INV_STD = (np.float32(1.0) / LATENT_STD).astype(np.float32)

CHUNK_FRAMES = 4  # pixel frames per streamed encoder chunk after the first (= temporal compression)


@dataclasses.dataclass(frozen=True)
class VaeConfig:
    """Constructor args of the reference `WanVAE_` (vae_config.json) plus execution dtypes."""

    z_dim: int = 48
    c_dim: int = 160
    dec_dim: int = 256
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0  # inference only: the VAE is frozen, dropout is never applied
    patch_size: int = 2
    downsample_spatial: int = 16
    downsample_temporal: int = 4
    z_channels: int = 48
    dtype: str = "float32"  # compute dtype of convs / attention (norms and softmax run in fp32)
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temperal_downsample"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.attn_scales:
            raise NotImplementedError(f"attn_scales {self.attn_scales}: attention inside stages is not implemented")
        if self.z_channels != self.z_dim:
            raise ValueError(f"z_channels {self.z_channels} != z_dim {self.z_dim}")
        spatial = self.patch_size * 2 ** (len(self.dim_mult) - 1)
        if self.downsample_spatial != spatial:
            raise ValueError(f"downsample_spatial {self.downsample_spatial} != patch_size * 2^(stages-1) = {spatial}")
        temporal = 2 ** sum(bool(f) for f in self.temperal_downsample[: len(self.dim_mult) - 1])
        if self.downsample_temporal != temporal or temporal != CHUNK_FRAMES:
            raise NotImplementedError(f"temporal compression {temporal} (downsample_temporal "
                                      f"{self.downsample_temporal}): the reference streams {CHUNK_FRAMES}-frame chunks")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise ValueError(f"{name} {getattr(self, name)!r} must be 'float32' or 'bfloat16'")

    @property
    def encoder_dims(self) -> tuple[int, ...]:
        return tuple(self.c_dim * u for u in (1,) + self.dim_mult)

    @property
    def decoder_dims(self) -> tuple[int, ...]:
        return tuple(self.dec_dim * u for u in (self.dim_mult[-1],) + self.dim_mult[::-1])

    @property
    def temperal_upsample(self) -> tuple[bool, ...]:
        return self.temperal_downsample[::-1]

    @property
    def pixel_channels(self) -> int:
        return 3 * self.patch_size ** 2

    def replace(self, **kw) -> "VaeConfig":
        return dataclasses.replace(self, **kw)


def load_vae_config(path: str, *, real_model: bool = False, **overrides) -> VaeConfig:
    """VaeConfig from a `vae_config.json` (file or its folder). `real_model=True` applies its
    `real_model` entry (the released widths) on top; unknown keys are an error."""
    if os.path.isdir(path):
        path = os.path.join(path, "vae_config.json")
    with open(path) as f:
        d = json.load(f)
    real = d.pop("real_model", {})
    if real_model:
        d.update(real)
    d.update(overrides)
    names = {f.name for f in dataclasses.fields(VaeConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{path}: unknown VAE config keys {unknown}")
    return VaeConfig(**d)


def _dtypes(cfg: VaeConfig):
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


class DownStage(nn.Module):
    """Down_ResidualBlock (§A.3.9): residual blocks (+ Resample), plus the AvgDown3D shortcut of the input."""

    cfg: VaeConfig
    features: int
    t_down: bool
    down: bool

    @nn.compact
    def __call__(self, x, mode: str):
        cfg, kw = self.cfg, _dtypes(self.cfg)
        h = x
        for j in range(cfg.num_res_blocks):
            h = ResidualBlock(self.features, name=f"downsamples_{j}", **kw)(h, mode)
        if self.down:
            h = Resample("downsample3d" if self.t_down else "downsample2d", name=f"downsamples_{cfg.num_res_blocks}",
                         **kw)(h, mode)
        return h + avg_down_3d(x.astype(h.dtype), self.features, 2 if self.t_down else 1, 2 if self.down else 1)


class UpStage(nn.Module):
    """Up_ResidualBlock (§A.3.9): num_res_blocks+1 residual blocks (+ Resample and the DupUp3D shortcut)."""

    cfg: VaeConfig
    features: int
    t_up: bool
    up: bool

    @nn.compact
    def __call__(self, x, mode: str):
        cfg, kw = self.cfg, _dtypes(self.cfg)
        h = x
        for j in range(cfg.num_res_blocks + 1):
            h = ResidualBlock(self.features, name=f"upsamples_{j}", **kw)(h, mode)
        if not self.up:
            return h  # the last decoder stage has no outer shortcut
        h = Resample("upsample3d" if self.t_up else "upsample2d", name=f"upsamples_{cfg.num_res_blocks + 1}",
                     **kw)(h, mode)
        return h + dup_up_3d(x.astype(h.dtype), self.features, 2 if self.t_up else 1, 2, first_chunk=mode != "next")


def _middle(x, features: int, kw: dict, mode: str):
    """Residual, attention, residual (40 §A.4-A.5), as submodules middle_0..2 of the calling module."""
    x = ResidualBlock(features, name="middle_0", **kw)(x, mode)
    x = AttentionBlock(name="middle_1", **kw)(x)
    return ResidualBlock(features, name="middle_2", **kw)(x, mode)


class Encoder(nn.Module):
    """Encoder3d (§A.4): patchified (N, T, H/2, W/2, 12) -> (N, t, h, w, 2*z_dim)."""

    cfg: VaeConfig

    @nn.compact
    def __call__(self, x, mode: str):
        cfg, kw = self.cfg, _dtypes(self.cfg)
        dims = cfg.encoder_dims
        n_stages = len(cfg.dim_mult)
        x = CausalConv3d(dims[0], name="conv1", **kw)(x, mode)
        for i, cout in enumerate(dims[1:]):
            t_down = i < len(cfg.temperal_downsample) and bool(cfg.temperal_downsample[i])
            x = DownStage(cfg, cout, t_down, i != n_stages - 1, name=f"downsamples_{i}")(x, mode)
        x = _middle(x, dims[-1], kw, mode)
        x = silu_f32(RMSNorm(kw["param_dtype"], name="head_0")(x))
        return CausalConv3d(2 * cfg.z_dim, name="head_2", **kw)(x, mode)


class Decoder(nn.Module):
    """Decoder3d (§A.5): (N, t, h, w, z_dim) after conv2 -> (N, T, H/2, W/2, 12)."""

    cfg: VaeConfig

    @nn.compact
    def __call__(self, x, mode: str):
        cfg, kw = self.cfg, _dtypes(self.cfg)
        dims = cfg.decoder_dims
        n_stages = len(cfg.dim_mult)
        x = CausalConv3d(dims[0], name="conv1", **kw)(x, mode)
        x = _middle(x, dims[0], kw, mode)
        for i, cout in enumerate(dims[1:]):
            t_up = i < len(cfg.temperal_upsample) and bool(cfg.temperal_upsample[i])
            x = UpStage(cfg, cout, t_up, i != n_stages - 1, name=f"upsamples_{i}")(x, mode)
        x = silu_f32(RMSNorm(kw["param_dtype"], name="head_0")(x))
        return CausalConv3d(cfg.pixel_channels, name="head_2", **kw)(x, mode)


class WanVAE(nn.Module):
    """WanVAE_: encoder + top-level conv1 (96 -> mu | log_var), conv2 + decoder. Channel-last inside.

    `__call__` (used by init) runs both halves in "whole" mode; the streaming drivers call
    `encode_frames` / `decode_frames` per chunk with the "cache" collection as the carry.
    """

    cfg: VaeConfig

    def setup(self):
        kw = _dtypes(self.cfg)
        self.encoder = Encoder(self.cfg)
        self.conv1 = Dense(2 * self.cfg.z_dim, **kw)
        self.conv2 = Dense(self.cfg.z_dim, **kw)
        self.decoder = Decoder(self.cfg)

    def __call__(self, x, z):
        return self.encode_frames(x, "whole"), self.decode_frames(z, "whole")

    def encode_frames(self, x, mode: str):
        """Patchified frames (N, T, H/2, W/2, 3p^2) -> (N, t, h, w, 2*z_dim) = raw mu | log_var."""
        return self.conv1(self.encoder(x, mode))

    def decode_frames(self, z, mode: str):
        """De-normalised latents (N, t, h, w, z_dim) -> (N, T, H/2, W/2, 3p^2) before unpatchify."""
        return self.decoder(self.conv2(z), mode)


# ----------------------------------------------------------------------------------------------
# Layout helpers (reference NCTHW at the boundary, NTHWC inside).


def patchify(video, p: int):
    """(N, C, T, H, W) -> (N, T, H/p, W/p, C*p*p); channel c*p^2 + r*p + q holds x[c, :, p*i+q, p*j+r]."""
    n, c, t, h, w = video.shape
    x = video.reshape(n, c, t, h // p, p, w // p, p)  # n c t i q j r
    return x.transpose(0, 2, 3, 5, 1, 6, 4).reshape(n, t, h // p, w // p, c * p * p)


def unpatchify(x, p: int):
    """Inverse of `patchify`: (N, T, h, w, C*p*p) -> (N, C, T, h*p, w*p)."""
    n, t, h, w, cpp = x.shape
    c = cpp // (p * p)
    x = x.reshape(n, t, h, w, c, p, p)  # n t i j c r q
    return x.transpose(0, 4, 1, 2, 6, 3, 5).reshape(n, c, t, h * p, w * p)


def _norm_constants(dtype):
    """(mean, 1/std) in the VAE dtype, as the reference builds them (1/std computed in that dtype)."""
    dtype = jnp.dtype(dtype)
    return jnp.asarray(LATENT_MEAN, dtype), jnp.reciprocal(jnp.asarray(LATENT_STD, dtype))


def normalize_latent(mu_raw, dtype="float32"):
    mean, inv_std = _norm_constants(dtype)
    return (mu_raw.astype(mean.dtype) - mean) * inv_std


def denormalize_latent(z, dtype="float32"):
    mean, inv_std = _norm_constants(dtype)
    return z.astype(mean.dtype) / inv_std + mean


def num_latent_frames(frames: int) -> int:
    return 1 + (frames - 1) // CHUNK_FRAMES


def num_pixel_frames(latent_frames: int) -> int:
    return 1 + CHUNK_FRAMES * (latent_frames - 1)


def _check_video(video, cfg: VaeConfig):
    shape = tuple(video.shape)
    if len(shape) not in (4, 5):
        raise ValueError(f"video must be (B, 3, T, H, W) or (3, T, H, W), got shape {shape}")
    c, t, h, w = shape[-4:]
    if c != 3:
        raise ValueError(f"video must have 3 colour channels on axis -4 (reference layout C,T,H,W), got {c} "
                         f"(shape {shape})")
    if t < 1 or (t - 1) % CHUNK_FRAMES:
        raise ValueError(f"video has {t} frames; the VAE needs 1 + {CHUNK_FRAMES}k frames (e.g. "
                         f"{num_pixel_frames(num_latent_frames(max(t, 1)))}); the reference would silently drop the "
                         f"trailing {(t - 1) % CHUNK_FRAMES if t >= 1 else 0}")
    s = cfg.downsample_spatial
    if h % s or w % s or h == 0 or w == 0:
        raise ValueError(f"video size {h}x{w} must be a positive multiple of {s} in both height and width")


def _check_latent(latent, cfg: VaeConfig):
    shape = tuple(latent.shape)
    if len(shape) not in (4, 5) or shape[-1] != cfg.z_dim:
        raise ValueError(f"latent must be channel-last (B, t, h, w, {cfg.z_dim}) or (t, h, w, {cfg.z_dim}), "
                         f"got shape {shape}")
    if min(shape[-4:-1]) < 1:
        raise ValueError(f"latent has an empty t/h/w axis: {shape}")


# ----------------------------------------------------------------------------------------------
# Streaming drivers (jitted; cfg and stream are static, clamp is traced).


def _zero_cache(model, params, method, x_chunk):
    """A zero cache pytree with the structure the "next" mode produces for chunks shaped like x_chunk."""
    def run(p, x):
        return model.apply({"params": p}, x, "next", method=method, mutable=["cache"])[1]["cache"]

    abstract = jax.eval_shape(run, params, x_chunk)
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)


@functools.partial(jax.jit, static_argnames=("cfg", "stream"))
def _encode(params, video, cfg: VaeConfig, stream: bool):
    """(N, 3, T, H, W) -> (mu, logvar, mu_raw), each (N, z_dim, t, h, w) fp32."""
    out = _encode_raw(params, video, cfg, stream)
    mu_raw, logvar = out[..., : cfg.z_dim], out[..., cfg.z_dim:]
    mu = normalize_latent(mu_raw, cfg.dtype)
    return tuple(jnp.moveaxis(a.astype(jnp.float32), -1, 1) for a in (mu, logvar, mu_raw))


def _encode_raw(params, video, cfg: VaeConfig, stream: bool):
    """(N, 3, T, H, W) -> (N, t, h, w, 2*z_dim) raw conv1 output (mu | log_var)."""
    model = WanVAE(cfg)
    p = cfg.patch_size
    dt = jnp.dtype(cfg.dtype)

    def frames_in(v):
        return patchify(v, p).astype(dt)

    if not stream:
        return model.apply({"params": params}, frames_in(video), "whole", method=WanVAE.encode_frames)

    n, _, t, h, w = video.shape
    chunks = num_latent_frames(t)
    step = functools.partial(model.apply, method=WanVAE.encode_frames, mutable=["cache"])
    chunk_shape = jax.ShapeDtypeStruct((n, CHUNK_FRAMES, h // p, w // p, 3 * p * p), dt)
    cache = _zero_cache(model, params, WanVAE.encode_frames, chunk_shape)
    out0, state = step({"params": params, "cache": cache}, frames_in(video[:, :, :1]), "first")
    if chunks == 1:
        return out0

    def body(cache, i):
        frames = jax.lax.dynamic_slice_in_dim(video, 1 + CHUNK_FRAMES * (i - 1), CHUNK_FRAMES, axis=2)
        out, state = step({"params": params, "cache": cache}, frames_in(frames), "next")
        return state["cache"], out[:, 0]

    _, outs = jax.lax.scan(body, state["cache"], jnp.arange(1, chunks))
    return jnp.concatenate([out0, jnp.moveaxis(outs, 0, 1)], axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "stream"))
def _decode(params, latent, clamp, cfg: VaeConfig, stream: bool):
    """(N, t, h, w, z_dim) normalised latents -> (N, 3, 1+4(t-1), H, W) fp32; `clamp` is a traced bool
    (one compilation serves both)."""
    model = WanVAE(cfg)
    p = cfg.patch_size

    def finish(y):
        y = unpatchify(y, p).astype(jnp.float32)
        return jnp.where(clamp, jnp.clip(y, -1.0, 1.0), y)

    z = denormalize_latent(latent, cfg.dtype)
    if not stream:
        return finish(model.apply({"params": params}, z, "whole", method=WanVAE.decode_frames))

    n, t, h, w, _ = latent.shape
    step = functools.partial(model.apply, method=WanVAE.decode_frames, mutable=["cache"])
    cache = _zero_cache(model, params, WanVAE.decode_frames, jax.ShapeDtypeStruct((n, 1, h, w, cfg.z_dim), z.dtype))
    y0, state = step({"params": params, "cache": cache}, z[:, :1], "first")
    y0 = finish(y0)
    if t == 1:
        return y0
    # The output is written chunk by chunk into one buffer carried by the scan (updated in place), so
    # no second output-sized copy exists besides the result.
    out = jnp.zeros(y0.shape[:2] + (num_pixel_frames(t),) + y0.shape[3:], y0.dtype)
    out = jax.lax.dynamic_update_slice_in_dim(out, y0, 0, axis=2)

    def body(carry, i):
        cache, out = carry
        zi = jax.lax.dynamic_slice_in_dim(z, i, 1, axis=1)
        y, state = step({"params": params, "cache": cache}, zi, "next")
        out = jax.lax.dynamic_update_slice_in_dim(out, finish(y), 1 + CHUNK_FRAMES * (i - 1), axis=2)
        return (state["cache"], out), None

    (_, out), _ = jax.lax.scan(body, (state["cache"], out), jnp.arange(1, t))
    return out


# ----------------------------------------------------------------------------------------------
# Public API.


class VaeEncoding(NamedTuple):
    """Encoder outputs in the reference layout (B, z_dim, t, h, w) (no batch axis for a 4-D input)."""

    mu: Any  # normalised mean (mu_raw - mean) / std: what Lance uses
    logvar: Any  # raw log-variance (never normalised)
    mu_raw: Any  # un-normalised mean (conv1 output, first half)


def encode(params, video, cfg: VaeConfig, *, stream: bool = True) -> VaeEncoding:
    """video (B, 3, T, H, W) or (3, T, H, W) in [-1, 1], T = 1 + 4k, H, W multiples of 16 ->
    VaeEncoding(mu, logvar, mu_raw), each (B, z_dim, t, h, w) fp32 with t = 1 + (T-1)/4.

    `stream=True` reproduces the reference's chunked evaluation (frame 0, then 4-frame chunks through
    a `lax.scan` with a cache carry); `stream=False` runs the whole clip at once (same maths)."""
    _check_video(video, cfg)
    batched = video.ndim == 5
    outs = _encode(params, video if batched else video[None], cfg, stream)
    return VaeEncoding(*(o if batched else o[0] for o in outs))


def sample_latent(mu, logvar, eps=None, *, key=None):
    """Lance's `vae_encode` sampling: mu + exp(0.5*logvar) * eps in fp32 (no log-var clamp), moved to
    channel-last. mu, logvar (and eps) are (..., z_dim, t, h, w); returns (..., t, h, w, z_dim).
    eps defaults to N(0, 1) drawn from `key`."""
    mu = jnp.asarray(mu, jnp.float32)
    logvar = jnp.asarray(logvar, jnp.float32)
    if mu.shape != logvar.shape:
        raise ValueError(f"mu {mu.shape} and logvar {logvar.shape} differ in shape")
    if eps is None:
        if key is None:
            raise ValueError("sample_latent needs eps or a PRNG key")
        eps = jax.random.normal(key, mu.shape, jnp.float32)
    eps = jnp.asarray(eps, jnp.float32)
    if eps.shape != mu.shape:
        raise ValueError(f"eps {eps.shape} does not match mu {mu.shape}")
    return jnp.moveaxis(mu + jnp.exp(0.5 * logvar) * eps, -4, -1)


def decode(params, latent, cfg: VaeConfig, *, clamp: bool = True, stream: bool = True):
    """Normalised latents (B, t, h, w, z_dim) or (t, h, w, z_dim) (channel-last, Lance's layout) ->
    video (B, 3, 1 + 4(t-1), 16h, 16w) (or without B) fp32, clamped to [-1, 1] unless clamp=False.

    `stream=True` decodes one latent frame at a time (chunk 0 with the temporal up-convs bypassed, the
    rest through a `lax.scan` with a cache carry); `stream=False` decodes the whole clip at once."""
    _check_latent(latent, cfg)
    batched = latent.ndim == 5
    out = _decode(params, latent if batched else latent[None], jnp.asarray(clamp, bool), cfg, stream)
    return out if batched else out[0]


def init_vae_params(cfg: VaeConfig, seed: int = 0, *, boxed: bool = False):
    """Random params for tests and benchmarks (the VAE itself is frozen and always loaded): kernels
    N(0, 1/fan_in), zero biases, unit gammas, drawn with NumPy from `seed` on the host -- jitting
    flax's init costs ~50 s of XLA compile on CPU for ~200 threefry draws. `boxed` keeps the logical
    axis names (flax LogicallyPartitioned leaves)."""
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(cfg.param_dtype)

    def draw(path, box):
        shape, name = box.value.shape, path[-1].key
        if name == "kernel":
            value = rng.standard_normal(shape, np.float32) / np.sqrt(np.prod(shape[:-1]))
        else:
            value = np.ones(shape, np.float32) if name == "gamma" else np.zeros(shape, np.float32)
        return box.replace_boxed(jnp.asarray(value, dtype))

    params = jax.tree_util.tree_map_with_path(draw, vae_abstract_params(cfg), is_leaf=_is_box)
    return params if boxed else nn.unbox(params)


def _is_box(x):
    return isinstance(x, nn.LogicallyPartitioned)


def _init_inputs(cfg: VaeConfig):
    s = cfg.downsample_spatial // cfg.patch_size
    x = jnp.zeros((1, 1 + CHUNK_FRAMES, s, s, cfg.pixel_channels), jnp.dtype(cfg.dtype))
    z = jnp.zeros((1, 2, 1, 1, cfg.z_dim), jnp.dtype(cfg.dtype))
    return x, z


def vae_abstract_params(cfg: VaeConfig):
    """Boxed abstract params (shapes, dtypes, logical axis names) without allocating anything."""
    x, z = _init_inputs(cfg)
    return jax.eval_shape(lambda r: WanVAE(cfg).init(r, x, z)["params"], jax.random.PRNGKey(0))


def vae_param_shapes(cfg: VaeConfig) -> dict:
    return jax.tree.map(lambda a: tuple(a.shape), nn.unbox(vae_abstract_params(cfg)))


# ----------------------------------------------------------------------------------------------
# Reference state dict <-> params (§A.10-A.11; the table is lance_jax/convert/vae_keys.py).


def read_vae_checkpoint(path: str) -> tuple[dict[str, dict], Any]:
    """(header {key: {'shape'}}, iterator factory of (key, array)) for a .safetensors or torch .pth file."""
    if path.endswith(".safetensors"):
        header = safetensors_header(path)
        return header, lambda keys: read_tensors(path, keys)
    tensors = read_pth(path)
    header = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in tensors.items()}
    return header, lambda keys: ((k, tensors[k]) for k in keys)


def _find_checkpoint(path: str) -> str:
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors")) or \
            sorted(f for f in os.listdir(path) if f.endswith(".pth"))
        if len(found) != 1:
            raise FileNotFoundError(f"{path}: expected exactly one VAE .safetensors (or .pth) file, found {found}")
        path = os.path.join(path, found[0])
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    return path


def load_vae_params(path: str, cfg: VaeConfig) -> dict:
    """Strictly load a reference VAE checkpoint (.safetensors, or the torch .pth through the safe reader;
    a folder holding one of them) into our param tree of NumPy arrays in cfg.param_dtype. Every missing,
    unexpected or mis-shaped key is reported in one CheckpointMismatchError."""
    path = _find_checkpoint(path)
    rules = vae_key_table(cfg)
    shapes = vae_param_shapes(cfg)
    header, tensors = read_vae_checkpoint(path)
    check_reference_keys(header, rules, shapes)
    return params_from_tensors(tensors([r.ref for r in rules]), rules, shapes, jnp.dtype(cfg.param_dtype))


def vae_reference_tensors(params: dict, cfg: VaeConfig):
    """Inverse direction: (reference key, array in the PyTorch layout) for every tensor."""
    return tensors_from_params(params, vae_key_table(cfg))
