"""Train Lance.

  python train.py --config configs/train/tiny_synthetic.py --workdir /tmp/run [--config.train.steps=20]

Re-running the same command resumes from the latest checkpoint in WORKDIR/checkpoints. Metrics go to the
console, a tqdm bar, and TensorBoard event files in WORKDIR/tb (tensorboardX).

Multi-host: run the same command on every process with LANCE_COORDINATOR=host:port, LANCE_NUM_PROCESSES
and LANCE_PROCESS_ID set (or LANCE_DISTRIBUTED=auto on a cluster JAX detects); WORKDIR must be shared.
"""
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config (configs/train/*.py)")
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints + TensorBoard logs")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a tqdm progress bar")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from lance_jax import sharding as S

    S.initialize_distributed()  # from LANCE_* variables (no-op without them); before any JAX backend starts
    import jax

    cfg = _CONFIG.value
    if cfg.get("matmul_precision"):
        jax.config.update("jax_default_matmul_precision", cfg.matmul_precision)
    from lance_jax.train.loop import run

    run(cfg, _WORKDIR.value, progress=_PROGRESS.value)


if __name__ == "__main__":
    app.run(main)
