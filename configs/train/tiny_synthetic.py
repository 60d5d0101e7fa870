"""Tiny synthetic run for CPU (seconds): the golden-shaped tiny model, random latents / ViT embeddings,
a t2i / i2i / ff2v / i2t mixture packed into 2 stream batches of 256 + 128 rows per step.

  python train.py --config configs/train/tiny_synthetic.py --workdir /tmp/lance_tiny
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_common", os.path.join(os.path.dirname(os.path.abspath(__file__)), "_common.py"))
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)


def get_config():
    c = _common.base("tiny")
    c.optimizer.warmup_steps = 2
    c.optimizer.lr = 1e-3
    c.ema_decay = 0.999
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.train.update(dict(steps=6, log_every=2, save_every=3, keep=2, seed=0, timesteps="device"))
    c.data.update(dict(seed=0, batch_size=2, token_budget=None, drop_overflow=True,
                       capacities=dict(und=256, gen=128, ce=32, vit=64)))
    c.data.groups = [
        dict(name="gen", source="synthetic", tasks=["t2i", "i2i", "ff2v"], task_rates=[0.5, 0.3, 0.2],
             latent_grids=[(1, 2, 2), (2, 2, 3)], vit_grid=(1, 4, 4), weight=2.0, loss_weight=1.0,
             num_records=1000, text_drop=0.1, vit_drop=0.1),
        dict(name="und", source="synthetic", tasks=["i2t"], vit_grid=(1, 4, 4), weight=1.0, loss_weight=1.0,
             num_records=1000),
    ]
    return c
