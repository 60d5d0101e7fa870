"""Lance forward: logical axis names, stream routing, capacity invariance, precision and rng handling."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lance_jax import packing
from lance_jax.parity_cases.train_forward import train_forward_inputs
from lance_jax.convert import load_reference_params
from lance_jax.models.lance import Lance, count_params, init_params
from lance_jax.sharding import LOGICAL_RULES


@pytest.fixture(scope="module")
def golden_inputs(golden, golden_cfg):
    params = load_reference_params(golden.model_dir, golden_cfg)
    batch, noise, extras = train_forward_inputs(golden, golden_cfg)
    return params, batch, noise, extras


def _apply(cfg, params, batch, noise):
    return jax.jit(lambda p, b, n: Lance(cfg).apply({"params": p}, b, noise=n))(params, batch, noise)


def test_every_param_has_logical_names(golden_cfg):
    boxed = jax.eval_shape(lambda r: init_params(golden_cfg, r, packing.dummy_stream_batch(golden_cfg)),
                           jax.random.PRNGKey(0))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    known = {name for name, _ in LOGICAL_RULES}
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= known, leaf.names


def test_routing_costs_one_weight_set_per_token(golden_cfg):
    """A dual-stream forward must cost ~ a single-stream one at equal tokens (no both-weights-on-every-token)."""
    cfg = golden_cfg.replace(num_layers=2)
    batch = packing.dummy_stream_batch(cfg, capacities=packing.Capacities(256, 256, 8, 8))

    def flops(c):
        params = jax.eval_shape(lambda r: init_params(c, r, batch), jax.random.PRNGKey(0))
        fn = jax.jit(lambda p, b: Lance(c).apply({"params": p}, b, noise=jnp.zeros_like(b["latents"]))["loss"])
        return fn.lower(nn.unbox(params), batch).compile().cost_analysis()["flops"]

    dual, single = flops(cfg), flops(cfg.replace(dual_stream=False, qk_norm_gen=False))
    assert dual / single < 1.02, (dual, single)


def test_capacity_padding_does_not_change_outputs(golden, golden_cfg, golden_inputs):
    params, batch, noise, ex = golden_inputs
    out = _apply(golden_cfg, params, batch, noise)
    caps = packing.stream_capacities(batch)
    big = packing.pad_stream_batch(batch, caps._replace(und=caps.und + 64, gen=caps.gen + 128, ce=caps.ce + 8))
    big_noise = np.pad(noise, ((0, 0), (0, 128), (0, 0)))
    out_big = _apply(golden_cfg, params, big, big_noise)
    np.testing.assert_allclose(out_big["loss"], out["loss"], rtol=1e-6)
    np.testing.assert_allclose(out_big["hidden"].und[:, : ex["cu"]], out["hidden"].und, atol=1e-5)
    np.testing.assert_allclose(out_big["v_pred"][:, : ex["cg"]], out["v_pred"], atol=1e-5)


def test_copied_gen_weights_equal_single_stream(golden_cfg, golden_inputs):
    """init_moe semantics: with *_moe_gen := und weights, MoT == the single-stream Qwen2 layer."""
    params, batch, noise, _ = golden_inputs

    def und_only(tree):
        if isinstance(tree, dict):
            return {k: und_only(v) for k, v in tree.items() if "_moe_gen" not in k}
        return tree

    def copied(tree):
        if isinstance(tree, dict):
            return {k: copied(tree[k.replace("_moe_gen", "")]) for k in tree}
        return tree

    single_cfg = golden_cfg.replace(dual_stream=False, qk_norm_gen=False)
    single = _apply(single_cfg, und_only(params), batch, noise)
    dual = _apply(golden_cfg, copied(params), batch, noise)
    np.testing.assert_allclose(dual["loss"], single["loss"], rtol=1e-6)
    np.testing.assert_allclose(dual["v_pred"], single["v_pred"], atol=1e-5)


def test_bf16_compute_runs_close_to_fp32(golden_cfg, golden_inputs):
    params, batch, noise, _ = golden_inputs
    ref = _apply(golden_cfg, params, batch, noise)
    low = _apply(golden_cfg.replace(dtype="bfloat16"), params, batch, noise)
    assert low["hidden"].und.dtype == jnp.bfloat16
    rel = float(jnp.abs(low["v_pred"] - ref["v_pred"]).max() / jnp.abs(ref["v_pred"]).max())
    assert 1e-4 < rel < 0.1, rel  # bf16 is visibly different but not broken (golden README: ~1e-2)


def test_noise_from_rng_is_deterministic_and_used(golden_cfg, golden_inputs):
    params, batch, _, _ = golden_inputs
    model = Lance(golden_cfg)
    fwd = jax.jit(lambda p, b, key: model.apply({"params": p}, b, rngs={"noise": key})["mse_loss"])
    a, b_, c = (fwd(params, batch, jax.random.PRNGKey(k)) for k in (1, 1, 2))
    assert a == b_ and a != c


def test_loss_weights_scale_each_tokens_term(golden_cfg, golden_inputs):
    """Per-token loss weights: all 1 is bit-for-bit the reference loss; otherwise each token's term is scaled
    over the unchanged token-count denominators, and weight 0 removes a token's gradient."""
    params, batch, noise, _ = golden_inputs
    ref = _apply(golden_cfg, params, batch, noise)
    ones = dict(batch, gen_loss_weight=np.ones(batch["latents"].shape[:2], np.float32),
                ce_loss_weight=np.ones(batch["ce_valid"].shape, np.float32))
    same = _apply(golden_cfg, params, ones, noise)
    for k in ("ce_loss", "mse_loss", "loss"):
        assert float(same[k]) == float(ref[k]), k
    rng = np.random.default_rng(0)
    gw = rng.uniform(0.0, 2.0, batch["latents"].shape[:2]).astype(np.float32)
    cw = rng.uniform(0.0, 2.0, batch["ce_valid"].shape).astype(np.float32)
    out = _apply(golden_cfg, params, dict(batch, gen_loss_weight=gw, ce_loss_weight=cw), noise)
    mask, valid = np.asarray(ref["mse_mask"]), np.asarray(batch["ce_valid"])
    per_gen = np.asarray(ref["mse_per_elem"]).mean(-1)
    want_mse = (per_gen * gw)[mask].sum() / mask.sum()
    want_ce = (np.asarray(ref["ce_per_token"]) * cw)[valid].sum() / valid.sum()
    # float32 sums over a few hundred terms: relative error ~1e-6
    np.testing.assert_allclose(float(out["mse_loss"]), want_mse, rtol=1e-5)
    np.testing.assert_allclose(float(out["ce_loss"]), want_ce, rtol=1e-5)
    assert abs(want_mse - float(ref["mse_loss"])) > 1e-3 * float(ref["mse_loss"])  # the weights did change it
    zero = dict(batch, gen_loss_weight=np.zeros_like(gw), ce_loss_weight=cw)
    grads = jax.jit(jax.grad(lambda p: Lance(golden_cfg).apply({"params": p}, zero, noise=noise)["loss"]))(params)
    assert float(jnp.abs(grads["llm2vae"]["kernel"]).max()) == 0.0  # no MSE term: the velocity head gets nothing


def test_gradients_are_finite(golden_cfg, golden_inputs):
    params, batch, noise, _ = golden_inputs
    grads = jax.jit(jax.grad(lambda p: Lance(golden_cfg).apply({"params": p}, batch, noise=noise)["loss"]))(params)
    flat = jax.tree.leaves(grads)
    assert all(bool(jnp.isfinite(g).all()) for g in flat)
    assert float(jnp.abs(grads["language_model"]["layers"]["mlp_moe_gen"]["up_proj"]["kernel"]).max()) > 0


def test_released_parameter_count():
    """10-backbone §7.4: the image checkpoint holds 6,185,205,808 params incl. the 4096x2048 fixed table."""
    import os

    from lance_jax.config import config_dict_from_file, model_config_from_dict

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "models", "lance_3b_image.py")
    cfg = model_config_from_dict(config_dict_from_file(path).model)
    assert count_params(cfg) == 6_185_205_808 - 4096 * 2048


def test_bf16_rotary_option_changes_the_forward(golden_cfg, golden_inputs):
    """Both settings of the quirk option run; 'on' (released behaviour) differs far beyond parity noise."""
    params, batch, noise, _ = golden_inputs
    off = _apply(golden_cfg, params, batch, noise)
    on = _apply(golden_cfg.replace(rope_bf16_inv_freq=True), params, batch, noise)
    rel = float(jnp.abs(on["hidden"].und - off["hidden"].und).max() / jnp.abs(off["hidden"].und).max())
    assert rel > 1e-3, rel
