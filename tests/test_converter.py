"""convert_weights.py: reference layout <-> orbax, bit-exact, strict, atomic, sharded restore."""
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

from lance_jax import packing, sharding
from lance_jax.convert import converter, read_tensors, write_safetensors
from lance_jax.convert.keys import CheckpointMismatchError
from lance_jax.convert.sources import find_reference
from lance_jax.models.lance import init_params
from lance_jax.parity_cases import train_forward

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reference_copy(golden, root, transform=None, with_vit=True, with_vae=True):
    """A golden-layout copy; `transform(part, tensors) -> tensors` rewrites model/vit/vae safetensors."""
    parts = ["model"] + (["vit"] if with_vit else []) + (["vae"] if with_vae else [])
    for part in parts:
        shutil.copytree(os.path.join(golden.root, part), os.path.join(root, part),
                        ignore=shutil.ignore_patterns("*.safetensors", "*.pth"))
        for name in os.listdir(os.path.join(golden.root, part)):
            if name.endswith(".safetensors"):
                tensors = {k: np.array(v) for k, v in read_tensors(os.path.join(golden.root, part, name))}
                if transform:
                    tensors = transform(part, tensors)
                write_safetensors(os.path.join(root, part, name), tensors)
    return root


def _assert_same_files(a_dir, b_dir, name="model.safetensors"):
    a = dict(read_tensors(os.path.join(a_dir, name)))
    b = dict(read_tensors(os.path.join(b_dir, name)))
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert np.array_equal(a[key].view(np.uint8), b[key].view(np.uint8)), key  # bit-exact, NaN-safe


def _vae_file(root):
    return next(os.path.join(root, "vae", n) for n in os.listdir(os.path.join(root, "vae")) if n.endswith(".safetensors"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_exact(golden, tmp_path, dtype):
    cast = (lambda part, t: {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}) if dtype == "bfloat16" else None
    src = _reference_copy(golden, str(tmp_path / "src"), cast)
    manifest = converter.to_jax(find_reference(src), str(tmp_path / "ckpt"), progress=False)
    assert manifest["items"] == ["language_model", "glue", "vit", "vae"]
    written = converter.to_torch(str(tmp_path / "ckpt"), str(tmp_path / "back"), progress=False)
    vae_rel = os.path.relpath(_vae_file(src), src)
    assert written == [os.path.join("model", "model.safetensors"), os.path.join("vit", "vit.safetensors"), vae_rel]
    _assert_same_files(os.path.join(src, "model"), str(tmp_path / "back" / "model"))
    _assert_same_files(os.path.join(src, "vit"), str(tmp_path / "back" / "vit"), "vit.safetensors")
    _assert_same_files(os.path.join(src, "vae"), str(tmp_path / "back" / "vae"), os.path.basename(vae_rel))
    for name in ("llm_config.json", "lance_config.json", "vocab.json"):
        assert open(tmp_path / "back" / "model" / name).read() == open(os.path.join(src, "model", name)).read()


@pytest.mark.parametrize("differ", [False, True])
def test_standalone_and_bundled_vit(golden, tmp_path, differ):
    src = _reference_copy(golden, str(tmp_path / "src"), with_vae=False)
    vit_file = os.path.join(src, "vit", "vit.safetensors")
    if differ:  # the released video checkpoint's bundled ViT is reported to differ from the standalone one
        t = {k: np.array(v) for k, v in read_tensors(vit_file)}
        t["merger.ln_q.weight"] = t["merger.ln_q.weight"] + 1
        write_safetensors(vit_file, t)
    ckpt = str(tmp_path / "ckpt")
    manifest = converter.to_jax(find_reference(src), ckpt, progress=False)
    assert manifest["items"] == ["language_model", "glue", "vit"] + (["vit_bundled"] if differ else [])
    vit = converter.restore_params(ckpt)["vit"]
    stored = dict(read_tensors(vit_file))["merger.ln_q.weight"]
    np.testing.assert_array_equal(vit["merger"]["ln_q"]["scale"], stored)  # the standalone set wins
    written = converter.to_torch(ckpt, str(tmp_path / "back"), progress=False)
    assert os.path.join("vit", "vit.safetensors") in written
    _assert_same_files(os.path.join(src, "model"), str(tmp_path / "back" / "model"))
    _assert_same_files(os.path.join(src, "vit"), str(tmp_path / "back" / "vit"), "vit.safetensors")
    assert open(tmp_path / "back" / "vit" / "config.json").read() == open(os.path.join(src, "vit", "config.json")).read()


def test_converted_checkpoint_runs_train_forward_parity(golden, tmp_path):
    src = _reference_copy(golden, str(tmp_path / "src"))
    converter.to_jax(find_reference(src), str(tmp_path / "ckpt"), progress=False)
    params = converter.restore_params(str(tmp_path / "ckpt"))["lance"]
    rows = train_forward.run(golden, 0, params=params).rows
    failed = [r.format() for r in rows if not r.passed]
    assert rows and not failed, "\n".join(failed)


def test_sharded_restore_reads_only_shards(golden, golden_cfg, tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    src = _reference_copy(golden, str(tmp_path / "src"))
    ckpt = str(tmp_path / "ckpt")
    converter.to_jax(find_reference(src), ckpt, progress=False)
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    boxed = jax.eval_shape(lambda r: init_params(golden_cfg, r, packing.dummy_stream_batch(golden_cfg)),
                           jax.random.PRNGKey(0))
    shardings = sharding.param_shardings(boxed, mesh)
    restored = converter.restore_params(ckpt, {"lance": shardings})["lance"]
    plain = converter.restore_params(ckpt)["lance"]
    leaves = jax.tree_util.tree_leaves_with_path(restored)
    assert len(leaves) == len(jax.tree.leaves(plain))
    for path, leaf in leaves:
        want = sharding_of(shardings, path)
        assert isinstance(leaf, jax.Array) and leaf.sharding == want, path
        assert np.array_equal(np.asarray(leaf), sharding_of(plain, path))
    up = restored["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert up.addressable_shards[0].data.shape == (up.shape[0], up.shape[1] // 4, up.shape[2] // 2)


def sharding_of(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_dtype_cast_and_sharded_source_and_ema(golden, tmp_path):
    src = _reference_copy(golden, str(tmp_path / "src"))
    model = os.path.join(src, "model")
    tensors = dict(read_tensors(os.path.join(model, "model.safetensors")))
    keys = list(tensors)
    half = len(keys) // 2
    write_safetensors(os.path.join(model, "ema-00001.safetensors"), {k: np.array(tensors[k]) for k in keys[:half]})
    write_safetensors(os.path.join(model, "ema-00002.safetensors"), {k: np.array(tensors[k]) for k in keys[half:]})
    with open(os.path.join(model, "ema.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {k: f"ema-0000{1 if i < half else 2}.safetensors" for i, k in enumerate(keys)}}, f)
    os.remove(os.path.join(model, "model.safetensors"))
    ckpt = str(tmp_path / "ckpt")
    converter.to_jax(find_reference(src), ckpt, dtype="bfloat16", progress=False)
    params = converter.restore_params(ckpt)["lance"]
    kernel = params["language_model"]["layers"]["mlp"]["down_proj"]["kernel"]
    assert kernel.dtype == ml_dtypes.bfloat16
    converter.to_torch(ckpt, str(tmp_path / "back"), progress=False)  # 'keep' = the reference's own dtypes
    back = dict(read_tensors(str(tmp_path / "back" / "model" / "model.safetensors")))
    assert back[keys[0]].dtype == tensors[keys[0]].dtype
    np.testing.assert_array_equal(back[keys[3]], tensors[keys[3]].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_tied_lm_head_option(golden, golden_cfg, tmp_path):
    def untie(part, t):
        if part == "model":
            t.pop("language_model.lm_head.weight")
        return t
    src = _reference_copy(golden, str(tmp_path / "src"), untie)
    with pytest.raises(CheckpointMismatchError, match="(?s)1 missing key.*lm_head"):
        converter.to_jax(find_reference(src), str(tmp_path / "ckpt"), progress=False)
    assert not os.path.exists(tmp_path / "ckpt") and not os.path.exists(tmp_path / "ckpt.partial")
    converter.to_jax(find_reference(src), str(tmp_path / "ckpt"), tie_lm_head=True, progress=False)
    lm = converter.restore_params(str(tmp_path / "ckpt"))["lance"]["language_model"]
    np.testing.assert_array_equal(lm["lm_head"]["kernel"], lm["embed_tokens"]["embedding"].T)


def test_bad_inputs_leave_nothing_behind(golden, tmp_path):
    src = _reference_copy(golden, str(tmp_path / "src"))
    weights = os.path.join(src, "model", "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])  # truncated download
    out = str(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="truncated"):
        converter.to_jax(find_reference(src), out, progress=False)
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")
    open(weights, "wb").write(data)
    cfg_path = os.path.join(src, "model", "llm_config.json")
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "intermediate_size": cfg["intermediate_size"] * 2}, open(cfg_path, "w"))
    with pytest.raises(CheckpointMismatchError, match="(?s)mis-shaped.*mlp"):
        converter.to_jax(find_reference(src), out, progress=False)
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")
    with pytest.raises(FileNotFoundError, match="--vae"):
        find_reference(src, vae=str(tmp_path / "missing.pth"))
    json.dump(cfg, open(cfg_path, "w"))
    vae = _vae_file(src)
    blob = open(vae, "rb").read()
    open(vae, "wb").write(blob[:-100])  # a truncated VAE download
    with pytest.raises(ValueError, match="truncated"):
        converter.to_jax(find_reference(src), out, progress=False)
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")
    open(vae, "wb").write(blob)
    os.makedirs(out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        converter.to_jax(find_reference(src), out, progress=False)


def test_vae_from_pth(golden, tmp_path):
    """The VAE as released (.pth, read without torch) converts to the same params as its safetensors copy."""
    from lance_jax.convert.pth_io import read_pth

    src = _reference_copy(golden, str(tmp_path / "src"), with_vit=False)
    pth = next(os.path.join(golden.root, "vae", n) for n in os.listdir(os.path.join(golden.root, "vae"))
               if n.endswith(".pth"))
    os.remove(_vae_file(src))
    shutil.copy(pth, os.path.join(src, "vae"))
    ckpt = str(tmp_path / "ckpt")
    converter.to_jax(find_reference(src), ckpt, progress=False)
    from_pth = converter.restore_params(ckpt)["vae"]
    ref = _reference_copy(golden, str(tmp_path / "ref"), with_vit=False)
    converter.to_jax(find_reference(ref), str(tmp_path / "ckpt2"), progress=False)
    from_st = converter.restore_params(str(tmp_path / "ckpt2"))["vae"]
    assert jax.tree.all(jax.tree.map(np.array_equal, from_pth, from_st))
    pytest.importorskip("torch", reason="writing .pth uses the optional torch extra")
    converter.to_torch(ckpt, str(tmp_path / "back"), progress=False)
    back = read_pth(os.path.join(tmp_path / "back" / "vae", os.path.basename(pth)))
    orig = read_pth(pth)
    assert list(back) == list(orig) and all(np.array_equal(back[k], orig[k]) for k in orig)


def test_cli_inspect_and_errors(golden, tmp_path):
    src = _reference_copy(golden, str(tmp_path / "src"))
    run = lambda *a: subprocess.run([sys.executable, "convert_weights.py", *a], capture_output=True, text=True,  # noqa: E731
                                    cwd=REPO)
    res = run("to-jax", "--src", src, "--out", str(tmp_path / "ckpt"), "--no-progress")
    assert res.returncode == 0, res.stderr
    res = run("inspect", str(tmp_path / "ckpt"))
    assert res.returncode == 0 and all(item in res.stdout for item in ("language_model", "glue", "vit", "vae"))
    res = run("inspect", src)
    assert res.returncode == 0 and "golden layout" in res.stdout
    res = run("to-jax", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "error:" in res.stderr and "Traceback" not in res.stderr
