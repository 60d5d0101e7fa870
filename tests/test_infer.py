"""infer.py and lance_jax.pipelines: every task end to end from the converted golden checkpoint.

Tiny sizes throughout (64x64 media, 5-frame videos, 2 Euler steps, 4 new tokens) so that the whole file
compiles each shape once and stays within a few minutes on 2 CPU cores. The golden `gen` case pins the
pipeline's plumbing (sequence build, plans, prefill, CFG denoising) to the reference's trajectory.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from lance_jax import media, pipelines
from lance_jax.parity import TOL_TRAJECTORY
from lance_jax.pipelines import GenerationSettings, InferenceError, LanceRunner, Request, TextSettings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = GenerationSettings(steps=2)  # shift 3.5: both steps guided -> one denoise compilation per shape
TEXT = TextSettings(max_new_tokens=4)
RES = "64/56"  # VAE bucket side 64 (64x64 for a square input), ViT side 56 (56x56 -> 2x2 merged tokens)


def _load_infer():
    spec = importlib.util.spec_from_file_location("infer_cli", os.path.join(REPO, "infer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ckpt(golden, tmp_path_factory):
    """The golden set converted once (language model, glue, ViT and, when the converter has it, the VAE)."""
    from lance_jax.convert import converter
    from lance_jax.convert.sources import find_reference

    out = str(tmp_path_factory.mktemp("infer") / "ckpt")
    converter.to_jax(find_reference(golden.root), out, progress=False)
    return out


@pytest.fixture(scope="module")
def vae_path(golden, ckpt):
    """None when the checkpoint carries the VAE; else the golden VAE folder (converter without a VAE item)."""
    items = json.load(open(os.path.join(ckpt, "lance_checkpoint.json")))["items"]
    return None if "vae" in items else os.path.join(golden.root, "vae")


@pytest.fixture(scope="module")
def runner(ckpt, vae_path):
    return LanceRunner(ckpt, vae_path=vae_path, progress=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    video = rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    return dict(image=media.write_png(str(root / "src.png"), image),
                video=media.write_mp4(str(root / "src.mp4"), video, fps=12), root=str(root))


# ----------------------------------------------------------------------------------------------
# Media
# ----------------------------------------------------------------------------------------------


def test_media_round_trip_and_sampling(tmp_path):
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    assert np.array_equal(media.read_image(media.write_png(str(tmp_path / "a.png"), frame)), frame)
    yy, xx = np.mgrid[0:48, 0:80]
    smooth = np.stack([xx * 3, yy * 5, 255 - xx * 3], axis=-1).astype(np.uint8)  # H.264 4:2:0 keeps gradients
    clip = np.repeat(smooth[None], 30, axis=0)
    path = media.write_mp4(str(tmp_path / "a.mp4"), clip, fps=24)
    frames, info = media.read_video(path)  # 30 frames at 24 fps = 1.25 s -> round(15) -> 13 = 4*3+1
    assert frames.shape == (13, 48, 80, 3) and frames.dtype == np.uint8
    assert info.source_frames == 30 and info.source_fps == 24 and info.indices[0] == 0 and info.indices[-1] == 29
    assert np.abs(frames.astype(int) - smooth).mean() < 4  # lossy H.264
    # 30 §9.3: 6 s -> 69, 5 s -> 57, 2 s -> 21; clips over 6 s are spread-sampled over their whole length
    assert [media.sample_count(n, 24) for n in (144, 120, 48, 1000)] == [69, 57, 21, 69]
    assert media.sample_indices(1000, 24)[-1] == 999
    assert media.sample_count(1, 24) == 1
    video = np.stack([-np.ones((3, 2, 2)), np.ones((3, 2, 2))], axis=1)  # (3, T=2, 2, 2)
    u8 = media.to_uint8(video)
    assert u8.shape == (2, 2, 2, 3) and u8[0].max() == 0 and u8[1].min() == 255


def test_media_errors(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(media.MediaError, match="cannot read video"):
        media.read_video(str(bad))
    with pytest.raises(media.MediaError, match="cannot read image"):
        media.read_image(str(bad))
    with pytest.raises(media.MediaError, match="empty"):
        media.read_image(str(empty))
    with pytest.raises(media.MediaError, match="not found"):
        media.read_video(str(tmp_path / "missing.mp4"))


# ----------------------------------------------------------------------------------------------
# Every task through the Python API (files written and decodable, records complete)
# ----------------------------------------------------------------------------------------------


GEN_CASES = {
    "t2i": dict(prompt="A red cat sits.", height=64, width=64),
    "t2v": dict(prompt="A red cat sits.", height=64, width=64, frames=5),
    "i2v": dict(prompt="A red cat sits.", frames=5, resolution=RES),
    "image_edit": dict(prompt="Remove the hat.", resolution=RES),
    "video_edit": dict(prompt="Make it red.", resolution=RES),
}


@pytest.mark.parametrize("task", list(GEN_CASES))
def test_generation_task_writes_media(runner, inputs, tmp_path, task):
    kw = dict(GEN_CASES[task])
    if task in ("i2v", "image_edit"):
        kw["image"] = inputs["image"]
    if task == "video_edit":
        kw["video"] = inputs["video"]
    record = runner.run(Request(task=task, index=7, seed=3, **kw), str(tmp_path), settings=FAST)
    video_out = task in ("t2v", "i2v", "video_edit")
    assert record["outputs"] == ["000007.mp4" if video_out else "000007.png"]
    path = str(tmp_path / record["outputs"][0])
    if video_out:
        frames, info = media.read_video(path, sample=False)
        assert frames.shape == (5, 64, 64, 3) and info.source_fps == 12
    else:
        assert media.read_image(path).shape == (64, 64, 3)
    (sample,) = record["samples"]
    assert sample["seed"] == 3 and sample["prompt"] == kw["prompt"]
    assert sample["latent_grid"] == [2 if video_out else 1, 4, 4]
    assert sample["guided_steps"] == 2 and sample["timings"]["denoise"] > 0 and sample["timings"]["vae_decode"] > 0
    assert sample["tokens"]["target"] == 32 if video_out else 16
    if task in ("image_edit", "video_edit"):
        assert sample["tokens"]["source_vae"] == sample["tokens"]["target"] and sample["tokens"]["vit"] > 0
        assert sample["posterior_seed"] == FAST.posterior_seed
    json.dumps(record)  # serialisable as is


def test_generation_is_seeded(runner):
    a = runner.t2i("A red cat sits.", height=64, width=64, seed=5, settings=FAST)
    b = runner.t2i("A red cat sits.", height=64, width=64, seed=5, settings=FAST)
    c = runner.t2i("A red cat sits.", height=64, width=64, seed=6, settings=FAST)
    assert np.array_equal(a.latent, b.latent) and not np.allclose(a.latent, c.latent)
    pair = runner.t2i("A red cat sits.", height=64, width=64, seed=5, num_samples=2, settings=FAST)
    assert [r.info["seed"] for r in pair] == [5, 6]
    assert np.array_equal(pair[0].latent, a.latent) and np.array_equal(pair[1].latent, c.latent)


def test_multi_edit_chains_turns(runner, inputs, tmp_path):
    record = runner.run(Request(task="multi_edit", prompt=["Remove the hat.", "Remove the cat."], image=inputs["image"],
                                resolution=RES), str(tmp_path), settings=FAST)
    assert record["outputs"] == ["000000_turn1.png", "000000_turn2.png"]
    assert [t["prompt"] for t in record["turns"]] == ["Remove the hat.", "Remove the cat."]
    assert [t["turn"] for t in record["turns"]] == [1, 2]
    first = media.read_image(str(tmp_path / "000000_turn1.png"))
    # turn 2 edits turn 1's output: the same as a single edit of that image
    again = runner.image_edit("Remove the cat.", first, resolution=RES, settings=FAST)
    assert np.array_equal(media.read_image(str(tmp_path / "000000_turn2.png")), again.frames[0])


@pytest.mark.parametrize("task", ["x2t_image", "x2t_video"])
def test_understanding_task(runner, inputs, task):
    source = inputs["image"] if task == "x2t_image" else inputs["video"]
    fn = getattr(runner, task)
    out = fn("Any cats?", source, resolution=RES, text=TEXT)
    assert 1 <= len(out.token_ids) <= 4 and out.info["new_tokens"] == len(out.token_ids)
    assert out.text == runner.tokenizer.decode(out.token_ids.tolist())
    assert out.info["tokens"]["vit"] == (4 if task == "x2t_image" else 12)  # 2x2 merged, x3 for 5 (->6) frames
    again = fn("Any cats?", source, resolution=RES, text=TEXT)
    assert np.array_equal(out.token_ids, again.token_ids)  # greedy
    if task == "x2t_image":  # temperature / top-p sampling (one more decode compilation: one task only)
        sampled = fn("Any cats?", source, resolution=RES, text=TextSettings(max_new_tokens=4, temperature=1.0,
                                                                            top_p=0.9), seed=1)
        assert 1 <= len(sampled.token_ids) <= 4 and sampled.info["seed"] == 1


# ----------------------------------------------------------------------------------------------
# The pipeline reproduces the reference's generation trajectory (golden `gen` case)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["t2i", pytest.param("image_edit", marks=pytest.mark.slow)])
def test_pipeline_matches_golden_generation(golden, runner, monkeypatch, task):
    z = golden.arrays("gen")
    ids, mod = z[f"{task}_input_ids"], z[f"{task}_sample_modality"]
    caption = runner.tokenizer.decode(ids[mod == 0].tolist())
    inference = golden.meta_lance_config()["inference"]
    settings = GenerationSettings(steps=int(inference["validation_num_timesteps"]),
                                  shift=float(inference["validation_timestep_shift"]),
                                  cfg_scale=float(inference["cfg_text_scale"]))
    monkeypatch.setattr(runner, "_noise", lambda seed, rows: z[f"{task}_noise_init_all"].astype(np.float32))
    size = z[f"{task}_video_sizes"][-1]  # (frames, H, W) of the target
    if task == "t2i":
        out = runner.t2i(caption, height=int(size[1]), width=int(size[2]), settings=settings)
    else:  # inject the reference's source latent and ViT patches
        monkeypatch.setattr(runner, "_vit_inputs", lambda f, s: (z[f"{task}_vit_patches"], z[f"{task}_vit_grid_thw"]))
        pixels = np.zeros((3,) + tuple(int(x) for x in size), np.float32)
        monkeypatch.setattr(runner, "_vae_frames", lambda f, s: pixels)
        monkeypatch.setattr(runner, "_vae_encode", lambda p, s: z[f"{task}_padded_latent_0"])
        out = runner.image_edit(caption, np.zeros((64, 64, 3), np.uint8), settings=settings)
    want = z[f"{task}_cfg_x_final_thwc"]
    assert out.latent.shape == want.shape
    assert np.abs(out.latent - want).max() <= TOL_TRAJECTORY * np.abs(want).max()


# ----------------------------------------------------------------------------------------------
# Clear errors, before any compute
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def no_compute(monkeypatch, runner):
    def boom(*a, **k):
        raise AssertionError("device compute started before validation finished")

    monkeypatch.setattr(pipelines.runner, "prefill_cache", boom)
    for name in ("_vit", "_vae_encode", "_vae_decode"):
        monkeypatch.setattr(runner, name, boom)
    return runner


def test_errors_fire_before_compute(no_compute, inputs, tmp_path, monkeypatch):
    r = no_compute
    cases = [
        (Request(task="t2j", prompt="x"), "unknown task"),
        (Request(task="t2i", prompt=""), "missing prompt"),
        (Request(task="i2v", prompt="x"), "missing input image"),
        (Request(task="video_edit", prompt="x", video=str(tmp_path / "nope.mp4")), "not found"),
        (Request(task="t2i", prompt="x", height=4096, width=64), "latent position table"),
        (Request(task="t2v", prompt="x", height=64, width=64, frames=200), "frames exceed"),
        (Request(task="t2i", prompt="x", height=8, width=64), "below 16"),
        (Request(task="multi_edit", prompt=["a", ""], image=inputs["image"]), "instruction 2"),
        (Request(task="image_edit", prompt="x", image=inputs["image"], resolution="huge"), "resolution"),
    ]
    for req, match in cases:
        with pytest.raises(InferenceError, match=match):
            r.run(req, str(tmp_path))
    garbage = tmp_path / "garbage.png"
    garbage.write_text("no image here")
    with pytest.raises(InferenceError, match="cannot read image"):
        r.image_edit("x", str(garbage), resolution=RES)
    with pytest.raises(InferenceError, match="cannot (read|decode) video"):
        r.x2t_video("q", str(garbage), resolution=RES)
    with pytest.raises(InferenceError, match="special token"):
        r.t2i("a <|im_end|> b", height=64, width=64)
    monkeypatch.setattr(r, "max_context", 100)
    with pytest.raises(InferenceError, match="context budget"):
        r.t2i("A red cat sits. " * 20, height=64, width=64)
    with pytest.raises(InferenceError, match="context budget"):
        r.x2t_image("Any cats?", inputs["image"], resolution=RES, text=TextSettings(max_new_tokens=256))
    with pytest.raises(InferenceError, match="steps"):
        r.t2i("x", height=64, width=64, settings=GenerationSettings(steps=0))


def test_checkpoint_without_vision_items(ckpt, tmp_path):
    stripped = str(tmp_path / "novision")
    shutil.copytree(ckpt, stripped, ignore=shutil.ignore_patterns("vit", "vae"))
    manifest_path = os.path.join(stripped, "lance_checkpoint.json")
    manifest = json.load(open(manifest_path))
    manifest["items"] = [i for i in manifest["items"] if i not in ("vit", "vae")]
    json.dump(manifest, open(manifest_path, "w"))
    r = LanceRunner(stripped, progress=False)
    assert not r.has_vit and not r.has_vae
    with pytest.raises(InferenceError, match="lacks the ViT"):
        r.x2t_image("q", np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(InferenceError, match="lacks the ViT .vision tower. and the VAE"):
        r.image_edit("x", np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(InferenceError, match="lacks the VAE"):
        r.t2i("x", height=64, width=64)
    with pytest.raises(InferenceError, match="not a lance-jax checkpoint"):
        LanceRunner(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# Input files (30 §8)
# ----------------------------------------------------------------------------------------------


def test_input_file_schema(tmp_path, inputs):
    pretty = tmp_path / "t2i.json"
    pretty.write_text(json.dumps({"000003.png": "a cat", "12": "a dog"}, indent=2))
    assert [(r["index"], r["data"]) for r in pipelines.read_input_file(str(pretty))] == [(3, "a cat"), (12, "a dog")]
    one_line = tmp_path / "one.json"
    one_line.write_text(json.dumps({"5.mp4": "a clip"}))  # the reference's quirk would lose this one
    assert pipelines.read_input_file(str(one_line))[0]["index"] == 5
    jsonl = tmp_path / "x.jsonl"
    rec = {"interleave_array": [os.path.basename(inputs["image"]), ["Look.", "Any cats?", ""]],
           "element_dtype_array": ["image", "text"], "istarget_in_interleave": [0, 1]}
    jsonl.write_text(json.dumps({"index": "a1", "data": rec}) + "\n" + json.dumps({"index": 2, "data": rec}) + "\n")
    recs = pipelines.read_input_file(str(jsonl))
    req = pipelines.request_from_record("x2t_image", recs[0], base_dir=inputs["root"])
    assert (req.index, req.system_prompt, req.prompt, req.image) == ("a1", "Look.", "Any cats?", inputs["image"])
    assert req.stem() == "a1" and Request(task="t2i", index=2).stem() == "000002"
    bare = dict(recs[1], data=dict(rec, interleave_array=[inputs["image"], "a caption"]))
    req = pipelines.request_from_record("x2t_image", bare)
    assert "image" in req.system_prompt and req.prompt == ""
    edit = {"interleave_array": ["Add a hat.", inputs["image"], inputs["image"]],
            "element_dtype_array": ["text", "image", "image"], "istarget_in_interleave": [0, 0, 1]}
    req = pipelines.request_from_record("image_edit", {"index": 0, "data": edit})
    assert (req.prompt, req.image) == ("Add a hat.", inputs["image"])
    multi = {"interleave_array": [inputs["image"], "one", "two"], "element_dtype_array": ["image", "text", "text"]}
    assert pipelines.request_from_record("multi_edit", {"index": 0, "data": multi}).prompt == ["one", "two"]
    with pytest.raises(InferenceError, match="needs a video"):
        pipelines.request_from_record("video_edit", {"index": 0, "data": edit})
    assert pipelines.request_from_record("t2i", {"index": 0, "data": "a cat"}, defaults=dict(seed=42)).seed == 42
    own = pipelines.request_from_record("t2i", {"index": 0, "data": "a cat", "seed": 7}, defaults=dict(seed=42))
    assert own.seed == 7  # a record's own noise seed overrides --seed
    with pytest.raises(InferenceError, match="'seed' must be an integer"):
        pipelines.request_from_record("t2i", {"index": 0, "data": "a cat", "seed": "7"})
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(InferenceError, match="neither JSON nor JSONL"):
        pipelines.read_input_file(str(bad))


# ----------------------------------------------------------------------------------------------
# The CLI
# ----------------------------------------------------------------------------------------------


def test_cli_t2i_from_input_file(ckpt, vae_path, tmp_path):
    spec = tmp_path / "t2i.json"
    spec.write_text(json.dumps({"000003.png": "A red cat sits."}, indent=2))
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(REPO, "infer.py"), "--ckpt", ckpt, "--task", "t2i", "--input", str(spec),
           "--out", str(out), "--height", "32", "--width", "48", "--steps", "2", "--seed", "7", "--cfg-scale", "4.0"]
    if vae_path:
        cmd += ["--vae-path", vae_path]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "denoise" in proc.stderr  # tqdm progress
    assert media.read_image(str(out / "000003.png")).shape == (32, 48, 3)
    assert json.load(open(out / "prompt.json")) == {"000003.png": "A red cat sits."}
    run = json.load(open(out / "run.json"))
    assert run["task"] == "t2i" and run["failed"] == 0 and run["settings"]["steps"] == 2
    assert run["settings"]["cfg_interval"] == [0.4, 1.0] and run["settings"]["cfg_renorm"] == "global"
    (rec,) = run["records"]
    (sample,) = rec["samples"]
    assert rec["index"] == 3 and sample["seed"] == 7 and sample["output"] == "000003.png"
    assert sample["prompt"] == "A red cat sits." and {"prefill", "denoise", "vae_decode"} <= set(sample["timings"])
    assert run["model"]["vae"] and run["environment"]["backend"] == "cpu"


def test_cli_x2t_and_errors(ckpt, vae_path, inputs, tmp_path, capsys):
    infer = _load_infer()
    out = tmp_path / "x2t"
    extra = ["--vae-path", vae_path] if vae_path else []
    rc = infer.main(["--ckpt", ckpt, "--task", "x2t_image", "--image", inputs["image"], "--prompt", "Any cats?",
                     "--resolution", RES, "--max-new-tokens", "4", "--out", str(out), "--quiet"] + extra)
    assert rc == 0
    result = json.load(open(out / "result.json"))
    assert result[0]["image"] == inputs["image"] and result[0]["question"] == "Any cats?"
    prompt = json.load(open(out / "prompt.json"))
    raw = prompt[os.path.basename(inputs["image"])]
    assert result[0]["answer"] == raw.replace("<|im_end|>", "").strip()
    run = json.load(open(out / "run.json"))
    assert run["text_settings"]["greedy"] and run["text_settings"]["max_new_tokens"] == 4 and run["settings"] is None
    rec = run["records"][0]
    assert rec["new_tokens"] == len(rec["token_ids"]) and rec["seed"] == 42
    capsys.readouterr()
    for argv, match in [
        (["--task", "x2t_image", "--prompt", "q"], "missing input image"),
        (["--task", "t2i", "--prompt", "q", "--height", "4096"], "latent position table"),
        (["--task", "t2i", "--prompt", "a", "--prompt", "b"], "only multi_edit"),
        (["--task", "t2i", "--prompt", "q", "--height", "64", "--width", "64", "--mesh", "fsdp=3"], "mesh"),
    ]:
        rc = infer.main(["--ckpt", ckpt, "--out", str(tmp_path / "err")] + argv)
        assert rc == 2 and match in capsys.readouterr().err
    assert infer.main(["--ckpt", str(tmp_path / "nowhere"), "--task", "t2i", "--prompt", "q"]) == 2
    assert "not a lance-jax checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Sharded run (8 fake CPU devices) == single device
# ----------------------------------------------------------------------------------------------


def test_sharded_runs_match_single_device(runner, ckpt, vae_path, inputs):
    """fsdp x tensor (params sharded) and data x context (CFG branches over `data`, tokens over `context`)
    meshes give the single-device latents (fp32 reassociation across devices only) and token ids."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    one = runner.t2i("A red cat sits.", height=64, width=64, settings=FAST)
    a = runner.x2t_image("Any cats?", inputs["image"], resolution=RES, text=TEXT)
    for mesh in ("fsdp=4,tensor=2", "data=2,context=4"):
        sharded = LanceRunner(ckpt, vae_path=vae_path, mesh=mesh, progress=False)
        if mesh.startswith("fsdp"):
            up = sharded.params["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
            assert len(up.sharding.device_set) == 8 and up.addressable_shards[0].data.shape[1:] == (
                up.shape[1] // 4, up.shape[2] // 2)
        many = sharded.t2i("A red cat sits.", height=64, width=64, settings=FAST)
        assert np.abs(one.latent - many.latent).max() <= 1e-4 * max(1.0, np.abs(one.latent).max()), mesh
        b = sharded.x2t_image("Any cats?", inputs["image"], resolution=RES, text=TEXT)
        assert np.array_equal(a.token_ids, b.token_ids), mesh


def test_cli_seed_defaults_are_the_pipelines_constants():
    """infer.py spells its seed defaults out (no jax import before --help); they must stay the library's."""
    from lance_jax.pipelines.requests import GLOBAL_SEED, NOISE_SEED

    args = _load_infer()._parser().parse_args(["--ckpt", "c", "--task", "t2i"])
    assert (args.seed, args.posterior_seed) == (NOISE_SEED, GLOBAL_SEED)
    assert Request(task="t2i").seed == NOISE_SEED
