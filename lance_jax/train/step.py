"""The train step `(state, batch, rng) -> (state, metrics)`, jitted with shardings over a mesh.

Order (50 §3.1): flow-matching noise and (optionally) timesteps from `rng` -> forward + loss
(0.25 CE + 1.0 MSE, global token means, `Lance.__call__`) -> grads (frozen leaves stop-gradiented) ->
pre-clip global norm -> skip if the loss or any gradient is non-finite (no optimizer, EMA or
schedule step; `skipped` counted) -> clip 1.0 -> Adam -> EMA.

Injectable randomness (tests, parity): a batch may carry `noise` (B, Cg, P); with
`timesteps="device"` the step samples one z ~ N(0, 1) per target item from `rng` (batch key
`gen_item` (B, Cg) int32, -1 = not a target; rows whose host logit is -inf stay clean, e.g. ff2v
condition frames); with `timesteps="host"` the batch's `timestep_logits` are used as they are
(the data pipeline drew them with its seeded rng). The shift (s = 4) is applied in the model.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from lance_jax import sharding as S
from lance_jax.models.lance import Lance
from lance_jax.train.ema import ema_update
from lance_jax.train.state import TrainState

TIMESTEP_MODES = ("host", "device")
_NOT_MODEL_INPUTS = ("noise", "gen_item")


def device_timestep_logits(batch, rng):
    """One logit-normal z per target item (per packed sequence), repeated over the item's rows."""
    item = batch["gen_item"]
    z = jax.random.normal(rng, item.shape, jnp.float32)  # item ids are < Cg
    picked = jnp.take_along_axis(z, jnp.maximum(item, 0), axis=-1)
    noisy = (item >= 0) & jnp.isfinite(batch["timestep_logits"])
    return jnp.where(noisy, picked, -jnp.inf)


def tree_all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def make_loss_fn(model: Lance, trainable_mask):
    """(params, model batch, noise) -> (loss, aux); frozen leaves are stop-gradiented (zero grads, no work)."""

    def loss_fn(params, batch, noise):
        params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable_mask)
        out = model.apply({"params": params}, batch, noise=noise)
        aux = dict(ce_loss=out["ce_loss"], mse_loss=out["mse_loss"],
                   ce_tokens=jnp.sum(batch["ce_valid"]), mse_tokens=jnp.sum(out["mse_mask"]))
        return out["loss"], aux

    return loss_fn


def train_step_fn(model: Lance, tx: optax.GradientTransformation, schedule, trainable_mask, *,
                  ema_decay: float | None, timesteps: str = "host"):
    """The un-jitted step. trainable_mask: bool tree like params (False = frozen, stop-gradient)."""
    if timesteps not in TIMESTEP_MODES:
        raise ValueError(f"timesteps must be one of {TIMESTEP_MODES}, got {timesteps!r}")

    loss_fn = make_loss_fn(model, trainable_mask)

    def step(state: TrainState, batch: dict, rng) -> tuple[TrainState, dict[str, Any]]:
        rng_noise, rng_t = jax.random.split(rng)
        batch = dict(batch)
        noise = batch.pop("noise", None)
        if timesteps == "device":
            batch["timestep_logits"] = device_timestep_logits(batch, rng_t)
        batch.pop("gen_item", None)
        if noise is None:
            noise = jax.random.normal(rng_noise, batch["latents"].shape, jnp.float32)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, noise)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & tree_all_finite(grads)
        lr = schedule(state.applied)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        new_ema = None if state.ema_params is None else ema_update(state.ema_params, new_params, ema_decay, state.applied)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = state.replace(
            step=state.step + 1,
            skipped=state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32),
            params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state),
            ema_params=None if new_ema is None else keep(new_ema, state.ema_params),
        )
        metrics = dict(loss=loss, grad_norm=grad_norm, lr=lr, finite=finite, skipped=new_state.skipped, **aux)
        return new_state, metrics

    return step


def batch_shardings(mesh, batch_abstract: dict):
    """Leading dim of every batch array over (data, fsdp) where it divides."""
    return {k: S.batch_sharding(mesh, len(v.shape), v.shape[0]) for k, v in batch_abstract.items()}


def jit_train_step(step, mesh, state_shardings: TrainState, batch_abstract: dict):
    """jax.jit with explicit shardings; the state is donated. Call it inside `sharding.use_mesh(mesh)`."""
    rep = NamedSharding(mesh, PartitionSpec())
    b_sh = batch_shardings(mesh, batch_abstract)
    return jax.jit(step, in_shardings=(state_shardings, b_sh, rep), out_shardings=(state_shardings, rep),
                   donate_argnums=(0,))


def step_rng(state: TrainState):
    """The rng of the step about to run: fold_in(base, step) (deterministic across resumes)."""
    return jax.random.fold_in(state.rng, state.step)
