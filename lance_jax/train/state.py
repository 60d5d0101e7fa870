"""TrainState and its creation and shardings over a mesh (FSDP by default, `sharding.LOGICAL_RULES`)."""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from lance_jax import sharding as S


@flax.struct.dataclass
class TrainState:
    """step: train-step calls so far (applied + skipped); skipped: non-finite steps skipped.

    params / ema_params are fp32 masters (the model casts to `cfg.dtype` for compute). rng is the base key
    (uint32[2]); step s draws from fold_in(rng, s). ema_params is None when EMA is off.
    """

    step: jax.Array
    skipped: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array

    @property
    def applied(self):
        return self.step - self.skipped


def state_shardings(abstract_state: TrainState, boxed_abstract, tx: optax.GradientTransformation, mesh) -> TrainState:
    """NamedShardings for every leaf: params/EMA by logical axes, Adam moments like their params, scalars replicated."""
    p_sh = S.param_shardings(boxed_abstract, mesh)
    rep = NamedSharding(mesh, PartitionSpec())
    opt_sh = like_params(abstract_state.opt_state, p_sh, rep)
    return TrainState(step=rep, skipped=rep, params=p_sh, opt_state=opt_sh,
                      ema_params=None if abstract_state.ema_params is None else p_sh, rng=rep)


def _dict_keys(path) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def like_params(tree, param_shardings, default):
    """Shardings for an optimizer-state tree: a leaf whose dict-key path ends with a param's path (and has its
    shape) takes that param's sharding (Adam mu/nu inside chain/multi_transform/masked states); others `default`."""
    by_path = {_dict_keys(p): sh for p, sh in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
    lengths = sorted({len(k) for k in by_path}, reverse=True)

    def pick(path, leaf):
        keys = _dict_keys(path)
        for n in lengths:
            if n <= len(keys) and keys[-n:] in by_path:
                return by_path[keys[-n:]]
        return default

    return jax.tree_util.tree_map_with_path(pick, tree)


def create_state(cfg, tx, mesh, example_batch, *, seed: int, use_ema: bool, params=None):
    """(state, shardings). params: an unboxed fp32 tree (e.g. converted reference weights) or None (random init)."""
    boxed, p_sh = S.param_plan(cfg, mesh, example_batch=example_batch)  # outside use_mesh (no unbox constraints)
    rng = jax.random.PRNGKey(seed)

    def build(params):
        return TrainState(step=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params),
                          ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
                          rng=jax.random.fold_in(rng, 2))

    abstract = jax.eval_shape(build, nn.unbox(boxed))
    shardings = state_shardings(abstract, boxed, tx, mesh)
    if params is None:
        params, _ = S.init_params_sharded(cfg, mesh, jax.random.fold_in(rng, 1), example_batch=example_batch)
    else:
        params = jax.device_put(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params), p_sh)
    with S.use_mesh(mesh):
        state = jax.jit(build, out_shardings=shardings)(params)
    return state, shardings
