"""The embedded demo's report: a self-contained `index.html` and one `contact_sheet.png`.

    python -m lance_jax.demo.report MANIFEST --out DIR [--scores SCORES.json] [--per-task N]

MANIFEST is the evaluation manifest (`lance_jax.demo.evaluate`); scores are recomputed from it unless a
scores JSON (`evaluate --json`) is given. index.html embeds every medium as a data URI (it can be moved or
mailed alone): per task its score rows, then one card per case with the prompt, the input (re-rendered from
the case spec), the output (<img>, or <video> plus a frame strip) and, for x2t, question / answer / expected.
contact_sheet.png has one row per task: input | output per cell (videos as frame strips), upscaled
nearest-neighbour so that 32 px scenes are legible, the prompt and the outcome underneath.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import os
import textwrap

import numpy as np

from lance_jax import media
from lance_jax.data import synthetic as Y
from lance_jax.demo import evaluate as E

SCALE = 4
HTML_STRIP_FRAMES = 5
SHEET_STRIP_FRAMES = 3  # frames 0, 4, 8 of a 9-frame clip: the ones the VAE's temporal compression keeps
GAP = 6
CELL_GAP = 28  # wider than GAP so that the input | output pairs of neighbouring cases read apart
LABEL_WIDTH = 96
TEXT_COLOR = (20, 20, 20)
SHEET_BG = (245, 245, 245)
MISSING = (160, 160, 160)


# ------------------------------------------------------------------------------------------------
# Arrays
# ------------------------------------------------------------------------------------------------


def frame_strip(frames: np.ndarray, n: int) -> np.ndarray:
    """(F, H, W, 3) -> (H, n*W + (n-1), 3): n frames spread over the clip, 1 px white separators."""
    idx = np.round(np.linspace(0, len(frames) - 1, min(n, len(frames)))).astype(int)
    sep = np.full((frames.shape[1], 1, 3), 255, np.uint8)
    parts = [p for i in idx for p in (frames[i], sep)][:-1]
    return np.concatenate(parts, axis=1)


def still(frames: np.ndarray, n: int) -> np.ndarray:
    """An image as it is, a video as its frame strip."""
    return frames if frames.ndim == 3 else frame_strip(frames, n)


def upscale(img: np.ndarray, k: int = SCALE) -> np.ndarray:
    return np.repeat(np.repeat(img, k, axis=0), k, axis=1)


def png_data_uri(img: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(Y.png_bytes(img)).decode()


def output_path(case: dict, root: str) -> str | None:
    rel = case.get("outputs", {}).get("media")
    return None if rel is None else os.path.join(root, rel)


def output_frames(case: dict, root: str) -> np.ndarray | None:
    """The output medium at the case's side ((H, W, 3) or (F, H, W, 3)), None when missing or unreadable."""
    path = output_path(case, root)
    if path is None:
        return None
    kind = "video" if case["task"] in Y.VIDEO_TASKS else "image"
    try:
        return E.read_output(path, kind, case["size"], case["size"])
    except media.MediaError:  # shown as a grey "missing" panel; the scores already count it as failed
        return None


def task_order(manifest: dict) -> list[str]:
    """The manifest's tasks: synthetic.EVAL_TASKS order first, then any others (multi_edit) as they come."""
    present = [c["task"] for c in manifest["cases"]]
    return [t for t in Y.EVAL_TASKS if t in present] + list(dict.fromkeys(t for t in present
                                                                            if t not in Y.EVAL_TASKS))


def outcome(score: dict) -> str:
    """One line: what the scorer found for this case."""
    if "error" in score:
        return "FAILED: " + score["error"][:80]
    if "answer" in score:
        mark = "ok" if score["correct"] else "WRONG"
        return f"answer {score['answer']!r} (expected {score['expected']!r}) {mark}"
    found = [f"{k}={score[k]}" for k in ("color", "direction") if k in score]
    checks = [f"{k}={'ok' if v else 'no'}" for k, v in score.items() if k.endswith("_ok")]
    psnrs = [f"{k}={score[k]:.1f}dB" for k in score if "psnr" in k]
    return " ".join(found + checks + psnrs)


# ------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------

CSS = """body{font-family:sans-serif;margin:20px;background:#fafafa}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
.pass{color:#080}.fail{color:#b00;font-weight:bold}.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #ddd;padding:8px;max-width:760px}
.card img,.card video{image-rendering:pixelated;margin-right:6px;vertical-align:top}
.panel{display:inline-block;margin-right:6px;vertical-align:top}
.prompt{font-family:monospace;margin:4px 0}.small{font-size:12px;color:#444}"""


def _img_tag(img: np.ndarray, title: str) -> str:
    return (f'<img src="{png_data_uri(img)}" width="{img.shape[1] * SCALE}" height="{img.shape[0] * SCALE}" '
            f'title="{html.escape(title)}" alt="{html.escape(title)}">')


def _panel(tag: str, label: str) -> str:
    return f'<div class="panel">{tag}<div class="small">{label}</div></div>'


def _video_tag(path: str, side: int) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return (f'<video src="data:video/mp4;base64,{data}" width="{side * SCALE}" height="{side * SCALE}" '
            'autoplay loop muted playsinline></video>')


def _score_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        result = "-" if r["passed"] is None else ('<span class="pass">PASS</span>' if r["passed"]
                                                  else '<span class="fail">FAIL</span>')
        bar = "-" if r["bar"] is None else f"&ge; {r['bar']:g}"
        body.append(f"<tr><td>{r['task']}</td><td>{html.escape(r['figure'])}</td><td>{r['n']}</td>"
                    f"<td>{r['value']:.3f}</td><td>{bar}</td><td>{result}</td></tr>")
    return ("<table><tr><th>task</th><th>figure</th><th>n</th><th>value</th><th>bar</th><th>result</th></tr>"
            + "".join(body) + "</table>")


def _case_card(case: dict, score: dict, root: str) -> str:
    parts = [f'<div class="card"><div class="small">{html.escape(case["id"])}</div>',
             f'<div class="prompt">{html.escape(E.prompt_text(case))}</div>']
    m = Y.case_media(case)
    if "input" in m:
        parts.append(_panel(_img_tag(still(m["input"], HTML_STRIP_FRAMES), "input"), "input"))
    out = output_frames(case, root)
    if out is not None and out.ndim == 4:
        parts.append(_panel(_video_tag(output_path(case, root), case["size"]), "output"))
    if out is not None:
        parts.append(_panel(_img_tag(still(out, HTML_STRIP_FRAMES), "output"), "output frames" if out.ndim == 4
                            else "output"))
    parts.append(f'<div class="small">{html.escape(outcome(score))}</div></div>')
    return "".join(parts)


def index_html(manifest: dict, scores: dict, root: str) -> str:
    """The whole page: overall table, then per task its rows and case cards."""
    by_id = {s["id"]: s for s in scores["cases"]}
    verdict = "all bars met" if scores["passed"] else "some bars not met"
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Lance embedded demo</title>",
             f"<style>{CSS}</style></head><body><h1>Lance embedded demo</h1>",
             f"<p>{len(manifest['cases'])} cases; {verdict}. Held-out (shape, colour) pairs: "
             f"{html.escape(', '.join(f'{c} {s}' for s, c in Y.HELDOUT))}.</p>", _score_table(scores["summary"])]
    for task in task_order(manifest):
        cases = [c for c in manifest["cases"] if c["task"] == task]
        parts += [f"<h2>{task}</h2>", _score_table([r for r in scores["summary"] if r["task"] == task]),
                  '<div class="cards">', *(_case_card(c, by_id[c["id"]], root) for c in cases), "</div>"]
    parts.append("</body></html>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------
# Contact sheet
# ------------------------------------------------------------------------------------------------


def _font(size: int = 12):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _panels(case: dict, root: str) -> list[np.ndarray]:
    """Upscaled input (if any) and output (grey if missing; none for x2t) panels of a case."""
    m = Y.case_media(case)
    panels = [m["input"]] if "input" in m else []
    if case["task"] not in ("x2t_image", "x2t_video"):
        out = output_frames(case, root)
        side = case["size"]
        panels.append(out if out is not None else np.full((side, side, 3), MISSING, np.uint8))
    return [upscale(still(p, SHEET_STRIP_FRAMES)) for p in panels]


def case_cell(case: dict, score: dict, root: str):
    """A PIL image: the panels side by side, the prompt and the outcome wrapped underneath."""
    from PIL import Image, ImageDraw

    panels = _panels(case, root)
    width = max(sum(p.shape[1] for p in panels) + GAP * (len(panels) - 1), 200)
    chars = max(width // 7, 20)
    lines = textwrap.wrap(E.prompt_text(case), chars) + textwrap.wrap(outcome(score), chars)
    font = _font()
    height = max(p.shape[0] for p in panels) + 4 + 15 * len(lines)
    cell = Image.new("RGB", (width, height), SHEET_BG)
    x = 0
    for p in panels:
        cell.paste(Image.fromarray(p), (x, 0))
        x += p.shape[1] + GAP
    draw = ImageDraw.Draw(cell)
    y = max(p.shape[0] for p in panels) + 4
    for line in lines:
        draw.text((0, y), line, fill=TEXT_COLOR, font=font)
        y += 15
    return cell


def contact_sheet(manifest: dict, scores: dict, root: str, per_task: int = 4):
    """A PIL image: one row per task (its first `per_task` cases), the task name on the left."""
    from PIL import Image, ImageDraw

    by_id = {s["id"]: s for s in scores["cases"]}
    rows = []
    for task in task_order(manifest):
        cases = [c for c in manifest["cases"] if c["task"] == task][:per_task]
        rows.append((task, [case_cell(c, by_id[c["id"]], root) for c in cases]))
    width = LABEL_WIDTH + max(sum(c.width + CELL_GAP for c in cells) for _, cells in rows)
    height = sum(max(c.height for c in cells) + 2 * GAP for _, cells in rows)
    sheet = Image.new("RGB", (width, height), SHEET_BG)
    draw, font, y = ImageDraw.Draw(sheet), _font(14), 0
    for task, cells in rows:
        draw.text((4, y + GAP), task, fill=TEXT_COLOR, font=font)
        x = LABEL_WIDTH
        for c in cells:
            sheet.paste(c, (x, y + GAP))
            x += c.width + CELL_GAP
        y += max(c.height for c in cells) + 2 * GAP
        draw.line([(0, y - 1), (width, y - 1)], fill=(200, 200, 200))
    return sheet


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def write_report(manifest_path: str, out_dir: str, scores: dict | None = None, per_task: int = 4) -> dict:
    """Write out_dir/index.html and out_dir/contact_sheet.png; returns their paths."""
    with open(manifest_path) as f:
        manifest = json.load(f)
    root = os.path.dirname(os.path.abspath(manifest_path))
    scores = scores or E.score_manifest(manifest_path)
    os.makedirs(out_dir, exist_ok=True)
    paths = dict(html=os.path.join(out_dir, "index.html"), sheet=os.path.join(out_dir, "contact_sheet.png"))
    with open(paths["html"], "w") as f:
        f.write(index_html(manifest, scores, root))
    contact_sheet(manifest, scores, root, per_task).save(paths["sheet"])
    return paths


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("manifest")
    ap.add_argument("--out", required=True)
    ap.add_argument("--scores", help="scores JSON from `evaluate --json` (default: score the manifest now)")
    ap.add_argument("--per-task", type=int, default=4, help="cases per task on the contact sheet")
    a = ap.parse_args(argv)
    scores = None
    if a.scores:
        with open(a.scores) as f:
            scores = json.load(f)
    paths = write_report(a.manifest, a.out, scores, a.per_task)
    print(f"wrote {paths['html']} and {paths['sheet']}")
    return paths


if __name__ == "__main__":
    main()
