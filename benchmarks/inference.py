"""Inference cost: per-step / per-token latency at the tiny config (CPU), and XLA's device-memory figures
for the full 3B model (compile only, nothing allocated).

Part 1 (latency): the golden tiny checkpoint (converted into a temp folder, or `--ckpt`) through
`lance_jax.pipelines.LanceRunner`: t2i at 256x256 (16x16 = 256 target tokens, the tiny table's largest)
with text CFG on (guided steps: 2 batched branches) and off (1 branch); x2t_image on a 224x224 image.
Each is run twice with the same shapes and the second (warm) run is reported: wall seconds per Euler
step (`denoise / steps`) and per generated token (`decode / tokens`), plus the cold (compile) time.

Part 2 (memory): the released 3B config (`configs/models/lance_3b_image.py`, bf16 params and compute)
generating 768x768 with CFG, and (`lance_3b_video.py`) t2v at 480x848 x 121 frames with CFG. The
request is planned on the host exactly as `pipelines` does (synthetic token ids with the released
token counts: 34 / 40 template tokens, a `--caption-tokens` caption, 5 suffix tokens), and every
device stage is lowered with `jax.ShapeDtypeStruct` arguments and compiled:
  prefill  `pipelines.runner.prefill_cache` (both CFG contexts, KV caches allocated inside),
  denoise  `sampling.denoise_step` guided (both branches batched; the largest step),
  vae      the released Wan 2.2 decode of the target latent (streamed).
`compiled.memory_analysis()` gives argument / output / temp / alias bytes per stage. Every param the
runner holds (LLM + VAE) is resident for the whole run; a stage adds its non-param inputs (batch, KV
caches, state), outputs and temps:  peak = LLM params + VAE params + max over stages of that "live" part.
The CPU backend's buffer assignment is a proxy for a GPU's (same HLO, different fusion/scheduling); the stages
are compiled in a child process with loop-invariant code motion off (see the note the report prints).

    .venv/bin/python benchmarks/inference.py                                 # both parts
    .venv/bin/python benchmarks/inference.py --skip-latency --out benchmarks/results.md
    .venv/bin/python benchmarks/inference.py --skip-video                    # 768x768 only

Not a test: nothing asserts on the figures.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from report import machine  # noqa: E402  (benchmarks/report.py)

GIB = 2 ** 30
TEXT_ID = 100  # any plain-text id: values never change shapes




# ----------------------------------------------------------------------------------------------
# Part 1: latency at the tiny config
# ----------------------------------------------------------------------------------------------


def latency(ckpt: str | None, golden: str, steps: int, tokens: int) -> dict:
    from lance_jax.pipelines import GenerationSettings, LanceRunner, TextSettings

    tmp = None
    if ckpt is None:
        from lance_jax.convert import converter
        from lance_jax.convert.sources import find_reference

        tmp = tempfile.TemporaryDirectory()
        ckpt = os.path.join(tmp.name, "ckpt")
        converter.to_jax(find_reference(golden), ckpt, progress=False)
    runner = LanceRunner(ckpt, progress=False)
    out = dict(ckpt=ckpt if tmp is None else f"{golden} (converted)", config=runner.describe())
    side = 16 * runner.cfg.max_latent_size
    prompt = "A red cat sits on a wooden table next to a window."
    for name, scale in (("cfg", 4.0), ("nocfg", 1.0)):
        # interval (0, 1]: every step guided when the scale is > 1, so the figure is one kind of step
        settings = GenerationSettings(steps=steps, cfg_scale=scale, cfg_interval=(0.0, 1.0))
        cold = runner.t2i(prompt, height=side, width=side, settings=settings)
        warm = runner.t2i(prompt, height=side, width=side, settings=settings)
        out[f"t2i_{name}"] = dict(size=f"{side}x{side}", target_tokens=warm.info["tokens"]["target"],
                                  context_tokens=warm.info["tokens"]["total"] - warm.info["tokens"]["target"] - 3,
                                  steps=steps, guided=warm.info["guided_steps"],
                                  step_s=warm.info["timings"]["denoise"] / steps,
                                  cold_denoise_s=cold.info["timings"]["denoise"],
                                  prefill_s=warm.info["timings"]["prefill"],
                                  vae_decode_s=warm.info["timings"]["vae_decode"])
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    text = TextSettings(max_new_tokens=tokens, temperature=1.0)  # sampling: no early stop at a random model's EOS
    res = "256/224"
    cold = runner.x2t_image("What is in the picture?", image, resolution=res, text=text, seed=1)
    warm = runner.x2t_image("What is in the picture?", image, resolution=res, text=text, seed=1)
    n = max(warm.info["new_tokens"], 1)
    out["x2t"] = dict(vit_tokens=warm.info["tokens"]["vit"], prompt_tokens=warm.info["tokens"]["prompt"],
                      new_tokens=warm.info["new_tokens"], token_s=warm.info["timings"]["decode"] / n,
                      cold_decode_s=cold.info["timings"]["decode"], prefill_s=warm.info["timings"]["prefill"])
    if tmp is not None:
        tmp.cleanup()
    return out


def mid_latency(golden: str, steps: int, tokens: int) -> dict:
    """Per-step / per-token latency of a mid-size random model (hidden 512, 8 layers) at t2i 256x256 (16x16 latents)
    and x2t decoding, timing the jitted pieces directly (no checkpoint of that size exists)."""
    import flax.linen as nn
    import jax

    from lance_jax.config import load_reference_config
    from lance_jax.kv_plan import plan_generation, plan_understanding
    from lance_jax.models.lance import Lance, init_params
    from lance_jax.pipelines.runner import prefill_cache
    from lance_jax.sampling import CFGConfig, decode, denoise_step
    from lance_jax.sequence import build_generation, build_understanding
    from lance_jax.tokenizer import Tokenizer

    model_dir = os.path.join(golden, "model")
    cfg = load_reference_config(model_dir).replace(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2,
                                                   intermediate_size=1408, mrope_section=(8, 12, 12),
                                                   vit_out_hidden_size=512)
    tok, model, rng = Tokenizer.from_folder(model_dir), Lance(cfg), np.random.default_rng(0)
    built = build_generation("t2i", "A red cat sits on a wooden table next to a window.", tokenizer=tok, cfg=cfg,
                             target_latent_grid=(1, 16, 16))
    n_vae = 256
    plan = plan_generation(built.layout, cfg, rng.standard_normal((n_vae, cfg.patch_latent_dim)).astype(np.float32))
    params = jax.jit(lambda r: nn.unbox(init_params(cfg, r, plan.context)))(jax.random.PRNGKey(0))
    capacity = plan.context["und_ids"].shape[1] + plan.context["latents"].shape[1]
    cache = prefill_cache(model, params, plan.context, rows=2, capacity=capacity)
    x = plan.query["latents"][0]
    out = dict(config="hidden 512, 8 layers, 8 heads / 2 kv, intermediate 1408, random params", target_tokens=n_vae,
               context_tokens=plan.debug["n_ctx"][0])
    for name, guided in (("cfg", True), ("nocfg", False)):
        step = lambda: denoise_step(model, params, plan.query, cache, x, np.float32(1.0), np.float32(0.1),  # noqa: E731
                                    plan.noisy, cfg=CFGConfig(), guided=guided)[0]
        jax.block_until_ready(step())
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            jax.block_until_ready(step())
            times.append(time.perf_counter() - t0)
        out[f"t2i_{name}_step_s"] = float(np.median(times))
    und = build_understanding("x2t_image", "What is in the picture?", tokenizer=tok, cfg=cfg, vit_grid=(1, 16, 16))
    uplan = plan_understanding(und.layout, cfg, tokens)
    batch = dict(uplan.prefill, vit_embeds=rng.standard_normal((1, 64, 512)).astype(np.float32))
    ucap = batch["und_ids"].shape[1] + batch["latents"].shape[1]
    from lance_jax.models.backbone import KVCache

    prefill = jax.jit(lambda p, b: model.apply({"params": p}, b, KVCache.empty(cfg, 1, ucap + tokens),
                                               method=Lance.extend)[2])
    ucache = prefill(params, batch)

    def run():
        return decode(model, params, ucache, uplan.first_token, uplan.decode_positions, uplan.order0, uplan.split0,
                      jax.random.PRNGKey(1), max_new_tokens=tokens, vocab_eff=cfg.vocab_size_eff,
                      eos_id=cfg.eos_token_id, greedy=False, temperature=1.0)

    jax.block_until_ready(run())
    t0 = time.perf_counter()
    ids, n, _ = jax.block_until_ready(run())
    out["x2t_token_s"] = (time.perf_counter() - t0) / max(int(n), 1)
    out["x2t_new_tokens"] = int(n)
    return out


# ----------------------------------------------------------------------------------------------
# Part 2: memory of the full model (compile only)
# ----------------------------------------------------------------------------------------------


def model_config(path: str, dtype: str):
    from lance_jax.config import config_dict_from_file, model_config_from_dict

    return model_config_from_dict(config_dict_from_file(str(_REPO / path)).model).replace(dtype=dtype,
                                                                                           param_dtype=dtype)


def synthetic_t2x_layout(cfg, grid, caption_tokens: int, prefix_tokens: int):
    """The released t2i / t2v layout (20 §3.5) with the real token counts; ids are placeholders."""
    from lance_jax import positions as P
    from lance_jax.kv_plan import SampleLayout

    t, h, w = grid
    n = t * h * w
    ids = np.concatenate([np.full(prefix_tokens + caption_tokens + 5, TEXT_ID), [cfg.vision_start_token_id],
                          np.full(n, cfg.video_token_id), [cfg.vision_end_token_id, cfg.eos_token_id]])
    modality = np.concatenate([np.full(prefix_tokens, P.MODALITY_SYSTEM), np.full(caption_tokens, P.MODALITY_TEXT),
                               np.full(5, P.MODALITY_SYSTEM), np.full(n + 2, P.MODALITY_NOISE), [P.MODALITY_SYSTEM]])
    return SampleLayout(ids, modality, [prefix_tokens, caption_tokens, 5, n + 2, 1],
                        ["causal", "causal", "causal", "noise", "causal"], [[t, 2 * h, 2 * w]])


def abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)


def mem(compiled) -> dict:
    m = compiled.memory_analysis()
    d = dict(arg=m.argument_size_in_bytes, out=m.output_size_in_bytes, temp=m.temp_size_in_bytes,
             alias=m.alias_size_in_bytes)
    d["peak"] = d["arg"] + d["out"] + d["temp"] - d["alias"]
    return d


def nbytes(tree) -> int:
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def memory_case(name: str, config: str, height: int, width: int, frames: int, caption_tokens: int, dtype: str,
                vae_dtype: str) -> dict:
    import flax.linen as nn

    from lance_jax import packing, pipelines
    from lance_jax.kv_plan import plan_generation
    from lance_jax.models import vae as V
    from lance_jax.models.lance import Lance, init_params
    from lance_jax.sampling import CFGConfig, denoise_step

    cfg = model_config(config, dtype)
    grid = ((frames - 1) // 4 + 1, height // 16, width // 16)
    layout = synthetic_t2x_layout(cfg, grid, caption_tokens, 34 if frames == 1 else 40)
    n_vae = int(np.prod(grid))
    t0 = time.perf_counter()
    plan = plan_generation(layout, cfg, np.zeros((n_vae, cfg.patch_latent_dim), np.float32), text_cfg=True)
    plan_s = time.perf_counter() - t0
    model = Lance(cfg)
    params = abstract(nn.unbox(jax.eval_shape(lambda r: init_params(cfg, r, packing.dummy_stream_batch(cfg)),
                                              jax.random.PRNGKey(0))))
    context, query = abstract(plan.context), abstract(plan.query)
    rows = plan.context["und_ids"].shape[0]
    capacity = plan.context["und_ids"].shape[1] + plan.context["latents"].shape[1]
    res = dict(name=name, config=config, dtype=dtype, size=f"{height}x{width}", frames=frames, latent_grid=grid,
               target_tokens=n_vae, context_tokens=plan.debug["n_ctx"], query_capacity=plan.query["und_ids"].shape[1] +
               plan.query["latents"].shape[1], cache_capacity=capacity, params_bytes=nbytes(params), plan_s=plan_s,
               attention="blockwise" if plan.query["latents"].shape[1] + capacity > cfg.dense_attention_max_len and
               cfg.attention_impl == "auto" else cfg.attention_impl)
    prefill = functools.partial(pipelines.runner.prefill_cache, model, rows=rows, capacity=capacity)
    t0 = time.perf_counter()
    compiled = jax.jit(prefill).lower(params, context).compile()
    res["prefill"] = dict(mem(compiled), compile_s=time.perf_counter() - t0)
    cache = jax.eval_shape(prefill, params, context)
    res["cache_bytes"] = nbytes(cache)
    cg = plan.query["latents"].shape[1]
    f32 = jax.ShapeDtypeStruct((), jnp.float32)
    x = jax.ShapeDtypeStruct((cg, cfg.patch_latent_dim), jnp.float32)
    noisy = jax.ShapeDtypeStruct((cg,), jnp.bool_)
    t0 = time.perf_counter()
    lowered = denoise_step.lower(model, params, query, cache, x, f32, f32, noisy, cfg=CFGConfig(), guided=True)
    compiled = lowered.compile()
    res["denoise"] = dict(mem(compiled), compile_s=time.perf_counter() - t0)
    vcfg = V.VaeConfig(dtype=vae_dtype, param_dtype=vae_dtype)  # released widths (c_dim 160, dec_dim 256)
    vparams = abstract(nn.unbox(V.vae_abstract_params(vcfg)))
    latent = jax.ShapeDtypeStruct((1,) + grid + (vcfg.z_dim,), jnp.float32)
    t0 = time.perf_counter()
    compiled = V._decode.lower(vparams, latent, jax.ShapeDtypeStruct((), jnp.bool_), vcfg, True).compile()
    res["vae_decode"] = dict(mem(compiled), compile_s=time.perf_counter() - t0)
    res["vae_params_bytes"] = nbytes(vparams)
    # Resident for the whole run: every param the runner holds. On top, per stage: its non-param inputs
    # (batch, caches, state), outputs and temps (jit drops unused params from the arguments, so the
    # stage's own argument bytes would undercount what stays resident).
    res["resident"] = res["params_bytes"] + res["vae_params_bytes"]
    inputs = dict(prefill=nbytes(context), denoise=nbytes((query, cache, x, noisy)), vae_decode=nbytes(latent))
    for stage, extra in inputs.items():
        m = res[stage]
        m["live"] = extra + m["out"] + m["temp"] - m["alias"]
    res["peak"] = res["resident"] + max(res[s]["live"] for s in inputs)
    return res


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


CASES = [("t2i 768x768 CFG", "configs/models/lance_3b_image.py", 768, 768, 1),
         ("t2v 480x848x121 CFG", "configs/models/lance_3b_video.py", 480, 848, 121)]
LICM_OFF = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"


def memory_subprocess(args) -> list[dict]:
    """Run the memory cases in a child with LICM off (see the report note); returns their dicts."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mem.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", path, "--caption-tokens",
               str(args.caption_tokens), "--dtype", args.dtype] + (["--skip-video"] if args.skip_video else [])
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + LICM_OFF).strip())
        subprocess.run(cmd, check=True, env=env)
        with open(path) as fh:
            return json.load(fh)


def gib(b) -> str:
    return f"{b / GIB:.2f}"


def report(lat: dict | None, mems: list[dict], target_gib: float) -> list[str]:
    lines = []
    if lat:
        c = lat["config"]
        lines += [f"- latency config: {lat['ckpt']}: {c['num_layers']} layers, hidden {c['hidden_size']}, dtype "
                  f"{c['dtype']}; warm second run of each (same shapes), wall seconds", "",
                  "| run | size / tokens | context tokens | steps (guided) | per step ms | cold denoise s | "
                  "prefill ms | VAE decode ms |", "|---|---|---|---|---|---|---|---|"]
        for key in ("t2i_cfg", "t2i_nocfg"):
            r = lat[key]
            lines.append(f"| {key} | {r['size']}, {r['target_tokens']} latent tokens | {r['context_tokens']} | "
                         f"{r['steps']} ({r['guided']}) | {1e3 * r['step_s']:.1f} | {r['cold_denoise_s']:.1f} | "
                         f"{1e3 * r['prefill_s']:.1f} | {1e3 * r['vae_decode_s']:.1f} |")
        x = lat["x2t"]
        lines += ["", "| run | ViT tokens | prompt tokens | new tokens | per token ms | cold decode s | prefill ms |",
                  "|---|---|---|---|---|---|---|",
                  f"| x2t_image 224x224 | {x['vit_tokens']} | {x['prompt_tokens']} | {x['new_tokens']} | "
                  f"{1e3 * x['token_s']:.1f} | {x['cold_decode_s']:.1f} | {1e3 * x['prefill_s']:.1f} |", ""]
    if mems:
        lines += ["- memory: XLA `memory_analysis()` of each compiled stage (abstract args, nothing allocated), GiB. "
                  "Stage live = its non-param inputs (batch / caches / state) + outputs + temps - aliases; run peak "
                  "= all resident params (LLM + VAE) + the largest stage live", "",
                  "| case | target / context tokens | attention | LLM params | KV caches | prefill live (temp) | "
                  "denoise step live (temp) | VAE params | VAE decode live (temp) | run peak | target |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in mems:
            verdict = "PASS" if m["peak"] <= target_gib * GIB else "ABOVE"
            lines.append(
                f"| {m['name']} ({m['config'].split('/')[-1]}, {m['dtype']}) | {m['target_tokens']} / "
                f"{'+'.join(str(n) for n in m['context_tokens'])} | {m['attention']} | {gib(m['params_bytes'])} | "
                f"{gib(m['cache_bytes'])} | {gib(m['prefill']['live'])} ({gib(m['prefill']['temp'])}) | "
                f"{gib(m['denoise']['live'])} ({gib(m['denoise']['temp'])}) | {gib(m['vae_params_bytes'])} | "
                f"{gib(m['vae_decode']['live'])} ({gib(m['vae_decode']['temp'])}) | **{gib(m['peak'])}** | "
                f"{'<= ' + str(target_gib) + ' GiB: ' + verdict if m['name'].startswith('t2i') else '-'} |")
        lines.append("")
        lines.append("- compile seconds (prefill / denoise / VAE decode): " + "; ".join(
            f"{m['name']} {m['prefill']['compile_s']:.0f} / {m['denoise']['compile_s']:.0f} / "
            f"{m['vae_decode']['compile_s']:.0f}" for m in mems))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--golden", default=os.environ.get("LANCE_GOLDEN", str(_REPO.parent / "shared" / "golden")))
    p.add_argument("--ckpt", help="a converted tiny checkpoint (default: convert the golden set into a temp folder)")
    p.add_argument("--steps", type=int, default=6, help="Euler steps of the latency runs")
    p.add_argument("--tokens", type=int, default=32, help="new tokens of the x2t latency run")
    p.add_argument("--caption-tokens", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="3B params and compute")
    p.add_argument("--target-gib", type=float, default=16.0)
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--mid", action="store_true", help="also time a mid-size random model (hidden 512, 8 layers)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-video", action="store_true", help="no 480p x 121-frame case")
    p.add_argument("--raw-cpu", action="store_true", help="also the 768x768 case compiled with XLA:CPU defaults")
    p.add_argument("--out", help="append a dated markdown entry to this file")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.memory_worker:  # child process: compile-only memory cases, results as JSON
        mems = [memory_case(*case, args.caption_tokens, args.dtype, args.dtype) for case in CASES
                if not (args.skip_video and case[0].startswith("t2v"))]
        with open(args.memory_worker, "w") as fh:
            json.dump(mems, fh, default=str)
        return 0
    started = time.perf_counter()
    lat = None if args.skip_latency else latency(args.ckpt, args.golden, args.steps, args.tokens)
    mid = mid_latency(args.golden, args.steps, args.tokens) if args.mid else None
    mems, raw = [], None
    if not args.skip_memory:
        mems = memory_subprocess(args)
        if args.raw_cpu:
            raw = memory_case(*CASES[0], args.caption_tokens, args.dtype, args.dtype)
            raw["name"] += " [CPU, LICM on]"
    lines = report(lat, mems + ([raw] if raw else []), args.target_gib)
    if mid:
        lines += ["", f"Mid-size latency ({mid['config']}; CPU): t2i 256x256 ({mid['target_tokens']} target tokens, "
                      f"{mid['context_tokens']} context tokens) denoise step {mid['t2i_cfg_step_s'] * 1e3:.1f} ms with CFG, "
                      f"{mid['t2i_nocfg_step_s'] * 1e3:.1f} ms without; x2t decode {mid['x2t_token_s'] * 1e3:.2f} ms/token "
                      f"over {mid['x2t_new_tokens']} tokens."]
    if mems:
        lines += ["- the stages are compiled in a child process with "
                  f"`XLA_FLAGS={LICM_OFF}`: XLA:CPU has no bf16 matmul, converts bf16 weights to f32, and "
                  "loop-invariant code motion hoists that convert out of the layer scan, materialising f32 copies "
                  "of all 36 layers (~21 GiB of temps; the `[CPU, LICM on]` row with --raw-cpu). A GPU runs bf16 "
                  "dots natively, so the figures without the hoist are the representative ones. The VAE decode's "
                  "bf16 temps on CPU still include f32 copies of the conv weights (an upper bound)."]
    print("\n".join(lines))
    if args.out:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        head = [f"## inference — {stamp}", "",
                f"- command: `python benchmarks/inference.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
                f"- machine: {machine()}; total {time.perf_counter() - started:.0f} s", ""]
        with open(args.out, "a") as fh:
            fh.write("\n" + "\n".join(head + lines) + "\n")
        print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
