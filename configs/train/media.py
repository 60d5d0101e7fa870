"""Real-media fine-tuning from a converted checkpoint on `write_shards` shards (CPU-sized defaults: the golden
tiny model, 64 px images, small stream capacities).

  python convert_weights.py to-jax --src /work/shared/golden --out /tmp/ckpt
  python -m lance_jax.data.write_shards --input my_images/ --out /tmp/shards
  python train.py --config configs/train/media.py:/tmp/shards --workdir /tmp/run --config.init.ckpt=/tmp/ckpt

The model config and Lance params come from `init.ckpt`; captions are tokenised with its tokenizer and the
media encoded with its frozen VAE (posterior sample) and ViT (`data.tokenizer` / `data.encoder_ckpt` =
'@init'). Raise `resolution` / `vit_resolution` / `capacities` for real models.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_common", os.path.join(os.path.dirname(os.path.abspath(__file__)), "_common.py"))
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)


def get_config(shards: str = "data/media"):
    """shards: the `write_shards` output folder (the config argument after ':')."""
    c = _common.base("tiny")  # `model` is replaced by init.ckpt's config
    c.optimizer.warmup_steps = 2
    c.optimizer.lr = 1e-4
    c.ema_decay = 0.0
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.train.update(dict(steps=4, log_every=1, save_every=2, keep=2, seed=0, timesteps="device"))
    c.data.update(dict(seed=0, batch_size=1, token_budget=None, drop_overflow=True, tokenizer="@init",
                       encoder_ckpt="@init", capacities=dict(und=1024, gen=256, ce=128, vit=64),
                       max_bad_fraction=0.5, min_records_for_report=20))
    c.data.groups = [dict(name="media", source="shards", path=shards or "data/media", tasks=["t2i", "t2v", "ff2v", "i2i", "i2t"],
                          task_rates=[1.0, 0.8, 0.2, 1.0, 1.0], resolution=64, vit_resolution=56, max_duration=2.0,
                          weight=1.0, loss_weight=1.0, text_drop=0.1, vit_drop=0.1)]
    return c
