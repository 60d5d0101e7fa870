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


def _mesh():
    import jax

    from lance_jax import sharding as S

    return S.make_mesh({"fsdp": 1}, jax.devices()[:1])  # one device: compiles fastest on a CPU runner


@pytest.fixture(scope="module")
def resumed_run(media_setup):
    """2 steps from the converted checkpoint, then the same command with steps=3 (resumes from step 2)."""
    from lance_jax.train import loop as L

    wd = str(media_setup["root"] / "run")
    mesh = _mesh()
    logs2, logs3 = [], []
    m2 = L.run(_config(media_setup, steps=2, save_every=2, log_every=1), wd, progress=False, console=logs2.append,
               mesh=mesh)
    ckpt2 = os.path.isdir(os.path.join(wd, "checkpoints", "2"))
    m3 = L.run(_config(media_setup, steps=3, save_every=2, log_every=1), wd, progress=False, console=logs3.append,
               mesh=mesh)
    return dict(wd=wd, m2=m2, m3=m3, logs3=logs3, ckpt2=ckpt2)


def test_train_from_converted_checkpoint_and_resume(resumed_run):
    m, wd, logs = resumed_run["m2"], resumed_run["wd"], resumed_run["logs3"]
    assert np.isfinite(m["loss"]) and m["finite"] == 1
    assert m["ce_tokens"] > 0 and m["mse_tokens"] > 0, m
    assert np.isfinite(m["ce_loss"]) and np.isfinite(m["mse_loss"]) and m["ce_loss"] > 0 and m["mse_loss"] > 0
    assert resumed_run["ckpt2"]
    assert "resumed from step 2" in logs
    assert any(line.startswith("step 3:") for line in logs) and not any(line.startswith("step 2:") for line in logs)
    assert np.isfinite(resumed_run["m3"]["loss"])
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


# -- videos, edits, video QA through real media ---------------------------------------------------------------
def _write_video_folder(d):
    from PIL import Image

    from lance_jax.media import write_mp4

    os.makedirs(os.path.join(d, "src"), exist_ok=True)
    frames = np.full((9, 64, 64, 3), 255, np.uint8)
    for i in range(9):  # a square moving right
        frames[i, 20:44, 4 + 4 * i:28 + 4 * i] = (200, 30, 30)
    write_mp4(os.path.join(d, "clip.mp4"), frames)  # 12 fps -> 9 sampled frames -> 3 latent frames
    with open(os.path.join(d, "clip.txt"), "w") as f:
        f.write("a red square moving right")
    a = np.full((64, 64, 3), 255, np.uint8)
    a[16:48, 16:48] = (255, 0, 0)
    Image.fromarray(a).save(os.path.join(d, "src", "in.png"))
    a[16:48, 16:48] = (0, 0, 255)
    Image.fromarray(a).save(os.path.join(d, "src", "out.png"))
    with open(os.path.join(d, "rows.jsonl"), "w") as f:
        f.write(json.dumps(dict(input_image="src/in.png", output_image="src/out.png", caption="make it blue")) + "\n")
        f.write(json.dumps(dict(video="clip.mp4", question="what moves?", answer="a red square")) + "\n")
        # a fully specified multi-turn conversation: the first answer is supervised, the second is not
        turns = [("What color?", "red", True), ("Which way?", "left", False), ("what moves?", "a red square", None)]
        els = [dict(type="video", media="clip.mp4")]
        for q, a, flag in turns:
            els += [dict(type="text", text=q), dict(type="text", role="assistant", text=a, loss=flag,
                                                     is_target_candidate=flag is None or None)]
        f.write(json.dumps(dict(elements=els)) + "\n")


@pytest.fixture(scope="module")
def video_setup(media_setup):
    from lance_jax.convert import converter
    from lance_jax.data import write_shards
    from lance_jax.data.shards import ShardSource

    folder, shards = str(media_setup["root"] / "vids"), str(media_setup["root"] / "vid_shards")
    _write_video_folder(folder)
    assert write_shards.main(["--input", folder, "--out", shards])["num_rows"] == 4
    src = ShardSource(shards)
    rows = {r["source_schema"]: r for r in (src[i] for i in range(len(src)))}
    assert set(rows) == {"text2video_general", "image2image", "x2t_general", "interleave"}, set(rows)
    return dict(rows=rows, cfg=converter.checkpoint_config(media_setup["ckpt"]))


def _builder(setup, **group):
    from lance_jax.convert import converter
    from lance_jax.data import media_records as MR
    from lance_jax.train.loop import data_config

    c = _config(setup)
    g = dict(c.data.groups[0], text_drop=0.0, vit_drop=0.0)
    g.update(group)
    return MR.make_builder(g, converter.checkpoint_config(setup["ckpt"]), data_config(c))


def _mse_rows(rec):
    """Latent rows the loss supervises: device timesteps (as in training) -> shifted t > 0."""
    import jax
    import jax.numpy as jnp

    from lance_jax.models.lance import shifted_timesteps
    from lance_jax.train.step import device_timestep_logits

    batch = dict(gen_item=jnp.asarray(rec["gen_item"])[None], timestep_logits=jnp.asarray(rec["timestep_logits"])[None])
    logits = device_timestep_logits(batch, jax.random.PRNGKey(0))
    return np.asarray(shifted_timesteps(logits, 4.0) > 0)[0], np.asarray(shifted_timesteps(
        jnp.asarray(rec["timestep_logits"]), 4.0) > 0)


def test_video_t2v_and_ff2v_records(media_setup, video_setup):
    cfg, row = video_setup["cfg"], video_setup["rows"]["text2video_general"]
    hw = 16  # 64 px at resolution 64: 4x4 latent tokens per frame
    for tasks, clean_frames in ((["t2v"], 0), (["ff2v"], 1)):
        b = _builder(media_setup, tasks=tasks, task_rates=None)
        r = b(row, np.random.default_rng(3), source="v")
        lat = r["latents"]
        assert lat.shape == (3 * hw, cfg.patch_latent_dim) and np.isfinite(lat).all(), lat.shape  # 3 latent frames
        assert not np.array_equal(lat[:hw], lat[hw:2 * hw])  # the frames differ (the square moves)
        assert r["attn_modes"][-2] == "noise" and len(r["ce_labels"]) == 0
        assert (r["gen_item"] == 0).all()  # one target item, every latent row belongs to it
        logits = r["timestep_logits"]
        n_clean = clean_frames * hw
        assert np.isneginf(logits[:n_clean]).all()
        assert np.isfinite(logits[n_clean:]).all() and len(set(logits[n_clean:].tolist())) == 1
        dev_mask, host_mask = _mse_rows(r)
        want = np.arange(len(lat)) >= n_clean
        assert np.array_equal(dev_mask, want) and np.array_equal(host_mask, want)


def test_group_timestep_shift_offsets_the_logit(media_setup, video_setup):
    """A group's timestep_shift s draws z from N(ln s, 1): the same record rng gives the unshifted z + ln s, which
    the model's shift turns into t = sigmoid(z + ln s + ln s_model)."""
    from lance_jax.data import media_records as MR
    from lance_jax.train.loop import check_group_timesteps

    row = video_setup["rows"]["text2video_general"]
    plain = _builder(media_setup, tasks=["t2v"], task_rates=None)(row, np.random.default_rng(3))
    shifted = _builder(media_setup, tasks=["t2v"], task_rates=None, timestep_shift=4.0)(row, np.random.default_rng(3))
    np.testing.assert_allclose(shifted["timestep_logits"], plain["timestep_logits"] + np.log(4.0), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(shifted["latents"], plain["latents"])
    with pytest.raises(ValueError, match="'v'.*timestep_shift must be > 0"):
        MR.group_logit_offset(dict(name="v", timestep_shift=0.0))
    check_group_timesteps([dict(name="v", timestep_shift=4.0)], "host")
    with pytest.raises(ValueError, match=r"\['v'\].*train.timesteps='host'"):
        check_group_timesteps([dict(name="v", timestep_shift=4.0), dict(name="w")], "device")


def test_edit_pair_and_video_qa_records(media_setup, video_setup):
    cfg, rows = video_setup["cfg"], video_setup["rows"]
    b = _builder(media_setup)
    r = b(rows["image2image"], np.random.default_rng(0), source="e")
    modes = r["attn_modes"]
    assert modes.count("full") >= 1 and "full_noise" in modes and modes[-2] == "noise", modes
    assert modes.index("full_noise") < len(modes) - 2  # the clean source block precedes the target
    assert len(r["vit_embeds"]) == len(r["vit_index"]) > 0 and np.isfinite(r["vit_embeds"]).all()
    assert r["latents"].shape == (32, cfg.patch_latent_dim)  # source + target, 16 tokens each
    src, tgt = slice(0, 16), slice(16, 32)
    assert (r["gen_item"][src] == -1).all() and (r["gen_item"][tgt] == 0).all()
    assert np.isneginf(r["timestep_logits"][src]).all() and np.isfinite(r["timestep_logits"][tgt]).all()
    assert not np.allclose(r["latents"][src], r["latents"][tgt])  # red in, blue out
    dev_mask, _ = _mse_rows(r)
    assert np.array_equal(dev_mask, np.arange(32) >= 16)

    q = b(rows["x2t_general"], np.random.default_rng(0), source="q")
    assert len(q["latents"]) == 0 and len(q["ce_labels"]) > 0
    assert q["ce_labels"][-1] == cfg.eos_token_id
    assert len(q["ce_index"]) == len(q["ce_labels"])
    assert len(q["vit_embeds"]) == len(q["vit_index"]) > 0 and np.isfinite(q["vit_embeds"]).all()
    # a video: 9 frames -> 10 (even) -> 5 temporal ViT groups, 56 px bucket -> 2x2 merged tokens per group
    assert q["vit_embeds"].shape == (5 * 4, cfg.vit_out_hidden_size), q["vit_embeds"].shape
    answer = b.tok.encode("a red square")  # the labels end with the answer's tokens, then EOS
    assert list(q["ce_labels"][-len(answer) - 1:-1]) == list(answer), (q["ce_labels"], answer)


def test_multi_turn_qa_record_supervises_flagged_answers(media_setup, video_setup):
    """A fully specified multi-turn QA row (jsonl `elements` with per-element `loss` flags, through the shard
    writer): one ViT block, CE on the flagged answer and the target, not on the unflagged one."""
    row = video_setup["rows"]["interleave"]
    assert [e["loss"] for e in row["elements"][2::2]] == [True, False, None]
    b = _builder(media_setup)
    single = b(video_setup["rows"]["x2t_general"], np.random.default_rng(0))
    multi = b(row, np.random.default_rng(0))
    eos = video_setup["cfg"].eos_token_id
    want = b.tok.encode("red") + [eos] + list(single["ce_labels"])
    assert list(multi["ce_labels"]) == want
    assert np.array_equal(multi["ids"][multi["ce_index"] + 1], multi["ce_labels"])
    assert np.array_equal(multi["vit_embeds"], single["vit_embeds"]) and len(multi["vit_index"]) == len(single["vit_index"])
    assert b.tok.decode(multi["ids"]).count(b.tok.decode([b.tok.im_start_id]) + "assistant") == 3


def _params(ckpt_dir, step):
    from lance_jax.train import checkpoint as C

    ck = C.Checkpointer(ckpt_dir)
    try:
        state, _, got = ck.restore(None, step)
    finally:
        ck.close()
    assert got == step
    return state["params"] if isinstance(state, dict) else state.params


def test_resume_equals_straight_run(media_setup, resumed_run):
    """2 steps + 1 after restore == 3 steps straight (same shards, seed): params bit-exact."""
    import jax

    from lance_jax.train import loop as L

    a, b = resumed_run["wd"], str(media_setup["root"] / "straight")
    ma = resumed_run["m3"]
    mb = L.run(_config(media_setup, steps=3, save_every=2, log_every=1), b, progress=False, console=lambda s: None,
               mesh=_mesh())
    assert ma["loss"] == mb["loss"], (ma, mb)
    pa, pb = _params(os.path.join(a, "checkpoints"), 3), _params(os.path.join(b, "checkpoints"), 3)
    la, lb = jax.tree_util.tree_leaves_with_path(pa), jax.tree_util.tree_leaves_with_path(pb)
    assert len(la) == len(lb) > 0
    for (ka, xa), (kb, xb) in zip(la, lb):
        assert ka == kb
        assert np.array_equal(np.asarray(xa), np.asarray(xb)), jax.tree_util.keystr(ka)
    # and training moved the params (the comparison is not vacuous)
    p2 = _params(os.path.join(b, "checkpoints"), 2)
    assert any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree_util.tree_leaves(p2), jax.tree_util.tree_leaves(pb)))
