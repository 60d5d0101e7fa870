"""Demo checkpoints in the converted-checkpoint layout `infer.py` and the training encoders read
(`lance_checkpoint.json` + orbax items `language_model`, `glue`, `vit` + `reference/model` tokenizer).

The demo has no reference weights to convert: its ViT is a small random (frozen) Qwen2.5-VL tower and its
codec is the parameter-free pixel autoencoder (named by the model config, so there is no `vae` item).
`write_checkpoint` is used twice: before training (random Lance params: the encoders the data pipeline
runs) and after it (`export_trained`: the trained -- EMA when kept -- params next to the same ViT).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np

from lance_jax.config import ModelConfig
from lance_jax.convert import converter, orbax_io
from lance_jax.models.vit import VisionTransformer, VitConfig, vit_init_inputs

LAYOUT = "demo"


def demo_vit_config(out_hidden_size: int, **overrides) -> VitConfig:
    """A two-block Qwen2.5-VL tower (window block, then full attention) with a width-`out_hidden_size` merger."""
    kw = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=out_hidden_size,
              fullatt_block_indexes=(1,), window_size=112)
    return VitConfig(**{**kw, **overrides})


def random_vit_params(cfg: VitConfig, seed: int = 0) -> dict:
    """Flax-initialised ViT params (host NumPy): random features, frozen for the whole demo."""
    patches, plan = vit_init_inputs(cfg)
    params = VisionTransformer(cfg).init(jax.random.PRNGKey(seed), patches, plan)["params"]
    return jax.tree.map(np.asarray, nn.unbox(params))


def write_checkpoint(out: str, cfg: ModelConfig, lance_params: dict, vit_cfg: VitConfig, vit_params: dict,
                     tokenizer_dir: str, *, overwrite: bool = True, note: str = "") -> dict:
    """Write a converted-layout checkpoint at `out` (atomically: nothing half-written remains); -> manifest."""
    if cfg.autoencoder != "pixel":
        raise ValueError(f"demo checkpoints carry no VAE weights: the model config must name the pixel autoencoder, "
                         f"not {cfg.autoencoder!r}")

    def build(tmp: str) -> dict:
        orbax_io.save_tree(os.path.join(tmp, "language_model"), lance_params["language_model"])
        orbax_io.save_tree(os.path.join(tmp, "glue"), {k: v for k, v in lance_params.items() if k != "language_model"})
        orbax_io.save_tree(os.path.join(tmp, "vit"), vit_params)
        model_dir = os.path.join(tmp, "reference", "model")
        shutil.copytree(tokenizer_dir, model_dir)
        with open(os.path.join(model_dir, "llm_config.json"), "w") as f:
            json.dump(dict(max_position_embeddings=4096, note="lance-jax demo model (no reference weights)"), f)
        manifest = dict(format=converter.FORMAT, version=converter.FORMAT_VERSION,
                        items=["language_model", "glue", "vit"], model_config=dataclasses.asdict(cfg),
                        dtype="keep", reference=dict(layout=LAYOUT, vit_config=dataclasses.asdict(vit_cfg),
                                                     files={"model": sorted(os.listdir(model_dir))}, note=note),
                        options={})
        with open(os.path.join(tmp, converter.MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        return manifest

    return converter.atomic_output(out, overwrite, build)


def read_vit(ckpt: str) -> tuple[VitConfig, dict]:
    """(ViT config, params) of a demo checkpoint (to carry the same frozen tower into the export)."""
    manifest = converter.read_manifest(ckpt)
    return VitConfig(**manifest["reference"]["vit_config"]), orbax_io.restore(os.path.join(ckpt, "vit"))


def export_trained(config, workdir: str, encoder_ckpt: str, out: str) -> dict:
    """The latest training checkpoint under `workdir` (EMA params when the run kept them) -> a demo checkpoint
    at `out` with the ViT and tokenizer of `encoder_ckpt`; -> manifest (with the exported step in `note`)."""
    from lance_jax.train import checkpoint as C
    from lance_jax.train import loop as L

    built = L.build(config)
    ckpt = C.Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(config.train.keep))
    try:
        state, _, step = ckpt.restore(C.abstract_like(built["state"], built["shardings"]))
    finally:
        ckpt.close()
    params = state.ema_params if state.ema_params is not None else state.params
    vit_cfg, vit_params = read_vit(encoder_ckpt)
    kind = "ema" if state.ema_params is not None else "raw"
    return write_checkpoint(out, built["cfg"], jax.device_get(params), vit_cfg, vit_params,
                            os.path.join(encoder_ckpt, "reference", "model"), note=f"step {step} ({kind} params)")
