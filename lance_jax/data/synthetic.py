"""Procedural scenes for the embedded demo: one flat shape on a flat background, still or moving.

    scene = Scene("circle", "red", "blue", center=(16.0, 12.0), size=12.0)
    img = render(scene)                                   # (32, 32, 3) uint8, exact palette colours
    frames, masks = render_video(scene, "left")           # (9, 32, 32, 3) uint8, (9, 32, 32) bool
    rows = demo_rows("t2i", 100, seed=0)                  # canonical `lance_interleaved_v1` rows
    write_demo_shards("data/demo", {"t2i": 2000, "t2v": 1000}, seed=0)   # data/demo/<task>/shard-*.parquet
    cases = heldout_cases(8, seed=1)                      # evaluation cases on held-out (shape, colour) pairs
    paths = write_case_inputs(cases[0], "eval/inputs")    # {"image": ...} / {"video": ...} / {}
    media = case_media(cases[0])                          # input / target arrays and object masks

Colours sit at softened corners of the RGB cube (25 / 230 instead of 0 / 255): every pair differs by 205 in
at least one channel, so nearest-palette classification of a generated pixel is unambiguous, and the margin
to 0 / 255 keeps a generator's overshoot from clipping. Rendering has no anti-aliasing: every pixel is
exactly a palette colour and the object mask is exact.

A case is a plain JSON-able dict (the spec); media are re-rendered from it on demand, so the evaluation
manifest needs no arrays. Training rows and evaluation cases come from the same spec builder; they differ
in the allowed (shape, colour) pairs (HELDOUT pairs never reach training) and in which questions are asked.

Videos have 9 frames written at 12 fps: `lance_jax.media.read_video` (12 fps, 4k+1 frames) returns exactly
those 9 frames, and the VAE's 4x temporal compression keeps frames 0, 4 and 8. They are encoded as H.264
yuv444p at crf 0 (lossless up to <= 1 level of RGB<->YUV rounding); yuv420p smears colours by ~30 levels
at the edges of a 32 px scene.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile

import numpy as np

from lance_jax import media
from lance_jax.data import schema as S
from lance_jax.data.shards import ShardWriter

LO, HI = 25, 230
PALETTE = {
    "red": (HI, LO, LO), "green": (LO, HI, LO), "blue": (LO, LO, HI), "yellow": (HI, HI, LO),
    "cyan": (LO, HI, HI), "magenta": (HI, LO, HI), "white": (HI, HI, HI), "black": (LO, LO, LO),
}
COLORS = tuple(PALETTE)
PALETTE_RGB = np.array([PALETTE[c] for c in COLORS], np.uint8)  # (8, 3), row i is COLORS[i]
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
STEP = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}  # (dy, dx)

# Never in training; every shape keeps 6 training colours and every colour 2 training shapes.
HELDOUT = (("circle", "red"), ("circle", "cyan"), ("square", "green"), ("square", "magenta"),
           ("triangle", "blue"), ("triangle", "yellow"))
TRAIN_PAIRS = tuple((s, c) for s in SHAPES for c in COLORS if (s, c) not in HELDOUT)

TASKS = ("t2i", "t2v", "image_edit", "video_edit", "x2t_image", "x2t_video")  # tasks with training rows
EVAL_TASKS = ("t2i", "x2t_image", "image_edit", "t2v", "x2t_video", "i2v", "video_edit")
VIDEO_TASKS = ("t2v", "i2v", "video_edit", "x2t_video")
FRAMES = 9
FPS = 12
BASE = 32  # sizes below are in pixels of a BASE-sided scene and scale with the scene side
MARGIN = 1.0
IMAGE_SHAPE_SIZE = (10.0, 16.0)
VIDEO_SHAPE_SIZE = (8.0, 11.0)  # smaller than stills so that size + travel + margins fit the frame
# px / frame: 14-18 px over the 8 steps of a 9-frame clip, about two 8 px ViT tokens / 4 px latent tokens
# between the kept frames 0, 4, 8. At 10-14 px (DATA_VERSION 2) generated objects barely moved and the
# direction answers collapsed onto one word
VIDEO_SPEED = (1.75, 2.25)
IMAGE_QUESTIONS = ("color", "any_color", "background", "shape", "caption")
VIDEO_QUESTIONS = ("direction", "color", "any_color", "background", "shape", "caption")
# Training draws of the question kind: the scored kinds (colour of the shape / direction of motion) get
# the largest share -- their answers are one or two CE tokens, against nine for a caption. "any_color"
# asks for the object's colour without naming the shape: held-out pairs never appear in training, so a
# model that answers "What color is the circle?" from which colours circles had learns a shape prior
# instead of reading the colour; the shape-free question trains the reading on every colour.
IMAGE_QUESTION_P = (0.3, 0.3, 0.15, 0.1, 0.15)
VIDEO_QUESTION_P = (0.55, 0.1, 0.1, 0.05, 0.05, 0.15)
# Questions per training understanding row: one conversation about one encoded image / video (kinds drawn
# without replacement, "color" and "any_color" not both). The ViT tokens dominate a row and an answer is
# one or two CE tokens, so more turns give more answer supervision per encoded medium (~20 CE tokens per
# step with one turn).
QA_TURNS = 3
# Bumped whenever the rows a seed produces change (question mix, sizes, motion): part of the shards' summary and
# of the demo's checkpoint cache key, so stale shards are rewritten and a stale cached model is not reused.
DATA_VERSION = 3
SCORED_QUESTION = {"x2t_image": "color", "x2t_video": "direction"}
MP4_OPTIONS = dict(pix_fmt="yuv444p", crf=0)


def is_heldout(shape: str, color: str) -> bool:
    return (shape, color) in HELDOUT


# ------------------------------------------------------------------------------------------------
# Scenes and rendering
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    center: tuple[float, float]  # (y, x) in pixels; the first frame's centre for videos
    size: float  # side of the shape's bounding box in pixels

    def to_json(self) -> dict:
        return dict(shape=self.shape, color=self.color, background=self.background,
                    center=[float(self.center[0]), float(self.center[1])], size=float(self.size))

    @classmethod
    def from_json(cls, d: dict) -> Scene:
        return cls(d["shape"], d["color"], d["background"], (float(d["center"][0]), float(d["center"][1])),
                   float(d["size"]))

    def with_color(self, color: str) -> Scene:
        return dataclasses.replace(self, color=color)

    def moved(self, direction: str, distance: float) -> Scene:
        dy, dx = STEP[direction]
        return dataclasses.replace(self, center=(self.center[0] + dy * distance, self.center[1] + dx * distance))


def object_mask(scene: Scene, size: int = BASE) -> np.ndarray:
    """bool (size, size): pixels whose centre lies inside the shape (hard edges, no anti-aliasing)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    cy, cx = scene.center
    r = scene.size / 2.0
    if scene.shape == "circle":
        return (y - cy) ** 2 + (x - cx) ** 2 <= r * r
    if scene.shape == "square":
        return (np.abs(y - cy) < r) & (np.abs(x - cx) < r)
    if scene.shape == "triangle":  # apex up, base = height = size: half width grows by 1/2 px per row
        depth = y - (cy - r)
        return (depth >= 0) & (y < cy + r) & (np.abs(x - cx) <= depth / 2.0)
    raise ValueError(f"unknown shape {scene.shape!r}; one of {SHAPES}")


def render(scene: Scene, size: int = BASE) -> np.ndarray:
    """uint8 (size, size, 3): the background colour with the shape painted in its colour."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = PALETTE[scene.background]
    img[object_mask(scene, size)] = PALETTE[scene.color]
    return img


def render_video(scene: Scene, direction: str, frames: int = FRAMES, size: int = BASE,
                 speed: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (F, size, size, 3), bool (F, size, size)): the shape starts at scene.center and moves
    `speed` px per frame in `direction`."""
    moved = [scene.moved(direction, speed * t) for t in range(frames)]
    return np.stack([render(s, size) for s in moved]), np.stack([object_mask(s, size) for s in moved])


def random_scene(rng: np.random.Generator, pair: tuple[str, str], size: int = BASE, *,
                 direction: str | None = None, speed: float = 0.0, avoid: tuple[str, ...] = ()) -> Scene:
    """A scene of (shape, colour) `pair` on a background differing from the colour and from `avoid`;
    with a direction, the start is chosen so that `speed` px per frame over FRAMES frames stays inside."""
    shape, color = pair
    background = str(rng.choice([c for c in COLORS if c != color and c not in avoid]))
    k = size / BASE
    lo, hi = VIDEO_SHAPE_SIZE if direction else IMAGE_SHAPE_SIZE
    side = float(rng.uniform(lo, hi) * k)
    travel = speed * (FRAMES - 1)
    dy, dx = STEP[direction] if direction else (0.0, 0.0)
    center = [0.0, 0.0]
    for axis, d in enumerate((dy, dx)):
        start_lo, start_hi = MARGIN * k + side / 2, size - MARGIN * k - side / 2  # centre range of a still shape
        start_lo, start_hi = start_lo - min(d, 0) * travel, start_hi - max(d, 0) * travel
        if start_lo > start_hi:
            raise ValueError(f"a {side:.1f} px shape travelling {travel:.1f} px does not fit a {size} px frame")
        center[axis] = float(rng.uniform(start_lo, start_hi))
    return Scene(shape, color, background, (center[0], center[1]), side)


# ------------------------------------------------------------------------------------------------
# Texts
# ------------------------------------------------------------------------------------------------


def caption(scene: Scene) -> str:
    return f"a {scene.color} {scene.shape} on a {scene.background} background"


def video_caption(scene: Scene, direction: str) -> str:
    return f"a {scene.color} {scene.shape} moving {direction} on a {scene.background} background"


def edit_instruction(shape: str, new_color: str) -> str:
    return f"make the {shape} {new_color}"


def question_answer(kind: str, scene: Scene, direction: str | None = None) -> tuple[str, str]:
    """(question, answer) of question `kind` about a still (direction None) or moving scene."""
    medium = "video" if direction else "image"
    if kind == "color":
        return f"What color is the {scene.shape}?", scene.color
    if kind == "any_color":
        return "What color is the shape?", scene.color
    if kind == "background":
        return "What color is the background?", scene.background
    if kind == "shape":
        return f"What shape is in the {medium}?", scene.shape
    if kind == "direction":
        return f"Which way does the {scene.shape} move?", direction
    if kind == "caption":
        return f"Describe the {medium}.", video_caption(scene, direction) if direction else caption(scene)
    raise ValueError(f"unknown question kind {kind!r}")


def x2t_instruction(kind: str) -> str:
    """The system prompt of understanding rows: the one infer.py uses by default, so that training and
    inference see the same instruction without flags."""
    from lance_jax import sequence  # lazy: sequence pulls in jax, which rendering does not need

    return sequence.GRADIO_X2T_VIDEO_INSTRUCTION if kind == "video" else sequence.GRADIO_X2T_IMAGE_INSTRUCTION


# ------------------------------------------------------------------------------------------------
# Cases: JSON-able specs shared by training rows and evaluation
# ------------------------------------------------------------------------------------------------


def _pairs(split: str) -> tuple[tuple[str, str], ...]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return TRAIN_PAIRS if split == "train" else HELDOUT


def make_case(task: str, rng: np.random.Generator, *, split: str = "train", size: int = BASE, index: int = 0,
              question: str | None = None) -> dict:
    """One JSON-able spec: id, task, split, size, scene, prompt, and per task direction / speed / frames,
    new_color, question kind and expected answer. The named object's (shape, colour) pair comes from the
    split's pairs (edits: the new colour's pair; the source pair is a training pair in the train split).
    in the heldout split, index picks the pair and direction round-robin so that small evaluation sets cover
    all of them (the train split draws both);
    question None draws a random question kind (x2t)."""
    if task not in EVAL_TASKS:
        raise ValueError(f"unknown task {task!r}; one of {EVAL_TASKS}")
    if size % 16:
        raise ValueError(f"scene side {size} is not a multiple of 16 (the autoencoder's stride)")
    pairs = _pairs(split)
    pair = pairs[index % len(pairs)] if split == "heldout" else pairs[int(rng.integers(len(pairs)))]
    case: dict = dict(id=f"{task}-{split}-{index:05d}", task=task, split=split, size=size)
    direction = None
    if task in VIDEO_TASKS:
        direction = DIRECTIONS[index % 4] if split == "heldout" else str(rng.choice(DIRECTIONS))
        speed = float(rng.uniform(*VIDEO_SPEED) * size / BASE)
        case.update(direction=direction, speed=speed, frames=FRAMES)
    if task in ("image_edit", "video_edit"):
        shape, new_color = pair
        olds = [c for c in COLORS if c != new_color and (split == "heldout" or not is_heldout(shape, c))]
        old = str(rng.choice(olds))
        scene = random_scene(rng, (shape, old), size, direction=direction, speed=case.get("speed", 0.0),
                             avoid=(new_color,))
        case.update(new_color=new_color, prompt=edit_instruction(shape, new_color))
    else:
        scene = random_scene(rng, pair, size, direction=direction, speed=case.get("speed", 0.0))
    case["scene"] = scene.to_json()
    if task == "t2i":
        case["prompt"] = caption(scene)
    elif task in ("t2v", "i2v"):
        case["prompt"] = video_caption(scene, direction)
    elif task in ("x2t_image", "x2t_video"):
        kinds = [question] if question else question_kinds(rng, QA_TURNS, video=direction is not None)
        case["prompt"], case["expected"] = question_answer(kinds[0], scene, direction)
        case.update(question=kinds[0], system_prompt=x2t_instruction("video" if direction else "image"))
        if len(kinds) > 1:
            case["follow_ups"] = [list(question_answer(k, scene, direction)) for k in kinds[1:]]
    return case


def question_kinds(rng: np.random.Generator, n: int, *, video: bool) -> list[str]:
    """n distinct question kinds of a training conversation, drawn with the QUESTION_P weights without
    replacement; "color" and "any_color" (same answer) exclude each other."""
    kinds, p = (VIDEO_QUESTIONS, VIDEO_QUESTION_P) if video else (IMAGE_QUESTIONS, IMAGE_QUESTION_P)
    w, out = np.asarray(p, np.float64), []
    for _ in range(n):
        k = int(rng.choice(len(kinds), p=w / w.sum()))
        out.append(kinds[k])
        w[k] = 0.0
        if kinds[k] in ("color", "any_color"):
            w[[kinds.index("color"), kinds.index("any_color")]] = 0.0
        if not w.sum():
            break
    return out


def case_scene(case: dict) -> Scene:
    return Scene.from_json(case["scene"])


def final_color(case: dict) -> str:
    """The object colour an edit case asks for last (multi_edit cases, built by the demo driver from an
    image_edit spec, list one new colour per turn in `new_colors`)."""
    return case.get("new_colors", [case.get("new_color")])[-1]


def case_media(case: dict) -> dict:
    """Arrays of a case, re-rendered from its spec:
      input: the conditioning medium (image (H, W, 3) for i2v / image_edit / x2t_image, video (F, H, W, 3)
             for video_edit / x2t_video), absent for t2i / t2v;
      target: the ideal output (t2i, image_edit, multi_edit (last turn): (H, W, 3); t2v, i2v, video_edit:
              (F, H, W, 3)), absent for x2t;
      masks: the object mask of the target (or of the input for x2t): (H, W) or (F, H, W) bool."""
    task, scene, size = case["task"], case_scene(case), case["size"]
    if task in VIDEO_TASKS:
        frames, masks = render_video(scene, case["direction"], case["frames"], size, case["speed"])
    else:
        frames, masks = render(scene, size), object_mask(scene, size)
    if task in ("x2t_image", "x2t_video"):
        return dict(input=frames, masks=masks)
    if task == "i2v":
        return dict(input=frames[0], target=frames, masks=masks)
    if task in ("image_edit", "multi_edit"):
        return dict(input=frames, target=render(scene.with_color(final_color(case)), size), masks=masks)
    if task == "video_edit":
        edited, _ = render_video(scene.with_color(case["new_color"]), case["direction"], case["frames"], size,
                                 case["speed"])
        return dict(input=frames, target=edited, masks=masks)
    return dict(target=frames, masks=masks)


def heldout_cases(n_per_task: int, seed: int, size: int = BASE, *, split: str = "heldout",
                  tasks: tuple[str, ...] = EVAL_TASKS) -> list[dict]:
    """n_per_task evaluation cases per task (EVAL_TASKS order), deterministic in seed. x2t cases ask the
    scored question (colour for images, direction for videos). split="train" gives in-distribution cases
    (training pairs, fresh positions) for comparison."""
    cases = []
    for t, task in enumerate(tasks):
        rng = np.random.default_rng([seed, 1 + t, 7])  # own stream per task: adding tasks keeps the others
        cases += [make_case(task, rng, split=split, size=size, index=i, question=SCORED_QUESTION.get(task))
                  for i in range(n_per_task)]
    return cases


def write_case_inputs(case: dict, folder: str) -> dict:
    """Write the case's input medium ({"image": folder/ID_input.png} or {"video": folder/ID_input.mp4});
    {} for text-only tasks. Videos: 12 fps, near-lossless H.264 (MP4_OPTIONS)."""
    m = case_media(case)
    if "input" not in m:
        return {}
    stem = os.path.join(folder, f"{case['id']}_input")
    if m["input"].ndim == 3:
        return {"image": media.write_png(stem + ".png", m["input"])}
    return {"video": media.write_mp4(stem + ".mp4", m["input"], FPS, **MP4_OPTIONS)}


# ------------------------------------------------------------------------------------------------
# Shard rows
# ------------------------------------------------------------------------------------------------


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def mp4_bytes(frames: np.ndarray, fps: int = FPS) -> bytes:
    """H.264 bytes of (F, H, W, 3) uint8 frames (MP4_OPTIONS: yuv444p, crf 0)."""
    with tempfile.TemporaryDirectory() as d:  # the writer (PyAV + mp4 muxer) wants a seekable file
        path = media.write_mp4(os.path.join(d, "v.mp4"), frames, fps, **MP4_OPTIONS)
        with open(path, "rb") as f:
            return f.read()


def media_element(frames: np.ndarray, role: str, target: bool = False) -> dict:
    """A canonical image (H, W, 3) or video (F, H, W, 3) element with inline bytes and its metadata."""
    if frames.ndim == 3:
        return S.element("image", role, media=png_bytes(frames), width=frames.shape[1], height=frames.shape[0],
                         num_frames=1, is_target_candidate=target or None)
    return S.element("video", role, media=mp4_bytes(frames), width=frames.shape[2], height=frames.shape[1],
                     num_frames=frames.shape[0], fps=float(FPS), is_target_candidate=target or None)


def case_row(case: dict) -> dict:
    """The canonical shard row of a training case (laid out like `write_shards`: generation = user text
    [+ user medium] + assistant medium target; understanding = user medium + user question + assistant
    answer target)."""
    task, m = case["task"], case_media(case)
    user_text = S.element("text", "user", text=case["prompt"])
    if task in ("t2i", "t2v", "i2v"):
        elements = [user_text, media_element(m["target"], "assistant", True)]
    elif task in ("image_edit", "video_edit"):
        elements = [user_text, media_element(m["input"], "user"), media_element(m["target"], "assistant", True)]
    else:  # understanding: one conversation; earlier answers carry the explicit loss flag (multi-turn rows)
        turns = [(case["prompt"], case["expected"])] + [tuple(t) for t in case.get("follow_ups", [])]
        elements = [media_element(m["input"], "user")]
        for i, (q, a) in enumerate(turns):
            last = i == len(turns) - 1
            elements += [S.element("text", "user", text=q),
                         S.element("text", "assistant", text=a, is_target_candidate=last or None, loss=True)]
    return dict(id=case["id"], elements=elements, system_prompt=case.get("system_prompt"),
                sample_task="edit" if task.endswith("_edit") else None, task_type=task,
                source_schema="synthetic_demo", lang="en", meta=json.dumps(case, sort_keys=True))


def demo_rows(task: str, n: int, seed: int, split: str = "train", size: int = BASE):
    """Yield n canonical rows of `task` (one of TASKS), deterministic in (seed, task, split). Train rows
    never contain a HELDOUT pair, neither in the source nor in an edit target."""
    if task not in TASKS:
        raise ValueError(f"no training rows for task {task!r}; one of {TASKS}")
    rng = np.random.default_rng([seed, TASKS.index(task), ("train", "heldout").index(split)])
    for i in range(n):
        yield case_row(make_case(task, rng, split=split, size=size, index=i))


def write_demo_shards(out_dir: str, counts: dict, seed: int, split: str = "train", size: int = BASE, *,
                      rows_per_shard: int = 2048, row_group_size: int = 64, progress: bool = True) -> dict:
    """Write one shard folder per task, out_dir/<task>/shard-*.parquet + index.json (a `shards` data group
    each), and out_dir/summary.json. Returns the summary: {split, seed, size, tasks: {task: {path, rows,
    files}}}."""
    from tqdm import tqdm

    summary = dict(version=DATA_VERSION, split=split, seed=seed, size=size, frames=FRAMES, fps=FPS,
                   heldout=[list(p) for p in HELDOUT], tasks={})
    for task, n in counts.items():
        path = os.path.join(out_dir, task)
        writer = ShardWriter(path, rows_per_shard=rows_per_shard, row_group_size=row_group_size)
        for row in tqdm(demo_rows(task, n, seed, split, size), total=n, desc=task, disable=not progress):
            writer.write(row)
        index = writer.close()
        summary["tasks"][task] = dict(path=path, rows=index["num_rows"], files=len(index["files"]))
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
