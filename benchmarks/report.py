"""What every benchmark entry records about the machine, and small formatting helpers."""
from __future__ import annotations

import os
import platform


def machine() -> str:
    """Architecture, CPU model, core count, 1-min load average, jax version and backend."""
    import jax

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()}, {cpu}, {os.cpu_count()} cores, 1-min load {load:.2f}; jax {jax.__version__} "
            f"({jax.default_backend()})")


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f}"
