"""AdamW as the reference runs it (50 §3.6-3.7): clip(global norm, +1e-6) -> Adam -> -lr(k), frozen leaves stateless.

lr(k) = peak * min(1, k / warmup) with k = number of *applied* updates (the first update uses LR 0);
skipped (non-finite) steps leave the optimizer state untouched, so they advance neither k nor Adam's count.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def lr_schedule(peak: float, warmup_steps: int, schedule: str = "constant", *, total_steps: int = 500_000,
                min_lr: float = 1e-6, num_cycles: float = 5.0):
    """LR as a function of the number of applied updates k. `constant`: linear warm-up then flat.

    `cosine` is the reference's HF "cosine with min LR" (num_cycles 5 -> five oscillations, 50 §3.6 quirk).
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown LR schedule {schedule!r} (constant | cosine)")

    def fn(k):
        k = jnp.asarray(k, jnp.float32)
        warm = jnp.minimum(1.0, k / warmup_steps) if warmup_steps > 0 else jnp.float32(1.0)
        if schedule == "constant":
            return peak * warm
        p = jnp.clip((k - warmup_steps) / max(1, total_steps - warmup_steps), 0.0, 1.0)
        factor = 0.5 * (1.0 + jnp.cos(2.0 * jnp.pi * num_cycles * p))
        floor = min_lr / peak
        return peak * jnp.where(k < warmup_steps, warm, floor + (1.0 - floor) * factor)

    return fn


class ClipState(NamedTuple):
    pass


def clip_by_global_norm_eps(max_norm: float, eps: float = 1e-6) -> optax.GradientTransformation:
    """PyTorch `clip_grad_norm_`: g * min(1, max_norm / (||g|| + eps)) (optax's variant lacks the eps)."""

    def init(params):
        del params
        return ClipState()

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        coef = jnp.minimum(1.0, max_norm / (norm + eps))
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(init, update)


def adamw(schedule, *, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-15, clip_norm: float = 1.0,
          weight_decay: float = 0.0) -> optax.GradientTransformation:
    """clip -> scale_by_adam -> (decoupled decay) -> -lr. weight_decay is 0 in the reference."""
    parts = []
    if clip_norm and clip_norm > 0:
        parts.append(clip_by_global_norm_eps(clip_norm))
    parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=0.0))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)


def make_optimizer(opt_cfg, trainable_mask: Any) -> tuple[optax.GradientTransformation, Any]:
    """(transform, schedule) from an `optimizer` ConfigDict; frozen leaves (mask False) get no state, zero update."""
    schedule = lr_schedule(opt_cfg.lr, opt_cfg.warmup_steps, opt_cfg.get("schedule", "constant"),
                           total_steps=opt_cfg.get("total_steps", 500_000), min_lr=opt_cfg.get("min_lr", 1e-6),
                           num_cycles=opt_cfg.get("num_cycles", 5.0))
    inner = adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, clip_norm=opt_cfg.clip_norm,
                  weight_decay=opt_cfg.get("weight_decay", 0.0))
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask)
    tx = optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule
