"""Key table of the language model and the generation adapters (10-backbone §7.1-7.2).

One declarative table says, for every tensor of the reference state dict, where it lives in our
param tree and whether it is a PyTorch Linear weight (out, in) that becomes a kernel (in..., out...).
"""
from __future__ import annotations

import os

import numpy as np

from lance_jax.config import ModelConfig
from lance_jax.convert.keys import KeyRule, check_reference_keys, params_from_tensors, tensors_from_params
from lance_jax.convert.safetensors_io import read_tensors, safetensors_header

GEN = "_moe_gen"

# Reference keys that are never loaded: the fixed sin-cos table is recomputed (10-backbone §7.5).
DROPPED_KEYS = ("latent_pos_embed.pos_embed",)

# Keys owned by the ViT, which has its own table.
VIT_PREFIX = "vit_model."


# (reference name under `language_model.model.layers.{i}.`, our path under the layer, kind).
# `{g}` is "" for the und stream and "_moe_gen" for the gen stream.
_LAYER_TABLE = (
    ("input_layernorm{g}.weight", ("input_layernorm{g}", "scale"), "copy"),
    ("post_attention_layernorm{g}.weight", ("post_attention_layernorm{g}", "scale"), "copy"),
    ("self_attn.q_proj{g}.weight", ("self_attn", "q_proj{g}", "kernel"), "linear"),
    ("self_attn.q_proj{g}.bias", ("self_attn", "q_proj{g}", "bias"), "copy"),
    ("self_attn.k_proj{g}.weight", ("self_attn", "k_proj{g}", "kernel"), "linear"),
    ("self_attn.k_proj{g}.bias", ("self_attn", "k_proj{g}", "bias"), "copy"),
    ("self_attn.v_proj{g}.weight", ("self_attn", "v_proj{g}", "kernel"), "linear"),
    ("self_attn.v_proj{g}.bias", ("self_attn", "v_proj{g}", "bias"), "copy"),
    ("self_attn.o_proj{g}.weight", ("self_attn", "o_proj{g}", "kernel"), "linear_in2"),
    ("self_attn.q_norm{g}.weight", ("self_attn", "q_norm{g}", "scale"), "qk_norm"),
    ("self_attn.k_norm{g}.weight", ("self_attn", "k_norm{g}", "scale"), "qk_norm"),
    ("mlp{g}.gate_proj.weight", ("mlp{g}", "gate_proj", "kernel"), "linear"),
    ("mlp{g}.up_proj.weight", ("mlp{g}", "up_proj", "kernel"), "linear"),
    ("mlp{g}.down_proj.weight", ("mlp{g}", "down_proj", "kernel"), "linear"),
)

# (reference key, our path, kind); `{g}` as above.
_GLOBAL_TABLE = (
    ("language_model.model.embed_tokens.weight", ("language_model", "embed_tokens", "embedding"), "embedding"),
    ("language_model.model.norm{g}.weight", ("language_model", "norm{g}", "scale"), "copy"),
    ("language_model.lm_head.weight", ("language_model", "lm_head", "kernel"), "linear"),
    ("time_embedder.mlp.0.weight", ("time_embedder", "mlp_0", "kernel"), "linear"),
    ("time_embedder.mlp.0.bias", ("time_embedder", "mlp_0", "bias"), "copy"),
    ("time_embedder.mlp.2.weight", ("time_embedder", "mlp_2", "kernel"), "linear"),
    ("time_embedder.mlp.2.bias", ("time_embedder", "mlp_2", "bias"), "copy"),
    ("vae2llm.weight", ("vae2llm", "kernel"), "linear"),
    ("vae2llm.bias", ("vae2llm", "bias"), "copy"),
    ("llm2vae.weight", ("llm2vae", "kernel"), "linear"),
    ("llm2vae.bias", ("llm2vae", "bias"), "copy"),
)

_KINDS = {
    "copy": dict(),
    "qk_norm": dict(),
    "embedding": dict(ref_ndim=2),
    "linear": dict(transpose=True),
    "linear_in2": dict(transpose=True, in_dims=2),
}


def _streams(cfg: ModelConfig, kind: str) -> list[str]:
    if kind == "qk_norm":
        return [g for g, on in (("", cfg.qk_norm_und), (GEN, cfg.qk_norm_gen and cfg.dual_stream)) if on]
    return ["", GEN] if cfg.dual_stream else [""]


def _fmt(template, g):
    return template.format(g=g) if isinstance(template, str) else tuple(p.format(g=g) for p in template)


def key_table(cfg: ModelConfig) -> list[KeyRule]:
    """Every reference tensor of the language model and generation adapters for `cfg`, in file order."""
    rules = []
    for ref, path, kind in _GLOBAL_TABLE:
        streams = _streams(cfg, kind) if "{g}" in ref else [""]
        rules += [KeyRule(_fmt(ref, g), _fmt(path, g), **_KINDS[kind]) for g in streams]
    for i in range(cfg.num_layers):
        layer_path = ("language_model", "layers") if cfg.scan_layers else ("language_model", f"layers_{i}")
        for ref, path, kind in _LAYER_TABLE:
            for g in _streams(cfg, kind):
                rules.append(KeyRule(
                    f"language_model.model.layers.{i}.{_fmt(ref, g)}", layer_path + _fmt(path, g), layer=i,
                    stacked=cfg.scan_layers, **_KINDS[kind]
                ))
    return rules


def param_shapes(cfg: ModelConfig) -> dict:
    """Nested dict of our param shapes (from abstract evaluation, nothing allocated)."""
    import flax.linen as nn
    import jax

    from lance_jax.models.lance import init_params
    from lance_jax.packing import dummy_stream_batch

    abstract = jax.eval_shape(lambda r: init_params(cfg, r, dummy_stream_batch(cfg)), jax.random.PRNGKey(0))
    return jax.tree.map(lambda x: tuple(x.shape), nn.unbox(abstract))


def load_reference_params(path: str, cfg: ModelConfig, *, ignore_prefixes=(VIT_PREFIX,)) -> dict:
    """Our (unboxed) param tree as NumPy arrays in cfg.param_dtype, from a reference `model.safetensors`.

    `path` may be the file or its folder. Keys under `ignore_prefixes` (by default the ViT, which has its
    own table) are skipped; every other key must be in the table or in DROPPED_KEYS.
    """
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    rules = key_table(cfg)
    shapes = param_shapes(cfg)
    header = safetensors_header(path)
    check_reference_keys(header, rules, shapes, ignore_prefixes=ignore_prefixes, dropped=DROPPED_KEYS)
    return params_from_tensors(read_tensors(path, [r.ref for r in rules]), rules, shapes, np.dtype(cfg.param_dtype))


def reference_tensors(params: dict, cfg: ModelConfig):
    """The inverse direction: yield (reference key, array) for every rule, from our param tree."""
    return tensors_from_params(params, key_table(cfg))
