"""Reference checkpoint <-> param tree through the key table: bit-exact, strict, with one full error."""
import ml_dtypes
import numpy as np
import pytest

from lance_jax import convert
from lance_jax.models.lance import latent_position_table


def _ref_file(golden):
    return f"{golden.model_dir}/model.safetensors"


@pytest.mark.parametrize("scan_layers", [True, False])
def test_load_and_back_is_bit_exact(golden, golden_cfg, scan_layers):
    cfg = golden_cfg.replace(scan_layers=scan_layers)
    params = convert.load_reference_params(golden.model_dir, cfg)
    shapes = convert.param_shapes(cfg)
    assert _leaf_shapes(params) == _leaf_shapes(shapes, is_shape=True)
    ref = dict(convert.read_tensors(_ref_file(golden)))
    back = dict(convert.reference_tensors(params, cfg))
    assert set(back) == {k for k in ref if not k.startswith(convert.VIT_PREFIX)} - set(convert.DROPPED_KEYS)
    for key, arr in back.items():
        assert arr.dtype == ref[key].dtype and np.array_equal(arr, ref[key]), key


def _leaf_shapes(tree, prefix=(), is_shape=False):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_leaf_shapes(v, prefix + (k,), is_shape))
        return out
    return {prefix: tuple(tree) if is_shape else tree.shape}


def test_table_counts_match_the_reference_layout(golden_cfg):
    rules = convert.key_table(golden_cfg)
    per_layer = [r for r in rules if r.layer == 0]
    assert len(per_layer) == 28  # 10-backbone §7.1: 28 tensors per MoT layer with all q/k norms
    assert len(rules) == 28 * golden_cfg.num_layers + 4 + 8
    single = convert.key_table(golden_cfg.replace(dual_stream=False, qk_norm_gen=False))
    assert not any(convert.GEN in r.ref for r in single)


def test_mismatch_error_lists_everything(golden, golden_cfg, tmp_path):
    tensors = dict(convert.read_tensors(_ref_file(golden)))
    del tensors["language_model.model.layers.1.mlp_moe_gen.up_proj.weight"]
    del tensors["vae2llm.bias"]
    tensors["language_model.model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
    tensors["llm2vae.weight"] = np.zeros((5, 7), np.float32)
    path = str(tmp_path / "model.safetensors")
    convert.write_safetensors(path, tensors)
    with pytest.raises(convert.CheckpointMismatchError) as err:
        convert.load_reference_params(path, golden_cfg)
    msg = str(err.value)
    assert "2 missing" in msg and "layers.1.mlp_moe_gen.up_proj.weight" in msg and "vae2llm.bias" in msg
    assert "1 unexpected" in msg and "self_attn.extra.weight" in msg
    assert "1 mis-shaped" in msg and "llm2vae.weight: checkpoint (5, 7)" in msg


def test_vit_keys_are_unexpected_unless_ignored(golden, golden_cfg):
    with pytest.raises(convert.CheckpointMismatchError, match="vit_model.merger"):
        convert.load_reference_params(golden.model_dir, golden_cfg, ignore_prefixes=())


def test_bf16_checkpoint_loads_as_fp32_master(golden, golden_cfg, tmp_path):
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in convert.read_tensors(_ref_file(golden))}
    path = str(tmp_path / "model.safetensors")
    convert.write_safetensors(path, tensors)
    params = convert.load_reference_params(path, golden_cfg)
    kernel = params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.dtype == np.float32
    rule = next(r for r in convert.key_table(golden_cfg) if r.ref.endswith("layers.2.self_attn.q_proj.weight"))
    np.testing.assert_array_equal(rule.to_ref(kernel[2]), tensors[rule.ref].astype(np.float32))


def test_stored_latent_table_is_the_recomputed_one(golden, golden_cfg):
    """The reference drops `latent_pos_embed.pos_embed` on load; our formula must reproduce it."""
    stored = dict(convert.read_tensors(_ref_file(golden), ["latent_pos_embed.pos_embed"]))["latent_pos_embed.pos_embed"]
    ours = latent_position_table(golden_cfg)
    assert ours.shape == stored.shape
    np.testing.assert_array_equal(ours, stored)  # both: float64 formula rounded once to float32


def test_bad_files(tmp_path, golden_cfg):
    with pytest.raises(FileNotFoundError):
        convert.load_reference_params(str(tmp_path / "nope.safetensors"), golden_cfg)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        convert.safetensors_header(str(bad))
