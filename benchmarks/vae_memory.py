"""Peak memory and wall time of the Wan 2.2 VAE encode / decode as the number of frames grows.

For each pixel frame count T (default 5, 17, 33, 65 at a fixed 64x64 size, the golden tiny config)
the streamed encode `video (1,3,T,H,W) -> mu, logvar, mu_raw` and the streamed decode
`latent (1,t,h,w,48) -> video` are jitted and compiled, and XLA's `compile().memory_analysis()` gives
the temp (working memory), argument (params + input) and output bytes; peak = temp + argument +
output. Inputs and outputs necessarily grow with T and are reported apart from the params; the
working memory (temp) of the streamed path must stay flat in T, since only the 2-frame caches and
one chunk's activations are live (`lax.scan` with the cache as carry). The whole-clip path
(`stream=False`, same maths, §A.7.3) is shown as the baseline whose temps grow with T.

Wall time: compile seconds, then the median of `--repeats` runs after one warm-up (random weights;
memory and time do not depend on the values).

    python benchmarks/vae_memory.py                              # tiny golden config, T = 5, 17, 33, 65
    python benchmarks/vae_memory.py --out benchmarks/results.md  # ... and append a dated entry
    python benchmarks/vae_memory.py --real --size 256x256 --no-run   # released widths, compile only

Not a test: nothing asserts on the figures.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from report import machine, mib  # noqa: E402  (benchmarks/report.py)

from lance_jax.models import vae as V  # noqa: E402


def measure(fn, args, run: bool, repeats: int) -> dict:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    res = dict(temp=mem.temp_size_in_bytes, arg=mem.argument_size_in_bytes, out=mem.output_size_in_bytes,
               compile_s=compile_s, run_s=float("nan"))
    res["peak"] = res["temp"] + res["arg"] + res["out"]
    if run:
        jax.block_until_ready(compiled(*args))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
        res["run_s"] = statistics.median(times)
    return res


def nbytes(tree) -> int:
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))






def ms(s: float) -> str:
    return "-" if s != s else f"{s * 1e3:.0f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--golden", default=os.environ.get("LANCE_GOLDEN", str(_REPO.parent / "shared" / "golden")))
    parser.add_argument("--frames", default="5,17,33,65", help="comma-separated pixel frame counts (1 + 4k)")
    parser.add_argument("--size", default="64x64", help="frame HxW in pixels (multiples of 16)")
    parser.add_argument("--real", action="store_true", help="the released widths (c_dim 160, dec_dim 256)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-run", action="store_true", help="compile only (memory analysis, no wall time)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the whole-clip (stream=False) baseline")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="append a dated markdown entry to this file")
    args = parser.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")

    cfg = V.load_vae_config(os.path.join(args.golden, "vae"), real_model=args.real, dtype=args.dtype,
                            param_dtype=args.dtype)
    params = V.init_vae_params(cfg, 0)
    param_bytes = nbytes(params)
    height, width = (int(s) for s in args.size.lower().split("x"))
    frames = [int(f) for f in args.frames.split(",")]
    modes = [True] + ([] if args.no_baseline else [False])
    rng = np.random.default_rng(0)
    rows = []
    for T in frames:
        t = V.num_latent_frames(T)
        video = jnp.asarray(rng.uniform(-1, 1, (1, 3, T, height, width)).astype(np.float32))
        s = cfg.downsample_spatial
        latent = jnp.asarray(rng.normal(size=(1, t, height // s, width // s, cfg.z_dim)).astype(np.float32))
        for stream in modes:
            enc = measure(lambda p, v, st=stream: V.encode(p, v, cfg, stream=st), (params, video), not args.no_run,
                          args.repeats)
            dec = measure(lambda p, z, st=stream: V.decode(p, z, cfg, stream=st), (params, latent), not args.no_run,
                          args.repeats)
            io = dict(enc_in=nbytes(video), enc_out=enc["out"], dec_in=nbytes(latent), dec_out=dec["out"])
            rows.append((T, t, stream, enc, dec, io))
            print(f"T {T:>3} t {t:>2} {'stream' if stream else 'whole '}  encode temp {mib(enc['temp'])} MiB "
                  f"peak {mib(enc['peak'])} compile {enc['compile_s']:.1f}s run {ms(enc['run_s'])}ms | "
                  f"decode temp {mib(dec['temp'])} MiB peak {mib(dec['peak'])} compile {dec['compile_s']:.1f}s "
                  f"run {ms(dec['run_s'])}ms", flush=True)

    lines = ["| T | t | path | enc input MiB | enc temp MiB | enc peak MiB | enc compile s | enc run ms "
             "| dec output MiB | dec temp MiB | dec peak MiB | dec compile s | dec run ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for T, t, stream, enc, dec, io in rows:
        lines.append(f"| {T} | {t} | {'stream' if stream else 'whole'} | {mib(io['enc_in'])} | {mib(enc['temp'])} | "
                     f"{mib(enc['peak'])} | {enc['compile_s']:.1f} | {ms(enc['run_s'])} | {mib(io['dec_out'])} | "
                     f"{mib(dec['temp'])} | {mib(dec['peak'])} | {dec['compile_s']:.1f} | {ms(dec['run_s'])} |")
    table = "\n".join(lines)
    print(table)
    stream_rows = [r for r in rows if r[2]]
    whole_rows = [r for r in rows if not r[2]]

    def temps(rs, k):
        return "/".join(mib(r[k]["temp"]) for r in rs)

    summary = (f"Streamed working memory (temp) for T = {'/'.join(str(r[0]) for r in stream_rows)}: encode "
               f"{temps(stream_rows, 3)} MiB, decode {temps(stream_rows, 4)} MiB")
    if whole_rows:
        summary += (f"; whole-clip baseline: encode {temps(whole_rows, 3)} MiB, decode {temps(whole_rows, 4)} MiB "
                    f"({whole_rows[-1][3]['temp'] / whole_rows[0][3]['temp']:.1f}x / "
                    f"{whole_rows[-1][4]['temp'] / whole_rows[0][4]['temp']:.1f}x)")
    summary += (f". Inputs/outputs grow with T (table); the argument bytes also hold the params each function "
                f"uses (all params: {mib(param_bytes)} MiB).")
    print(summary)
    if args.out:
        cmd = "python benchmarks/vae_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
        entry = [
            f"\n## {datetime.date.today().isoformat()} — VAE encode/decode memory and time vs frames "
            "(`benchmarks/vae_memory.py`)\n",
            f"- machine: {machine()}",
            f"- config: {'released' if args.real else 'golden tiny'} Wan 2.2 VAE (c_dim {cfg.c_dim}, dec_dim "
            f"{cfg.dec_dim}, z_dim {cfg.z_dim}, dim_mult {list(cfg.dim_mult)}), dtype {cfg.dtype}, frames "
            f"{height}x{width}, batch 1, random weights",
            "- metric: XLA `compile().memory_analysis()`; temp = working memory, peak = temp + argument (params + "
            "input) + output bytes; "
            + ("compile only, not run" if args.no_run else f"run = median of {args.repeats} after a warm-up"),
            f"- command: `{cmd.strip()}`",
            "",
            table,
            "",
            summary,
        ]
        with open(args.out, "a") as fh:
            fh.write("\n".join(entry) + "\n")
        print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
