"""Train-step throughput on CPU at a small config: tokens/s and step time (median of warm steps).

  python benchmarks/train_step.py [--layers 3] [--hidden 64] [--steps 5] [--append benchmarks/results.md]
"""
import argparse
import datetime
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/train/tiny_synthetic.py")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--append", default="")
    a = ap.parse_args()
    from lance_jax import sharding as S
    from lance_jax.config import config_dict_from_file
    from lance_jax.train import loop as L
    from lance_jax.train import step as Sp

    c = config_dict_from_file(a.config)
    if a.layers:
        c.model.num_layers = a.layers
    if a.hidden:
        c.model.hidden_size = a.hidden
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    mesh = S.make_mesh({"fsdp": 1}, jax.devices()[:1])
    b = L.build(c, mesh=mesh)
    state, it = b["state"], b["data"]
    batches = [next(it) for _ in range(a.steps + 1)]
    times, tokens = [], []
    with S.use_mesh(mesh):
        t0 = time.perf_counter()
        state, m = b["step"](state, batches[0], Sp.step_rng(state))
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        for batch in batches[1:]:
            t0 = time.perf_counter()
            state, m = b["step"](state, batch, Sp.step_rng(state))
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
            tokens.append(int((batch["sample"] >= 0).sum()))
    step_s = statistics.median(times)
    slots = batches[0]["sample"].size
    line = (f"train_step {a.config} layers={c.model.num_layers} hidden={c.model.hidden_size} "
            f"batch={c.data.batch_size}x{slots // c.data.batch_size} slots: first call (compile) {compile_s:.1f} s, "
            f"step {step_s * 1e3:.1f} ms (median of {len(times)}), {statistics.mean(tokens) / step_s:.0f} real tokens/s, "
            f"{slots / step_s:.0f} slots/s, device {jax.devices()[0].platform} x1")
    print(line)
    if a.append:
        with open(a.append, "a") as f:
            f.write(f"\n## {datetime.date.today().isoformat()} train step (benchmarks/train_step.py)\n\n- {line}\n")


if __name__ == "__main__":
    main()
