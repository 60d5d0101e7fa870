"""Metric writers: console lines and TensorBoard event files (tensorboardX, no TensorFlow needed)."""
from __future__ import annotations

import logging
import math
import os
from typing import Mapping

import numpy as np

log = logging.getLogger("lance_jax.train")


def scalars(metrics: Mapping) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        if a.size == 1:
            out[k] = float(a.reshape(()))
    return out


def format_line(step: int, values: Mapping[str, float]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) and not float(v).is_integer() or not math.isfinite(v) else f"{int(v)}"
    return f"step {step}: " + " ".join(f"{k}={fmt(v)}" for k, v in sorted(values.items()))


class MetricWriter:
    """write(step, metrics) -> console (logging + optional print hook) and TensorBoard under `logdir`."""

    def __init__(self, logdir: str | None, *, console=print):
        self.console = console
        self.tb = None
        if logdir:
            from tensorboardX import SummaryWriter

            os.makedirs(logdir, exist_ok=True)
            self.tb = SummaryWriter(logdir)

    def write(self, step: int, metrics: Mapping, *, prefix: str = "train/"):
        values = scalars(metrics)
        if self.console:
            self.console(format_line(step, values))
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(prefix + k, v, step)
            self.tb.flush()
        return values

    def close(self):
        if self.tb is not None:
            self.tb.close()


class Average:
    """Running means of scalar metrics between log lines (counters such as `skipped` keep their last value)."""

    LAST = ("skipped", "lr", "step")

    def __init__(self):
        self.sums, self.n, self.last = {}, 0, {}

    def add(self, metrics: Mapping):
        self.n += 1
        for k, v in scalars(metrics).items():
            if k in self.LAST:
                self.last[k] = v
            else:
                self.sums[k] = self.sums.get(k, 0.0) + v

    def result(self) -> dict[str, float]:
        out = {k: v / max(self.n, 1) for k, v in self.sums.items()}
        out.update(self.last)
        self.sums, self.n, self.last = {}, 0, {}
        return out
