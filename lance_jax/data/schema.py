"""The canonical shard row schema `lance_interleaved_v1` (50 §6.2) and adapters from the reference's
Parquet layouts (50 §1.2, §6.3). One schema covers image-text, video-text, QA and edit pairs."""
from __future__ import annotations

import json

import pyarrow as pa

SCHEMA_NAME = "lance_interleaved_v1"

ELEMENT = pa.struct([
    ("type", pa.string()),          # text | image | video
    ("role", pa.string()),          # system | user | assistant
    ("text", pa.string()),
    ("media", pa.binary()),         # encoded image / video bytes, inline
    ("media_uri", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("num_frames", pa.int32()), ("fps", pa.float32()),
    ("is_target_candidate", pa.bool_()),
    ("loss", pa.bool_()),
    ("vae_mu", pa.binary()), ("vae_logvar", pa.binary()), ("latent_shape", pa.list_(pa.int32())),  # float16 [t,h,w,C]
    ("vit_embed", pa.binary()), ("vit_grid", pa.list_(pa.int32())),                              # float16 [L, D]
])

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("elements", pa.list_(ELEMENT)),
    ("system_prompt", pa.string()),
    ("sample_task", pa.string()),
    ("task_type", pa.string()),
    ("source_schema", pa.string()),
    ("lang", pa.string()),
    ("meta", pa.string()),
])

ELEMENT_FIELDS = [f.name for f in ELEMENT]


def element(type_: str, role: str, *, text=None, media=None, **kw) -> dict:
    e = {f: None for f in ELEMENT_FIELDS}
    e.update(type=type_, role=role, text=text, media=media, **kw)
    return e


def _media_type(row) -> tuple[str, str]:
    return ("image", "image_bytes") if row.get("image_bytes") is not None else ("video", "video_bytes")


def from_reference_row(row: dict, dataset_type: str | None = None, row_id: str = "") -> dict:
    """One reference Parquet row (text2image_general, text2video_general, image2image, video2video, x2t_general
    triplet or rewrite_VQA) -> a canonical row. `dataset_type` None sniffs the columns."""
    cols = set(k for k, v in row.items() if v is not None)
    if dataset_type is None:
        if {"input_image_bytes", "output_image_bytes"} <= cols:
            dataset_type = "image2image"
        elif {"input_video_bytes", "output_video_bytes"} <= cols:
            dataset_type = "video2video"
        elif "caption_a" in cols or "rewrite_VQA" in cols:
            dataset_type = "x2t_general"
        elif "image_bytes" in cols:
            dataset_type = "text2image_general"
        elif "video_bytes" in cols:
            dataset_type = "text2video_general"
        else:
            raise ValueError(f"cannot tell the reference layout of a row with columns {sorted(cols)}")
    out = dict(id=row_id, system_prompt=None, sample_task=None, task_type=None, source_schema=dataset_type,
               lang=None, meta=None)
    if dataset_type in ("text2image_general", "text2video_general"):
        kind = "image" if dataset_type == "text2image_general" else "video"
        out["elements"] = [element("text", "user", text=(row["caption"] or "").strip()),
                           element(kind, "assistant", media=row[f"{kind}_bytes"], is_target_candidate=True)]
    elif dataset_type in ("image2image", "video2video"):
        kind = "image" if dataset_type == "image2image" else "video"
        out["sample_task"] = "edit"
        out["elements"] = [element("text", "user", text=(row["caption"] or "").strip()),
                           element(kind, "user", media=row[f"input_{kind}_bytes"]),
                           element(kind, "assistant", media=row[f"output_{kind}_bytes"], is_target_candidate=True)]
    elif dataset_type == "x2t_general":
        kind, col = _media_type(row)
        if row.get("caption_a") is not None:
            system, question, answer = row.get("caption_i") or "", row.get("caption_q") or "", row["caption_a"]
        else:
            vqa = json.loads(row["rewrite_VQA"])
            system = "View the video attentively and provide a suitable answer to the posed question."
            question = vqa.get("question", vqa.get("Question", ""))
            options = vqa.get("options", vqa.get("Options"))
            if options and "options" not in question.lower():
                opts = [f"{k} {v}" for k, v in options.items()] if isinstance(options, dict) else list(options)
                question += "\nOptions:\n" + "\n".join(opts)
            answer = vqa["final_answer"]
        out["system_prompt"] = system
        els = [element(kind, "user", media=row[col])]
        if question:
            els.append(element("text", "user", text=question))
        els.append(element("text", "assistant", text=answer, is_target_candidate=True))
        out["elements"] = els
    else:
        raise ValueError(f"unsupported reference dataset_type {dataset_type!r}")
    return out
