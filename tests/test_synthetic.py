"""The embedded demo's procedural data (`lance_jax.data.synthetic`), scorer (`lance_jax.demo.evaluate`) and
report (`lance_jax.demo.report`): exact rendering, the held-out split, the shard round trip, and a scorer
that gives full marks to the renderer's own outputs and none to wrong ones."""
import json
import os

import numpy as np
import pytest

from lance_jax import media
from lance_jax.data import media as DM
from lance_jax.data import synthetic as Y
from lance_jax.data.shards import ShardSource
from lance_jax.demo import evaluate as E
from lance_jax.demo import report as R

VIDEO_MAX_ERROR = 1  # yuv444p crf 0: lossless up to the RGB<->YUV rounding


def _scenes(n, seed=0, size=32):
    rng = np.random.default_rng(seed)
    return [Y.random_scene(rng, Y.TRAIN_PAIRS[i % len(Y.TRAIN_PAIRS)], size) for i in range(n)]


def test_render_uses_exact_palette_colours_and_mask():
    for scene in _scenes(30):
        img, mask = Y.render(scene), Y.object_mask(scene)
        assert img.dtype == np.uint8 and img.shape == (32, 32, 3)
        assert scene.color != scene.background
        assert (img[mask] == Y.PALETTE[scene.color]).all() and (img[~mask] == Y.PALETTE[scene.background]).all()
        assert 40 <= mask.sum() <= 16 * 16  # >= a 10 px triangle, <= a 16 px square
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())  # margin kept


def test_shapes_have_their_geometry():
    sq = Y.Scene("square", "red", "blue", (16.0, 16.0), 12.0)
    circle, tri = Y.Scene("circle", "red", "blue", (16.0, 16.0), 12.0), Y.Scene("triangle", "red", "blue",
                                                                                  (16.0, 16.0), 12.0)
    assert Y.object_mask(sq).sum() == 144
    assert abs(Y.object_mask(circle).sum() - np.pi * 36) < 8
    rows = Y.object_mask(tri).sum(1)
    assert abs(Y.object_mask(tri).sum() - 72) < 8 and rows[rows > 0][0] < rows[rows > 0][-1]  # apex up
    assert (np.abs(Y.PALETTE_RGB[:, None].astype(int) - Y.PALETTE_RGB[None]).max(-1) + np.eye(8) * 205).min() == 205


@pytest.mark.parametrize("direction", Y.DIRECTIONS)
def test_video_moves_inside_the_frame_and_direction_is_recoverable(direction):
    rng = np.random.default_rng(Y.DIRECTIONS.index(direction))
    for i in range(6):
        speed = float(rng.uniform(*Y.VIDEO_SPEED))
        scene = Y.random_scene(rng, Y.TRAIN_PAIRS[i * 3], 32, direction=direction, speed=speed)
        frames, masks = Y.render_video(scene, direction, speed=speed)
        assert frames.shape == (9, 32, 32, 3) and masks.shape == (9, 32, 32)
        assert all(m.sum() == Y.object_mask(Y.Scene.from_json(scene.to_json()).moved(direction, speed * t)).sum()
                   for t, m in enumerate(masks))
        assert not masks[:, [0, -1]].any() and not masks[:, :, [0, -1]].any()  # the whole path stays inside
        dy, dx = E.centroid_motion(frames, scene.background)
        travel = np.array(Y.VIDEO_SPEED) * (Y.FRAMES - 1)  # +-1 px: the centroid of a rasterised shape
        assert travel[0] - 1 <= max(abs(dy), abs(dx)) <= travel[1] + 1
        assert E.motion_direction(frames, scene.background) == direction
    static = np.stack([Y.render(scene)] * 9)
    assert E.motion_direction(static, scene.background) is None


def test_heldout_split():
    assert {c for _, c in Y.TRAIN_PAIRS} == set(Y.COLORS) and {s for s, _ in Y.TRAIN_PAIRS} == set(Y.SHAPES)
    assert all(Y.is_heldout(*p) for p in Y.HELDOUT) and not any(Y.is_heldout(*p) for p in Y.TRAIN_PAIRS)
    for task in Y.TASKS:
        for row in Y.demo_rows(task, 40, seed=3):
            case = json.loads(row["meta"])
            shape = case["scene"]["shape"]
            assert not Y.is_heldout(shape, case["scene"]["color"])
            assert not Y.is_heldout(shape, case.get("new_color", case["scene"]["color"]))
    for case in Y.heldout_cases(6, seed=1):
        named = case.get("new_color", case["scene"]["color"])
        assert Y.is_heldout(case["scene"]["shape"], named), case
    assert {(c["scene"]["shape"], c["scene"]["color"]) for c in Y.heldout_cases(6, 1, tasks=("t2i",))} == set(
        Y.HELDOUT)


def test_texts_and_determinism():
    scene = Y.Scene("circle", "red", "blue", (16.0, 16.0), 12.0)
    assert Y.caption(scene) == "a red circle on a blue background"
    assert Y.video_caption(scene, "left") == "a red circle moving left on a blue background"
    assert Y.edit_instruction("circle", "green") == "make the circle green"
    assert Y.question_answer("color", scene) == ("What color is the circle?", "red")
    assert Y.question_answer("background", scene) == ("What color is the background?", "blue")
    assert Y.question_answer("shape", scene) == ("What shape is in the image?", "circle")
    assert Y.question_answer("direction", scene, "left") == ("Which way does the circle move?", "left")
    assert Y.question_answer("caption", scene) == ("Describe the image.", Y.caption(scene))
    assert [r["meta"] for r in Y.demo_rows("x2t_video", 5, 0)] == [r["meta"] for r in Y.demo_rows("x2t_video", 5, 0)]
    assert Y.heldout_cases(2, 5) == Y.heldout_cases(2, 5) and Y.heldout_cases(2, 5) != Y.heldout_cases(2, 6)
    for case in Y.heldout_cases(3, 0):
        if case["task"].endswith("_edit"):
            assert case["new_color"] not in (case["scene"]["color"], case["scene"]["background"])
        json.dumps(case)  # plain JSON


def test_training_conversations_draw_distinct_question_kinds():
    rng = np.random.default_rng(0)
    for video in (False, True):
        all_kinds = Y.VIDEO_QUESTIONS if video else Y.IMAGE_QUESTIONS
        draws = [Y.question_kinds(rng, Y.QA_TURNS, video=video) for _ in range(400)]
        for kinds in draws:
            assert len(kinds) == Y.QA_TURNS == len(set(kinds)) and set(kinds) <= set(all_kinds)
            assert not {"color", "any_color"} <= set(kinds)  # same answer: one would copy the other
        first = [k[0] for k in draws]  # the first question follows the single-question weights
        scored = "direction" if video else "color"
        p = (Y.VIDEO_QUESTION_P if video else Y.IMAGE_QUESTION_P)[all_kinds.index(scored)]
        assert abs(first.count(scored) / len(first) - p) < 0.08
    assert Y.question_kinds(rng, 10, video=False).__len__() == len(Y.IMAGE_QUESTIONS) - 1
    case = Y.make_case("x2t_video", np.random.default_rng(1), question="direction")
    assert "follow_ups" not in case  # evaluation cases ask one question


def test_shard_round_trip_and_training_decoder(tmp_path):
    counts = {task: 3 for task in Y.TASKS}
    summary = Y.write_demo_shards(str(tmp_path), counts, seed=0, progress=False)
    assert set(summary["tasks"]) == set(Y.TASKS) and all(t["rows"] == 3 for t in summary["tasks"].values())
    for task in Y.TASKS:
        src = ShardSource(str(tmp_path / task))
        expected = list(Y.demo_rows(task, 3, 0))
        assert len(src) == 3
        for i in range(3):
            row, case = src[i], json.loads(expected[i]["meta"])
            assert row["id"] == case["id"] and row["task_type"] == task
            els, m = row["elements"], Y.case_media(case)
            assert [bool(e["is_target_candidate"]) for e in els].index(True) == len(els) - 1
            media_els = [e for e in els if e["type"] != "text"]
            if task.startswith("x2t"):  # one conversation: (question, answer) turns after the medium
                turns = [[case["prompt"], case["expected"]]] + case["follow_ups"]
                assert len(turns) == Y.QA_TURNS
                assert [e["type"] for e in els][1:] == ["text"] * 2 * len(turns)
                assert [[e["text"] for e in els[1 + 2 * i:3 + 2 * i]] for i in range(len(turns))] == turns
                assert [e["role"] for e in els[1:]] == ["user", "assistant"] * len(turns)
                assert all(e["loss"] for e in els[2::2])
                assert row["system_prompt"]
                want = [m["input"]]
            else:
                assert els[0]["type"] == "text" and els[0]["text"] == case["prompt"]
                want = [m["input"], m["target"]] if "input" in m else [m["target"]]
            for e, frames in zip(media_els, want):
                got = DM.decode_frames(e)
                frames = frames if frames.ndim == 4 else frames[None]
                assert got.shape == frames.shape and e["num_frames"] == len(frames) and e["width"] == 32
                limit = 0 if e["type"] == "image" else VIDEO_MAX_ERROR
                assert np.abs(got.astype(int) - frames).max() <= limit


def test_case_inputs_read_back(tmp_path):
    for case in Y.heldout_cases(1, 0):
        paths, m = Y.write_case_inputs(case, str(tmp_path)), Y.case_media(case)
        assert set(paths) == ({"image"} if case["task"] in ("i2v", "image_edit", "x2t_image") else
                              {"video"} if case["task"] in ("video_edit", "x2t_video") else set())
        for kind, path in paths.items():
            got = media.read_image(path) if kind == "image" else media.read_video(path)[0]
            assert got.shape == m["input"].shape and np.abs(got.astype(int) - m["input"]).max() <= VIDEO_MAX_ERROR


def test_pixel_measures():
    scene = Y.Scene("circle", "red", "blue", (16.0, 16.0), 12.0)
    img = Y.render(scene)
    assert (E.classify_pixels(img) == np.where(Y.object_mask(scene), 0, 2)).all()
    noisy = np.clip(img.astype(int) + np.random.default_rng(0).integers(-60, 60, img.shape), 0, 255).astype(np.uint8)
    assert E.object_color(noisy, "blue") == "red"
    assert E.object_color(Y.render(Y.Scene("circle", "red", "blue", (16.0, 16.0), 2.0)), "blue") is None  # speck
    assert E.psnr(img, img) == float("inf")
    other = img.copy()
    other[0, 0] = 0
    assert E.psnr(img, other, ~Y.object_mask(scene) & (np.arange(32)[:, None] > 0)) == float("inf")
    assert 30 < E.psnr(img, other) < 60
    assert E.dilate(np.eye(5, dtype=bool)[None], 1)[0].sum() == 5 + 2 * 4 + 2 * 3


@pytest.mark.parametrize("answer,expected,ok", [
    ("red", "red", True), ("Red.", "red", True), ("The circle is RED!", "red", True),
    ("red or blue", "red", False), ("reddish", "red", False), ("", "red", False),
    ("left", "left", True), ("It moves left, not right.", "left", False), ("a red circle", "red", True),
    ("a red circle on a blue background", "a red circle on a blue background", True),
    ("a red circle on a green background", "a red circle on a blue background", False),
])
def test_answer_matches(answer, expected, ok):
    assert E.answer_matches(answer, expected) is ok


def _manifest(folder, cases, wrong=False):
    """Outputs from the renderer itself (wrong=True: another colour / the opposite direction / the wrong
    answer), written like infer.py writes them (PNG, yuv420p MP4)."""
    opposite = dict(left="right", right="left", up="down", down="up")
    for c in cases:
        m, bg = Y.case_media(c), c["scene"]["background"]
        if c["task"].startswith("x2t"):
            c["outputs"] = dict(answer=(opposite.get(c["expected"], "black" if c["expected"] != "black" else "white")
                                        if wrong else c["expected"]))
            continue
        target = m["target"]
        if wrong:
            spec = dict(c)
            bad = next(k for k in Y.COLORS if k not in (bg, c["scene"]["color"], c.get("new_color"), Y.final_color(c)))
            spec["scene"] = dict(c["scene"], color=bad)
            if "direction" in c:  # from the end of the true path back to its start: the opposite direction
                end = Y.case_scene(c).moved(c["direction"], c["speed"] * (c["frames"] - 1))
                spec.update(direction=opposite[c["direction"]], scene=dict(spec["scene"], center=list(end.center)))
            target = Y.case_media(dict(spec, task="t2v" if "direction" in c else "t2i"))["target"]
        name = f"{c['id']}.{'mp4' if target.ndim == 4 else 'png'}"
        (media.write_mp4 if target.ndim == 4 else media.write_png)(os.path.join(folder, "out", name), target)
        c["outputs"] = dict(media=os.path.join("out", name))
    path = os.path.join(folder, "manifest.json")
    with open(path, "w") as f:
        json.dump(dict(cases=cases), f)
    return path


def _with_multi_edit(cases):
    """The cases plus a two-turn edit made from the first image_edit case, as the demo driver builds it."""
    first = next(c for c in cases if c["task"] == "image_edit")
    new = next(k for k in Y.COLORS if k not in (first["new_color"], first["scene"]["background"]))
    return cases + [dict(first, id="multi_edit-00000", task="multi_edit", new_colors=[first["new_color"], new],
                         prompt=[first["prompt"], Y.edit_instruction(first["scene"]["shape"], new)])]


def test_scorer_on_ground_truth_and_wrong_outputs(tmp_path, capsys):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir(), bad.mkdir()
    right = E.score_manifest(_manifest(str(good), _with_multi_edit(Y.heldout_cases(4, 0))))
    figures = {(r["task"], r["figure"]): r["value"] for r in right["summary"]}
    assert right["passed"]
    for (task, figure), value in figures.items():
        if "PSNR" not in figure and "agreement" not in figure:
            assert value == 1.0, (task, figure)
    assert figures[("i2v", "first-frame palette agreement")] > 0.9  # yuv420p output smears a few edge pixels
    assert figures[("image_edit", "mean PSNR outside object (dB)")] == E.PSNR_CAP
    assert figures[("video_edit", "mean PSNR outside object (dB)")] > 35  # yuv420p output, edges forgiven

    assert figures[("multi_edit", "last-turn colour accuracy")] == 1.0

    wrong = E.score_manifest(_manifest(str(bad), _with_multi_edit(Y.heldout_cases(4, 0)), wrong=True))
    figures = {(r["task"], r["figure"]): r["value"] for r in wrong["summary"]}
    assert not wrong["passed"]
    for key in [("t2i", "colour accuracy"), ("x2t_image", "colour answer accuracy"),
                ("image_edit", "new-colour accuracy"), ("t2v", "direction accuracy"),
                ("x2t_video", "direction answer accuracy"), ("video_edit", "new-colour accuracy"),
                ("multi_edit", "last-turn colour accuracy")]:
        assert figures[key] == 0.0, key
    assert figures[("image_edit", "mean PSNR outside object (dB)")] == E.PSNR_CAP  # background still right

    assert E.main([str(bad / "manifest.json"), "--json", str(tmp_path / "s.json")]) == 0
    assert E.main([str(bad / "manifest.json"), "--strict"]) == 1
    table = capsys.readouterr().out
    assert "FAIL" in table and "video_edit" in table
    assert json.load(open(tmp_path / "s.json"))["passed"] is False


def test_i2v_direction_is_read_from_the_generated_frames():
    """The given first frame starts on the side opposite the motion: an output that jumps from it to a still
    object at the frame's centre is no motion, though its first-to-last centroid shift points the named way."""
    case = next(c for c in Y.heldout_cases(4, 0) if c["task"] == "i2v")
    m = Y.case_media(case)
    scene = Y.case_scene(case)
    still = Y.render(Y.Scene(scene.shape, scene.color, scene.background, (16.0, 16.0), scene.size))
    jump = np.concatenate([m["target"][:1], np.stack([still] * (len(m["target"]) - 1))])
    assert E.motion_direction(jump, scene.background) == case["direction"]  # what the old figure counted
    assert not E._score_video(case, jump, m)["direction_ok"]
    assert E._score_video(case, m["target"], m)["direction_ok"]


def test_missing_outputs_count_as_failures(tmp_path):
    cases = Y.heldout_cases(1, 0, tasks=("t2i", "t2v", "x2t_image"))
    cases[0]["outputs"] = dict(media="nowhere.png")
    cases[1]["outputs"] = dict(error="infer.py exited 1")
    cases[2]["outputs"] = {}
    scored = [E.score_case(c, c["outputs"], str(tmp_path)) for c in cases]
    assert all("error" in s for s in scored)
    assert all(r["value"] == 0.0 for r in E.summarize(scored))


def test_report_writes_page_and_contact_sheet(tmp_path):
    from PIL import Image

    cases = _with_multi_edit(Y.heldout_cases(2, 0))
    path = _manifest(str(tmp_path), cases)
    cases[0]["outputs"] = dict(media="out/missing.png")  # a failed case still gets a (grey) cell
    with open(path, "w") as f:
        json.dump(dict(cases=cases), f)
    paths = R.write_report(path, str(tmp_path / "report"))
    page = open(paths["html"]).read()
    assert page.count("<video") == 2 * 3 and "make the circle red" in page and "FAIL" in page  # t2i: 1 of 2
    assert all(f"<h2>{t}</h2>" in page for t in Y.EVAL_TASKS + ("multi_edit",))
    assert "What color is the circle?" in page and "make the circle red | make the circle" in page
    sheet = Image.open(paths["sheet"])
    assert sheet.width > 32 * R.SCALE * 4 and sheet.height > 8 * 32 * R.SCALE
