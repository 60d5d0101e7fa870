"""Real-media training: tiny captioned images + a QA row -> write_shards -> records through the tokenizer and
the frozen VAE / ViT of the converted golden checkpoint -> train steps from that checkpoint; resume."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lance_jax.config import config_dict_from_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEDIA_CFG = os.path.join(REPO, "configs", "train", "media.py")
GOLDEN = os.environ.get("LANCE_GOLDEN", os.path.join(os.path.dirname(REPO), "shared", "golden"))


def _write_folder(d):
    from PIL import Image

    os.makedirs(os.path.join(d, "qa"), exist_ok=True)
    for i, c in enumerate([(255, 0, 0), (0, 128, 255), (20, 200, 60)]):
        a = np.full((64, 64, 3), 255, np.uint8)
        a[16:48, 16:48] = c
        Image.fromarray(a).save(os.path.join(d, f"sq{i}.png"))
        with open(os.path.join(d, f"sq{i}.txt"), "w") as f:
            f.write(f"a square number {i}")
    Image.fromarray(np.full((32, 32, 3), (250, 200, 0), np.uint8)).save(os.path.join(d, "qa", "y.png"))
    with open(os.path.join(d, "qa.jsonl"), "w") as f:
        f.write(json.dumps(dict(image="qa/y.png", question="what colour?", answer="yellow")) + "\n")


@pytest.fixture(scope="module")
def media_setup(tmp_path_factory):
    if not os.path.isdir(GOLDEN):
        pytest.skip(f"golden directory {GOLDEN} not found (set LANCE_GOLDEN)")
    root = tmp_path_factory.mktemp("media")
    ckpt, folder, shards = str(root / "ckpt"), str(root / "imgs"), str(root / "shards")
    out = subprocess.run([sys.executable, os.path.join(REPO, "convert_weights.py"), "to-jax", "--src", GOLDEN,
                          "--out", ckpt], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    _write_folder(folder)
    from lance_jax.data import write_shards

    index = write_shards.main(["--input", folder, "--out", shards])
    assert index["num_rows"] == 4
    return dict(ckpt=ckpt, shards=shards, root=root)


def _config(setup, **train):
    c = config_dict_from_file(MEDIA_CFG)
    c.init.ckpt = setup["ckpt"]
    c.data.groups[0]["path"] = setup["shards"]
    c.train.update(train)
    return c


def test_media_records(media_setup):
    from lance_jax.convert import converter
    from lance_jax.data import media_records as MR
    from lance_jax.data.shards import ShardSource
    from lance_jax.train.loop import data_config

    c = _config(media_setup)
    cfg = converter.checkpoint_config(media_setup["ckpt"])
    b = MR.make_builder(dict(c.data.groups[0], text_drop=0.0, vit_drop=0.0), cfg, data_config(c))
    src = ShardSource(media_setup["shards"])
    recs = [b(src[i], np.random.default_rng(i), source="t") for i in range(len(src))]
    und = [r for r in recs if len(r["ce_labels"])]
    gen = [r for r in recs if len(r["latents"])]
    assert len(und) == 1 and len(gen) == 3
    assert und[0]["vit_embeds"].shape == (4, cfg.vit_out_hidden_size)  # 32 px -> 56 px bucket: 2x2 merged tokens
    assert und[0]["ce_labels"][-1] == cfg.eos_token_id
    for r in gen:
        assert r["latents"].shape == (16, cfg.patch_latent_dim)  # 64 px at resolution 64: (1, 4, 4) latents
        assert np.isfinite(r["latents"]).all() and np.isfinite(r["timestep_logits"]).all()
        assert r["attn_modes"][-2] == "noise"
    # the VAE posterior sample is seeded by the record rng: reproducible, different per seed
    a = b(src[1], np.random.default_rng(5))
    assert np.array_equal(a["latents"], b(src[1], np.random.default_rng(5))["latents"])
    assert not np.array_equal(a["latents"], b(src[1], np.random.default_rng(6))["latents"])


def test_train_from_converted_checkpoint_and_resume(media_setup):
    import jax

    from lance_jax import sharding as S
    from lance_jax.train import loop as L

    mesh = S.make_mesh({"fsdp": 1}, jax.devices()[:1])  # one device: compiles fastest on a CPU runner
    wd = str(media_setup["root"] / "run")
    logs = []
    m = L.run(_config(media_setup, steps=2, save_every=2, log_every=1), wd, progress=False, console=logs.append,
              mesh=mesh)
    assert np.isfinite(m["loss"]) and m["finite"] == 1
    assert m["ce_tokens"] > 0 and m["mse_tokens"] > 0, m
    assert np.isfinite(m["ce_loss"]) and np.isfinite(m["mse_loss"]) and m["ce_loss"] > 0 and m["mse_loss"] > 0
    assert os.path.isdir(os.path.join(wd, "checkpoints", "2"))
    logs.clear()
    m = L.run(_config(media_setup, steps=3, save_every=2, log_every=1), wd, progress=False, console=logs.append,
              mesh=mesh)
    assert "resumed from step 2" in logs
    assert any(line.startswith("step 3:") for line in logs) and not any(line.startswith("step 2:") for line in logs)
    assert np.isfinite(m["loss"])
    assert os.path.isdir(os.path.join(wd, "checkpoints", "3"))


@pytest.mark.slow
def test_train_py_media(media_setup, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.join(REPO, "train.py"), f"--config={MEDIA_CFG}:{media_setup['shards']}",
           f"--workdir={tmp_path}", "--noprogress", f"--config.init.ckpt={media_setup['ckpt']}", "--config.train.steps=1",
           "--config.mesh.fsdp=1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 1:" in out.stdout and "mse_tokens" in out.stdout
