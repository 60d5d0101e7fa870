"""The training forward sharded over 8 fake CPU devices (fsdp x tensor) equals the single-device result."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from lance_jax import packing, sharding
from lance_jax.parity_cases.train_forward import train_forward_inputs
from lance_jax.convert import load_reference_params
from lance_jax.models.lance import Lance, init_params


@pytest.fixture(scope="module")
def inputs(golden, golden_cfg):
    params = load_reference_params(golden.model_dir, golden_cfg)
    batch, noise, _ = train_forward_inputs(golden, golden_cfg)
    # four different rows: same layout, different noise, so batch-mixing bugs would show
    rows = 4
    batch = {k: np.repeat(v, rows, axis=0) for k, v in batch.items()}
    noise = np.random.default_rng(0).normal(size=(rows,) + noise.shape[1:]).astype(np.float32)
    return params, batch, noise


def _forward(cfg):
    def fwd(params, batch, noise):
        out = Lance(cfg).apply({"params": params}, batch, noise=noise)
        return {k: out[k] for k in ("loss", "v_pred", "ce_logits")} | {"hidden_und": out["hidden"].und}
    return fwd


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_forward_matches_single_device(golden_cfg, inputs, mesh_shape):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set by conftest)")
    params, batch, noise = inputs
    single = jax.jit(_forward(golden_cfg))(params, batch, noise)

    mesh = sharding.make_mesh(mesh_shape)
    boxed = jax.eval_shape(lambda r: init_params(golden_cfg, r, packing.dummy_stream_batch(golden_cfg)),
                           jax.random.PRNGKey(0))
    p_shard = sharding.param_shardings(boxed, mesh)
    b_shard = jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim, x.shape[0]), batch)
    n_shard = sharding.batch_sharding(mesh, noise.ndim, noise.shape[0])
    sharded_params = jax.device_put(params, p_shard)
    # the rules really shard: the MLP kernel is split over tensor, the embedding rows over fsdp
    up = sharded_params["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert len(up.addressable_shards) == 8 and up.addressable_shards[0].data.shape[1:] == (
        up.shape[1] // mesh.shape["fsdp"], up.shape[2] // mesh.shape["tensor"])
    with sharding.use_mesh(mesh):
        fn = jax.jit(_forward(golden_cfg), in_shardings=(p_shard, b_shard, n_shard))
        out = fn(sharded_params, jax.device_put(batch, b_shard), jax.device_put(noise, n_shard))
    # sharded reductions sum in a different order: fp32 rounding only (golden LLM tolerance, 2e-5 of max)
    for key in single:
        got, want = np.asarray(out[key]), np.asarray(single[key])
        assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max(), key


def test_mesh_errors():
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh({"model": 2})
    with pytest.raises(ValueError, match="needs"):
        sharding.make_mesh({"fsdp": 3, "tensor": 5})


def test_indivisible_dims_fall_back_to_replication(golden_cfg):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})  # 2 kv heads cannot split 4 ways
    boxed = jax.eval_shape(lambda r: init_params(golden_cfg, r, packing.dummy_stream_batch(golden_cfg)),
                           jax.random.PRNGKey(0))
    spec = sharding.param_shardings(boxed, mesh)["language_model"]["layers"]["self_attn"]["k_proj"]["kernel"].spec
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)
    assert nn.unbox(boxed)["language_model"]["layers"]["self_attn"]["k_proj"]["kernel"].shape[2] == 2
