"""Score the embedded demo's outputs against its procedural ground truth.

    python -m lance_jax.demo.evaluate MANIFEST [--json OUT] [--strict]

MANIFEST (written by the demo driver): {"cases": [case, ...]}, each case a `synthetic.heldout_cases` spec
plus "outputs": {"media": path of the PNG / MP4 infer.py wrote} or {"answer": text}, or {"error": text}
when the run failed (scored as wrong). Relative paths are relative to the manifest's folder.

Everything is measured in palette space: each pixel goes to its nearest palette colour (`classify_pixels`),
the object is the most frequent non-background colour, motion is the shift of the non-background
centroid between the first and last frame (for i2v: the middle and the last, both generated). Quality bars
(BARS) apply to the held-out tasks; i2v and video_edit are reported without bars. Prints a table of every
figure (passing or not) and exits 0 unless --strict and a bar fails.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

from lance_jax import media
from lance_jax.data import synthetic as Y

# A shape covers >= ~50 px of a 32 px scene (a 10 px triangle); a quarter of that, as a fraction of the image,
# still counts a shrunken or half-drawn object, while the rims a blurry generator leaves (a few px of an
# intermediate colour scattered along an edge) stay below it.
MIN_OBJECT_FRACTION = 12 / 1024
# The demo moves objects 14-18 px of 32 between the first and last frame (7-9 px from the middle frame on, what
# i2v is measured over); a fifth of the whole travel still counts a model that under-moves, while a still object
# redrawn with wobbling edges shifts its centroid by ~1 px.
MIN_TRAVEL_FRACTION = 3 / 32
# Pixels within this many px of the object are left out of the "unchanged region" PSNR: a boundary one pixel
# off flips ~40 rim pixels by 205 levels, which alone would read as ~16 dB on a perfect background.
EDGE_FORGIVENESS = 2
# PSNR is capped per case so that identical images (inf) do not swamp a mean; 60 dB is 0.25 level RMS.
PSNR_CAP = 60.0

# (task, figure, per-case key, bar or None): one summary row each; bars are ">= value".
FIGURES = (
    ("t2i", "colour accuracy", "color_ok", 0.80),
    ("t2i", "background accuracy", "background_ok", None),
    ("x2t_image", "colour answer accuracy", "correct", 0.90),
    ("image_edit", "new-colour accuracy", "new_color_ok", 0.70),
    ("image_edit", "mean PSNR outside object (dB)", "psnr_outside", 20.0),
    ("t2v", "direction accuracy", "direction_ok", 0.70),
    ("t2v", "colour accuracy", "color_ok", None),
    ("x2t_video", "direction answer accuracy", "correct", 0.80),
    ("i2v", "mean first-frame PSNR (dB)", "first_frame_psnr", None),
    ("i2v", "first-frame palette agreement", "first_frame_agreement", None),
    ("i2v", "direction accuracy", "direction_ok", None),
    ("i2v", "colour kept", "color_ok", None),
    ("video_edit", "new-colour accuracy", "new_color_ok", None),
    ("video_edit", "direction kept", "direction_ok", None),
    ("video_edit", "mean PSNR outside object (dB)", "psnr_outside", None),
    ("multi_edit", "last-turn colour accuracy", "new_color_ok", None),
    ("multi_edit", "mean PSNR outside object (dB)", "psnr_outside", None),
)
VOCABULARIES = (Y.COLORS, Y.SHAPES, Y.DIRECTIONS)


# ------------------------------------------------------------------------------------------------
# Pixel measurements (uint8 arrays in, no I/O)
# ------------------------------------------------------------------------------------------------


def classify_pixels(img: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) int palette indices (into synthetic.COLORS) of the nearest palette colour."""
    d = np.asarray(img, np.int32)[..., None, :] - Y.PALETTE_RGB.astype(np.int32)
    return np.argmin((d * d).sum(-1), axis=-1)


def min_object_area(height: int, width: int) -> int:
    return int(np.ceil(MIN_OBJECT_FRACTION * height * width))


def object_color(img: np.ndarray, background_name: str) -> str | None:
    """The most frequent palette colour of (H, W, 3) `img` other than the background, None when it covers
    less than MIN_OBJECT_FRACTION of the image."""
    counts = np.bincount(classify_pixels(img).ravel(), minlength=len(Y.COLORS))
    counts[Y.COLORS.index(background_name)] = 0
    best = int(np.argmax(counts))
    return Y.COLORS[best] if counts[best] >= min_object_area(*img.shape[:2]) else None


def video_color(frames: np.ndarray, background_name: str) -> str | None:
    """The object colour found in most of the (F, H, W, 3) frames (None if most frames show no object)."""
    found = [object_color(f, background_name) for f in frames]
    names, counts = np.unique(np.array([c or "" for c in found]), return_counts=True)
    best = names[int(np.argmax(counts))]
    return str(best) or None


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """bool (..., H, W) grown by `radius` px (square neighbourhood)."""
    out = np.zeros_like(mask, bool)
    h, w = mask.shape[-2:]
    padded = np.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(radius, radius), (radius, radius)])
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[..., dy:dy + h, dx:dx + w]
    return out


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR (dB, peak 255) of uint8 images / videos (..., H, W, 3) over the pixels where bool `mask`
    (..., H, W) is True (all pixels if None); inf when they agree exactly, nan when the mask is empty."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    sq = (diff * diff).mean(-1)
    if mask is not None:
        sq = sq[np.broadcast_to(mask, sq.shape)]
    if sq.size == 0:
        return float("nan")
    mse = float(sq.mean())
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def centroid(img: np.ndarray, background_name: str) -> tuple[float, float] | None:
    """(y, x) pixel-centre centroid of the non-background pixels of (H, W, 3) `img`; None below the
    minimum object area."""
    ys, xs = np.nonzero(classify_pixels(img) != Y.COLORS.index(background_name))
    if len(ys) < min_object_area(*img.shape[:2]):
        return None
    return float(ys.mean() + 0.5), float(xs.mean() + 0.5)


def centroid_motion(frames: np.ndarray, background_name: str) -> tuple[float, float] | None:
    """(dy, dx) px of the non-background centroid from the first to the last of (F, H, W, 3) frames;
    None when either frame shows no object."""
    first, last = centroid(frames[0], background_name), centroid(frames[-1], background_name)
    if first is None or last is None:
        return None
    return last[0] - first[0], last[1] - first[1]


def motion_direction(frames: np.ndarray, background_name: str) -> str | None:
    """left / right / up / down along the dominant axis of `centroid_motion`; None when the object is missing
    or travels less than MIN_TRAVEL_FRACTION of the frame side."""
    motion = centroid_motion(frames, background_name)
    if motion is None:
        return None
    dy, dx = motion
    if max(abs(dy), abs(dx)) < MIN_TRAVEL_FRACTION * max(frames.shape[1:3]):
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def words(text: str) -> list[str]:
    """Lower-case words of `text`, punctuation dropped."""
    return re.sub(r"[^a-z0-9]+", " ", (text or "").lower()).split()


def answer_matches(answer: str, expected: str) -> bool:
    """The answer's words contain the expected words (in order, contiguous) and no other word of a
    vocabulary (colours, shapes, directions) the expected answer uses: "Red." matches "red", "red or blue"
    does not."""
    got, want = words(answer), words(expected)
    if not want or not any(got[i:i + len(want)] == want for i in range(len(got) - len(want) + 1)):
        return False
    for vocab in VOCABULARIES:
        if set(want) & set(vocab) and (set(got) & set(vocab)) - set(want):
            return False
    return True


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


def resize_nearest(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(..., h, w, 3) uint8 -> (..., height, width, 3) by nearest neighbour (no new colours)."""
    ys = (np.arange(height) + 0.5) * frames.shape[-3] / height
    xs = (np.arange(width) + 0.5) * frames.shape[-2] / width
    return frames[..., ys.astype(int), :, :][..., xs.astype(int), :]


def read_output(path: str, kind: str, height: int, width: int) -> np.ndarray:
    """(H, W, 3) image or (F, H, W, 3) video of an output file, resized to the case's side if needed."""
    frames = media.read_image(path) if kind == "image" else media.read_video(path)[0]
    if frames.shape[-3:-1] != (height, width):
        frames = resize_nearest(frames, height, width)
    return frames


def match_frames(frames: np.ndarray, n: int) -> np.ndarray:
    """n frames spread over (F, H, W, 3) `frames` (the frames themselves when F == n)."""
    return frames[np.round(np.linspace(0, len(frames) - 1, n)).astype(int)]


def capped(value: float) -> float:
    return float(min(value, PSNR_CAP))


def failed_figures(task: str) -> dict:
    """The figures of a case whose output is missing: wrong answers, 0 dB."""
    return {key: False if key.endswith("_ok") or key == "correct" else 0.0
            for t, _, key, _ in FIGURES if t == task}


def _score_image(case, out, m) -> dict:
    bg = case["scene"]["background"]
    color = object_color(out, bg)
    if case["task"] == "t2i":
        bg_found = Y.COLORS[int(np.argmax(np.bincount(classify_pixels(out).ravel(), minlength=len(Y.COLORS))))]
        return dict(color=color, color_ok=color == case["scene"]["color"], background_ok=bg_found == bg)
    outside = ~dilate(m["masks"], EDGE_FORGIVENESS)
    return dict(color=color, new_color_ok=color == Y.final_color(case),
                psnr_outside=capped(psnr(out, m["target"], outside)))


def _score_video(case, out, m) -> dict:
    bg, task = case["scene"]["background"], case["task"]
    # i2v: the motion from the middle frame on, all of it generated. Measured from the given first frame, an
    # object drawn at the frame's centre in every generated frame scored as moving the named way: training clips
    # start on the side opposite their motion (benchmarks/results.md, session 8)
    moving = out[len(out) // 2:] if task == "i2v" else out
    color, direction = video_color(out, bg), motion_direction(moving, bg)
    fig = dict(color=color, direction=direction, direction_ok=direction == case["direction"])
    if task == "video_edit":
        outside = ~dilate(m["masks"], EDGE_FORGIVENESS)
        target = m["target"]
        return dict(fig, new_color_ok=color == case["new_color"],
                    psnr_outside=capped(psnr(out, match_frames(target, len(out)), match_frames(outside, len(out)))))
    fig["color_ok"] = color == case["scene"]["color"]
    if task == "i2v":  # infer.py writes yuv420p: a perfect first frame reads ~20-34 dB but agrees >= ~94%
        fig["first_frame_psnr"] = capped(psnr(out[0], m["input"]))
        fig["first_frame_agreement"] = float((classify_pixels(out[0]) == classify_pixels(m["input"])).mean())
    return fig


def prompt_text(case: dict) -> str:
    """The case's prompt; the turns of a multi-turn prompt joined by ' | '."""
    prompt = case["prompt"]
    return prompt if isinstance(prompt, str) else " | ".join(prompt)


def score_case(case: dict, output: dict, root: str = ".") -> dict:
    """Figures of one case: {id, task, prompt, ...the task's FIGURES keys and what was detected...};
    output is {"media": path} / {"answer": text} / {"error": text}; media paths are relative to root."""
    task = case["task"]
    base = dict(id=case["id"], task=task, prompt=prompt_text(case))
    if task in ("x2t_image", "x2t_video"):
        if "answer" not in output:
            return dict(base, **failed_figures(task), error=output.get("error", "no answer"))
        return dict(base, answer=output["answer"], expected=case["expected"],
                    correct=answer_matches(output["answer"], case["expected"]))
    if "media" not in output:
        return dict(base, **failed_figures(task), error=output.get("error", "no output medium"))
    kind = "video" if task in Y.VIDEO_TASKS else "image"
    path = os.path.join(root, output["media"])
    try:
        out = read_output(path, kind, case["size"], case["size"])
    except media.MediaError as err:  # a missing / broken output is a failed case, not a failed evaluation
        return dict(base, **failed_figures(task), error=str(err))
    m = Y.case_media(case)
    return dict(base, **(_score_video(case, out, m) if kind == "video" else _score_image(case, out, m)))


def summarize(scored: list[dict]) -> list[dict]:
    """One row per FIGURES entry whose task has cases: {task, figure, n, value, bar, passed (None without
    a bar)}; accuracies are the fraction of True, PSNRs the mean."""
    rows = []
    for task, figure, key, bar in FIGURES:
        values = [float(s[key]) for s in scored if s["task"] == task]
        if not values:
            continue
        value = float(np.mean(values))
        rows.append(dict(task=task, figure=figure, n=len(values), value=value, bar=bar,
                         passed=None if bar is None else value >= bar))
    return rows


def score_manifest(path: str) -> dict:
    """{"cases": scored cases, "summary": summarize rows, "passed": every bar met}."""
    with open(path) as f:
        manifest = json.load(f)
    root = os.path.dirname(os.path.abspath(path))
    scored = [score_case(c, c.get("outputs", {}), root) for c in manifest["cases"]]
    rows = summarize(scored)
    return dict(cases=scored, summary=rows, passed=all(r["passed"] is not False for r in rows))


def format_table(rows: list[dict]) -> str:
    lines = [f"{'task':<11} {'figure':<30} {'n':>4} {'value':>8} {'bar':>8}  result"]
    for r in rows:
        bar = "-" if r["bar"] is None else f">={r['bar']:g}"
        result = "-" if r["passed"] is None else ("PASS" if r["passed"] else "FAIL")
        lines.append(f"{r['task']:<11} {r['figure']:<30} {r['n']:>4} {r['value']:>8.3f} {bar:>8}  {result}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("manifest")
    ap.add_argument("--json", help="write the scores here")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a bar fails")
    a = ap.parse_args(argv)
    result = score_manifest(a.manifest)
    print(format_table(result["summary"]))
    print("all bars met" if result["passed"] else "some bars not met")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if a.strict and not result["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
