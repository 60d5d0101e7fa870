"""A converted checkpoint folder -> the pieces `LanceRunner` holds: config, tokenizer, LLM params (sharded under a
mesh), the ViT and the autoencoder (the checkpoint's items, or reference weights named by path).

Every failure is an `InferenceError` that names the checkpoint and what is missing."""
from __future__ import annotations

import json
import os

import jax

from lance_jax.pipelines.requests import InferenceError


def llm_json(ckpt: str) -> dict:
    """The reference's llm_config.json of the checkpoint ({} when the folder has none)."""
    path = os.path.join(ckpt, "reference", "model", "llm_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def cast_params(tree, param_dtype: str | None):
    """Floating leaves cast to param_dtype (None or 'keep': unchanged)."""
    if not param_dtype or param_dtype == "keep":
        return tree
    import jax.numpy as jnp

    dt = jnp.dtype(param_dtype)
    return jax.tree.map(lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def model_config(ckpt: str, dtype: str | None):
    """(converter manifest, ModelConfig with the compute dtype overridden when given)."""
    from lance_jax.convert import converter

    try:
        manifest = converter.read_manifest(ckpt)
    except (FileNotFoundError, ValueError) as err:
        raise InferenceError(str(err)) from None
    if dtype not in (None, "float32", "bfloat16"):
        raise InferenceError(f"dtype {dtype!r} must be float32 or bfloat16")
    return manifest, converter.checkpoint_config(ckpt, **({} if dtype is None else {"dtype": dtype}))


def tokenizer(ckpt: str):
    from lance_jax.tokenizer import Tokenizer

    try:
        return Tokenizer.from_folder(os.path.join(ckpt, "reference", "model"))
    except (FileNotFoundError, ValueError) as err:
        raise InferenceError(f"checkpoint {ckpt}: no usable tokenizer under reference/model ({err})") from None


def restored_params(ckpt: str, cfg, mesh_shape: dict | None):
    """(mesh or None, the checkpoint's param items); under a mesh the LLM params are placed with the logical-axis
    rules as they are read."""
    from lance_jax.convert import converter

    mesh, shardings = None, None
    if mesh_shape:
        from lance_jax import packing, sharding
        from lance_jax.models.lance import init_params

        try:
            mesh = sharding.make_mesh(mesh_shape)
        except ValueError as err:
            raise InferenceError(f"mesh {mesh_shape}: {err}") from None
        boxed = jax.eval_shape(lambda r: init_params(cfg, r, packing.dummy_stream_batch(cfg)), jax.random.PRNGKey(0))
        shardings = {"lance": sharding.param_shardings(boxed, mesh)}
    return mesh, converter.restore_params(ckpt, shardings)


def vit(manifest: dict, params, path: str | None, dtype: str, param_dtype: str | None):
    """(VitConfig, params) from reference weights at `path`, else the checkpoint's item; (None, None) if neither."""
    from lance_jax.models.vit import VitConfig, load_vit_config, load_vit_params

    if path:
        cfg = load_vit_config(path, dtype=dtype)
        return cfg, cast_params(load_vit_params(path, cfg), param_dtype)
    raw = manifest.get("reference", {}).get("vit_config")
    if params is None or not raw:
        return None, None
    return VitConfig(**dict(raw, dtype=dtype)), cast_params(params, param_dtype)


def autoencoder(ckpt: str, model_cfg, manifest: dict, params, path: str | None, param_dtype: str | None):
    """(codec config, params): the Wan VAE from reference weights at `path` or the checkpoint's item, or the
    parameter-free pixel autoencoder when the model config names it; (None, None) without a VAE."""
    from lance_jax.models.autoencoder import codec
    from lance_jax.models.vae import VaeConfig, load_vae_config, load_vae_params

    dtype = model_cfg.dtype
    if path and model_cfg.autoencoder == "pixel":
        raise InferenceError(f"vae_path {path!r} given, but checkpoint {ckpt} uses the parameter-free pixel "
                             f"autoencoder (model config autoencoder='pixel')")
    if path:
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        has_cfg = os.path.isfile(os.path.join(folder, "vae_config.json"))
        cfg = load_vae_config(folder, dtype=dtype) if has_cfg else VaeConfig(dtype=dtype)
        return cfg, cast_params(load_vae_params(path, cfg), param_dtype)
    cfg, params = codec(model_cfg, manifest.get("reference", {}).get("vae_config"), params, dtype=dtype)
    return cfg, (params if cfg is None else cast_params(params, param_dtype))
