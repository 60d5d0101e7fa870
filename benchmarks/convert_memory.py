"""Peak host memory of convert_weights.py on a synthetic multi-GB checkpoint in the released key layout.

    python benchmarks/convert_memory.py [--hidden 2048 --layers 2 --vocab 151936 --intermediate 11008]
                                        [--workdir /tmp/lance_convert_bench] [--out benchmarks/results.md]

Writes a Lance_3B-style folder (llm_config.json, lance_config.json, model.safetensors of random fp32
tensors under the real key names, written one tensor at a time), then runs `to-jax` and `to-torch`
in subprocesses and reads each one's peak RSS. Target (issue 3): peak <= 2 x largest tensor + 500 MB.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from lance_jax.config import ModelConfig  # noqa: E402
from lance_jax.convert import key_table, param_shapes  # noqa: E402
from lance_jax.convert.safetensors_io import write_safetensors_streaming  # noqa: E402
from lance_jax.models.lance import latent_position_table  # noqa: E402


def synthetic_checkpoint(root: str, cfg: ModelConfig) -> tuple[int, int]:
    """Write root/Lance_3B in the released layout; returns (file bytes, largest tensor bytes)."""
    model = os.path.join(root, "Lance_3B")
    os.makedirs(model)
    llm = dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
               num_key_value_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size,
               vocab_size=cfg.vocab_size, rms_norm_eps=1e-6, rope_theta=1e6, torch_dtype="bfloat16",
               rope_scaling={"type": "mrope", "mrope_section": list(cfg.mrope_section)},
               vision_config={"spatial_merge_size": 2, "tokens_per_second": 2, "out_hidden_size": cfg.hidden_size})
    lance = dict(latent_patch_size=[1, 1, 1], max_latent_size=64, max_num_frames=1, layer_module="Qwen2MoTDecoderLayer")
    for name, content in (("llm_config.json", llm), ("lance_config.json", lance)):
        with open(os.path.join(model, name), "w") as f:
            json.dump(content, f)
    shapes = param_shapes(cfg)
    entries = []
    for rule in key_table(cfg):
        shape = shapes
        for p in rule.path:
            shape = shape[p]
        entries.append((rule.ref, rule.ref_shape(shape[1:] if rule.stacked else shape), np.float32))
    table = latent_position_table(cfg)
    entries.append(("latent_pos_embed.pos_embed", table.shape, np.float32))
    rng = np.random.default_rng(0)

    def produce(key):
        if key == "latent_pos_embed.pos_embed":
            return table
        shape = next(s for k, s, _ in entries if k == key)
        return rng.standard_normal(shape, dtype=np.float32)

    path = os.path.join(model, "model.safetensors")
    write_safetensors_streaming(path, entries, produce)
    largest = max(int(np.prod(s)) * 4 for _, s, _ in entries)
    return os.path.getsize(path), largest


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--workdir", default="/tmp/lance_convert_bench")
    p.add_argument("--direction", choices=["to-jax", "to-torch", "both"], default="both")
    p.add_argument("--out", default=None, help="append a dated entry to this results file")
    args = p.parse_args()
    cfg = ModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 128, num_kv_heads=2,
                      intermediate_size=args.intermediate, vocab_size=args.vocab, vocab_size_eff=args.vocab)
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    size, largest = synthetic_checkpoint(args.workdir, cfg)
    target = 2 * largest + 500e6
    print(f"synthetic checkpoint: {size / 1e9:.2f} GB, largest tensor {largest / 1e9:.2f} GB, target {target / 1e9:.2f} GB")
    ckpt, back = os.path.join(args.workdir, "ckpt"), os.path.join(args.workdir, "back")
    results = {}
    steps = {"to-jax": ["to-jax", "--src", args.workdir, "--out", ckpt],
             "to-torch": ["to-torch", "--src", ckpt, "--out", back]}
    for name, argv in steps.items():
        if args.direction in (name, "both") or name == "to-jax":  # to-torch needs the to-jax output
            # a fresh interpreter per step, so ru_maxrss of the children is this step's peak
            code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
                    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", code, sys.executable, "convert_weights.py", *argv,
                                  "--no-progress"], check=True, cwd=REPO, capture_output=True, text=True).stdout
            rss = int(out.strip().splitlines()[-1]) * 1024.0
            results[name] = (rss, time.perf_counter() - t0)
            print(f"{name}: peak RSS {rss / 1e9:.2f} GB ({rss / target:.2f} x target), {results[name][1]:.1f} s")
    if args.out:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
        lines = [f"\n## convert_weights.py peak host memory — {datetime.date.today().isoformat()}\n",
                 f"- machine: {platform.machine()}, {cpu}, {os.cpu_count()} cores; python {platform.python_version()}",
                 f"- checkpoint: synthetic Lance_3B layout, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
                 f"intermediate {args.intermediate}, fp32: {size / 1e9:.2f} GB, largest tensor {largest / 1e9:.2f} GB",
                 f"- target: 2 x largest + 500 MB = {target / 1e9:.2f} GB",
                 "- command: `python benchmarks/convert_memory.py --out benchmarks/results.md`", "",
                 "| direction | peak RSS | vs target | wall |", "| --- | --- | --- | --- |"]
        lines += [f"| {n} | {r / 1e9:.2f} GB | {r / target:.2f} x | {t:.0f} s |" for n, (r, t) in results.items()]
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
