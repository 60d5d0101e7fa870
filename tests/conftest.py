"""Shared test setup: 8 fake CPU devices for sharding tests, fp32 'highest' matmuls, the golden set."""
import os
from pathlib import Path

# Must happen before jax initialises its backends: sharding tests need a multi-device mesh.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

# Parity tolerances (golden README) assume full-precision fp32 matmuls.
jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("LANCE_GOLDEN", REPO.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden():
    """The golden parity set (LANCE_GOLDEN, default ../shared/golden)."""
    from lance_jax.parity import Golden

    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden directory {GOLDEN_DIR} not found (set LANCE_GOLDEN)")
    return Golden(str(GOLDEN_DIR))


@pytest.fixture(scope="session")
def golden_cfg(golden):
    return golden.model_config()
