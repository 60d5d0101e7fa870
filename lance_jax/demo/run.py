"""The embedded demo, end to end (`make demo`): synthetic shards -> train a tiny Lance (or reuse a cached
one) -> every task through `infer.py` on held-out prompts -> quality table (+ JSON), HTML page, contact sheet.

  python -m lance_jax.demo.run [--config configs/demo.py] [--root demo_out] [--config.train.steps=200]
                               [--stage data|train|infer|evaluate|all] [--retrain]

ROOT/encoders   tokenizer + pretrained frozen ViT (+ the untrained Lance): what the data pipeline encodes with
ROOT/shards     one shard folder per task (`synthetic.write_demo_shards`)
ROOT/train/<key>  the training run of one config (orbax checkpoints, TensorBoard); resumes when re-run
                with that config, never under another one (`key` as below)
CACHE/<key>     the finished checkpoint (converted layout); `key` hashes the config, so a finished demo
                is reused until the model, data or training settings change (CACHE: $LANCE_DEMO_CACHE or
                ~/.cache/lance_jax/demo)
ROOT/eval       inputs, infer.py outputs per task, manifest.json, scores.json, index.html, contact_sheet.png

`--stage all` with a finished model at hand (cached, or named by --ckpt) skips the data stage: inference reads
the tokenizer and the ViT from that checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "demo.py")
STAGES = ("data", "train", "infer", "evaluate")


def load_config(path: str, root: str, overrides: list[str]):
    """configs/demo.py:ROOT with `--config.a.b=v` overrides applied."""
    from lance_jax.config import apply_overrides, config_dict_from_file

    return apply_overrides(config_dict_from_file(f"{path}:{root}"), overrides)


def cache_key(config) -> str:
    """Hash of everything the trained weights depend on (model, optimisation, data, demo sizes)."""
    keep = copy.deepcopy({k: config[k].to_dict() if hasattr(config[k], "to_dict") else config[k]
                          for k in ("model", "optimizer", "freeze", "ema_decay", "train", "data")})
    keep["demo"] = {k: v for k, v in config.demo.to_dict().items()
                    if k in ("size", "vit_side", "seed", "rows", "vit_pretrain", "curriculum")}
    from lance_jax.data.synthetic import DATA_VERSION

    keep["demo"]["data_version"] = DATA_VERSION
    for g in keep["data"]["groups"]:
        g.pop("path", None)  # where the shards live does not change them
    for k in ("tokenizer", "encoder_ckpt"):
        keep["data"].pop(k, None)
    keep["train"] = {k: v for k, v in keep["train"].items() if k not in ("log_every", "save_every", "keep")}
    blob = json.dumps(keep, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_dir(config) -> str:
    base = os.environ.get("LANCE_DEMO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lance_jax", "demo")
    return os.path.join(base, cache_key(config))


def cached_checkpoint(config) -> str | None:
    """The finished checkpoint of this config in the cache, or None."""
    out = cache_dir(config)
    return out if os.path.isfile(os.path.join(out, "lance_checkpoint.json")) else None


# ---------------------------------------------------------------------------------------------- data


ENCODER_SETTINGS = "demo_encoders.json"


def encoder_settings(config) -> dict:
    """What the encoder checkpoint depends on: the ViT (seed, scene size, pretraining, merger width = the model's
    width) and the codec the data pipeline encodes with (the model config's `autoencoder`)."""
    d, m = config.demo, config.model
    return dict(seed=int(d.seed), size=int(d.size), vit_pretrain=d.vit_pretrain.to_dict(),
                vit_out_hidden_size=int(m.vit_out_hidden_size), autoencoder=str(m.autoencoder))


def _same_encoders(enc: str, config) -> bool:
    path = os.path.join(enc, ENCODER_SETTINGS)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f) == json.loads(json.dumps(encoder_settings(config)))


def stage_data(config, console=print) -> None:
    """Tokenizer + encoder checkpoint + training shards under config.demo.root (skipped when present)."""
    enc = config.data.encoder_ckpt
    shards = os.path.join(config.demo.root, "shards")
    # the shards do not depend on the encoders: written by a second process while this one pretrains the ViT
    writer = None if _shards_ready(shards, config) else _start_shard_writer(shards, config)
    try:
        _write_encoders(config, enc, console)
    except BaseException:
        if writer is not None:
            writer.terminate()
        raise
    if writer is not None:
        writer.join()
        if writer.exitcode != 0:
            raise RuntimeError(f"writing the demo shards to {shards} failed (exit {writer.exitcode}); see above")
        console(f"wrote {shards}")


def _shards_ready(shards: str, config) -> bool:
    """True when `shards` holds a finished write of this config's rows, seed and data version."""
    from lance_jax.data import synthetic as SY

    path = os.path.join(shards, "summary.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        have = json.load(f)
    return ({t: v["rows"] for t, v in have["tasks"].items()} == dict(config.demo.rows.to_dict())
            and have["seed"] == int(config.demo.seed) and have.get("version") == SY.DATA_VERSION)


def _start_shard_writer(shards: str, config):
    """A started process writing the demo's training shards (its summary.json last, so an interrupted write is
    redone on the next run). Spawned, not forked: this process may already hold JAX's threads."""
    import multiprocessing

    from lance_jax.data import synthetic as SY

    if os.path.isfile(os.path.join(shards, "summary.json")):
        os.remove(os.path.join(shards, "summary.json"))
    d = config.demo
    proc = multiprocessing.get_context("spawn").Process(
        target=SY.write_demo_shards, args=(shards, dict(d.rows.to_dict()), int(d.seed), "train", int(d.size)),
        kwargs=dict(progress=False), name="demo-shards")
    proc.start()
    return proc


def _write_encoders(config, enc: str, console) -> None:
    """The tokenizer and the encoder checkpoint (pretrained ViT + untrained Lance) under ROOT, unless written
    with this config's settings already."""
    from lance_jax.config import model_config_from_dict
    from lance_jax.demo import checkpoint as DC
    from lance_jax.demo import tokenizer as DT
    from lance_jax.models.lance import init_params
    from lance_jax.packing import dummy_stream_batch

    root, d = config.demo.root, config.demo
    if os.path.isdir(enc) and not _same_encoders(enc, config):
        # Safe beside other configs' runs: each run resumes only under its own config (ROOT/train/<key>), whose
        # key covers every encoder setting, and the encoders are a deterministic function of those settings.
        console(f"{enc} was written with other encoder settings: writing it again")
        shutil.rmtree(enc)
    if not os.path.isdir(enc):
        import flax.linen as nn
        import jax

        cfg = model_config_from_dict(config.model)
        tok_dir = os.path.join(root, "tokenizer")
        tok = DT.write_tokenizer(tok_dir, DT.scene_texts())
        if DT.model_ids(tok) != {k: getattr(cfg, k) for k in DT.model_ids(tok)}:
            raise ValueError(f"configs/demo.py token ids {DT.model_ids(tok)} do not match the demo tokenizer")
        vit_cfg = DC.demo_vit_config(cfg.vit_out_hidden_size)
        vit_params, note = DC.random_vit_params(vit_cfg, int(d.seed)), "random ViT"
        pt = d.vit_pretrain
        if int(pt.steps):
            from lance_jax.demo.vit_pretrain import pretrain

            vit_params, report = pretrain(vit_cfg, vit_params, size=int(d.size), steps=int(pt.steps),
                                          seed=int(d.seed), batch_size=int(pt.batch_size), lr=float(pt.lr),
                                          motion_steps=int(pt.get("motion_steps", 0)), console=console)
            if pt.get("token_spread"):
                from lance_jax.demo.vit_pretrain import with_token_spread

                vit_params, report["token_scale"] = with_token_spread(vit_cfg, vit_params, float(pt.token_spread),
                                                                      size=int(d.size), seed=int(d.seed))
                console(f"ViT output tokens scaled x{report['token_scale']:.3f} to a spread of {pt.token_spread}")
            note = f"ViT pretrained: {json.dumps(report)}"
        lance = nn.unbox(init_params(cfg, jax.random.PRNGKey(int(d.seed)), dummy_stream_batch(cfg)))
        DC.write_checkpoint(enc, cfg, jax.device_get(lance), vit_cfg, vit_params, tok_dir,
                            note=f"untrained Lance (encoders for the data pipeline); {note}")
        with open(os.path.join(enc, ENCODER_SETTINGS), "w") as f:
            json.dump(encoder_settings(config), f)
        console(f"wrote {enc}")


# ---------------------------------------------------------------------------------------------- train


def train_workdir(config) -> str:
    """ROOT/train/<cache key>: a run is resumed only by the config that started it (one ROOT/train shared by all
    configs resumed a finished run under a changed config and cached its weights as that config's)."""
    return os.path.join(config.demo.root, "train", cache_key(config))


def curriculum_configs(config) -> list:
    """The runs that `demo.curriculum` puts before the full mix, in order: the same model and optimiser on the
    named data groups alone for that stage's steps (its own LR decay; raw, not EMA, params exported for the next
    run to start from), its packed rows resized by the stage's `capacities` entry (if any). Stages with 0 steps
    are left out; none: []."""
    cur = config.demo.get("curriculum", None)
    if cur is None:
        return []
    groups, steps = [tuple(g) for g in cur.groups], [int(n) for n in cur.steps]
    rows = list(cur.get("capacities", None) or [{}] * len(groups))
    if not all(hasattr(r, "items") for r in rows):
        raise ValueError(f"demo.curriculum.capacities {rows} must hold one dict per stage ({{}}: the mix's rows)")
    rows = [dict(r) for r in rows]
    if not len(groups) == len(steps) == len(rows):
        raise ValueError(f"demo.curriculum has {len(groups)} stages of groups, {len(steps)} step counts and "
                         f"{len(rows)} capacities: give one of each per stage")
    known = [g["name"] for g in config.data.groups]
    out = []
    for i, (names, n, row) in enumerate(zip(groups, steps, rows)):
        if not names or set(names) - set(known):
            raise ValueError(f"demo.curriculum.groups[{i}] {list(names)} must name data groups of the demo, "
                             f"one of {known}")
        if set(row) - set(config.data.capacities) or not all(isinstance(v, int) and v > 0 for v in row.values()):
            raise ValueError(f"demo.curriculum.capacities[{i}] {row} may only resize "
                             f"{sorted(config.data.capacities)}, to positive integers")
        if not n:
            continue
        c = config.copy_and_resolve_references()
        c.train.steps = c.optimizer.total_steps = n
        c.ema_decay = 0.0  # the next run starts from these weights, not from an average lagging ~400 steps behind
        c.data.groups = [g for g in c.data.groups if g["name"] in names]
        c.data.capacities.update(row)
        # the cache key of this stage: its own groups, steps and rows and the stages it starts from
        c.demo.curriculum = ml_collections.ConfigDict(dict(groups=tuple(groups[:i + 1]), steps=tuple(steps[:i + 1]),
                                                           capacities=tuple(rows[:i + 1])))
        out.append(c)
    return out


def trained_checkpoint(config, *, retrain: bool, console=print) -> str:
    """One training run of `config` (from `config.init.ckpt`, if set), exported to its cache folder."""
    from lance_jax.demo import checkpoint as DC
    from lance_jax.train import loop as L

    out = cache_dir(config)
    workdir = train_workdir(config)
    if retrain and os.path.isdir(workdir):
        console(f"--retrain: starting {workdir} over")
        shutil.rmtree(workdir)
    t0 = time.time()
    metrics = L.run(config, workdir, console=console)
    manifest = DC.export_trained(config, workdir, config.data.encoder_ckpt, out)
    with open(os.path.join(out, "demo_training.json"), "w") as f:
        json.dump(dict(seconds=round(time.time() - t0, 1), last_metrics=metrics, note=manifest["reference"]["note"]),
                  f, indent=1, default=float)
    console(f"trained in {time.time() - t0:.0f} s -> {out}")
    return out


def reused(config, *, retrain: bool, console=print) -> str | None:
    """`config`'s checkpoint from the cache, said so; None when retraining or not cached."""
    cached = None if retrain else cached_checkpoint(config)
    if cached:
        console(f"reusing the trained checkpoint {cached} (--retrain to train again)")
    return cached


def reused_or_trained(config, *, retrain: bool, console=print) -> str:
    """`config`'s checkpoint from the cache (unless retrain), else trained and exported."""
    return reused(config, retrain=retrain, console=console) or trained_checkpoint(config, retrain=retrain,
                                                                                 console=console)


def stage_train(config, *, retrain: bool = False, console=print) -> str:
    """The trained demo checkpoint: the cached one, or train + export -- `demo.curriculum`'s runs, each from the
    one before (a stage already in the cache is reused), then the full mix from the last. Returns its path.
    retrain: start this config's runs over (their workdirs are removed) and replace the cached checkpoints."""
    cached = reused(config, retrain=retrain, console=console)
    if cached:
        return cached
    start = None
    for i, c in enumerate(curriculum_configs(config), 1):
        names = ", ".join(g["name"] for g in c.data.groups)
        console(f"curriculum stage {i}: {names} alone for {c.train.steps} steps" + (f" from {start}" if start else ""))
        if start:
            c.init.ckpt = start
        start = reused_or_trained(c, retrain=retrain, console=console)
    if start:
        config = config.copy_and_resolve_references()
        config.init.ckpt = start
        console(f"full mix from {start}")
    return trained_checkpoint(config, retrain=retrain, console=console)


# ---------------------------------------------------------------------------------------------- infer


def noise_seed(config, index: int) -> int:
    """Initial-noise seed of a task's index-th case: its own (42 + index) under demo.eval_noise 'per_case',
    infer.py's one seed for every case under 'shared' (how the reference samples a prompt file)."""
    from lance_jax.pipelines.requests import NOISE_SEED

    mode = config.demo.get("eval_noise", "per_case")
    if mode not in ("per_case", "shared"):
        raise ValueError(f"demo.eval_noise must be 'per_case' or 'shared', got {mode!r}")
    return NOISE_SEED + index if mode == "per_case" else NOISE_SEED


def _record(case: dict, inputs: dict, index: int, seed: int) -> dict:
    """One infer.py input record (30 §8 schema, plus its own noise seed) for a case."""
    task = case["task"]
    if task in ("t2i", "t2v"):
        return dict(index=index, seed=seed, data=case["prompt"])
    kind, path = next(iter(inputs.items()))
    if task in ("x2t_image", "x2t_video"):
        texts = [[case["system_prompt"], case["prompt"], case["expected"]]]
    else:
        texts = case["prompt"] if isinstance(case["prompt"], list) else [case["prompt"]]
    return dict(index=index, seed=seed, data=dict(interleave_array=[path, *texts],
                                                  element_dtype_array=[kind] + ["text"] * len(texts)))


def multi_edit_case(cases: list[dict]) -> dict | None:
    """A two-turn edit built from the first two image_edit cases: turn 2 recolours turn 1's result."""
    edits = [c for c in cases if c["task"] == "image_edit"]
    if len(edits) < 2:
        return None
    first, second = edits[0], edits[1]
    shape = first["scene"]["shape"]
    from lance_jax.data import synthetic as SY

    colors = [c for c in SY.COLORS if c not in (first["new_color"], first["scene"]["background"])]
    new = second["new_color"] if second["new_color"] in colors else colors[0]
    return dict(first, id="multi_edit-00000", task="multi_edit",
                prompt=[first["prompt"], SY.edit_instruction(shape, new)], new_colors=[first["new_color"], new])


# demo tasks trained by another task's data group (the groups are named after the tasks they train)
TRAINING_GROUP = {"i2v": "t2v", "multi_edit": "image_edit"}


def vit_side(config, task: str) -> int:
    """The ViT input side `task` is trained with: its data group's `vit_resolution` (else demo.vit_side), so
    that inference shows the model the token grids of training."""
    name = TRAINING_GROUP.get(task, task)
    sides = [g.get("vit_resolution") for g in config.data.groups if g.get("name") == name]
    return int(sides[0] if sides and sides[0] else config.demo.vit_side)


def guidance(config, task: str) -> tuple[float, list[float]]:
    """(CFG scale, CFG interval) for `task`: demo.task_guidance of its training group, else the demo's."""
    d = config.demo
    own = d.get("task_guidance", {}).get(TRAINING_GROUP.get(task, task), {})
    return float(own.get("cfg_scale", d.cfg_scale)), [float(x) for x in own.get("cfg_interval", d.cfg_interval)]


def infer_flags(config, task: str) -> list[str]:
    """infer.py flags of the demo's sampler and sizes for `task`."""
    d = config.demo
    scale, interval = guidance(config, task)
    return ["--height", str(d.size), "--width", str(d.size), "--frames", "9", "--resolution",
            f"{d.size}/{vit_side(config, task)}", "--steps", str(d.steps), "--shift", str(d.shift), "--cfg-scale",
            str(scale), "--cfg-interval", *[str(x) for x in interval], "--max-new-tokens", "12",
            "--quiet"] + (["--x2t-training-positions"] if d.x2t_training_positions else [])


def run_infer_commands(commands: dict[str, list[str]], jobs: int, console=print) -> None:
    """Run the infer.py command of every task, `jobs` at a time. Each call is mostly single-threaded (its own
    start-up, compiles and a tiny model's sampling), so two at a time use both cores of a 2-core machine.
    Raises on a failed call (exit 1 = some records failed, which are scored)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(task):
        t0 = time.time()
        proc = subprocess.run(commands[task], capture_output=True, text=True)
        console(f"infer.py --task {task}: done in {time.time() - t0:.0f} s (exit {proc.returncode})")
        return task, proc

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for task, proc in pool.map(one, commands):
            if proc.returncode not in (0, 1):
                raise RuntimeError(f"infer.py --task {task} failed:\n{proc.stderr[-4000:]}")


def stage_infer(config, ckpt: str, console=print, tasks: list[str] | None = None) -> str:
    """Run every task (or `tasks`) on the held-out cases through infer.py; returns the evaluation manifest path."""
    from lance_jax.data import synthetic as SY

    d = config.demo
    ev = os.path.join(d.root, "eval")
    os.makedirs(os.path.join(ev, "inputs"), exist_ok=True)
    cases = SY.heldout_cases(int(d.eval_per_task), int(d.seed) + 1, int(d.size),
                             split=d.get("eval_split", "heldout"))
    multi = multi_edit_case(cases)
    by_task: dict[str, list[dict]] = {}
    for case in cases + ([multi] if multi else []):
        if tasks and case["task"] not in tasks:
            continue
        by_task.setdefault(case["task"], []).append(case)
    commands = {}
    for task, group in by_task.items():
        jsonl = os.path.join(ev, f"{task}.jsonl")
        with open(jsonl, "w") as f:
            for i, case in enumerate(group):
                as_edit = dict(case, task="image_edit") if task == "multi_edit" else case  # same source image
                case["inputs"] = SY.write_case_inputs(as_edit, os.path.join(ev, "inputs"))
                case["noise_seed"] = noise_seed(config, i)
                f.write(json.dumps(_record(case, case["inputs"], i, case["noise_seed"])) + "\n")
        commands[task] = [sys.executable, os.path.join(REPO, "infer.py"), "--ckpt", ckpt, "--task", task,
                          "--input", jsonl, "--out", os.path.join(ev, task), *infer_flags(config, task)]
    run_infer_commands(commands, int(d.get("infer_jobs", 1)), console)
    manifest = dict(ckpt=ckpt, cases=[])
    for task, group in by_task.items():
        with open(os.path.join(ev, task, "run.json")) as f:
            records = {r["index"]: r for r in json.load(f)["records"]}
        out = os.path.join(ev, task)
        for i, case in enumerate(group):
            rec = records.get(i, {})
            outputs = dict(error=rec["error"]) if rec.get("error") else (
                dict(answer=rec.get("answer", "")) if "answer" in rec else
                dict(media=os.path.join(out, rec["outputs"][-1]), all_media=[os.path.join(out, p) for p in rec["outputs"]]))
            manifest["cases"].append(dict(case, outputs=outputs))
    path = os.path.join(ev, "manifest.json")
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
    return path


# ---------------------------------------------------------------------------------------------- main


def stage_evaluate(manifest: str, console=print) -> dict:
    from lance_jax.demo import evaluate as E
    from lance_jax.demo import report as R

    ev = os.path.dirname(manifest)
    code = E.main([manifest, "--json", os.path.join(ev, "scores.json")])
    R.main([manifest, "--out", ev])
    with open(os.path.join(ev, "scores.json")) as f:
        scores = json.load(f)
    console(f"report: {os.path.join(ev, 'index.html')}, {os.path.join(ev, 'contact_sheet.png')}")
    scores["exit"] = code
    return scores


def stages_to_run(config, stage: str, ckpt: str | None, retrain: bool) -> tuple[str, ...]:
    """`stage` alone, or for "all" every stage a finished model still needs: none of the data stage
    (tokenizer, ViT pretraining, shards: ~3 min) when --ckpt names one or a trained checkpoint is cached,
    and no training with --ckpt."""
    if stage != "all":
        return (stage,)
    if ckpt:
        return ("infer", "evaluate")
    if not retrain and cached_checkpoint(config):
        return ("train", "infer", "evaluate")  # the train stage hands back the cached checkpoint
    return STAGES


def task_list(text: str) -> list[str]:
    """`--tasks` value -> task names; unknown names are an error before any stage runs (a typo would
    otherwise train, then score nothing)."""
    from lance_jax.data.synthetic import EVAL_TASKS

    known = EVAL_TASKS + ("multi_edit",)
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tasks if t not in known]
    if bad or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task(s) {bad or [text]}; choose from {', '.join(known)}")
    return tasks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--root", default=os.environ.get("LANCE_DEMO_ROOT", "demo_out"))
    p.add_argument("--stage", choices=STAGES + ("all",), default="all")
    p.add_argument("--retrain", action="store_true", help="train even when a cached checkpoint exists")
    p.add_argument("--ckpt", help="evaluate this demo checkpoint instead of the trained / cached one")
    p.add_argument("--tasks", type=task_list, help="comma-separated tasks to run and score (default: all, incl. "
                   "multi_edit)")
    args, overrides = p.parse_known_args(argv)
    config = load_config(args.config, os.path.abspath(args.root), overrides)
    t0 = time.time()
    if args.ckpt and args.stage == "train":
        p.error("--ckpt names a finished checkpoint: use it with --stage infer, evaluate or all")
    stages = stages_to_run(config, args.stage, args.ckpt, args.retrain)
    if "data" in stages:
        stage_data(config)
    elif args.stage == "all":
        print("a finished checkpoint is at hand: the data stage (tokenizer, ViT, shards) is not needed")
    ckpt = args.ckpt
    if ckpt is None and ("train" in stages or "infer" in stages):
        ckpt = stage_train(config, retrain=args.retrain)
    manifest = os.path.join(config.demo.root, "eval", "manifest.json")
    if "infer" in stages:
        manifest = stage_infer(config, ckpt, tasks=args.tasks)
    if "evaluate" in stages:
        stage_evaluate(manifest)
    print(f"demo finished in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
