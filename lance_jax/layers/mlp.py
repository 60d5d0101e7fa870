"""SwiGLU MLP of the Qwen2 decoder: down(silu(gate(x)) * up(x)), no biases."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from lance_jax.layers.linear import dense


class MLP(nn.Module):
    """x (B, N, H) -> (B, N, H)."""

    intermediate_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        hidden = x.shape[-1]
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        gate = dense(self.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = dense(self.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        h = nn.with_logical_constraint(nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
        return dense(hidden, ("mlp", "embed"), name="down_proj", **kw)(h)
