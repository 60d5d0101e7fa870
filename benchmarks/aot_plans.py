"""AOT memory / FLOP plans of the 3B video model on 8 devices, appended to benchmarks/results.md.

    python benchmarks/aot_plans.py [--mesh h100x8] [--step-time 10]

Runs `python -m lance_jax.plan_memory` (which compiles on 8 fake CPU devices when no 8-device platform
is visible) for the train step (65,536 tokens per device) and the 480p/121-frame t2v denoise step.
"""
import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = str(REPO / "configs/models/lance_3b_video.py")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mesh", default="h100x8")
    ap.add_argument("--step-time", default="10")
    ap.add_argument("--results", default=str(REPO / "benchmarks/results.md"))
    a = ap.parse_args()
    runs = [("train", f"{a.mesh}:train", []), ("train", f"{a.mesh}:train_cp", []),
            ("t2v", f"{a.mesh}:infer", []), ("t2i", f"{a.mesh}:infer", [])]
    rc = 0
    for task, mesh, extra in runs:
        cmd = [sys.executable, "-m", "lance_jax.plan_memory", "--model", MODEL, "--mesh", mesh, "--task", task,
               "--step-time", a.step_time, "--results", a.results, *extra]
        print("+", " ".join(cmd), flush=True)
        rc |= subprocess.call(cmd, cwd=str(REPO))
    return rc


if __name__ == "__main__":
    sys.exit(main())
