"""Building blocks of the Wan 2.2 video VAE (40-vae-and-vit §A.3), channel-last (N, T, H, W, C).

Every block takes a static `mode`:

* ``"whole"``  -- the whole clip at once with the equivalent whole-sequence rules of §A.7.3
  (causal convs pad two zero frames; temporal resamplers bypass frame 0).
* ``"first"``  -- the first streamed chunk (1 frame): temporal resamplers are bypassed, the
  DupUp3D shortcut drops its first ``ft - 1`` frames.
* ``"next"``   -- every later chunk.

In the two streaming modes the per-layer histories live in the flax collection ``"cache"`` (apply
with ``mutable=["cache"]``): each kernel-3 causal conv keeps the last 2 frames of its input, the
encoder's temporal down-conv the last frame of its input. A zero-initialised cache makes chunk 0 and
later chunks the same computation for every causal conv (zero history == the causal zero pad); the
decoder's temporal up-conv is not run on chunk 0 and its zero history is what the reference's "Rep"
marker means (frame 0 is not history).

Param names follow the reference state dict (``residual_2`` <- ``residual.2``, ``kernel`` <-
``weight``, see `vae.vae_key_table`); kernels are (kt, kh, kw, I, O), 2-D ones (kh, kw, I, O), 1x1
convs (I, O).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

MODES = ("whole", "first", "next")

CONV_INIT = nn.initializers.lecun_normal()
WINDOW_AXES = ("conv_time", "conv_row", "conv_col")  # kernel window dims (t, h, w); never sharded
IN_AXIS = "conv_in"
OUT_AXIS = "conv_out"
NORM_AXIS = "norm"
# Logical names the VAE params use beyond sharding.LOGICAL_RULES (proposed: replicated; the VAE is
# 1.4 GB in bf16 and its cost is activations, which shard over batch / space instead).
VAE_LOGICAL_RULES = tuple((name, None) for name in WINDOW_AXES + (IN_AXIS, OUT_AXIS))

_DN3 = ("NDHWC", "DHWIO", "NDHWC")
_DN2 = ("NHWC", "HWIO", "NHWC")


def _check_mode(mode: str):
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} not in {MODES}")


def silu_f32(x):
    return jax.nn.silu(x.astype(jnp.float32))


def per_frame(fn, x):
    """Apply a (N', H, W, C) -> (N', H', W', C') function to every frame of x (N, T, H, W, C)."""
    n, t = x.shape[:2]
    y = fn(x.reshape((n * t,) + x.shape[2:]))
    return y.reshape((n, t) + y.shape[1:])


class RMSNorm(nn.Module):
    """Channel L2 normalisation (§A.3.3): x / max(|x|_2, 1e-12) * sqrt(C) * gamma, in fp32; returns fp32."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        gamma = self.param("gamma", nn.with_logical_partitioning(nn.initializers.ones, (NORM_AXIS,)), (c,),
                           self.param_dtype)
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
        return xf / jnp.maximum(norm, 1e-12) * math.sqrt(c) * gamma.astype(jnp.float32)


class Dense(nn.Module):
    """A 1x1(x1) conv as a channel matmul: kernel (I, O), bias (O,)."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(CONV_INIT, (IN_AXIS, OUT_AXIS)),
                            (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (OUT_AXIS,)), (self.features,),
                          self.param_dtype)
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)


class Conv2d(nn.Module):
    """Per-frame 2-D conv with explicit spatial padding ((top, bottom), (left, right)) and stride."""

    features: int
    padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
    stride: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(CONV_INIT, WINDOW_AXES[1:] + (IN_AXIS, OUT_AXIS)),
                            (3, 3, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (OUT_AXIS,)), (self.features,),
                          self.param_dtype)
        kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)

        def conv(f):
            y = jax.lax.conv_general_dilated(f, kernel, (self.stride,) * 2, self.padding, dimension_numbers=_DN2)
            return y + bias

        return per_frame(conv, x.astype(self.dtype))


class CausalConv3d(nn.Module):
    """3-D conv, kernel (kt, kh, kw), spatial padding kh//2 / kw//2 on both sides.

    causal=True: ``kt - 1`` frames of history in front (zeros in "whole" mode, the cache otherwise);
    causal=False: temporally valid (used with stride_t 2 by the encoder's temporal down-conv).
    """

    features: int
    kernel_size: tuple[int, int, int] = (3, 3, 3)
    stride_t: int = 1
    causal: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mode: str = "whole"):
        _check_mode(mode)
        kt, kh, kw = self.kernel_size
        kernel = self.param("kernel", nn.with_logical_partitioning(CONV_INIT, WINDOW_AXES + (IN_AXIS, OUT_AXIS)),
                            (kt, kh, kw, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (OUT_AXIS,)), (self.features,),
                          self.param_dtype)
        x = x.astype(self.dtype)
        hist = kt - 1 if self.causal else 0
        if hist:
            if mode == "whole":
                x = jnp.pad(x, ((0, 0), (hist, 0), (0, 0), (0, 0), (0, 0)))
            else:
                cache = self.variable("cache", "history", jnp.zeros, (x.shape[0], hist) + x.shape[2:], x.dtype)
                x = jnp.concatenate([cache.value, x], axis=1)
                cache.value = x[:, -hist:]
        pad = ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2))
        y = jax.lax.conv_general_dilated(x, kernel.astype(self.dtype), (self.stride_t, 1, 1), pad,
                                         dimension_numbers=_DN3)
        return y + bias.astype(self.dtype)


class ResidualBlock(nn.Module):
    """shortcut(x) + conv_b(SiLU(RMS_b(conv_a(SiLU(RMS_a(x)))))) (§A.3.4)."""

    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mode: str):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = silu_f32(RMSNorm(self.param_dtype, name="residual_0")(x))
        h = CausalConv3d(self.features, name="residual_2", **kw)(h, mode)
        h = silu_f32(RMSNorm(self.param_dtype, name="residual_3")(h))
        h = CausalConv3d(self.features, name="residual_6", **kw)(h, mode)
        if x.shape[-1] != self.features:
            x = Dense(self.features, name="shortcut", **kw)(x)
        return x.astype(self.dtype) + h


class AttentionBlock(nn.Module):
    """Single-head, per-frame, non-causal self-attention over the h*w positions (§A.3.5)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        n, t, h, w, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        u = RMSNorm(self.param_dtype, name="norm")(x)
        qkv = Dense(3 * c, name="to_qkv", **kw)(u).reshape(n * t, h * w, 3 * c)
        q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        o = jnp.einsum("bqk,bkc->bqc", probs, v).reshape(n, t, h, w, c)
        return Dense(c, name="proj", **kw)(o) + x.astype(self.dtype)


class Resample(nn.Module):
    """Stage-final resampler (§A.3.6): downsample2d / downsample3d / upsample2d / upsample3d."""

    resample_mode: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mode: str):
        _check_mode(mode)
        c = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rm = self.resample_mode
        if rm.startswith("upsample"):
            if rm == "upsample3d":
                x = self._time_up(x, mode, kw)
            x = per_frame(lambda f: jnp.repeat(jnp.repeat(f, 2, axis=1), 2, axis=2), x)
            return Conv2d(c, ((1, 1), (1, 1)), 1, name="resample_1", **kw)(x)
        if rm.startswith("downsample"):
            x = Conv2d(c, ((0, 1), (0, 1)), 2, name="resample_1", **kw)(x)
            if rm == "downsample3d":
                x = self._time_down(x, mode, kw)
            return x
        raise ValueError(f"unknown resample mode {rm!r}")

    def _time_up(self, x, mode, kw):
        """C -> 2C causal time conv, frames interleaved ([0, C) = earlier frame); frame 0 bypassed."""
        conv = CausalConv3d(2 * x.shape[-1], (3, 1, 1), name="time_conv", **kw)
        if mode == "first":
            return x
        if mode == "whole":
            if x.shape[1] == 1:
                return x
            head, rest = x[:, :1].astype(self.dtype), x[:, 1:]
        else:
            head, rest = None, x
        y = conv(rest, "whole" if mode == "whole" else "next")
        n, t, h, w, c2 = y.shape
        y = y.reshape(n, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(n, 2 * t, h, w, c2 // 2)
        return y if head is None else jnp.concatenate([head, y], axis=1)

    def _time_down(self, x, mode, kw):
        """Stride-2 valid time conv over [last frame of the previous chunk, chunk]; frame 0 bypassed."""
        conv = CausalConv3d(x.shape[-1], (3, 1, 1), stride_t=2, causal=False, name="time_conv", **kw)
        if mode == "whole":
            if x.shape[1] == 1:
                return x
            return jnp.concatenate([x[:, :1].astype(self.dtype), conv(x)], axis=1)
        x = x.astype(self.dtype)
        last = self.variable("cache", "time_conv_last", jnp.zeros, (x.shape[0], 1) + x.shape[2:], x.dtype)
        if mode == "first":
            last.value = x[:, -1:]
            return x
        y = conv(jnp.concatenate([last.value, x], axis=1))
        last.value = x[:, -1:]
        return y


def avg_down_3d(x, out_channels: int, ft: int, fs: int):
    """AvgDown3D (§A.3.7): zero-pad frames in front to a multiple of ft, space-to-depth, group means."""
    n, t, h, w, c = x.shape
    f = ft * fs * fs
    group = c * f // out_channels
    pad_t = (ft - t % ft) % ft
    if pad_t:
        x = jnp.pad(x, ((0, 0), (pad_t, 0), (0, 0), (0, 0), (0, 0)))
        t += pad_t
    # S[c*F + a*fs^2 + b*fs + d, tau', i, j] = x[c, tau'*ft + a, i*fs + b, j*fs + d]
    x = x.reshape(n, t // ft, ft, h // fs, fs, w // fs, fs, c)
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6).reshape(n, t // ft, h // fs, w // fs, out_channels, group)
    return jnp.mean(x.astype(jnp.float32), axis=-1).astype(x.dtype)


def dup_up_3d(x, out_channels: int, ft: int, fs: int, first_chunk: bool):
    """DupUp3D (§A.3.8): out[o, tau*ft + a, i*fs + b, j*fs + d] = x[(o*F + a*fs^2 + b*fs + d) div R]."""
    n, t, h, w, c = x.shape
    f = ft * fs * fs
    repeats = out_channels * f // c
    x = jnp.repeat(x, repeats, axis=-1).reshape(n, t, h, w, out_channels, ft, fs, fs)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(n, t * ft, h * fs, w * fs, out_channels)
    return x[:, ft - 1:] if first_chunk else x
