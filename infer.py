"""Run any Lance task from a converted checkpoint and write real files (spec 30 §15.3).

  python infer.py --ckpt CKPT --task t2i --prompt "A red cat sits." --height 768 --width 768
  python infer.py --ckpt CKPT --task image_edit --image in.png --prompt "Add a hat."
  python infer.py --ckpt CKPT --task x2t_video --video in.mp4 --prompt "What happens?"
  python infer.py --ckpt CKPT --task multi_edit --image in.png --prompt "Add a hat." --prompt "Make it night."
  python infer.py --ckpt CKPT --task t2i --input config/examples/t2i_example.json --out results/t2i

Outputs in --out: `{index:06d}.png` (one frame) or `.mp4` (H.264, 12 fps) per generated sample
(`_{k}` per extra sample, `_turn{i}` per multi_edit turn), `prompt.json` (+ `result.json` for
understanding) as the reference writes them, and `run.json`: every prompt, setting, seed, answer and
timing of the run. Defaults are the released shell values: 30 steps, shift 3.5, CFG 4.0 on (0.4, 1],
global renorm, seed 42, 768x768, 50 -> 49 frames, greedy decoding of up to 256 tokens.
Exit status: 0 when every sample ran, 1 if some failed, 2 on a usage / validation error.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

TASK_CHOICES = ("t2i", "t2v", "i2v", "image_edit", "video_edit", "x2t_image", "x2t_video", "multi_edit")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="converted checkpoint (convert_weights.py to-jax)")
    p.add_argument("--task", required=True, choices=TASK_CHOICES)
    src = p.add_argument_group("inputs")
    src.add_argument("--input", help="task JSON / JSONL in the reference schema (30 §8)")
    src.add_argument("--prompt", action="append",
                     help="caption / instruction / question (multi_edit: repeat once per turn)")
    src.add_argument("--image", help="input image (i2v, image_edit, x2t_image, multi_edit)")
    src.add_argument("--video", help="input video (video_edit, x2t_video, multi_edit)")
    src.add_argument("--system-prompt", help="x2t instruction (default: the Gradio demo's)")
    p.add_argument("--out", help="output folder (default results/{task}_sample_..._{timestamp})")
    gen = p.add_argument_group("generation")
    gen.add_argument("--steps", type=int, default=30)
    gen.add_argument("--shift", type=float, default=3.5)
    gen.add_argument("--cfg-scale", type=float, default=4.0, help="text CFG scale (<= 1: no unconditional pass)")
    gen.add_argument("--cfg-interval", type=float, nargs=2, default=(0.4, 1.0), metavar=("LO", "HI"))
    gen.add_argument("--cfg-renorm", choices=("global", "channel", "none"), default="global")
    gen.add_argument("--cfg-renorm-min", type=float, default=0.0)
    gen.add_argument("--clean-uncond-positions", action="store_true",
                     help="recompute the caption-free cache's position ids (default: the released KV-path quirk)")
    gen.add_argument("--vae-mean", action="store_true", help="encode sources with the posterior mean (no sampling)")
    gen.add_argument("--posterior-seed", type=int, default=2025, help="VAE posterior / random-instruction seed")
    gen.add_argument("--height", type=int, help="t2i / t2v height (default 768)")
    gen.add_argument("--width", type=int, help="t2i / t2v width (default 768)")
    gen.add_argument("--frames", type=int, help="t2v / i2v pixel frames, floored to 4k+1 (default 50 -> 49)")
    gen.add_argument("--resolution", help="media bucket preset (image_768res, video_480p, ...) or VAE[/VIT] sides")
    gen.add_argument("--fps", type=int, default=12, help="input video sampling and output mp4 rate")
    gen.add_argument("--max-duration", type=float, default=6.0, help="input video clamp (seconds)")
    gen.add_argument("--num-samples", type=int, default=1, help="samples per prompt; the k-th uses seed + k")
    p.add_argument("--seed", type=int, default=42,
                   help="initial-noise seed (-1: random, recorded); an input record's own `seed` overrides it")
    und = p.add_argument_group("understanding")
    und.add_argument("--max-new-tokens", type=int, default=256)
    und.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the reference)")
    und.add_argument("--top-p", type=float, default=1.0)
    und.add_argument("--x2t-training-positions", action="store_true",
                     help="decode with the MaPE-shifted ids of training (ViT T from 1000); default: the released "
                          "inference's unshifted ids")
    run = p.add_argument_group("execution")
    run.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the checkpoint's)")
    run.add_argument("--param-dtype", choices=("keep", "float32", "bfloat16"), default="keep")
    run.add_argument("--mesh", help="shard the LLM params, e.g. fsdp=4,tensor=2 (axes data, fsdp, tensor)")
    run.add_argument("--vit-path", help="reference ViT folder to use instead of the checkpoint's")
    run.add_argument("--vae-path",
                     help="reference VAE .pth/.safetensors (or folder) to use instead of the checkpoint's")
    run.add_argument("--max-context", type=int, help="context budget in tokens (default: the LLM's max positions)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _requests(args, pipelines):
    defaults = dict(height=args.height, width=args.width, frames=args.frames, resolution=args.resolution,
                    seed=args.seed, num_samples=args.num_samples)
    if args.input:
        if args.prompt or args.image or args.video:
            raise pipelines.InferenceError("give either --input or --prompt/--image/--video, not both")
        base = os.path.dirname(os.path.abspath(args.input))
        reqs = []
        for rec in pipelines.read_input_file(args.input):
            req = pipelines.request_from_record(args.task, rec, base_dir=base, defaults=defaults)
            if args.system_prompt and args.task in pipelines.UNDERSTANDING_TASKS:
                req.system_prompt = args.system_prompt
            reqs.append(req)
        return reqs
    prompts = args.prompt or []
    if args.task != "multi_edit" and len(prompts) > 1:
        raise pipelines.InferenceError(f"--prompt given {len(prompts)} times; only multi_edit takes several")
    prompt = prompts if args.task == "multi_edit" else (prompts[0] if prompts else None)
    return [pipelines.Request(task=args.task, prompt=prompt, image=args.image, video=args.video,
                              system_prompt=args.system_prompt, index=0, **defaults)]


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from lance_jax import pipelines

    settings = pipelines.GenerationSettings(
        steps=args.steps, shift=args.shift, cfg_scale=args.cfg_scale, cfg_interval=tuple(args.cfg_interval),
        cfg_renorm=args.cfg_renorm, cfg_renorm_min=args.cfg_renorm_min,
        kv_position_quirk=not args.clean_uncond_positions,
        sample_posterior=not args.vae_mean, posterior_seed=args.posterior_seed, fps=args.fps,
        max_duration=args.max_duration)
    text = pipelines.TextSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                 training_positions=args.x2t_training_positions)
    started = time.perf_counter()
    try:
        settings.validate()
        text.validate()
        requests = _requests(args, pipelines)
        # Everything that can be checked without the model is checked before it is loaded.
        from lance_jax.convert.converter import checkpoint_config

        try:
            cfg = checkpoint_config(args.ckpt)
        except (FileNotFoundError, ValueError) as err:
            raise pipelines.InferenceError(str(err)) from None
        for req in requests:
            pipelines.check_request(req, cfg)
        runner = pipelines.LanceRunner(args.ckpt, dtype=args.dtype, param_dtype=args.param_dtype, mesh=args.mesh,
                                       vit_path=args.vit_path, vae_path=args.vae_path, max_context=args.max_context,
                                       progress=not args.quiet)
        runner.require(args.task)
    except (pipelines.InferenceError, FileNotFoundError) as err:
        print(f"infer.py: error: {err}", file=sys.stderr)
        return 2
    out_dir = args.out or pipelines.default_out_dir(args.task, settings, args.seed)
    os.makedirs(out_dir, exist_ok=True)
    run = dict(
        command=" ".join(["infer.py"] + (sys.argv[1:] if argv is None else list(argv))),
        started=datetime.datetime.now().isoformat(timespec="seconds"), task=args.task, ckpt=os.path.abspath(args.ckpt),
        input=args.input, out_dir=os.path.abspath(out_dir), model=runner.describe(),
        settings=settings.to_json() if args.task not in pipelines.UNDERSTANDING_TASKS else None,
        text_settings=text.to_json() if args.task in pipelines.UNDERSTANDING_TASKS else None,
        seed=args.seed, mesh=args.mesh, environment=_environment(), records=[])
    failed = 0
    for req in requests:
        try:
            record = runner.run(req, out_dir, settings=settings, text=text)
        except pipelines.InferenceError as err:
            failed += 1
            record = dict(index=req.index, task=req.task, error=str(err))
            print(f"infer.py: sample {req.index!r}: error: {err}", file=sys.stderr)
        run["records"].append(record)
        _report(record)
    run["total_seconds"] = round(time.perf_counter() - started, 3)
    run["failed"] = failed
    paths = pipelines.write_run_files(out_dir, run)
    print(f"wrote {out_dir}: {', '.join(os.path.basename(p) for p in paths.values())}")
    if failed and len(requests) == 1:
        return 2
    return 1 if failed else 0


def _report(record: dict) -> None:
    if record.get("error"):
        return
    if "answer" in record:
        print(f"[{record['index']}] {record['answer']!r}")
    else:
        print(f"[{record['index']}] {', '.join(record.get('outputs', []))}")


def _environment() -> dict:
    import jax

    return dict(python=platform.python_version(), jax=jax.__version__, backend=jax.default_backend(),
                devices=[str(d) for d in jax.devices()])


if __name__ == "__main__":
    sys.exit(main())
