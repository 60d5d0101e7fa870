"""Qwen2.5-VL ViT: golden parity, host plans, packing, strict loading, key-table round trip, bf16 option."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from lance_jax.convert.keys import CheckpointMismatchError
from lance_jax.convert.safetensors_io import read_tensors, write_safetensors
from lance_jax.models import vit as V
from lance_jax.models import vit_layout as L
from lance_jax.parity_cases import vit as vit_case


@pytest.fixture(scope="module")
def vit_dir(golden):
    return os.path.join(golden.root, "vit")


@pytest.fixture(scope="module")
def cfg(vit_dir):
    return V.load_vit_config(vit_dir)


@pytest.fixture(scope="module")
def params(vit_dir, cfg):
    return V.load_vit_params(vit_dir, cfg)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def test_parity_all_rows_pass(golden):
    rows = vit_case.run(golden, 0).rows
    failed = [r.format() for r in rows if not r.passed]
    assert not failed, "\n".join(failed)
    names = {r.name for r in rows}
    # every array of vit.npz has a row (inputs `*_pixels` are covered by the `*_patches` rows)
    assert {k for k in golden.arrays("vit") if not k.endswith("_pixels")} <= names


def test_parity_rows_catch_a_wrong_golden(golden, cfg, params):
    """The case can fail: perturbed arrays of one item give FAIL rows for exactly those arrays."""
    z = dict(golden.arrays("vit"))
    z["video4_block0_out"] = z["video4_block0_out"] * (1 + 1e-3)
    z["video4_window_index"] = z["video4_window_index"][::-1].copy()
    rows = vit_case.item_rows("video4", z, cfg, params, vit_case.forward_fn(cfg))
    assert {r.name for r in rows if not r.passed} == {"video4_block0_out", "video4_window_index"}


def test_unscanned_blocks_match_scanned(golden, vit_dir, cfg, params):
    z = golden.arrays("vit")
    cfg_u = cfg.replace(scan_blocks=False)
    params_u = V.load_vit_params(vit_dir, cfg_u)
    assert "blocks_0" in params_u and "blocks" not in params_u
    ours = V.encode(params_u, z["image_patches"], z["image_grid_thw"], cfg_u)
    assert rel_err(ours, z["image_out"]) <= 1e-5
    assert rel_err(ours, V.encode(params, z["image_patches"], z["image_grid_thw"], cfg)) <= 1e-6


def test_packing_equals_one_by_one(cfg, params):
    """Several items (odd windows, several temporal groups) in one call == each item alone."""
    grids = np.array([[1, 6, 10], [2, 4, 8], [1, 6, 10]])  # repeated grid: one compile fewer
    rng = np.random.default_rng(0)
    items = [rng.normal(size=(int(np.prod(g)), cfg.patch_dim)).astype(np.float32) for g in grids]
    packed = np.asarray(V.encode(params, np.concatenate(items), grids, cfg))
    alone = np.concatenate([np.asarray(V.encode(params, x, g[None], cfg)) for x, g in zip(items, grids)])
    assert packed.shape == (int(np.prod(grids, axis=1).sum()) // 4, cfg.out_hidden_size)
    assert rel_err(packed, alone) <= 1e-5


def test_window_index_worked_examples():
    # 40 §B.6: one frame of 6x10 patches (3x5 merged)
    widx, cu = L.window_index([[1, 6, 10]], window_merged=4, merge=2)
    assert widx.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 4, 9, 14]
    assert cu.tolist() == [0, 48, 60]
    # divisible grids get a full (empty) extra window row/column, removed again: [0, 64] per frame
    assert L.window_index([[2, 8, 8]], 4, 2)[1].tolist() == [0, 64, 128]
    # 21x21 merged grid: 6x6 windows, the last row/column 1 merged token thick
    lens = np.diff(L.window_index([[1, 42, 42]], 4, 2)[1]) // 4
    assert len(lens) == 36 and lens.reshape(6, 6)[:5, :5].min() == 16 and lens[-1] == 1 and lens[5] == 4


def test_plan_segments_and_permutation(cfg):
    grid = np.array([[1, 6, 10], [2, 4, 4]])
    plan = L.vit_plan(grid, cfg)
    n = L.num_patches(grid)
    assert sorted(plan.perm.tolist()) == list(range(n))
    for seg in (plan.window, plan.full):
        flat = np.where(seg.sample >= 0, seg.gather, -1).reshape(-1)
        assert (flat[seg.scatter] == np.arange(n)).all()  # scatter reads every row back from its segment
        assert (seg.sample >= 0).sum() == n
    assert plan.full.gather.shape == (3, 60)  # one segment per (item, temporal group), padded to 6*10


def test_single_sequence_segments_give_the_same_result(golden, cfg, params):
    """Segments as one row told apart by sample ids (the O(N²) baseline) == the padded segment batch."""
    z = golden.arrays("vit")
    grid = z["video4_grid_thw"]
    plan = L.vit_plan(grid, cfg)
    _, cu_window = L.window_index(grid, cfg.window_merged, cfg.spatial_merge_size)
    one_row = plan._replace(window=L.single_sequence_segments(cu_window),
                            full=L.single_sequence_segments(L.full_cu_seqlens(grid)))
    out = V.vit_apply_fn(cfg)(params, z["video4_patches"], one_row)
    assert rel_err(out, z["video4_out"]) <= 1e-5


def test_rotary_bf16_quirk():
    spec_inv = [1.0, 0.6328125, 0.3984375, 0.251953125, 0.158203125, 0.10009765625, 0.06298828125, 0.039794921875,
                0.025146484375, 0.015869140625, 0.010009765625, 0.006317138671875, 0.00396728515625,
                0.0025177001953125, 0.0015869140625, 0.00099945068359375, 0.000629425048828125,
                0.0003986358642578125, 0.00025177001953125, 0.0001583099365234375]
    assert L.inv_frequencies(80, 10000.0, bf16=True).astype(np.float64).tolist() == spec_inv
    assert L.angle_table(53, 80, 10000.0, bf16=True)[52, 1] == 33.0
    assert abs(L.angle_table(53, 80, 10000.0)[52, 1] - 32.81) < 0.01
    cfg = V.VitConfig(depth=1, hidden_size=32, intermediate_size=8, num_heads=2, out_hidden_size=8,
                      fullatt_block_indexes=())
    assert not cfg.rope_bf16_tables and cfg.replace(dtype="bfloat16").rope_bf16_tables
    assert not cfg.replace(dtype="bfloat16", rope_bf16=False).rope_bf16_tables


def test_bf16_compute(golden, cfg, params):
    z = golden.arrays("vit")
    out = V.encode(params, z["image_patches"], z["image_grid_thw"], cfg.replace(dtype="bfloat16"))
    assert out.dtype == jax.numpy.bfloat16
    assert rel_err(np.asarray(out, np.float32), z["image_out"]) < 5e-2


def test_strict_loading_lists_every_problem(tmp_path, vit_dir, cfg):
    tensors = dict(read_tensors(os.path.join(vit_dir, "vit.safetensors")))
    del tensors["blocks.0.norm1.weight"]
    tensors["blocks.0.attn.extra"] = np.zeros(3, np.float32)
    tensors["merger.mlp.2.bias"] = np.zeros(5, np.float32)
    write_safetensors(str(tmp_path / "vit.safetensors"), tensors)
    with pytest.raises(CheckpointMismatchError) as err:
        V.load_vit_params(str(tmp_path), cfg)
    msg = str(err.value)
    assert "1 missing" in msg and "blocks.0.norm1.weight" in msg
    assert "1 unexpected" in msg and "blocks.0.attn.extra" in msg
    assert "1 mis-shaped" in msg and "merger.mlp.2.bias" in msg
    with pytest.raises(CheckpointMismatchError, match="blocks.2.attn.qkv.weight"):
        V.load_vit_params(vit_dir, cfg.replace(depth=3))
    with pytest.raises(FileNotFoundError):
        V.load_vit_params(str(tmp_path / "nope.safetensors"), cfg)


@pytest.mark.parametrize("scan", [True, False])
def test_key_table_round_trip(golden, vit_dir, cfg, scan):
    cfg = cfg.replace(scan_blocks=scan)
    for path, prefix in ((os.path.join(vit_dir, "vit.safetensors"), ""),
                         (os.path.join(golden.model_dir, "model.safetensors"), "vit_model.")):
        original = {k: v for k, v in read_tensors(path) if k.startswith(prefix)}
        back = dict(V.vit_reference_tensors(V.load_vit_params(path, cfg, prefix), cfg, prefix))
        assert back.keys() == original.keys()
        for k, v in original.items():
            assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), k


def test_config_from_file_and_other_sizes(tmp_path, cfg):
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.fullatt_block_indexes) == (2, 32, 2, (1,))
    d = {"depth": 3, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2, "out_hidden_size": 12,
         "fullatt_block_indexes": [0, 2], "window_size": 56}
    (tmp_path / "config.json").write_text(json.dumps(d))
    other = V.load_vit_config(str(tmp_path))
    assert other.window_merged == 2 and other.fullatt_block_indexes == (0, 2)
    # random params from the abstract shapes (a jitted `init` compiles for ~15 s on 2 CPU cores)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.1, s).astype(np.float32), V.vit_param_shapes(other),
                          is_leaf=lambda x: isinstance(x, tuple))
    out = V.encode(params, np.ones((2 * 8 * 12, other.patch_dim), np.float32), [[2, 8, 12]], other)
    assert out.shape == (48, 12) and np.isfinite(np.asarray(out)).all()
    del d["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="hidden_size"):
        V.load_vit_config(str(tmp_path))
    with pytest.raises(ValueError, match="fullatt_block_indexes"):
        cfg.replace(fullatt_block_indexes=(5,))


def test_input_errors(cfg, params):
    with pytest.raises(ValueError, match="implied by grid_thw"):
        V.encode(params, np.zeros((10, cfg.patch_dim), np.float32), [[1, 4, 4]], cfg)
    with pytest.raises(ValueError, match="multiples of the merge size"):
        L.vit_plan([[1, 3, 4]], cfg)
    with pytest.raises(ValueError, match="positive"):
        L.vit_plan([[0, 4, 4]], cfg)


def test_every_param_has_logical_names(cfg):
    patches, plan = V.vit_init_inputs(cfg)
    boxed = jax.eval_shape(lambda r: V.VisionTransformer(cfg).init(r, patches, plan), jax.random.PRNGKey(0))
    specs = jax.tree.leaves(nn.get_partition_spec(boxed["params"]),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    shapes = jax.tree.leaves(nn.unbox(boxed["params"]))
    assert len(specs) == len(shapes)
    assert all(len(s) == len(x.shape) and None not in tuple(s) for s, x in zip(specs, shapes))


def test_sharded_params_forward_matches(golden, cfg, params):
    """Params placed by the logical rules on 8 fake devices (fsdp x tensor) give the same tokens."""
    from lance_jax import sharding

    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (set by conftest)")
    z = golden.arrays("vit")
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    patches, plan = V.vit_init_inputs(cfg)
    boxed = jax.eval_shape(lambda r: V.VisionTransformer(cfg).init(r, patches, plan), jax.random.PRNGKey(0))
    shardings = sharding.param_shardings(boxed["params"], mesh)
    qkv = shardings["blocks"]["attn"]["qkv"]["kernel"].spec
    assert qkv == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor", None)  # (layers, embed, qkv, heads, hd)
    with sharding.use_mesh(mesh):
        out = V.vit_apply_fn(cfg)(jax.device_put(params, shardings), z["video2_patches"],
                                  L.vit_plan(z["video2_grid_thw"], cfg))
    assert rel_err(out, z["video2_out"]) <= 1e-5
