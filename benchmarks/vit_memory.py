"""Peak memory of the ViT forward as the number of frames grows (XLA compiled memory analysis).

For each frame count F (fixed frame size, default 224x224 -> 16x16 patches per temporal group) the
ViT forward `jit(params, patches, plan) -> tokens` is lowered and compiled, and XLA's
`memory_analysis()` gives temp + argument + output bytes = the peak we report. Two attention
layouts are compared, with the same model and the dense attention kernel:

* `segments` (what lance-jax runs): windows and temporal groups as a padded (S, L) batch of
  independent rows, so attention memory is linear in tokens; the "full" blocks are per temporal
  group (40 §B.6), so frames add groups, never longer rows.
* `one-row` (baseline): all N patches in one row, segments told apart by sample ids, i.e. one
  dense (N, N) mask/score matrix per head: what a sample-wide mask costs (40 §C.4).

    python benchmarks/vit_memory.py                              # tiny golden config, F = 2, 8, 16, 32
    python benchmarks/vit_memory.py --out benchmarks/results.md  # ... and append a dated entry
    python benchmarks/vit_memory.py --preset 3b --size 588x588        # the released 3B ViT sizes (40 §B.1)

Measure bf16 on an accelerator only: XLA:CPU upcasts bf16 weights for its dots, so a bf16 compile on CPU
shows ~2x the parameter bytes as temp.

Nothing is executed (compile only), so it runs on a laptop CPU for any size. Not a test.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from report import machine, mib  # noqa: E402  (benchmarks/report.py)

from lance_jax.models import vit as V  # noqa: E402
from lance_jax.models import vit_layout as L  # noqa: E402


PRESET_3B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                 fullatt_block_indexes=(7, 15, 23, 31))


def one_row_plan(plan: L.VitPlan, grid, cfg: V.VitConfig) -> L.VitPlan:
    """The same plan with every segment set as one row of N tokens (sample ids tell segments apart)."""
    _, cu_window = L.window_index(grid, cfg.window_merged, cfg.spatial_merge_size)
    return plan._replace(window=L.single_sequence_segments(cu_window),
                         full=L.single_sequence_segments(L.full_cu_seqlens(grid)))


def peak_bytes(cfg: V.VitConfig, shapes: dict, grid, layout: str) -> dict:
    """Compile the forward for `grid` and return XLA's memory analysis (bytes)."""
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, np.dtype(cfg.param_dtype)), shapes,
                          is_leaf=lambda x: isinstance(x, tuple))
    plan = L.vit_plan(grid, cfg)
    if layout == "one-row":
        plan = one_row_plan(plan, grid, cfg)
    patches = jax.ShapeDtypeStruct((L.num_patches(grid), cfg.patch_dim), np.float32)
    model = V.VisionTransformer(cfg)
    fn = jax.jit(lambda p, x, pl: model.apply({"params": p}, x, pl))
    mem = fn.lower(params, patches, plan).compile().memory_analysis()
    temp, arg, out = mem.temp_size_in_bytes, mem.argument_size_in_bytes, mem.output_size_in_bytes
    return dict(temp=temp, arg=arg, out=out, peak=temp + arg + out)






def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--golden", default=os.environ.get("LANCE_GOLDEN", str(_REPO.parent / "shared" / "golden")))
    parser.add_argument("--frames", default="2,8,16,32", help="comma-separated frame counts (even)")
    parser.add_argument("--size", default="224x224", help="frame HxW in pixels (multiples of 28)")
    parser.add_argument("--vit-config", default=None,
                        help="a Qwen2.5-VL-ViT config.json (or folder); default: the golden tiny one")
    parser.add_argument("--preset", choices=["3b"], default=None, help="the Qwen2.5-VL-3B ViT sizes (40 §B.1)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attention-impl", default="dense", choices=["dense", "blockwise", "auto"])
    parser.add_argument("--no-baseline", action="store_true", help="skip the one-row (N x N) baseline")
    parser.add_argument("--out", default=None, help="append a dated markdown entry to this file")
    args = parser.parse_args(argv)

    run = dict(dtype=args.dtype, param_dtype=args.dtype, attention_impl=args.attention_impl)
    if args.preset == "3b":
        cfg = V.VitConfig(**PRESET_3B, **run)
    else:
        cfg = V.load_vit_config(args.vit_config or os.path.join(args.golden, "vit"), **run)
    source = args.preset or args.vit_config or "golden tiny"
    shapes = V.vit_param_shapes(cfg)
    height, width = (int(s) for s in args.size.lower().split("x"))
    frames = [int(f) for f in args.frames.split(",")]
    layouts = ["segments"] + ([] if args.no_baseline else ["one-row"])
    rows = []
    for f in frames:
        grid = np.array([[f // cfg.temporal_patch_size, height // cfg.patch_size, width // cfg.patch_size]])
        res = {lay: peak_bytes(cfg, shapes, grid, lay) for lay in layouts}
        rows.append((f, L.num_patches(grid), res))
        line = "  ".join(f"{lay}: peak {mib(r['peak'])} MiB (temp {mib(r['temp'])})" for lay, r in res.items())
        print(f"frames {f:>3}  patches {L.num_patches(grid):>6}  {line}", flush=True)

    base_f, base_n, base = rows[0]
    lines = ["| frames | patches | " + " | ".join(f"{lay} peak MiB | {lay} temp MiB | {lay} temp growth"
                                                   for lay in layouts) + " |",
             "|---|---|" + "---|---|---|" * len(layouts)]
    for f, n, res in rows:
        cells = [f"{mib(res[lay]['peak'])} | {mib(res[lay]['temp'])} | {res[lay]['temp'] / base[lay]['temp']:.1f}x"
                 for lay in layouts]
        lines.append(f"| {f} | {n} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        cmd = "python benchmarks/vit_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
        entry = [
            f"\n## {datetime.date.today().isoformat()} — ViT forward peak memory vs frames "
            "(`benchmarks/vit_memory.py`)\n",
            f"- machine: {machine()}",
            f"- config: {source} ViT (depth {cfg.depth}, hidden {cfg.hidden_size}, heads {cfg.num_heads}, "
            f"full-attention blocks {list(cfg.fullatt_block_indexes)}, window {cfg.window_size} px), "
            f"dtype {cfg.dtype}, attention kernel {cfg.attention_impl}, frames {height}x{width}",
            "- metric: XLA `compile().memory_analysis()`, peak = temp + argument + output bytes (compile only)",
            f"- command: `{cmd.strip()}`",
            "",
            table,
            "",
            f"Tokens grow {rows[-1][1] / base_n:.0f}x from {base_f} to {rows[-1][0]} frames.",
        ]
        with open(args.out, "a") as fh:
            fh.write("\n".join(entry) + "\n")
        print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
