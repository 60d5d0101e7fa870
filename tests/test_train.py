"""Training: golden loss through the step, finite differences, checkpoint/resume bit-exactness, freezing,
non-finite skipping, and an end-to-end `train.py` run."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lance_jax import sharding as S
from lance_jax.config import config_dict_from_file
from lance_jax.models.lance import Lance
from lance_jax.train import checkpoint as C
from lance_jax.train import freeze as F
from lance_jax.train import loop as L
from lance_jax.train import optimizer as O
from lance_jax.train import state as St
from lance_jax.train import step as Sp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "train", "tiny_synthetic.py")


def tiny_config(**train):
    c = config_dict_from_file(TINY)
    c.train.update(train)
    return c


def opt_cfg(**kw):
    d = dict(lr=1e-4, warmup_steps=500, b1=0.9, b2=0.95, eps=1e-15, clip_norm=1.0)
    d.update(kw)
    return ml_collections.ConfigDict(d)


FREEZE = ml_collections.ConfigDict(dict(vit=True, vae=True, embed_and_head=True, und=False, patterns=[]))


def test_golden_loss_through_train_step(golden, golden_cfg):
    from lance_jax.convert import load_reference_params
    from lance_jax.parity_cases.train_forward import train_forward_inputs

    cfg = golden_cfg
    batch, noise, _ = train_forward_inputs(golden, cfg)
    batch = dict(batch, noise=noise)
    params = load_reference_params(golden.model_dir, cfg)
    mesh = S.make_mesh({"fsdp": 1}, jax.devices()[:1])
    example = {k: v for k, v in batch.items() if k != "noise"}
    mask = jax.tree.map(lambda _: True, params)
    tx, sched = O.make_optimizer(opt_cfg(), mask)
    state, sh = St.create_state(cfg, tx, mesh, example, seed=0, use_ema=True, params=params)
    fn = Sp.train_step_fn(Lance(cfg), tx, sched, mask, ema_decay=0.9999, timesteps="host")
    with S.use_mesh(mesh):
        jstep = Sp.jit_train_step(fn, mesh, sh, jax.eval_shape(lambda: batch))
        _, m = jstep(state, batch, jax.random.PRNGKey(0))
    for name in ("loss", "ce_loss", "mse_loss"):
        want = golden.scalar("train_forward", name)
        np.testing.assert_allclose(float(m[name]), want, rtol=1e-5, err_msg=name)
    assert bool(m["finite"]) and float(m["lr"]) == 0.0  # the first update runs at LR 0 (HF warm-up)


@pytest.fixture(scope="module")
def built():
    """One build (one compile) of the tiny synthetic config on 2 of the fake devices."""
    c = tiny_config()
    c.mesh = dict(data=1, fsdp=2, tensor=1)
    mesh = S.make_mesh({"fsdp": 2}, jax.devices()[:2])
    b = L.build(c, mesh=mesh)
    b["init_host"] = jax.device_get(b["state"])  # the step donates its input: keep a host copy to restart from
    return c, b


def _run(b, state, it, n):
    with S.use_mesh(b["mesh"]):
        for _ in range(n):
            state, m = b["step"](state, next(it), Sp.step_rng(state))
    return state, m


def _fresh_state(c, b):
    return jax.device_put(b["init_host"], b["shardings"])


def test_gradients_match_finite_differences(built):
    c, b = built
    cfg = b["cfg"]
    from lance_jax.data import pipeline as PL

    batch = next(PL.make_iterator(c.data, cfg))
    batch.pop("gen_item")
    noise = np.random.default_rng(0).standard_normal(batch["latents"].shape).astype(np.float32)
    params = jax.device_get(_fresh_state(c, b).params)
    loss_fn = Sp.make_loss_fn(Lance(cfg), b["mask"])
    f = jax.jit(lambda p: loss_fn(p, batch, noise)[0])
    g = jax.jit(jax.grad(lambda p: loss_fn(p, batch, noise)[0]))(params)
    rng = np.random.default_rng(1)
    for trial in range(2):
        d = jax.tree.map(lambda x, t: rng.standard_normal(x.shape).astype(np.float32) * t, params, b["mask"])
        norm = np.sqrt(sum(float(np.sum(v * v)) for v in jax.tree.leaves(d)))
        d = jax.tree.map(lambda v: v / norm, d)  # unit direction: fp32 central differences stay accurate
        eps = 1e-2
        plus = f(jax.tree.map(lambda p, v: p + eps * v, params, d))
        minus = f(jax.tree.map(lambda p, v: p - eps * v, params, d))
        fd = (float(plus) - float(minus)) / (2 * eps)
        an = sum(float(jnp.vdot(a, v)) for a, v in zip(jax.tree.leaves(g), jax.tree.leaves(d)))
        assert abs(fd - an) <= 1e-2 * abs(an) + 1e-4, (trial, fd, an)
    # frozen leaves get exactly zero gradient
    for path in F.frozen_paths(b["mask"]):
        leaf = g
        for k in path.split("/"):
            leaf = leaf[k]
        assert not np.any(np.asarray(leaf))


def _trees_equal(a, b):
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_resume_is_bit_exact_and_frozen_params_stay(built, tmp_path):
    from lance_jax.data import pipeline as PL

    c, b = built
    cfg, n = b["cfg"], 4
    init = _fresh_state(c, b)
    init_host = jax.device_get(init)
    it = PL.make_iterator(c.data, cfg)
    straight, _ = _run(b, init, it, n)
    straight_data = it.get_state()

    ckpt = C.Checkpointer(str(tmp_path / "ckpt"), keep=2)
    it = PL.make_iterator(c.data, cfg)
    half, _ = _run(b, _fresh_state(c, b), it, n // 2)
    ckpt.save(n // 2, half, it.get_state(), force=True)
    ckpt.wait()
    del half
    restored, data_state, step = ckpt.restore(C.abstract_like(_fresh_state(c, b), b["shardings"]))
    assert step == n // 2
    it = PL.make_iterator(c.data, cfg)
    it.set_state(data_state)
    resumed, _ = _run(b, restored, it, n - n // 2)
    ckpt.close()
    assert int(resumed.step) == n
    for field in ("params", "opt_state", "ema_params", "rng", "step", "skipped"):
        assert _trees_equal(getattr(straight, field), getattr(resumed, field)), field
    assert it.get_state() == straight_data

    params = jax.device_get(straight.params)
    frozen = set(F.frozen_paths(b["mask"]))
    assert frozen == {"language_model/embed_tokens/embedding", "language_model/lm_head/kernel"}
    for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        x0 = init_host.params
        for k in p:
            x0 = x0[k.key]
        same = np.array_equal(x, x0)
        assert same == (F.path_str(p) in frozen), F.path_str(p)


def test_non_finite_step_is_skipped(built):
    from lance_jax.data import pipeline as PL

    c, b = built
    state = _fresh_state(c, b)
    it = PL.make_iterator(c.data, b["cfg"])
    state, _ = _run(b, state, it, 1)
    before = jax.device_get(state)
    batch = next(it)
    batch["latents"] = np.full_like(batch["latents"], np.nan)
    with S.use_mesh(b["mesh"]):
        after, m = b["step"](state, batch, Sp.step_rng(state))
    assert not bool(m["finite"]) and int(m["skipped"]) == 1
    assert int(after.step) == 2 and int(after.applied) == 1
    for field in ("params", "opt_state", "ema_params"):
        assert _trees_equal(getattr(before, field), getattr(after, field)), field


def test_schedule_and_freeze_masks():
    s = O.lr_schedule(1e-4, 500)
    assert float(s(0)) == 0.0 and np.isclose(float(s(250)), 5e-5) and np.isclose(float(s(10_000)), 1e-4)
    # one cosine half-cycle (num_cycles 0.5, passed through make_optimizer): peak after warm-up, half-way down
    # mid-run, min_lr from the last step on; the reference's default (5 cycles) is back at the peak there
    opt = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=10, schedule="cosine", total_steps=110, min_lr=1e-5,
                                         num_cycles=0.5, b1=0.9, b2=0.95, eps=1e-15, clip_norm=1.0))
    _, half = O.make_optimizer(opt, {"w": True})
    assert np.isclose(float(half(10)), 1e-3) and np.isclose(float(half(60)), 0.5 * (1e-3 + 1e-5), rtol=1e-5)
    assert np.isclose(float(half(110)), 1e-5) and np.isclose(float(half(500)), 1e-5)
    with opt.unlocked():
        del opt["num_cycles"]
    assert np.isclose(float(O.make_optimizer(opt, {"w": True})[1](110)), 1e-3)
    params = {"language_model": {"embed_tokens": {"embedding": 0}, "lm_head": {"kernel": 0}, "norm": {"scale": 0},
                                 "layers": {"mlp_moe_gen": {"k": 0}, "mlp": {"k": 0}}}, "vae2llm": {"kernel": 0}}
    und = ml_collections.ConfigDict(dict(FREEZE.to_dict(), und=True))
    assert set(F.frozen_paths(F.trainable_mask(params, und))) == {
        "language_model/embed_tokens/embedding", "language_model/lm_head/kernel", "language_model/norm/scale",
        "language_model/layers/mlp/k"}
    with pytest.raises(NotImplementedError):
        F.trainable_mask(params, ml_collections.ConfigDict(dict(FREEZE.to_dict(), vit=False)))


def test_train_py_end_to_end(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.join(REPO, "train.py"), f"--config={TINY}", f"--workdir={tmp_path}",
           "--noprogress", "--config.train.steps=2", "--config.train.save_every=2", "--config.mesh.fsdp=1",
           "--config.data.groups[1].loss_weight=0.5"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 2:" in out.stdout
    assert os.path.isdir(tmp_path / "checkpoints" / "2")
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "tb"))
    record = json.loads((tmp_path / L.RUN_CONFIG).read_text())
    assert record["config"]["train"]["steps"] == 2 and record["model"]["num_layers"] >= 1
    assert [g["loss_weight"] for g in record["config"]["data"]["groups"]] == [1.0, 0.5]  # a per-group override


def test_resume_under_another_model_is_refused(tmp_path):
    """run_config.json: the same config resumes silently, other settings are listed, another model is refused
    with the differing field named (a restore would otherwise read the weights as another model)."""
    config = tiny_config(steps=2)
    cfg = L.model_config(config)
    L.check_resume(str(tmp_path), L.run_record(config, cfg), console=pytest.fail)  # no record yet: no check
    L.write_run_record(str(tmp_path), L.run_record(config, cfg))
    lines = []
    L.check_resume(str(tmp_path), L.run_record(config, cfg), console=lines.append)
    assert lines == []
    L.check_resume(str(tmp_path), L.run_record(tiny_config(steps=9), cfg), console=lines.append)
    assert len(lines) == 1 and "train.steps: 2 -> 9" in lines[0]
    other = dataclasses.replace(cfg, rope_theta=cfg.rope_theta * 2)
    with pytest.raises(ValueError, match=r"another model \(1 field\(s\) differ: rope_theta"):
        L.check_resume(str(tmp_path), L.run_record(config, other), console=lines.append)


@pytest.mark.slow
def test_train_py_resumes(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.join(REPO, "train.py"), f"--config={TINY}", f"--workdir={tmp_path}",
           "--noprogress", "--config.mesh.fsdp=1", "--config.train.save_every=2"]
    first = subprocess.run(cmd + ["--config.train.steps=2"], capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run(cmd + ["--config.train.steps=4"], capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert again.returncode == 0 and "resumed from step 2" in again.stdout, again.stderr[-3000:]
    assert "train.steps: 2 -> 4" in again.stdout
    assert os.path.isdir(tmp_path / "checkpoints" / "4")
