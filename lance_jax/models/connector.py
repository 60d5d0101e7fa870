"""The optional ViT -> LLM connector of `vit_type = qwen2_5_vl` (40 §B.9): fc1 -> GELU-tanh -> fc2.

Not used by the released checkpoints (`qwen_2_5_vl_original` feeds the merger output directly);
kept for the golden `connector_variant` and for configs that select it.
"""
from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax.numpy as jnp

from lance_jax.convert.keys import KeyRule
from lance_jax.layers.linear import dense
from lance_jax.models.vit import load_strict, read_json

_CONNECTOR_ACTS = {"gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
                   "gelu": lambda x: nn.gelu(x, approximate=False)}


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    """The `vit_type = qwen2_5_vl` connector: fc1 (in -> out) -> act -> fc2 (out -> out), both biased."""

    in_dim: int
    out_dim: int
    act: str = "gelu_pytorch_tanh"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.act not in _CONNECTOR_ACTS:
            raise ValueError(f"unsupported connector_act {self.act!r}; expected one of {sorted(_CONNECTOR_ACTS)}")


def load_connector_config(path_or_folder: str, **overrides) -> ConnectorConfig:
    """ConnectorConfig from a golden-style `connector_config.json` ({in_dim, out_dim, connector_act})."""
    d = read_json(path_or_folder, "connector_config.json")
    kw = dict(in_dim=int(d["in_dim"]), out_dim=int(d["out_dim"]), act=d.get("connector_act", "gelu_pytorch_tanh"))
    return ConnectorConfig(**{**kw, **overrides})


class MLPConnector(nn.Module):
    """x (..., in_dim) -> (..., out_dim)."""

    cfg: ConnectorConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        kw = dict(use_bias=True, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        x = dense(cfg.out_dim, ("embed", "mlp"), name="fc1", **kw)(x)
        return dense(cfg.out_dim, ("mlp", "embed"), name="fc2", **kw)(_CONNECTOR_ACTS[cfg.act](x))


def connector_key_table(prefix: str = "connector.") -> list[KeyRule]:
    """`connector.fc{1,2}.weight` (Linear, transposed) and `.bias` (copied)."""
    rules = []
    for fc in ("fc1", "fc2"):
        rules += [KeyRule(f"{prefix}{fc}.weight", (fc, "kernel"), transpose=True),
                  KeyRule(f"{prefix}{fc}.bias", (fc, "bias"))]
    return rules


def load_connector_params(path_or_folder: str, cfg: ConnectorConfig, prefix: str = "connector.") -> dict:
    """Connector params from `connector.safetensors` (a folder picks that file); strict like load_vit_params."""
    path = path_or_folder
    if os.path.isdir(path):
        path = os.path.join(path, "connector.safetensors")
    shapes = {"fc1": {"kernel": (cfg.in_dim, cfg.out_dim), "bias": (cfg.out_dim,)},
              "fc2": {"kernel": (cfg.out_dim, cfg.out_dim), "bias": (cfg.out_dim,)}}
    return load_strict(path, connector_key_table(prefix), shapes, prefix, cfg.param_dtype)
