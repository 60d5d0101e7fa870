"""Write `lance_interleaved_v1` shards.

  python -m lance_jax.data.write_shards --input DIR_OR_JSONL --out OUT [--rows-per-shard N] [--row-group-size N]

Inputs:
  * a folder of media files, each with an optional same-stem `.txt` caption (image/video -> text2image/video),
    plus the rows of any `.jsonl` files in it (format below; media paths relative to the folder);
  * a folder of reference Parquet files (any of the six local layouts; adapted, media copied inline);
  * a `.jsonl` file, one object per line, either {"elements": [...canonical elements...], ...} with `media`
    given as a path (relative to the jsonl; a multi-turn QA conversation marks earlier supervised answers
    with "loss": true) or {"caption"/"image"/"video"/"input_image"/"output_image"/
    "question"/"answer"/"system": ...} shorthands (paths for media).
Prints the number of rows and files; writes OUT/index.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from lance_jax.data import media as M
from lance_jax.data import schema as S
from lance_jax.data.shards import ShardWriter, list_parquet

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
VIDEO_EXT = {".mp4", ".mov", ".webm", ".mkv", ".avi"}


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _media_element(kind: str, role: str, data: bytes, target: bool = False) -> dict:
    e = S.element(kind, role, media=data, is_target_candidate=target or None)
    try:  # metadata lets the packer budget tokens before decoding; unreadable media are left to the pipeline
        if kind == "image":
            img = M.decode_image(data)
            e.update(width=img.width, height=img.height, num_frames=1)
        else:
            n, fps, h, w = M.video_info(data)
            e.update(width=w, height=h, num_frames=n, fps=fps)
    except Exception:  # noqa: BLE001
        pass
    return e


def rows_from_folder(folder: str):
    names = sorted(os.listdir(folder))
    if any(n.endswith(".parquet") for n in names):
        from lance_jax.data.shards import ReferenceSource

        src = ReferenceSource(list_parquet(folder))
        for i in range(len(src)):
            row = src[i]
            if "_bad" in row:
                print(f"skipping bad row {i} of {row['_source']}: {row['_bad']}", file=sys.stderr)
                continue
            row.pop("_source")
            yield row
        return
    for n in names:
        stem, ext = os.path.splitext(n)
        if ext.lower() == ".jsonl":  # QA / edit / interleaved rows next to the captioned media
            yield from rows_from_jsonl(os.path.join(folder, n))
            continue
        kind = "image" if ext.lower() in IMAGE_EXT else "video" if ext.lower() in VIDEO_EXT else None
        if kind is None:
            continue
        cap_path = os.path.join(folder, stem + ".txt")
        caption = open(cap_path).read().strip() if os.path.exists(cap_path) else ""
        yield dict(id=stem, system_prompt=None, sample_task=None, task_type=None, lang=None, meta=None,
                   source_schema=f"text2{kind}_general",
                   elements=[S.element("text", "user", text=caption),
                             _media_element(kind, "assistant", _read(os.path.join(folder, n)), True)])


def _kind(path: str) -> str:
    return "video" if os.path.splitext(path)[1].lower() in VIDEO_EXT else "image"


def rows_from_jsonl(path: str):
    root = os.path.dirname(os.path.abspath(path))
    p = lambda x: x if os.path.isabs(x) else os.path.join(root, x)  # noqa: E731
    with open(path) as f:
        for ln, line in enumerate(f):
            if not line.strip():
                continue
            o = json.loads(line)
            row = dict(id=str(o.get("id", ln)), system_prompt=o.get("system"), sample_task=o.get("sample_task"),
                       task_type=o.get("task_type"), lang=o.get("lang"), meta=json.dumps(o.get("meta")) if o.get("meta") else None)
            if "elements" in o:
                els = []
                for e in o["elements"]:
                    if e["type"] == "text":
                        els.append(S.element("text", e.get("role", "user"), text=e["text"],
                                             is_target_candidate=e.get("is_target_candidate"), loss=e.get("loss")))
                    else:
                        els.append(_media_element(e["type"], e.get("role", "user"), _read(p(e["media"])),
                                                  bool(e.get("is_target_candidate"))))
                row.update(elements=els, source_schema="interleave")
            elif "input_image" in o or "input_video" in o:
                k = "image" if "input_image" in o else "video"
                row.update(sample_task=row["sample_task"] or "edit", source_schema=f"{k}2{k}", elements=[
                    S.element("text", "user", text=o.get("caption", "")),
                    _media_element(k, "user", _read(p(o[f"input_{k}"]))),
                    _media_element(k, "assistant", _read(p(o[f"output_{k}"])), True)])
            elif "answer" in o:
                m = o.get("image") or o.get("video")
                els = [_media_element(_kind(m), "user", _read(p(m)))]
                if o.get("question"):
                    els.append(S.element("text", "user", text=o["question"]))
                els.append(S.element("text", "assistant", text=o["answer"], is_target_candidate=True))
                row.update(elements=els, source_schema="x2t_general")
            else:
                m = o.get("image") or o.get("video")
                row.update(source_schema=f"text2{_kind(m)}_general", elements=[
                    S.element("text", "user", text=o.get("caption", "")),
                    _media_element(_kind(m), "assistant", _read(p(m)), True)])
            yield row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows-per-shard", type=int, default=2048)
    ap.add_argument("--row-group-size", type=int, default=64)
    a = ap.parse_args(argv)
    rows = rows_from_jsonl(a.input) if a.input.endswith(".jsonl") else rows_from_folder(a.input)
    w = ShardWriter(a.out, rows_per_shard=a.rows_per_shard, row_group_size=a.row_group_size)
    for r in rows:
        w.write(r)
    index = w.close()
    print(f"wrote {index['num_rows']} rows in {len(index['files'])} file(s) to {a.out}")
    return index


if __name__ == "__main__":
    main()
