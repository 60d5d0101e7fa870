"""RMSNorm as the reference computes it (Qwen2): normalise in fp32, cast back, then scale."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class RMSNorm(nn.Module):
    """x (..., D) -> (..., D). The weight multiplies *after* the cast back to x.dtype (10-backbone §8)."""

    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],), self.param_dtype
        )
        xf = x.astype(jnp.float32)
        y = xf * jnp.reciprocal(jnp.sqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps))
        return y.astype(x.dtype) * scale.astype(x.dtype)
