"""Key table of the Qwen2.5-VL vision tower (`vit.safetensors`, or `vit_model.*` inside the Lance file; 40 §B.10)."""
from __future__ import annotations

from lance_jax.convert.keys import KeyRule

_LINEAR, _LINEAR_IN2, _COPY = dict(transpose=True), dict(transpose=True, in_dims=2), dict()

# (reference name under `blocks.{i}.`, our path under the block, rule kind)
_BLOCK_TABLE = (
    ("norm1.weight", ("norm1", "scale"), _COPY),
    ("norm2.weight", ("norm2", "scale"), _COPY),
    ("attn.qkv.weight", ("attn", "qkv", "kernel"), _LINEAR),
    ("attn.qkv.bias", ("attn", "qkv", "bias"), _COPY),
    ("attn.proj.weight", ("attn", "proj", "kernel"), _LINEAR_IN2),
    ("attn.proj.bias", ("attn", "proj", "bias"), _COPY),
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), _LINEAR),
    ("mlp.gate_proj.bias", ("mlp", "gate_proj", "bias"), _COPY),
    ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), _LINEAR),
    ("mlp.up_proj.bias", ("mlp", "up_proj", "bias"), _COPY),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), _LINEAR),
    ("mlp.down_proj.bias", ("mlp", "down_proj", "bias"), _COPY),
)

_GLOBAL_TABLE = (
    # Conv3d weight (D, C, tp, p, p) -> kernel (C, tp, p, p, D)
    ("patch_embed.proj.weight", ("patch_embed", "proj", "kernel"), dict(perm=(1, 2, 3, 4, 0))),
    ("merger.ln_q.weight", ("merger", "ln_q", "scale"), _COPY),
    ("merger.mlp.0.weight", ("merger", "mlp_0", "kernel"), _LINEAR),
    ("merger.mlp.0.bias", ("merger", "mlp_0", "bias"), _COPY),
    ("merger.mlp.2.weight", ("merger", "mlp_2", "kernel"), _LINEAR),
    ("merger.mlp.2.bias", ("merger", "mlp_2", "bias"), _COPY),
)


def vit_key_table(cfg, prefix: str = "") -> list[KeyRule]:
    """Every ViT tensor: prefix "" for `vit.safetensors`, "vit_model." inside the Lance checkpoint.

    Block params are one stacked leaf per tensor kind under `blocks` (scan_blocks) or `blocks_{i}`.
    """
    rules = [KeyRule(prefix + ref, path, **kind) for ref, path, kind in _GLOBAL_TABLE]
    for i in range(cfg.depth):
        block = ("blocks",) if cfg.scan_blocks else (f"blocks_{i}",)
        rules += [KeyRule(f"{prefix}blocks.{i}.{ref}", block + path, layer=i, stacked=cfg.scan_blocks, **kind)
                  for ref, path, kind in _BLOCK_TABLE]
    return rules
