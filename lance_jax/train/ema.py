"""EMA of the params (50 §3.8): at the first applied update the EMA is overwritten with the new weights
(ema_start_steps = 0), then ema <- decay * ema + (1 - decay) * params after every applied update."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def ema_update(ema, params, decay: float, applied_before):
    """applied_before: number of updates applied before this one (0 -> copy)."""
    d = jnp.where(applied_before == 0, 0.0, decay).astype(jnp.float32)
    return jax.tree.map(lambda e, p: (d * e.astype(jnp.float32) + (1.0 - d) * p.astype(jnp.float32)).astype(e.dtype),
                        ema, params)
