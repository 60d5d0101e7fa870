"""Dense projections whose params carry logical axis names (one name per kernel dimension).

Kernels are created in their natural multi-dimensional shape (e.g. (H, heads, head_dim)), never
flattened: flax's DenseGeneral initialises a flat kernel and reshapes it, which breaks logical
sharding constraints on the kernel when a mesh is active.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

KERNEL_INIT = nn.initializers.normal(stddev=0.02)


class Projection(nn.Module):
    """x (..., *in) -> (..., *features): contracts the last `in_dims` axes of x with kernel (*in, *features)."""

    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    use_bias: bool
    in_dims: int = 1
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = KERNEL_INIT

    @nn.compact
    def __call__(self, x):
        in_shape = tuple(x.shape[-self.in_dims:])
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                            in_shape + self.features, self.param_dtype)
        dtype = self.dtype or x.dtype
        contract = (tuple(range(x.ndim - self.in_dims, x.ndim)), tuple(range(self.in_dims)))
        y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (contract, ((), ())))
        if self.use_bias:
            bias_axes = self.kernel_axes[self.in_dims:]
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, bias_axes), self.features,
                              self.param_dtype)
            y = y + bias.astype(dtype)
        return y


def dense(features: int | Sequence[int], kernel_axes: tuple[str, ...], *, use_bias: bool, axis=-1, name=None,
          dtype=None, param_dtype=jnp.float32):
    """A Projection; `axis=(-2, -1)` contracts two input axes (e.g. heads x head_dim for o_proj)."""
    features = tuple(features) if isinstance(features, (tuple, list)) else (int(features),)
    in_dims = len(axis) if isinstance(axis, (tuple, list)) else 1
    return Projection(features, tuple(kernel_axes), use_bias, in_dims, dtype, param_dtype or jnp.float32, name=name)
