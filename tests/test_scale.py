"""Scale-out: mesh presets and validation, sharded init, context parallelism, golden param specs, AOT plans.

Runs on the 8 fake CPU devices of conftest. The equivalence tests check that the training loss and the
gradients of every param on meshes with data / fsdp / context / tensor axes equal the single-device
result up to fp32 reduction-order noise. Regenerate the golden spec files with
`LANCE_REGEN_GOLDEN=1 pytest tests/test_scale.py -k golden`.
"""
import json
import os
import types
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from lance_jax import packing, sharding as S
from lance_jax.config import config_dict_from_file, model_config_from_dict
from lance_jax.convert import load_reference_params
from lance_jax.models.lance import Lance, init_params
from lance_jax.parity_cases.train_forward import train_forward_inputs

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
PRESETS = ["cpu8", "cpu8:data8", "cpu8:fsdp8", "cpu8:data_fsdp_context", "gpu1", "h100x8", "h100x8:infer",
           "h100x8:train_cp", "tpu_v5p_32", "tpu_v5p_32:infer"]

needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest sets XLA_FLAGS)")


def _video_cfg():
    return model_config_from_dict(config_dict_from_file(str(REPO / "configs/models/lance_3b_video.py")).model)


# ----------------------------------------------------------------------------------------------
# presets and validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load(preset):
    c = S.load_mesh_config(preset)
    sizes = S.resolve_mesh_shape(dict(c.shape), c.num_devices)
    assert set(sizes) == set(S.MESH_AXES) and np.prod(list(sizes.values())) == c.num_devices
    assert c.name.split(":")[0] == preset.split(":")[0]


def test_unknown_preset_lists_presets():
    with pytest.raises(FileNotFoundError, match="h100x8"):
        S.load_mesh_config("h100x9")


@needs8
def test_validation_says_what_does_not_divide(golden_cfg):
    mesh = S.make_mesh({"fsdp": 2, "context": 2, "tensor": 2})
    with pytest.raises(ValueError, match=r"batch 3 is not divisible by data x fsdp = 1 x 2 = 2"):
        S.validate_mesh(mesh, batch=3)
    with pytest.raises(ValueError, match=r"gen capacity 129 is not divisible by context = 2"):
        S.validate_mesh(mesh, seq_lens={"gen capacity": 129})
    wide = S.make_mesh({"tensor": 8})
    with pytest.raises(ValueError, match=r"num_heads 4 is not divisible by tensor = 8"):
        S.validate_mesh(wide, golden_cfg)
    # 2 kv heads on a 4-way tensor axis: intended replication, reported as a note (or an error if disallowed)
    t4 = S.make_mesh({"fsdp": 2, "tensor": 4})
    notes = S.validate_mesh(t4, golden_cfg, batch=8, seq_lens={"und": 1024})
    assert any("num_kv_heads 2" in n and "replicated" in n for n in notes)
    with pytest.raises(ValueError, match="num_kv_heads 2 is not divisible by tensor = 4"):
        S.validate_mesh(t4, golden_cfg, allow_kv_head_replication=False)
    # all problems in one message
    with pytest.raises(ValueError) as err:
        S.validate_mesh(S.make_mesh({"fsdp": 2, "context": 4}), batch=3, seq_lens={"und capacity": 7})
    assert "batch 3" in str(err.value) and "und capacity 7 is not divisible by context = 4" in str(err.value)


@needs8
def test_replication_is_listed_not_silent(golden_cfg, caplog):
    boxed = S.abstract_params(golden_cfg)
    mesh = S.make_mesh({"fsdp": 2, "tensor": 4})
    report = S.replication_report(boxed, mesh)
    assert report and all(r["intended"] and r["logical"] == "kv_heads" for r in report)
    assert any(r["param"].endswith("k_proj/kernel") for r in report)
    with caplog.at_level("INFO", logger="lance_jax.sharding"):
        S.param_shardings(boxed, mesh, strict=True)  # only intended fallbacks: no error
    assert any("k_proj" in m and "replicated" in m for m in caplog.messages)
    wide = S.make_mesh({"tensor": 8})  # 4 q heads on 8: unintended
    with pytest.raises(ValueError, match=r"q_proj/kernel dim 2 \(q_heads=4\) not divisible by tensor=8"):
        S.param_shardings(boxed, wide, strict=True)


# ----------------------------------------------------------------------------------------------
# golden param sharding specs per preset (abstract meshes: no devices needed, 3B video model)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def video_boxed():
    return S.abstract_params(_video_cfg())


@pytest.mark.parametrize("preset", ["cpu8", "gpu1", "h100x8", "h100x8:infer", "tpu_v5p_32"])
def test_golden_param_specs(video_boxed, preset):
    c = S.load_mesh_config(preset)
    sizes = S.resolve_mesh_shape(dict(c.shape), c.num_devices)
    mesh = jax.sharding.AbstractMesh(tuple(sizes[a] for a in S.MESH_AXES), S.MESH_AXES)
    table = S.spec_table(S.param_shardings(video_boxed, mesh, strict=True))
    path = DATA / f"sharding_specs_{preset.replace(':', '_')}.json"
    if os.environ.get("LANCE_REGEN_GOLDEN") == "1" or not path.exists():
        if os.environ.get("LANCE_REGEN_GOLDEN") != "1":
            pytest.fail(f"golden {path} missing; regenerate with LANCE_REGEN_GOLDEN=1")
        path.write_text(json.dumps(dict(preset=c.name, mesh=sizes, specs=table), indent=1, sort_keys=True) + "\n")
    want = json.loads(path.read_text())
    assert want["mesh"] == sizes
    assert table == want["specs"], [k for k in table if table[k] != want["specs"].get(k)]


# ----------------------------------------------------------------------------------------------
# sharded init
# ----------------------------------------------------------------------------------------------


@needs8
def test_sharded_init_matches_and_never_gathers(golden_cfg):
    mesh = S.make_mesh({"fsdp": 4, "tensor": 2})
    rng = jax.random.PRNGKey(3)
    params, shardings = S.init_params_sharded(golden_cfg, mesh, rng)
    ref = jax.jit(lambda r: nn.unbox(init_params(golden_cfg, r, packing.dummy_stream_batch(golden_cfg))))(rng)
    for (path, got), want, sh in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(ref),
                                     jax.tree.leaves(shardings)):
        assert got.sharding == sh, path
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(path))
    up = params["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert up.addressable_shards[0].data.shape == (up.shape[0], up.shape[1] // 4, up.shape[2] // 2)


# ----------------------------------------------------------------------------------------------
# equivalence: loss and gradients, single device vs meshes with context parallelism
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_inputs(golden, golden_cfg):
    params = load_reference_params(golden.model_dir, golden_cfg)
    batch, noise, _ = train_forward_inputs(golden, golden_cfg)
    rows = 8  # same layout, different noise per row: batch-mixing bugs would show
    batch = {k: np.repeat(v, rows, axis=0) for k, v in batch.items()}
    noise = np.random.default_rng(1).normal(size=(rows,) + noise.shape[1:]).astype(np.float32)
    return params, batch, noise


def _loss_and_grad(cfg):
    def loss(params, batch, noise):
        return Lance(cfg).apply({"params": params}, batch, noise=noise)["loss"]

    return jax.value_and_grad(loss)


@pytest.fixture(scope="module")
def single_device(golden_cfg, train_inputs):
    params, batch, noise = train_inputs
    return jax.jit(_loss_and_grad(golden_cfg))(params, batch, noise)


@needs8
@pytest.mark.parametrize("mesh_shape", [
    {"data": 8}, {"fsdp": 8}, {"fsdp": 2, "context": 2, "tensor": 2}, {"data": 2, "fsdp": 2, "context": 2},
], ids=lambda m: "_".join(f"{k}{v}" for k, v in m.items()))
def test_loss_and_grads_match_single_device(golden_cfg, train_inputs, single_device, mesh_shape):
    params, batch, noise = train_inputs
    mesh = S.make_mesh(mesh_shape)
    S.validate_mesh(mesh, golden_cfg, batch=noise.shape[0],
                    seq_lens={"und": batch["und_ids"].shape[1], "gen": batch["latents"].shape[1]})
    boxed, p_sh = S.param_plan(golden_cfg, mesh)
    b_sh = jax.tree.map(lambda x: S.batch_sharding(mesh, x.ndim, x.shape[0]), batch)
    n_sh = S.batch_sharding(mesh, noise.ndim, noise.shape[0])
    with S.use_mesh(mesh):
        fn = jax.jit(_loss_and_grad(golden_cfg), in_shardings=(p_sh, b_sh, n_sh))
        compiled = fn.lower(params, batch, noise).compile()
        loss, grads = compiled(jax.device_put(params, p_sh), jax.device_put(batch, b_sh), jax.device_put(noise, n_sh))
    if mesh.shape["context"] > 1:  # context parallelism is really on: K/V are gathered over the context axis
        assert "all-gather" in compiled.as_text()
    want_loss, want_grads = single_device
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=2e-5)
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(want_grads)):
        g, w = np.asarray(g), np.asarray(w)
        scale = max(np.abs(w).max(), 1e-30)
        assert np.abs(g - w).max() <= 2e-5 * scale, (jax.tree_util.keystr(path), np.abs(g - w).max() / scale)


# ----------------------------------------------------------------------------------------------
# AOT plans
# ----------------------------------------------------------------------------------------------


def _plan_args(**kw):
    base = dict(model=str(REPO / "configs/models/tiny.py"), mesh="cpu8", task="t2i", tokens_per_device=256,
                frames=1, height=128, width=128, text_len=16, no_cfg=False, no_ema=False, attention_block=0)
    base.update(kw)
    return types.SimpleNamespace(**base)


@needs8
def test_aot_plan_tiny_t2i():
    from lance_jax import plan_memory as PM

    plan = PM.make_plan(_plan_args())
    assert plan.num_devices == 8 and plan.peak_gb > 0 and plan.model_flops_per_step > 0
    assert plan.shapes["latent_tokens"] == 64 and plan.shapes["rows"] == 2
    text = PM.format_plan(plan, 1.0)
    assert "XLA:CPU" in text and "MFU(t)" in text


@pytest.mark.slow
@needs8
@pytest.mark.parametrize("task,mesh", [("train", "h100x8"), ("t2v", "h100x8:infer")])
def test_aot_plan_3b(task, mesh):
    from lance_jax import plan_memory as PM

    plan = PM.make_plan(_plan_args(model=str(REPO / "configs/models/lance_3b_video.py"), mesh=mesh, task=task,
                                   tokens_per_device=65536, frames=121, height=480, width=832, text_len=512))
    assert plan.peak_gb > 0


# ----------------------------------------------------------------------------------------------
# multi-host: 2 CPU processes on 127.0.0.1 (2 devices each) run the tiny forward on a global mesh
# ----------------------------------------------------------------------------------------------

_WORKER = r'''
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
from lance_jax import sharding as S
S.initialize_distributed()
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from lance_jax.parity import Golden
from lance_jax.parity_cases.train_forward import train_forward_inputs
from lance_jax.models.lance import Lance
g = Golden(sys.argv[1]); cfg = g.model_config()
batch, noise, _ = train_forward_inputs(g, cfg)
rows = 4
batch = {k: np.repeat(v, rows, axis=0) for k, v in batch.items()}
noise = np.random.default_rng(1).normal(size=(rows,) + noise.shape[1:]).astype(np.float32)
mesh = S.make_mesh({"fsdp": 2, "context": 2})
params, p_sh = S.init_params_sharded(cfg, mesh, jax.random.PRNGKey(5))
sl = S.host_local_batch_slice(rows)  # each process feeds only its rows
gb = S.global_batch_from_local({k: v[sl] for k, v in batch.items()} | {"noise": noise[sl]}, mesh, rows)
noise_g = gb.pop("noise")
with S.use_mesh(mesh):
    loss = jax.jit(lambda p, b, n: Lance(cfg).apply({"params": p}, b, noise=n)["loss"])(params, gb, noise_g)
print("RESULT", json.dumps(dict(pid=jax.process_index(), n=jax.process_count(), devices=jax.device_count(),
                                loss=float(loss))), flush=True)
'''


@needs8
def test_two_process_forward_matches_single_process(golden, golden_cfg, tmp_path):
    import socket
    import subprocess
    import sys

    from conftest import GOLDEN_DIR

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(2):
        env = dict(os.environ, LANCE_COORDINATOR=f"127.0.0.1:{port}", LANCE_NUM_PROCESSES="2",
                   LANCE_PROCESS_ID=str(pid), PYTHONPATH=str(REPO))
        env.pop("XLA_FLAGS", None)
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, str(GOLDEN_DIR)], env=env, cwd=str(REPO),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    results = []
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        results.append(json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT"))[7:]))
    assert sorted(r["pid"] for r in results) == [0, 1] and all(r["n"] == 2 and r["devices"] == 4 for r in results)
    # single process reference: same params (sharding-independent init), same 4 rows
    batch, noise, _ = train_forward_inputs(golden, golden_cfg)
    batch = {k: np.repeat(v, 4, axis=0) for k, v in batch.items()}
    noise = np.random.default_rng(1).normal(size=(4,) + noise.shape[1:]).astype(np.float32)
    params, _ = S.init_params_sharded(golden_cfg, S.make_mesh({"fsdp": 1}, jax.devices()[:1]), jax.random.PRNGKey(5))
    want = float(jax.jit(lambda p, b, n: Lance(golden_cfg).apply({"params": p}, b, noise=n)["loss"])(params, batch, noise))
    for r in results:
        np.testing.assert_allclose(r["loss"], want, rtol=2e-5)
