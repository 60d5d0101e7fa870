"""Shared pieces of the training configs (50 §3-4). Loaded by path from each config file."""
import importlib.util
import os

import ml_collections

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(os.path.dirname(HERE), "models")

# Released fine-tuning values (50 §4.2): token budget 65,536 per rank, drops 0.1 / 0.1 / 0.
TOKENS_PER_RANK = 65536


def model_config(name: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"model_{name}", os.path.join(MODELS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config().model


def base(model: str = "lance_3b_video") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = model_config(model)
    # params: '' = random init | a reference checkpoint folder; ckpt: a converted (to-jax) checkpoint (its model
    # config + Lance params; model_overrides: ModelConfig fields changed on top, e.g. remat_policy)
    c.init = ml_collections.ConfigDict(dict(params="", ckpt="", model_overrides={}))
    c.optimizer = ml_collections.ConfigDict(dict(lr=1e-4, warmup_steps=500, schedule="constant", total_steps=500_000,
                                                 min_lr=1e-6, b1=0.9, b2=0.95, eps=1e-15, clip_norm=1.0,
                                                 weight_decay=0.0))
    c.freeze = ml_collections.ConfigDict(dict(vit=True, vae=True, embed_and_head=True, und=False, patterns=[]))
    c.ema_decay = 0.9999
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.matmul_precision = ""
    c.train = ml_collections.ConfigDict(dict(steps=500_000, log_every=2, save_every=200, keep=3, seed=2026,
                                             timesteps="host"))
    c.data = ml_collections.ConfigDict(dict(
        seed=2026, batch_size=8, token_budget=TOKENS_PER_RANK, drop_overflow=True,
        capacities=dict(und=32768, gen=32768, ce=4096, vit=16384),
        max_bad_fraction=0.05, min_records_for_report=100, fail_on_bad_shard=False, groups=[],
        # curriculum (pipeline.py): (dict(records=N, weights={group name: w}), ...) drawn first, per process;
        # then the groups' own weights. A tuple: absl's --config flags cannot override a list field
        phases=(),
        # real-media records (media_records.py): a tokenizer folder / converted checkpoint, and the converted
        # checkpoint holding the frozen ViT + VAE ('@init' = init.ckpt); '' tokenizer = byte-id smoke path
        tokenizer="", encoder_ckpt="", encoder_dtype="",
        # batches built ahead in a background thread while the device runs a step (data/prefetch.py); 0 = none
        prefetch=2))
    return c


# One entry per released YAML group (50 §4.1). `path` points at our shards (source=shards) or the
# reference Parquet files (source=reference); resolutions are bucket sides, max_duration in seconds.
def group(kind: str, path: str = "", weight: float = 1.0, source: str = "shards") -> dict:
    g = dict(
        t2i=dict(tasks=["t2i"], resolution=768),
        t2v=dict(tasks=["t2v", "ff2v"], task_rates=[0.8, 0.2], resolution=640, max_duration=6.0),
        i2i=dict(tasks=["i2i"], resolution=768, vit_resolution=672, sample_task="edit"),
        v2v=dict(tasks=["v2v"], resolution=640, vit_resolution=616, max_duration=6.0, sample_task="edit"),
        i2t=dict(tasks=["i2t"], vit_resolution=616),
        v2t=dict(tasks=["v2t"], vit_resolution=616, max_duration=2.0),
    )[kind]
    g.update(name=kind, source=source, path=path or f"data/{kind}", weight=weight, text_drop=0.1, vit_drop=0.1,
             timestep_shift=1.0, loss_weight=1.0)
    return g


def stage(kinds, *, ema: bool = True, save_every: int = 10, model: str = "lance_3b_video"):
    c = base(model)
    c.data.groups = [group(k) for k in kinds]
    c.ema_decay = 0.9999 if ema else 0.0
    c.train.save_every = save_every
    return c


