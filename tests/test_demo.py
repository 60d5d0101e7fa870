"""The embedded demo's pieces: the pixel autoencoder, the demo tokenizer and checkpoints, and a shortened
end-to-end run (a few training steps; every task runs through infer.py and writes files). The quality bars
live in `python -m lance_jax.demo.run`, not here: a few CPU steps cannot learn the scenes."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lance_jax.config import model_config_from_dict
from lance_jax.models import autoencoder as AE
from lance_jax.models import pixel_autoencoder as PA

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "configs", "demo.py")


def _video(frames=9, h=32, w=48, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (3, frames, h, w)).astype(np.float32)


def test_pixel_autoencoder_layout_and_round_trip():
    v = _video()
    enc = PA.encode(None, v)
    assert enc.mu.shape == (48, 3, 8, 12) and enc.logvar is None
    # channel (row * 4 + column) * 3 + rgb of token (t, i, j) is pixel (4i + row, 4j + column) of key frame 4t
    mu = np.asarray(enc.mu)
    for (c, t, i, j) in [(0, 0, 0, 0), (47, 2, 7, 11), (3 * 5 + 1, 1, 3, 4)]:
        row, col, rgb = (c // 3) // 4, (c // 3) % 4, c % 3
        assert mu[c, t, i, j] == v[rgb, 4 * t, 4 * i + row, 4 * j + col]
    out = np.asarray(PA.decode(None, np.moveaxis(mu, 0, -1)))
    assert out.shape == v.shape
    np.testing.assert_array_equal(out[:, ::4], v[:, ::4])  # key frames come back exactly
    # in-between frames: linear interpolation of the neighbouring key frames
    np.testing.assert_allclose(out[:, 1], 0.75 * v[:, 0] + 0.25 * v[:, 4], atol=1e-6)
    np.testing.assert_allclose(out[:, 6], 0.5 * v[:, 4] + 0.5 * v[:, 8], atol=1e-6)


def test_pixel_autoencoder_batched_clamp_and_errors():
    v = np.stack([_video(5, 16, 16, 1), _video(5, 16, 16, 2)])
    lat = AE.encode_latent(None, v, PA.PixelAutoencoderConfig())
    assert lat.shape == (2, 2, 4, 4, 48)
    np.testing.assert_array_equal(np.asarray(PA.decode(None, lat))[:, :, ::4], v[:, :, ::4])
    assert float(jnp.max(PA.decode(None, 3 * lat))) == 1.0  # clamped like the VAE's output
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        PA.encode(None, _video(4))
    with pytest.raises(ValueError, match="divisible by 4"):
        PA.encode(None, _video(5, 30, 32))
    with pytest.raises(ValueError, match="48"):
        PA.decode(None, np.zeros((1, 2, 2, 16), np.float32))


def test_model_config_names_the_codec():
    from lance_jax.config import config_dict_from_file

    m = config_dict_from_file(DEMO_CONFIG + ":/tmp/unused").model
    cfg = model_config_from_dict(m)
    assert cfg.autoencoder == "pixel" and cfg.latent_stride == 4
    assert model_config_from_dict({**m.to_dict(), "autoencoder": "wan2.2"}).latent_stride == 16
    with pytest.raises(ValueError, match="autoencoder"):
        model_config_from_dict({**m.to_dict(), "autoencoder": "sd-vae"})
    with pytest.raises(ValueError, match="48 latent channels"):
        model_config_from_dict({**m.to_dict(), "latent_channels": 16})


def test_demo_tokenizer_ids_and_words():
    from lance_jax.config import config_dict_from_file
    from lance_jax.data import synthetic as SY
    from lance_jax.demo import tokenizer as DT

    tok = DT.demo_tokenizer()
    m = config_dict_from_file(DEMO_CONFIG + ":/tmp/unused").model
    for k, v in DT.model_ids(tok).items():
        assert m[k] == v, k
    assert DT.model_ids(DT.demo_tokenizer()) == DT.model_ids(tok)  # deterministic
    # every scene word is one id (with and without the leading space), so held-out prompts reuse trained ids
    for word in SY.COLORS + SY.SHAPES + SY.DIRECTIONS:
        assert len(tok.encode(word)) == 1 and len(tok.encode(" " + word)) == 1, word
    for sentence in DT.template_sentences():
        assert len(tok.encode(sentence)) == 1
    text = "<|im_start|>user\nmake the circle red<|im_end|>"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(text)[0] == tok.im_start_id == 1


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    """An untrained demo checkpoint (what the data stage writes) at a 2-layer width."""
    import flax.linen as nn

    from lance_jax.config import config_dict_from_file
    from lance_jax.demo import checkpoint as DC
    from lance_jax.demo import tokenizer as DT
    from lance_jax.models.lance import init_params
    from lance_jax.packing import dummy_stream_batch

    root = tmp_path_factory.mktemp("demo_ckpt")
    m = config_dict_from_file(DEMO_CONFIG + f":{root}").model
    m.num_layers = 2
    cfg = model_config_from_dict(m)
    tok_dir = str(root / "tok")
    DT.write_tokenizer(tok_dir, DT.scene_texts())
    vit_cfg = DC.demo_vit_config(cfg.vit_out_hidden_size)
    lance = jax.device_get(nn.unbox(init_params(cfg, jax.random.PRNGKey(0), dummy_stream_batch(cfg))))
    out = str(root / "ckpt")
    DC.write_checkpoint(out, cfg, lance, vit_cfg, DC.random_vit_params(vit_cfg), tok_dir)
    return out, cfg, lance


def test_demo_checkpoint_round_trip_and_encoders(demo_ckpt):
    from lance_jax.convert import converter
    from lance_jax.data.encoders import FrozenEncoders

    out, cfg, lance = demo_ckpt
    assert converter.checkpoint_config(out) == cfg
    restored = converter.restore_params(out)
    assert set(restored) == {"lance", "vit"}
    for a, b in zip(jax.tree.leaves(restored["lance"]), jax.tree.leaves(lance)):
        np.testing.assert_array_equal(a, b)
    enc = FrozenEncoders(out)
    assert isinstance(enc.vae_cfg, PA.PixelAutoencoderConfig) and enc.vae_params == {}
    v = _video(5, 32, 32)
    lat = enc.vae(v, key=jax.random.PRNGKey(0))  # deterministic codec: the key changes nothing
    np.testing.assert_array_equal(lat, np.moveaxis(np.asarray(PA.encode(None, v).mu), 0, -1))
    with pytest.raises(ValueError, match="pixel autoencoder"):
        from lance_jax.demo import checkpoint as DC

        DC.write_checkpoint(out + "_x", cfg.replace(autoencoder="wan2.2"), lance, None, None, "")


def test_runner_uses_the_pixel_codec(demo_ckpt, tmp_path):
    from lance_jax.pipelines import GenerationSettings, LanceRunner

    out, cfg, _ = demo_ckpt
    runner = LanceRunner(out, progress=False)
    assert runner.has_vae and runner.has_vit
    res = runner.t2i("a red circle on a blue background", height=32, width=16, seed=1,
                     settings=GenerationSettings(steps=2))
    assert res.frames.shape == (1, 32, 16, 3) and res.info["latent_grid"] == [1, 8, 4]
    with pytest.raises(Exception, match="at most 32 px"):  # the 8x8 latent table at 4 px per token
        runner.t2i("a red circle", height=48, width=32, settings=GenerationSettings(steps=1))
    with pytest.raises(Exception, match="pixel autoencoder"):
        LanceRunner(out, vae_path=out, progress=False)


def test_shortened_demo_runs_every_task(tmp_path, monkeypatch):
    """Data -> every curriculum stage (2 steps each) and the mix (3 steps) -> export -> all seven tasks + a
    two-turn edit through infer.py -> scores, HTML page and contact sheet. Asserts that every case produced its
    file or answer, not quality."""
    from lance_jax.demo import run as DR

    monkeypatch.setenv("LANCE_DEMO_CACHE", str(tmp_path / "cache"))
    stages = len(DR.load_config(DR.DEFAULT_CONFIG, str(tmp_path / "root"), []).demo.curriculum.steps)
    rows = [f"--config.demo.rows.{t}=12" for t in ("t2i", "t2v", "image_edit", "video_edit", "x2t_image",
                                                   "x2t_video")]
    argv = ["--root", str(tmp_path / "root"), *rows, "--config.train.steps=3", "--config.train.log_every=1",
            "--config.train.save_every=3", "--config.model.num_layers=1", "--config.demo.eval_per_task=2",
            "--config.demo.steps=2", "--config.optimizer.warmup_steps=1", "--config.demo.vit_pretrain.steps=3",
            "--config.demo.vit_pretrain.motion_steps=1", f"--config.demo.curriculum.steps={(2,) * stages}"]
    assert DR.main(argv) == 0
    settings = json.loads((tmp_path / "root" / "encoders" / DR.ENCODER_SETTINGS).read_text())
    assert settings["vit_pretrain"]["steps"] == 3
    ev = tmp_path / "root" / "eval"
    manifest = json.loads((ev / "manifest.json").read_text())
    tasks = [c["task"] for c in manifest["cases"]]
    assert sorted(set(tasks)) == sorted(["t2i", "t2v", "i2v", "image_edit", "video_edit", "x2t_image", "x2t_video",
                                         "multi_edit"])
    for case in manifest["cases"]:
        outs = case["outputs"]
        assert "error" not in outs, (case["id"], outs)
        if case["task"].startswith("x2t"):
            assert isinstance(outs["answer"], str)
        else:
            assert os.path.getsize(outs["media"]) > 0
            assert outs["media"].endswith(".mp4" if case["task"] in ("t2v", "i2v", "video_edit") else ".png")
    multi = next(c for c in manifest["cases"] if c["task"] == "multi_edit")
    assert len(multi["outputs"]["all_media"]) == 2  # two turns, two images
    # demo.eval_noise 'per_case': the cases of a task start from different noise, and infer.py used it
    t2v_seeds = [r["samples"][0]["seed"] for r in json.loads((ev / "t2v" / "run.json").read_text())["records"]]
    assert t2v_seeds == [c["noise_seed"] for c in manifest["cases"] if c["task"] == "t2v"] == [42, 43]
    scores = json.loads((ev / "scores.json").read_text())
    assert scores and (ev / "index.html").stat().st_size > 0 and (ev / "contact_sheet.png").stat().st_size > 0
    # the cache is reused: a second run does not train again
    cached = DR.cache_dir(DR.load_config(DR.DEFAULT_CONFIG, str(tmp_path / "root"), argv[2:]))
    assert os.path.isfile(os.path.join(cached, "lance_checkpoint.json"))


def test_demo_config_ties_the_decay_to_the_run_and_keys_the_cache_on_the_data(monkeypatch):
    """The LR decay ends with --config.train.steps; the checkpoint cache key changes with the step count and
    with synthetic.DATA_VERSION (new rows must not reuse a model trained on the old ones)."""
    from lance_jax.data import synthetic as SY
    from lance_jax.demo import run as DR

    short = DR.load_config(DR.DEFAULT_CONFIG, "/tmp/unused-demo-root", ["--config.train.steps=40"])
    assert short.optimizer.total_steps == 40 and short.optimizer.schedule == "cosine"
    default = DR.load_config(DR.DEFAULT_CONFIG, "/tmp/unused-demo-root", [])
    assert default.optimizer.total_steps == default.train.steps
    key = DR.cache_key(default)
    assert DR.cache_key(short) != key
    untrained_vit = DR.load_config(DR.DEFAULT_CONFIG, "/tmp/unused-demo-root", ["--config.demo.vit_pretrain.steps=0"])
    assert DR.cache_key(untrained_vit) != key  # another frozen tower: the cached model does not fit it
    monkeypatch.setattr(SY, "DATA_VERSION", SY.DATA_VERSION + 1)
    assert DR.cache_key(default) != key
    assert DR.task_list("t2i, x2t_image,multi_edit") == ["t2i", "x2t_image", "multi_edit"]
    with pytest.raises(SystemExit):  # a typo stops the command before the data / train stages
        DR.main(["--root", "/tmp/unused-demo-root", "--tasks", "t2i,x2t_imgae"])
    assert not os.path.exists("/tmp/unused-demo-root")


def test_a_finished_model_skips_the_data_stage(tmp_path, monkeypatch):
    """`--stage all` writes no tokenizer / ViT / shards when a trained checkpoint is cached or named by --ckpt
    (inference reads both from it); --retrain and explicit stages still run them."""
    from lance_jax.demo import run as DR

    monkeypatch.setenv("LANCE_DEMO_CACHE", str(tmp_path / "cache"))
    c = DR.load_config(DR.DEFAULT_CONFIG, str(tmp_path / "root"), [])
    assert DR.stages_to_run(c, "all", None, False) == DR.STAGES  # nothing cached yet
    assert DR.stages_to_run(c, "all", "/some/ckpt", False) == ("infer", "evaluate")
    os.makedirs(DR.cache_dir(c))
    (tmp_path / "cache" / DR.cache_key(c) / "lance_checkpoint.json").write_text("{}")
    assert DR.stages_to_run(c, "all", None, False) == ("train", "infer", "evaluate")
    assert DR.stages_to_run(c, "all", None, True) == DR.STAGES
    assert DR.stages_to_run(c, "data", None, False) == ("data",)
    other = DR.load_config(DR.DEFAULT_CONFIG, str(tmp_path / "root"), ["--config.train.steps=7"])
    assert DR.stages_to_run(other, "all", None, False) == DR.STAGES  # another model: not the cached one
    with pytest.raises(SystemExit):
        DR.main(["--root", str(tmp_path / "root"), "--stage", "train", "--ckpt", "/some/ckpt"])
    assert not (tmp_path / "root").exists()


def test_infer_reads_each_task_at_its_training_vit_side():
    """infer.py gets, per task, the ViT side the task's training group encodes with (a mismatch would show
    the model token grids it never saw), also when a group's side is overridden."""
    from lance_jax.demo import run as DR

    c = DR.load_config(DR.DEFAULT_CONFIG, "/tmp/unused-demo-root", [])
    group_of = {"t2i": "t2i", "t2v": "t2v", "i2v": "t2v", "image_edit": "image_edit", "multi_edit": "image_edit",
                "video_edit": "video_edit", "x2t_image": "x2t_image", "x2t_video": "x2t_video"}
    sides = {g["name"]: g["vit_resolution"] for g in c.data.groups}
    for task, group in group_of.items():
        flags = DR.infer_flags(c, task)
        assert flags[flags.index("--resolution") + 1] == f"{c.demo.size}/{sides[group]}", task
    assert sides["x2t_image"] != sides["x2t_video"]  # the per-task override is in effect
    i = [g["name"] for g in c.data.groups].index("x2t_image")
    other = DR.load_config(DR.DEFAULT_CONFIG, "/tmp/unused-demo-root", [f"--config.data.groups[{i}].vit_resolution=112"])
    assert DR.infer_flags(other, "x2t_image")[DR.infer_flags(other, "x2t_image").index("--resolution") + 1] == "32/112"
    assert DR.cache_key(other) != DR.cache_key(c)


def test_eval_noise_gives_each_case_its_own_seed_or_the_reference_one():
    from lance_jax.demo import run as DR

    own = DR.load_config(DR.DEFAULT_CONFIG, "/tmp/unused-demo-root", [])
    assert [DR.noise_seed(own, i) for i in range(3)] == [42, 43, 44]
    shared = DR.load_config(DR.DEFAULT_CONFIG, "/tmp/unused-demo-root", ["--config.demo.eval_noise=shared"])
    assert {DR.noise_seed(shared, i) for i in range(3)} == {42}
    bad = DR.load_config(DR.DEFAULT_CONFIG, "/tmp/unused-demo-root", ["--config.demo.eval_noise=random"])
    with pytest.raises(ValueError, match="eval_noise must be"):
        DR.noise_seed(bad, 0)


def test_edits_and_clips_get_their_own_guidance():
    """demo.task_guidance reaches infer.py for the tasks its training group trains (multi_edit is an image
    edit, i2v a t2v clip); a key it leaves out (t2v's interval) and every other task keep the demo's."""
    from lance_jax.demo import run as DR

    c = DR.load_config(DR.DEFAULT_CONFIG, "/tmp/unused-demo-root", [])
    own = c.demo.task_guidance["image_edit"]
    assert (own["cfg_scale"], list(own["cfg_interval"])) != (c.demo.cfg_scale, list(c.demo.cfg_interval))

    def cfg_flags(task):
        f = DR.infer_flags(c, task)
        i = f.index("--cfg-interval")
        return float(f[f.index("--cfg-scale") + 1]), [float(f[i + 1]), float(f[i + 2])]

    for task in ("image_edit", "multi_edit"):
        assert cfg_flags(task) == (own["cfg_scale"], [float(x) for x in own["cfg_interval"]]), task
    clips = c.demo.task_guidance["t2v"]["cfg_scale"]
    assert clips != c.demo.cfg_scale
    for task in ("t2v", "i2v"):
        assert cfg_flags(task) == (clips, [float(x) for x in c.demo.cfg_interval]), task
    for task in ("t2i", "video_edit"):
        assert cfg_flags(task) == (c.demo.cfg_scale, [float(x) for x in c.demo.cfg_interval]), task


def test_x2t_training_positions_shift_the_vit_block(demo_ckpt, monkeypatch):
    """TextSettings.training_positions decodes with the training layout's ids (ViT T ids from 1000, spec 20
    §2.5); the default keeps the released inference's unshifted ids."""
    from lance_jax import kv_plan, positions
    from lance_jax.pipelines import LanceRunner, TextSettings

    seen = []
    plan = kv_plan.plan_understanding

    def spy(layout, cfg, max_new, **kw):
        out = plan(layout, cfg, max_new, **kw)
        seen.append((kw.get("shift", False), out.debug["prefill_pos"][0, out.debug["vit_token_indexes"]]))
        return out

    monkeypatch.setattr(kv_plan, "plan_understanding", spy)
    out, _, _ = demo_ckpt
    runner = LanceRunner(out, progress=False)
    image = np.zeros((32, 32, 3), np.uint8)
    for shifted in (False, True):
        res = runner.x2t_image("What color is the shape?", image, resolution="32/112",
                               text=TextSettings(max_new_tokens=2, training_positions=shifted))
        assert isinstance(res.text, str)
    (s0, t0), (s1, t1) = seen
    assert (s0, s1) == (False, True)
    assert t0.max() < positions.VIT_T_START <= t1.min()  # the block (from its start token) moved to 1000
    np.testing.assert_array_equal(t1 - t1.min(), t0 - t0.min())  # inside the block nothing changes


def test_vit_pretraining_targets_are_each_tokens_colours_object_share_and_motion():
    """Per merged token: mean colour of its region in both frames of the temporal patch, then the object's share
    of the region in each, then the object's velocity times the share it covers in either frame; a 9-frame clip
    is padded to 10 frames like the ViT's input (last pair = frame 8 twice, nothing moves in it)."""
    from lance_jax.demo import vit_pretrain as VP

    frames = np.zeros((9, 32, 32, 3), np.uint8)
    masks = np.zeros((9, 32, 32), bool)
    for f in range(9):  # a white 8x8 square stepping one 8-px token to the right every two frames
        x = 8 * (f // 2) if f < 8 else 24
        frames[f, 8:16, x:x + 8] = 255
        masks[f, 8:16, x:x + 8] = True
    t = VP.token_targets(frames, masks, 112, velocity=(0.0, 4.0))  # 112 px: 4x4 tokens of 8x8 scene px
    assert t.shape == (5, 4, 4, VP.TARGETS)
    motion = t[..., 8:]
    for g in range(4):
        np.testing.assert_array_equal(motion[g, 1, g], [0.0, 4.0])
        assert np.abs(motion[g]).sum() == 4.0
    np.testing.assert_array_equal(motion[4], 0.0)  # the padded pair
    np.testing.assert_array_equal(VP.token_targets(frames, masks, 112)[..., 8:], 0.0)  # no velocity given
    share_a, share_b = t[..., 6], t[..., 7]
    for g in range(4):
        assert share_a[g, 1, g] == 1.0 and share_b[g, 1, g] == 1.0 and share_a[g].sum() == 1.0
    assert share_a[4, 1, 3] == share_b[4, 1, 3] == 1.0  # the padded pair repeats frame 8
    np.testing.assert_allclose(t[2, 1, 2, :6], 1.0)  # white in both frames
    np.testing.assert_allclose(t[2, 0, 0, :6], 0.0)
    half = VP.token_targets(frames[:1], masks[:1], 224)  # an image: 8x8 tokens of 4x4 px, both frames the image
    assert half.shape == (1, 8, 8, VP.TARGETS)
    np.testing.assert_array_equal(half[0, 2:4, 0:2, 6], 1.0)
    np.testing.assert_array_equal(half[..., 6], half[..., 7])
    with pytest.raises(ValueError, match="multiple"):
        VP.token_targets(frames[:, :30, :30], masks[:, :30, :30], 112)


def test_vit_pretraining_clips_report_the_velocity_their_object_moves_with():
    """The motion target's sign and axis come from the clip itself: velocity (dy, dx), in pixels per frame,
    points the way the object's centroid moves between the first and last frame; stills have none."""
    from lance_jax.demo import vit_pretrain as VP

    rng = np.random.default_rng(3)
    for _ in range(8):
        frames, masks, (dy, dx) = VP.clip(rng, 32, True)
        ys, xs = [np.array([np.nonzero(m)[k].mean() for m in masks[[0, -1]]]) for k in (0, 1)]
        shift = np.array([ys[1] - ys[0], xs[1] - xs[0]]) / (len(masks) - 1)  # px per frame
        np.testing.assert_allclose([dy, dx], shift, atol=0.3)
        assert (dy == 0) != (dx == 0)
    assert VP.clip(rng, 32, False)[2] == (0.0, 0.0)


def test_vit_pretraining_fits_the_read_out():
    """A few Adam steps on one batch kind lower the standardised read-out loss and change the tower."""
    from lance_jax.demo import checkpoint as DC
    from lance_jax.demo import vit_pretrain as VP

    cfg = DC.demo_vit_config(32, hidden_size=32, intermediate_size=64)
    params = DC.random_vit_params(cfg, 0)
    new, report = VP.pretrain(cfg, params, size=32, steps=12, batch_size=4, lr=3e-3, kinds=((112, False),),
                              console=lambda *a: None)
    kind = report["kinds"]["image@112"]
    assert kind["last_loss"] < kind["first_loss"]
    assert jax.tree.structure(new) == jax.tree.structure(params)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)))


def test_vit_pretraining_motion_phase_reads_clips_for_motion_alone():
    """The motion-only first phase trains on clips (a still would give it nothing to learn); its steps are not
    counted in the per-kind losses, and without a video kind it is refused by name."""
    from lance_jax.demo import checkpoint as DC
    from lance_jax.demo import vit_pretrain as VP

    cfg = DC.demo_vit_config(32, hidden_size=32, intermediate_size=64)
    params = DC.random_vit_params(cfg, 0)
    kinds = ((112, True), (112, False))
    new, report = VP.pretrain(cfg, params, size=32, steps=4, motion_steps=2, batch_size=2, kinds=kinds,
                              console=lambda *a: None)
    assert report["motion_steps"] == 2
    assert report["kinds"]["video@112"]["first_loss"] is not None  # step 2 (video), after the phase
    assert report["kinds"]["video@112"]["r2"][VP.MOTION][0] is not None  # clips vary in motion
    assert report["kinds"]["image@112"]["r2"][VP.MOTION] == [None, None]  # stills do not
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)))
    with pytest.raises(ValueError, match="video kind"):
        VP.pretrain(cfg, params, size=32, steps=2, motion_steps=1, kinds=((112, False),), console=lambda *a: None)


def test_the_towers_tokens_are_scaled_to_the_set_spread_and_nothing_else_changes():
    """with_token_spread scales the merger's last projection only (weights and bias), so the output tokens are
    the same up to one factor and their mean per-channel std is the one asked for."""
    from lance_jax.demo import checkpoint as DC
    from lance_jax.demo import vit_pretrain as VP

    cfg = DC.demo_vit_config(32, hidden_size=32, intermediate_size=64)
    params = DC.random_vit_params(cfg, 0)
    before = VP.token_spread(cfg, params, size=32, batch_size=2)
    scaled, factor = VP.with_token_spread(cfg, params, 0.37, size=32)
    after = VP.token_spread(cfg, scaled, size=32, batch_size=2)
    np.testing.assert_allclose(after, before * factor, rtol=1e-4)  # the same scenes: one factor throughout
    np.testing.assert_allclose(VP.token_spread(cfg, scaled, size=32), 0.37, rtol=1e-4)
    flat = dict(jax.tree_util.tree_leaves_with_path(params))
    flat_scaled = dict(jax.tree_util.tree_leaves_with_path(scaled))
    for path, leaf in flat.items():
        want = leaf * factor if "mlp_2" in jax.tree_util.keystr(path) else leaf
        np.testing.assert_allclose(flat_scaled[path], want, rtol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_encoder_settings_cover_the_merger_width_and_the_codec(tmp_path):
    """Encoders written for another model width (the ViT merger projects to it) or codec are not reused."""
    from lance_jax.demo import run as DR

    config = DR.load_config(DR.DEFAULT_CONFIG, str(tmp_path), [])
    enc = tmp_path / "encoders"
    enc.mkdir()
    (enc / DR.ENCODER_SETTINGS).write_text(json.dumps(DR.encoder_settings(config)))
    assert DR._same_encoders(str(enc), config)
    assert DR._same_encoders(str(enc), DR.load_config(DR.DEFAULT_CONFIG, str(tmp_path), ["--config.optimizer.lr=1e-3"]))
    for flag in ("--config.model.vit_out_hidden_size=192", "--config.model.autoencoder=wan2.2", "--config.demo.seed=1",
                 "--config.demo.vit_pretrain.steps=0"):
        assert not DR._same_encoders(str(enc), DR.load_config(DR.DEFAULT_CONFIG, str(tmp_path), [flag])), flag


NO_CURRICULUM = ("--config.demo.curriculum.groups=()", "--config.demo.curriculum.steps=()",
                 "--config.demo.curriculum.capacities=()")


@pytest.fixture
def fake_training(tmp_path, monkeypatch):
    """stage_train without training: each L.run call is recorded as (config, workdir, the workdir's entries when
    the run started or None) and leaves a checkpoints folder; export_trained writes a checkpoint folder holding
    only its lance_checkpoint.json (so the cache finds it).
    The demo cache is under tmp_path."""
    from lance_jax.demo import checkpoint as DC
    from lance_jax.train import loop as L

    monkeypatch.setenv("LANCE_DEMO_CACHE", str(tmp_path / "cache"))
    runs = []

    def fake_run(config, workdir, console=print):
        runs.append((config, workdir, sorted(os.listdir(workdir)) if os.path.isdir(workdir) else None))
        os.makedirs(os.path.join(workdir, "checkpoints"), exist_ok=True)
        return {}

    def fake_export(config, workdir, enc, out):
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "lance_checkpoint.json"), "w") as f:
            f.write("{}")
        return dict(reference=dict(note=""))

    monkeypatch.setattr(L, "run", fake_run)
    monkeypatch.setattr(DC, "export_trained", fake_export)
    return runs


def test_a_training_run_resumes_only_under_its_own_config(tmp_path, fake_training):
    """ROOT/train/<key>: a changed config trains in its own workdir instead of resuming (and caching as its
    own) another config's finished run; --retrain starts the config's run over."""
    from lance_jax.demo import run as DR

    load = lambda *flags: DR.load_config(DR.DEFAULT_CONFIG, str(tmp_path / "root"),  # noqa: E731
                                         [*NO_CURRICULUM, *flags])
    base, other_lr, more_logs = load(), load("--config.optimizer.lr=1e-3"), load("--config.train.log_every=7")
    assert DR.train_workdir(base) == DR.train_workdir(more_logs)  # logging does not change the weights
    assert DR.train_workdir(base) != DR.train_workdir(other_lr)
    assert os.path.dirname(DR.train_workdir(base)) == str(tmp_path / "root" / "train")
    quiet = dict(console=lambda *a: None)
    DR.stage_train(base, **quiet)
    DR.stage_train(other_lr, **quiet)
    DR.stage_train(base, retrain=True, **quiet)
    runs = [(workdir, found) for _, workdir, found in fake_training]
    assert len(runs) == 3 and [w for w, _ in runs[:2]] == [DR.train_workdir(base), DR.train_workdir(other_lr)]
    assert runs[1][1] is None  # the lr change found no run to resume
    assert runs[2] == (DR.train_workdir(base), None)  # started over, not resumed


def test_the_curriculum_trains_its_groups_alone_in_order_and_the_mix_starts_from_the_last(tmp_path, fake_training):
    """demo.curriculum: one run per stage on its groups alone (its own steps, LR decay and packed-row sizes, raw
    params exported), each from the one before, then the full mix with init.ckpt = the last stage's checkpoint; a
    stage in the cache is reused; each stage's settings (and those before it) key the cache; bad stages are
    refused by name."""
    from lance_jax.demo import run as DR

    def load(groups, steps, rows="()", *flags):
        return DR.load_config(DR.DEFAULT_CONFIG, str(tmp_path / "root"), [
            f"--config.demo.curriculum.groups={groups}", f"--config.demo.curriculum.steps={steps}",
            f"--config.demo.curriculum.capacities={rows}", *flags])

    two, one = "(('x2t_video',), ('t2v', 't2i'))", "(('x2t_video',),)"
    rows = "({}, {'und': 96, 'gen': 576})"
    c = load(two, "(30, 20)", rows, "--config.train.steps=50")
    DR.stage_train(c, console=lambda *a: None)
    first, second, mix = [config for config, _, _ in fake_training]
    assert [g["name"] for g in first.data.groups] == ["x2t_video"]
    assert [g["name"] for g in second.data.groups] == ["t2i", "t2v"]  # in the mix's order
    assert first.train.steps == first.optimizer.total_steps == 30 and first.ema_decay == 0.0
    assert second.train.steps == second.optimizer.total_steps == 20 and second.ema_decay == 0.0
    assert mix.train.steps == mix.optimizer.total_steps == 50 and mix.ema_decay == c.ema_decay
    assert len(mix.data.groups) == len(c.data.groups)
    assert first.data.capacities == mix.data.capacities == c.data.capacities  # only the second stage is resized
    assert second.data.capacities.to_dict() == dict(c.data.capacities.to_dict(), und=96, gen=576)
    assert second.init.ckpt == DR.cache_dir(first) and mix.init.ckpt == DR.cache_dir(second)
    assert DR.cache_dir(mix) == DR.cache_dir(c)

    # another second stage: the first is reused from the cache, the second and the mix train again
    del fake_training[:]
    DR.stage_train(load(two, "(30, 40)", rows, "--config.train.steps=50"), console=lambda *a: None)
    assert [len(r.data.groups) for r, _, _ in fake_training] == [2, len(c.data.groups)]
    assert fake_training[0][0].init.ckpt == DR.cache_dir(first)

    assert DR.curriculum_configs(load(one, "(0,)")) == []
    keys = {DR.cache_key(load(one, f"({n},)")) for n in (0, 30, 40)}
    keys |= {DR.cache_key(load(two, "(30, 20)", r)) for r in ("()", rows)}
    assert len(keys) == 5  # another curriculum or other rows in a stage: another trained model
    stage_keys = [DR.cache_key(x) for x in DR.curriculum_configs(c)]
    assert stage_keys[0] == DR.cache_key(DR.curriculum_configs(load(one, "(30,)"))[0])
    assert len(set(stage_keys) | {DR.cache_key(c)}) == 3
    with pytest.raises(ValueError, match=r"curriculum.groups\[0\] \['x2t_vidoe'\]"):
        DR.curriculum_configs(load("(('x2t_vidoe',),)", "(30,)"))
    with pytest.raises(ValueError, match="one of each per stage"):
        DR.curriculum_configs(load(two, "(30,)"))
    with pytest.raises(ValueError, match="one of each per stage"):
        DR.curriculum_configs(load(two, "(30, 20)", "({},)"))
    with pytest.raises(ValueError, match=r"capacities\[1\] .* may only resize \['ce', 'gen', 'und', 'vit'\]"):
        DR.curriculum_configs(load(two, "(30, 20)", "({}, {'tokens': 96})"))
    with pytest.raises(ValueError, match="to positive integers"):
        DR.curriculum_configs(load(two, "(30, 20)", "({}, {'und': 0})"))
    with pytest.raises(ValueError, match="one dict per stage"):
        DR.curriculum_configs(load(two, "(30, 20)", "({}, 96)"))


def test_infer_commands_run_side_by_side_and_a_failed_call_names_its_task(tmp_path):
    """Every task's command runs (two at a time here); exit 1 (some records failed, still scored) passes, any
    other exit raises with the task's name and its stderr."""
    from lance_jax.demo import run as DR

    def cmd(name, code):
        return [sys.executable, "-c", f"import pathlib, sys; pathlib.Path({str(tmp_path / name)!r}).touch(); "
                                      f"print('bad {name}', file=sys.stderr); sys.exit({code})"]

    DR.run_infer_commands({"a": cmd("a", 0), "b": cmd("b", 1), "c": cmd("c", 0)}, 2, console=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]
    with pytest.raises(RuntimeError, match="infer.py --task d failed:\nbad d"):
        DR.run_infer_commands({"a": cmd("a", 0), "d": cmd("d", 2)}, 2, console=lambda *_: None)


def test_shards_are_written_beside_the_encoders_and_a_failed_write_is_an_error(tmp_path, monkeypatch):
    """The data stage writes the shards in a second process while it builds the encoders; it waits for them,
    and a failed write raises (naming the folder) instead of training on missing rows."""
    from lance_jax.demo import run as DR

    built = []
    monkeypatch.setattr(DR, "_write_encoders", lambda config, enc, console: built.append(enc))
    c = DR.load_config(DR.DEFAULT_CONFIG, str(tmp_path / "root"), [])
    c.demo.rows = dict(t2i=3, t2v=2, image_edit=2, video_edit=1, x2t_image=2, x2t_video=2)
    DR.stage_data(c, console=lambda *_: None)
    shards = tmp_path / "root" / "shards"
    summary = json.loads((shards / "summary.json").read_text())
    assert {t: v["rows"] for t, v in summary["tasks"].items()} == c.demo.rows.to_dict() and built
    assert DR._shards_ready(str(shards), c)
    c.demo.rows.t2i = 4
    c.demo.rows.no_such_task = 1
    with pytest.raises(RuntimeError, match=f"writing the demo shards to {shards} failed"):
        DR.stage_data(c, console=lambda *_: None)
    assert not (shards / "summary.json").exists()  # the next run writes them again
