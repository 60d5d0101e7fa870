"""Input files in the reference's JSON/JSONL schema (30 §8) and the files a run writes."""
from __future__ import annotations

import datetime
import json
import os
import random

import numpy as np

from lance_jax import media
from lance_jax.pipelines.requests import (
    DEFAULT_FRAMES, DEFAULT_SIZE, GLOBAL_SEED, GenerationSettings, InferenceError, Request, TextSettings,
    UNDERSTANDING_TASKS, _path_or_array, check_request,
)


# ----------------------------------------------------------------------------------------------
# Input files (30 §8)
# ----------------------------------------------------------------------------------------------


def _index(key):
    if isinstance(key, (int, np.integer)):
        return int(key)
    stem = str(key)
    for ext in (".mp4", ".jpg", ".png", ".jpeg"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    try:
        return int(stem)
    except ValueError:
        return stem


def read_input_file(path: str) -> list[dict]:
    """[{index, data, ...}] from a task JSON / JSONL (30 §8), in file order.

    JSON is tried first (an object of `"<index>[.ext]": data`, a list of records, or one record), then
    JSONL (one record per line). Unlike the reference, a one-line JSON object is read as the object it is.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise InferenceError(f"cannot read input file {path!r}: {err}") from None
    try:
        doc = json.loads(text)
        if isinstance(doc, dict) and "data" in doc:
            records = [doc]
        elif isinstance(doc, dict):
            records = [dict(index=_index(k), data=v) for k, v in doc.items()]
        elif isinstance(doc, list):
            records = list(doc)
        else:
            raise InferenceError(f"{path}: expected a JSON object or list, got {type(doc).__name__}")
    except json.JSONDecodeError:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise InferenceError(f"{path}:{n}: neither JSON nor JSONL ({err})") from None
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "data" not in rec:
            raise InferenceError(f"{path}: record {i} has no 'data' field (expected {{index, data}})")
        out.append(dict(rec, index=_index(rec.get("index", i))))
    if not out:
        raise InferenceError(f"{path}: no samples")
    return out


def _resolve_path(p: str, base: str) -> str:
    if os.path.exists(p) or os.path.isabs(p):
        return p
    alt = os.path.join(base, p)
    return alt if os.path.exists(alt) else p


def request_from_record(task: str, record: dict, *, base_dir: str = ".", defaults: dict | None = None) -> Request:
    """A Request from one input record (30 §8 value formats; multi_edit: one medium + one text per turn)."""
    defaults = dict(defaults or {})
    data = record["data"]
    where = f"sample {record['index']!r}"
    if "seed" in record:  # lance-jax extension: the record's own initial-noise seed (the reference's is global)
        if isinstance(record["seed"], bool) or not isinstance(record["seed"], int):
            raise InferenceError(f"{where}: 'seed' must be an integer, got {record['seed']!r}")
        defaults["seed"] = record["seed"]
    req = Request(task=task, index=record["index"], additional_info=record.get("additional_info"), **defaults)
    if task in ("t2i", "t2v"):
        if isinstance(data, dict):
            data = data.get("prompt", data.get("caption"))
        if not isinstance(data, str):
            raise InferenceError(f"{where}: a {task} sample's data must be the prompt string")
        req.prompt = data
        return req
    if not isinstance(data, dict) or "interleave_array" not in data:
        raise InferenceError(f"{where}: a {task} sample needs {{interleave_array, element_dtype_array}}")
    items = data["interleave_array"]
    kinds = data.get("element_dtype_array") or ["text" if not isinstance(x, str) or not os.path.splitext(x)[1]
                                                else "image" for x in items]
    targets = data.get("istarget_in_interleave") or [0] * len(items)
    if not (len(items) == len(kinds) == len(targets)):
        raise InferenceError(f"{where}: interleave_array, element_dtype_array and istarget_in_interleave differ in "
                             f"length")
    texts, visuals = [], []
    for item, kind, target in zip(items, kinds, targets):
        if kind == "text":
            texts.append((item, target))
        elif kind in ("image", "video"):
            if not target or task in UNDERSTANDING_TASKS:  # edit targets (GEdit, Gradio) are ignored
                visuals.append((kind, _resolve_path(str(item), base_dir)))
        else:
            raise InferenceError(f"{where}: unknown element type {kind!r}")
    if not visuals:
        raise InferenceError(f"{where}: task {task} needs an image or video element")
    kind, path = visuals[0]
    if task in UNDERSTANDING_TASKS:
        want = "video" if task == "x2t_video" else "image"
        if kind != want:
            raise InferenceError(f"{where}: {task} needs a {want}, got a {kind}")
        text = texts[0][0] if texts else ""
        if isinstance(text, (list, tuple)):  # [system prompt, question, reference answer]
            if len(text) < 2:
                raise InferenceError(f"{where}: the x2t text triple needs [system prompt, question, answer]")
            req.system_prompt, req.prompt = text[0] or None, text[1]
        else:  # a bare caption target: a random caption instruction (reference: under the global seed)
            from lance_jax.sequence import CAPTION_PROMPTS

            rng = random.Random(defaults.get("posterior_seed", GLOBAL_SEED))
            req.system_prompt, req.prompt = rng.choice(CAPTION_PROMPTS).replace("{v}", want), ""
    elif task == "multi_edit":
        req.prompt = [t for t, _ in texts]
    else:
        req.prompt = "".join(t for t, target in texts if not target) or None
    setattr(req, "video" if kind == "video" else "image", path)
    if task in ("i2v", "image_edit") and kind != "image":
        raise InferenceError(f"{where}: {task} needs an image, got a {kind}")
    if task == "video_edit" and kind != "video":
        raise InferenceError(f"{where}: video_edit needs a video, got a {kind}")
    return req


def default_out_dir(task: str, settings: GenerationSettings, seed: int) -> str:
    """results/{task}_sample_ts{steps}_tts{shift}_seed{seed}_cfg{cfg}_kvcache_{YYYYmmdd_HHMMSS} (30 §11)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    if task in UNDERSTANDING_TASKS:
        return os.path.join("results", f"{task}_sample_seed{seed}_{stamp}")
    return os.path.join("results", f"{task}_sample_ts{settings.steps}_tts{settings.shift}_seed{seed}_"
                                   f"cfg{settings.cfg_scale}_kvcache_{stamp}")


def write_run_files(out_dir: str, run: dict) -> dict[str, str]:
    """run.json (everything) + the reference's prompt.json (+ result.json for understanding)."""
    paths = {"run": os.path.join(out_dir, "run.json")}
    with open(paths["run"], "w", encoding="utf-8") as f:
        json.dump(run, f, indent=1, ensure_ascii=False, default=_json_default)
    prompts, results = {}, []
    for rec in run["records"]:
        if rec.get("error"):
            continue
        if rec["task"] in UNDERSTANDING_TASKS:
            key = os.path.basename(rec.get("input") or str(rec["index"]))
            prompts[key] = rec["raw"]
            kind = "video" if rec["task"] == "x2t_video" else "image"
            results.append({kind: rec.get("input"), "question": rec.get("question"), "answer": rec["answer"]})
        elif rec["task"] == "multi_edit":
            for turn in rec["turns"]:
                prompts[turn["output"]] = turn["prompt"]
        else:
            for s in rec["samples"]:
                prompts[s["output"]] = s["prompt"]
    paths["prompt"] = os.path.join(out_dir, "prompt.json")
    with open(paths["prompt"], "w", encoding="utf-8") as f:
        json.dump(prompts, f, indent=1, ensure_ascii=False)
    if results:
        paths["result"] = os.path.join(out_dir, "result.json")
        with open(paths["result"], "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, ensure_ascii=False)
    return paths


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


# ----------------------------------------------------------------------------------------------
# One request -> files
# ----------------------------------------------------------------------------------------------


def run_request(runner, request: Request, out_dir: str, *, settings: GenerationSettings = GenerationSettings(),
                text: TextSettings = TextSettings(), progress=None) -> dict:
    """Run one request on a `LanceRunner`, write its files under out_dir, return its JSON record."""
    r = request
    task = r.task
    check_request(r, runner.cfg)
    runner.require(task)
    stem = r.stem()
    record = dict(index=r.index if isinstance(r.index, (int, str)) else int(r.index), task=task)
    if r.additional_info:
        record["additional_info"] = r.additional_info
    os.makedirs(out_dir, exist_ok=True)
    if task in UNDERSTANDING_TASKS:
        source = r.image if task == "x2t_image" else r.video
        fn = runner.x2t_image if task == "x2t_image" else runner.x2t_video
        kw = dict(settings=settings) if task == "x2t_video" else {}
        out = fn(r.prompt, source, resolution=r.resolution, system_prompt=r.system_prompt, text=text, seed=r.seed,
                 **kw)
        record.update(out.info, input=_path_or_array(source), raw=out.text, answer=out.answer,
                      token_ids=out.token_ids.tolist())
        return record
    if task == "multi_edit":
        source = r.image if r.image is not None else r.video
        if source is None:
            raise InferenceError("multi_edit needs --image or --video as the first turn's source")
        turns = [r.prompt] if isinstance(r.prompt, str) else list(r.prompt or [])
        results = runner.multi_edit(turns, source, kind="video" if r.image is None else "image",
                                  resolution=r.resolution, seed=r.seed, settings=settings, progress=progress)
        record.update(input=_path_or_array(source), turns=[])
        for res in results:
            path = media.write_media(os.path.join(out_dir, f"{stem}_turn{res.info['turn']}"), res.frames,
                                     settings.fps)
            record["turns"].append(dict(res.info, output=os.path.basename(path)))
        record["outputs"] = [t["output"] for t in record["turns"]]
        return record
    common = dict(seed=r.seed, num_samples=r.num_samples, settings=settings, progress=progress)
    if task in ("t2i", "t2v"):
        kw = dict(height=r.height or DEFAULT_SIZE[0], width=r.width or DEFAULT_SIZE[1])
        if task == "t2v":
            kw["frames"] = r.frames or DEFAULT_FRAMES
        out = getattr(runner, task)(r.prompt, **kw, **common)
    elif task == "i2v":
        out = runner.i2v(r.prompt, r.image, frames=r.frames or DEFAULT_FRAMES, resolution=r.resolution, **common)
    else:
        source = r.image if task == "image_edit" else r.video
        out = getattr(runner, task)(r.prompt, source, resolution=r.resolution, **common)
    results = out if isinstance(out, list) else [out]
    record["samples"] = []
    for res in results:
        name = stem if len(results) == 1 else f"{stem}_{res.info['sample']}"
        path = media.write_media(os.path.join(out_dir, name), res.frames, settings.fps)
        record["samples"].append(dict(res.info, output=os.path.basename(path)))
    record["outputs"] = [s["output"] for s in record["samples"]]
    record["prompt"] = results[0].info["prompt"]
    src = r.image if task in ("i2v", "image_edit") else (r.video if task == "video_edit" else None)
    if src is not None:
        record["input"] = _path_or_array(src)
    return record
