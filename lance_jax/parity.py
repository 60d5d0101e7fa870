"""Parity harness: run a golden directory's cases through lance-jax and compare every output.

    python -m lance_jax.parity --golden ../shared/golden [--cases positions,train_forward] [--benchmark]

Prints one row per compared output (case, name, max abs error, relative L2 error, tolerance,
PASS/FAIL) and exits non-zero if any row fails. All sizes come from the golden directory's own
configs (`model/llm_config.json`, `model/lance_config.json`, tokenizer), so golden sets with other
seeds and other tiny configs run unchanged. The metric is the golden README's:
max|ours - golden| <= tol * max|golden| (tol = 0: exact equality, used for ids, masks, positions).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Callable

import numpy as np

# Tolerances of the golden README ("Suggested checks for an fp32 JAX port"). The reference measured
# float32 vs float64 noise of at most 2e-6 for every case; these leave ~5-10x headroom over that
# for a different but equally valid float32 summation order, and stay far below what a real
# mistake (a wrong section split, bf16 matmuls, a mask error) produces (>= 1e-3).
TOL_EXACT = 0.0
TOL_MODULE = 1e-5  # embeddings and single-module outputs
TOL_LLM = 2e-5  # LLM hidden states, logits, velocities and their per-token losses
TOL_LOSS = 1e-5  # scalar losses (relative)
TOL_TRAJECTORY = 5e-5  # multi-step sampling trajectories (x_steps, applied velocities with CFG renorm)


@dataclasses.dataclass
class Row:
    case: str
    name: str
    max_abs: float
    rel_l2: float
    tol: float
    passed: bool
    note: str = ""

    def format(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        return (f"{self.case:<14} {self.name:<34} {self.max_abs:>11.3e} {self.rel_l2:>11.3e} "
                f"{self.tol:>9.1e}  {status}{('  ' + self.note) if self.note else ''}")


HEADER = f"{'case':<14} {'output':<34} {'max_abs':>11} {'rel_l2':>11} {'tol':>9}  result"


def compare(case: str, name: str, ours, golden, tol: float) -> Row:
    """One row: shapes must match; exact when tol == 0, else max|a-g| <= tol * max|g|."""
    ours, golden = np.asarray(ours), np.asarray(golden)
    if ours.shape != golden.shape:
        return Row(case, name, np.inf, np.inf, tol, False, f"shape {ours.shape} != golden {golden.shape}")
    if ours.size == 0:
        return Row(case, name, 0.0, 0.0, tol, True)
    a, g = ours.astype(np.float64), golden.astype(np.float64)
    finite = np.isfinite(g)
    same_nonfinite = np.array_equal(np.isfinite(a), finite) and np.array_equal(a[~finite], g[~finite], equal_nan=True)
    diff = np.abs(a[finite] - g[finite])
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(g[finite]).max()) if diff.size else 0.0
    rel_l2 = float(np.linalg.norm(diff) / max(np.linalg.norm(g[finite]), 1e-30)) if diff.size else 0.0
    passed = same_nonfinite and (max_abs == 0.0 if tol == 0 else max_abs <= tol * scale)
    return Row(case, name, max_abs, rel_l2, tol, bool(passed), "" if same_nonfinite else "non-finite entries differ")


class Golden:
    """A golden directory: configs, case arrays and case metadata."""

    def __init__(self, root: str, config_overrides: dict | None = None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"golden directory {root} not found (set --golden or LANCE_GOLDEN)")
        self.root = root
        with open(os.path.join(root, "cases.json")) as f:
            self.meta = json.load(f)
        self._arrays: dict[str, dict] = {}
        self.config_overrides = dict(config_overrides or {})

    @property
    def model_dir(self) -> str:
        return os.path.join(self.root, "model")

    def cases(self) -> list[str]:
        return list(self.meta["cases"])

    def case_meta(self, case: str) -> dict:
        return self.meta["cases"][case]

    def scalar(self, case: str, name: str) -> float:
        return self.case_meta(case)["scalars"][name]["value"]

    def arrays(self, case: str) -> dict[str, np.ndarray]:
        if case not in self._arrays:
            with np.load(os.path.join(self.root, self.case_meta(case)["file"])) as z:
                self._arrays[case] = {k: z[k] for k in z.files}
        return self._arrays[case]

    def meta_lance_config(self) -> dict:
        """model/lance_config.json (launch arguments, incl. the inference schedule of the golden run)."""
        with open(os.path.join(self.model_dir, "lance_config.json")) as f:
            return json.load(f)

    def model_config(self, **overrides):
        from lance_jax.config import load_reference_config

        return load_reference_config(self.model_dir, **{**self.config_overrides, **overrides})


@dataclasses.dataclass
class CaseResult:
    rows: list[Row]
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


def time_jitted(fn, *args, repeats: int) -> dict[str, float]:
    """Compile time of a jitted `fn` on `args`, then the median of `repeats` runs after one warm-up."""
    import jax

    jax.clear_caches()  # the parity run already compiled `fn`: measure a cold compile
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        runs.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, "median_s": statistics.median(runs), "min_s": min(runs)}


def runners() -> dict[str, Callable[[Golden, int], CaseResult]]:
    """Case name -> runner(golden, benchmark_repeats). Runners live in `parity_cases`."""
    from lance_jax import parity_cases

    return parity_cases.RUNNERS


def run(golden_dir: str, cases: list[str] | None = None, benchmark: int = 0, out=None,
        config_overrides: dict | None = None) -> list[Row]:
    """Run `cases` (default: every implemented case present in the golden) and print the table."""
    out = out or sys.stdout
    golden = Golden(golden_dir, config_overrides)
    available = golden.cases()
    known = runners()
    if cases is None:
        cases = [c for c in known if c in available]
        pending = [c for c in available if c not in known]
        if pending:
            print(f"# golden cases without a lance-jax runner yet: {', '.join(pending)}", file=out)
    unknown = [c for c in cases if c not in known]
    missing = [c for c in cases if c not in available]
    if unknown or missing:
        raise SystemExit(f"unknown case(s) {unknown} (known: {list(known)}); not in golden: {missing}")
    rows: list[Row] = []
    print(HEADER, file=out)
    for case in cases:
        result = known[case](golden, benchmark)
        for row in result.rows:
            print(row.format(), file=out)
        if result.timings:
            timing = "  ".join(f"{k}={v * 1e3:.2f}ms" for k, v in result.timings.items())
            print(f"# benchmark {case}: {timing}", file=out)
        rows += result.rows
    failed = [r for r in rows if not r.passed]
    print(f"# {len(rows) - len(failed)} passed, {len(failed)} failed", file=out)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--golden", default=os.environ.get("LANCE_GOLDEN", "../shared/golden"))
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all implemented)")
    parser.add_argument("--benchmark", nargs="?", const=10, default=0, type=int, metavar="REPEATS",
                        help="time each case's jitted computation: warm-up, then the median of REPEATS runs (default 10)")
    parser.add_argument("--matmul-precision", default="highest", choices=["highest", "high", "default"],
                        help="jax_default_matmul_precision (parity tolerances assume 'highest')")
    parser.add_argument("--attention-impl", default=None, choices=["auto", "dense", "blockwise"],
                        help="override the model's attention implementation (default: the config's 'auto')")
    parser.add_argument("--attention-block-size", default=None, type=int, help="blockwise attention tile size")
    args = parser.parse_args(argv)
    import jax

    jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    cases = args.cases.split(",") if args.cases else None
    overrides = {k: v for k, v in (("attention_impl", args.attention_impl),
                                   ("attention_block_size", args.attention_block_size)) if v is not None}
    rows = run(args.golden, cases, args.benchmark, config_overrides=overrides)
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
