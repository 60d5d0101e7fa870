"""Trainable-parameter masks (50 §3.5).

The ViT and the VAE are not in the Lance param tree: the step consumes their outputs (ViT embeddings,
VAE latents), so they are frozen by construction; `freeze.vit/vae = False` is rejected until they
are trained in-graph. Inside the tree:
  embed_and_head  language_model/embed_tokens + language_model/lm_head  (released recipe: frozen)
  und             every language_model param without `moe_gen` in its name (embed, lm_head, final
                  und norm included) = the reference's `freeze_und_params`
  patterns        extra regexes matched against '/'-joined paths
"""
from __future__ import annotations

import re
from typing import Any, Iterable

import jax


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def frozen_predicate(freeze_cfg) -> Any:
    """path string -> True when the param is frozen."""
    if not freeze_cfg.get("vit", True) or not freeze_cfg.get("vae", True):
        raise NotImplementedError("training the ViT or the VAE is not supported: they run outside the grad graph")
    patterns: list[str] = list(freeze_cfg.get("patterns", ()) or ())
    if freeze_cfg.get("embed_and_head", True):
        patterns += [r"^language_model/embed_tokens/", r"^language_model/lm_head/"]
    und = bool(freeze_cfg.get("und", False))
    compiled = [re.compile(p) for p in patterns]

    def frozen(path: str) -> bool:
        if und and path.startswith("language_model/") and "moe_gen" not in path:
            return True
        return any(c.search(path) for c in compiled)

    return frozen


def trainable_mask(params, freeze_cfg) -> Any:
    """Bool pytree like `params`: True = trained."""
    frozen = frozen_predicate(freeze_cfg)
    return jax.tree_util.tree_map_with_path(lambda p, _: not frozen(path_str(p)), params)


def frozen_paths(mask) -> Iterable[str]:
    return [path_str(p) for p, t in jax.tree_util.tree_flatten_with_path(mask)[0] if not t]
