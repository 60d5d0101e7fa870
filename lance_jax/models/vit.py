"""Qwen2.5-VL vision tower (40 §B) as Flax modules, plus its key table and strict loader.

`VisionTransformer` maps packed patches (N, C·tp·p·p) of k items to merged tokens (N/merge², out) in
natural raster order `(item, ti, hb, wb)`. Its second input is a `VitPlan` built on the host from
`grid_thw` (`vit_layout.vit_plan`); `encode` wraps plan + jitted call for users.

Numerics follow the reference (40 §C.1): RMSNorm and the rotary application in fp32, softmax in
fp32, everything else in `cfg.dtype` (float32 for parity, bfloat16 for the released checkpoints,
whose bf16-rounded rotary tables are reproduced by `rope_bf16`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lance_jax.convert.keys import KeyRule, check_reference_keys, params_from_tensors, tensors_from_params
from lance_jax.convert.vit_keys import vit_key_table
from lance_jax.convert.safetensors_io import read_tensors, safetensors_header
from lance_jax.layers.attention import attention
from lance_jax.layers.linear import dense
from lance_jax.layers.masking import MODE_FULL, MaskTokens
from lance_jax.layers.norms import RMSNorm
from lance_jax.layers.rotary import rotate_half
from lance_jax.models.vit_layout import Segments, VitPlan, vit_plan

__all__ = [
    "VitConfig", "load_vit_config", "VisionTransformer", "vit_key_table", "vit_param_shapes", "load_vit_params",
    "vit_reference_tensors", "encode", "vit_apply_fn", "VitPlan", "vit_plan",
]

# Qwen2_5_VLVisionConfig defaults for the structural fields; the sizes (hidden 3584 etc. are the 7B
# model's) must come from the file (40 §B.1).
_STRUCTURE_DEFAULTS = dict(in_channels=3, patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                           fullatt_block_indexes=(7, 15, 23, 31))
_REQUIRED = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size")


@dataclasses.dataclass(frozen=True)
class VitConfig:
    """Hyper-parameters of the vision tower (40 §B.1) and how to run it."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None: bf16-rounded rotary tables exactly when computing in bf16, as the reference does after
    # `model.to(bfloat16)` (40 §B.5); the fp32 goldens have exact tables.
    rope_bf16: bool | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_blocks: bool = True  # params `blocks` stacked over depth (else `blocks_{i}`)
    attention_impl: str = "auto"  # per segment batch: 'dense', 'blockwise' or 'auto'
    attention_block_size: int = 512
    dense_attention_max_len: int = 1024  # 'auto': segments longer than this go blockwise

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 (2-D rotary halves)")
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ValueError(f"window_size {self.window_size} not a multiple of patch*merge")
        if self.attention_impl not in ("auto", "dense", "blockwise"):
            raise ValueError(f"attention_impl {self.attention_impl!r} not in ('auto', 'dense', 'blockwise')")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name} {getattr(self, name)!r} not in ('float32', 'bfloat16', 'float16')")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} outside [0, {self.depth})")
        object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2

    @property
    def window_merged(self) -> int:
        """Window side in merged tokens (4 for 112 px windows of 14 px patches merged 2x2)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def window_patches(self) -> int:
        return (self.window_merged * self.spatial_merge_size) ** 2

    @property
    def rope_bf16_tables(self) -> bool:
        return self.dtype == "bfloat16" if self.rope_bf16 is None else bool(self.rope_bf16)

    def replace(self, **kw) -> "VitConfig":
        return dataclasses.replace(self, **kw)


def read_json(path_or_folder: str, name: str) -> dict:
    path = os.path.join(path_or_folder, name) if os.path.isdir(path_or_folder) else path_or_folder
    with open(path) as f:
        return json.load(f)


def load_vit_config(path_or_folder: str, **overrides) -> VitConfig:
    """VitConfig from a `Qwen2.5-VL-ViT/config.json` (or its folder); `overrides` set run options (dtype...)."""
    d = read_json(path_or_folder, "config.json")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ValueError(f"ViT config.json lacks {missing} (sizes are never defaulted)")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported ViT hidden_act {d['hidden_act']!r} (only silu)")
    if d.get("patch_size", 14) != d.get("spatial_patch_size", d.get("patch_size", 14)):
        raise ValueError("patch_size and spatial_patch_size differ")
    kw = {k: int(d[k]) for k in _REQUIRED}
    kw.update({k: d.get(k, v) for k, v in _STRUCTURE_DEFAULTS.items()})
    kw["fullatt_block_indexes"] = tuple(int(i) for i in kw["fullatt_block_indexes"])
    kw.update(overrides)
    return VitConfig(**kw)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


def _rope(x, cos, sin):
    """Rotate-half rotary in fp32 (reference casts q/k up), x (N, heads, Dh), cos/sin (N, Dh)."""
    xf = x.astype(jnp.float32)
    return (xf * cos[:, None] + rotate_half(xf) * sin[:, None]).astype(x.dtype)


def segment_attention(q, k, v, seg: Segments, cfg: VitConfig):
    """Bidirectional attention inside each segment. q, k, v (N, heads, Dh) -> (N, heads, Dh).

    Rows are gathered into the (S, L) segment batch; the mask lets a slot see the slots of its row with
    the same sample id; padding (id -1) attends nothing, is attended by nothing and is never read back.
    """
    S, L = seg.gather.shape
    tokens = MaskTokens(
        order=jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (S, L)),
        sample=seg.sample,
        split=jnp.zeros((S, L), jnp.int32),
        mode=jnp.full((S, L), MODE_FULL, jnp.int32),
    )
    out = attention(q[seg.gather], k[seg.gather], v[seg.gather], tokens, tokens, impl=cfg.attention_impl,
                    block_q=cfg.attention_block_size, block_k=cfg.attention_block_size,
                    dense_max_len=cfg.dense_attention_max_len)
    return out.reshape((S * L,) + out.shape[2:])[seg.scatter]


class VisionAttention(nn.Module):
    """qkv (bias) -> 2-D rotary on q, k -> segment attention -> proj (bias). x (N, D) -> (N, D)."""

    cfg: VitConfig

    @nn.compact
    def __call__(self, x, cos, sin, window: Segments, full: Segments, is_full):
        cfg = self.cfg
        kw = dict(use_bias=True, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        # Kernel (D, 3, heads, Dh): the reference splits its 3·D outputs as [q | k | v], head-major.
        qkv = dense((3, cfg.num_heads, cfg.head_dim), ("embed", "qkv", "q_heads", "head_dim"), name="qkv", **kw)(x)
        q, k, v = _rope(qkv[:, 0], cos, sin), _rope(qkv[:, 1], cos, sin), qkv[:, 2]
        if isinstance(is_full, bool):  # unrolled blocks: the segment set is static
            out = segment_attention(q, k, v, full if is_full else window, cfg)
        else:  # scanned blocks: a per-layer flag picks one of the two (differently shaped) segment sets
            out = jax.lax.cond(is_full, lambda: segment_attention(q, k, v, full, cfg),
                               lambda: segment_attention(q, k, v, window, cfg))
        return dense(cfg.hidden_size, ("q_heads", "head_dim", "embed"), axis=(-2, -1), name="proj", **kw)(out)


class VisionMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), all with bias. x (N, D) -> (N, D)."""

    cfg: VitConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        kw = dict(use_bias=True, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        return dense(cfg.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(nn.silu(gate) * up)


class VisionBlock(nn.Module):
    """Pre-norm block (40 §B.7). Returns (x, None) so it can be an `nn.scan` body."""

    cfg: VitConfig

    @nn.compact
    def __call__(self, x, is_full, cos, sin, window: Segments, full: Segments):
        cfg = self.cfg
        pdt = jnp.dtype(cfg.param_dtype)
        h = RMSNorm(cfg.rms_norm_eps, pdt, name="norm1")(x)
        x = x + VisionAttention(cfg, name="attn")(h, cos, sin, window, full, is_full)
        x = x + VisionMLP(cfg, name="mlp")(RMSNorm(cfg.rms_norm_eps, pdt, name="norm2")(x))
        self.sow("intermediates", "output", x)
        return x, None


class PatchMerger(nn.Module):
    """ln_q per patch, concatenate each merge group (consecutive rows), Linear -> GELU(erf) -> Linear."""

    cfg: VitConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        kw = dict(use_bias=True, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        x = RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.param_dtype), name="ln_q")(x)
        x = x.reshape(-1, cfg.merge_unit * cfg.hidden_size)
        x = dense(x.shape[-1], ("embed", "mlp"), name="mlp_0", **kw)(x)
        x = nn.gelu(x, approximate=False)
        x = dense(cfg.out_hidden_size, ("mlp", "embed"), name="mlp_2", **kw)(x)
        self.sow("intermediates", "output", x)
        return x


class PatchEmbed(nn.Module):
    """patches (N, C·tp·p·p) -> (N, D): the Conv3d with kernel == stride == (tp, p, p) as one matmul.

    The kernel keeps the reference's (C, tp, p, p) input axes (the patch vector's flatten order).
    """

    cfg: VitConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        x = x.reshape(-1, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        x = dense(cfg.hidden_size, ("patch_channel", "patch_time", "patch_row", "patch_col", "embed"),
                  axis=(-4, -3, -2, -1), use_bias=False, name="proj", dtype=jnp.dtype(cfg.dtype),
                  param_dtype=jnp.dtype(cfg.param_dtype))(x)
        self.sow("intermediates", "output", x)
        return x


class VisionTransformer(nn.Module):
    """patches (N, C·tp·p·p) + VitPlan -> (N / merge², out_hidden_size), natural raster order.

    Intermediates (collection `intermediates`, when mutable), each under `<module>/output`:
    `patch_embed` (input order), `blocks` stacked (or `blocks_{i}`; window order), `merger` (window order).
    """

    cfg: VitConfig

    @nn.compact
    def __call__(self, patches, plan: VitPlan):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        x = PatchEmbed(cfg, name="patch_embed")(patches.astype(dt))
        x = x[plan.perm]
        cos, sin = self._rope_tables(plan)
        blocks_args = (cos, sin, plan.window, plan.full)
        if cfg.scan_blocks:
            is_full = jnp.asarray([i in cfg.fullatt_block_indexes for i in range(cfg.depth)])
            scanned = nn.scan(VisionBlock, variable_axes={"params": 0, "intermediates": 0},
                              split_rngs={"params": True}, in_axes=(0,) + (nn.broadcast,) * 4,
                              length=cfg.depth, metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = scanned(cfg, name="blocks")(x, is_full, *blocks_args)
        else:
            for i in range(cfg.depth):
                x, _ = VisionBlock(cfg, name=f"blocks_{i}")(x, i in cfg.fullatt_block_indexes, *blocks_args)
        x = PatchMerger(cfg, name="merger")(x)
        return x[plan.unperm]

    def _rope_tables(self, plan: VitPlan):
        """cos, sin (N, head_dim) float32: [row freqs, column freqs] twice (rotate-half pairs i, i + Dh/2)."""
        h, w = plan.rope_pos[:, 0], plan.rope_pos[:, 1]
        cos = jnp.concatenate([plan.rope_cos[h], plan.rope_cos[w]], axis=-1)
        sin = jnp.concatenate([plan.rope_sin[h], plan.rope_sin[w]], axis=-1)
        return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


# ----------------------------------------------------------------------------------------------
# Key tables and loading (40 §B.10)
# ----------------------------------------------------------------------------------------------

def vit_reference_tensors(params: dict, cfg: VitConfig, prefix: str = ""):
    """The inverse of loading: (reference key, array) for every ViT tensor, from our param tree."""
    return tensors_from_params(params, vit_key_table(cfg, prefix))


def vit_init_inputs(cfg: VitConfig):
    """Smallest valid (patches, plan): one item of one merge group (for init / shape evaluation)."""
    m = cfg.spatial_merge_size
    return np.zeros((m * m, cfg.patch_dim), np.float32), vit_plan(np.array([[1, m, m]]), cfg)


def vit_param_shapes(cfg: VitConfig) -> dict:
    """Nested dict of our param shapes (abstract evaluation, nothing allocated)."""
    patches, plan = vit_init_inputs(cfg)
    abstract = jax.eval_shape(lambda r: VisionTransformer(cfg).init(r, patches, plan), jax.random.PRNGKey(0))
    return jax.tree.map(lambda x: tuple(x.shape), nn.unbox(abstract["params"]))


def load_strict(path: str, rules: list[KeyRule], shapes: dict, prefix: str, dtype) -> dict:
    """Strict load of the keys under `prefix` (keys outside it belong to other components)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    header = {k: v for k, v in safetensors_header(path).items() if k.startswith(prefix)}
    check_reference_keys(header, rules, shapes)
    return params_from_tensors(read_tensors(path, [r.ref for r in rules]), rules, shapes, np.dtype(dtype))


def load_vit_params(path_or_folder: str, cfg: VitConfig, prefix: str = "") -> dict:
    """ViT param tree (NumPy, cfg.param_dtype) from `vit.safetensors` (prefix "") or the Lance
    `model.safetensors` (prefix "vit_model."); a folder picks the file by the prefix.

    Strict: one CheckpointMismatchError lists every missing, unexpected (under `prefix`) and mis-shaped key.
    """
    path = path_or_folder
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors" if prefix else "vit.safetensors")
    return load_strict(path, vit_key_table(cfg, prefix), vit_param_shapes(cfg), prefix, cfg.param_dtype)


# ----------------------------------------------------------------------------------------------
# Convenience entry point
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def vit_apply_fn(cfg: VitConfig):
    """jit(params, patches, plan) -> merged tokens; one cached function per config."""
    model = VisionTransformer(cfg)
    return jax.jit(lambda params, patches, plan: model.apply({"params": params}, patches, plan))


def encode(params, patches, grid_thw, cfg: VitConfig):
    """Packed patches (N, patch_dim) of the items in grid_thw (k, 3) -> (N / merge², out_hidden_size).

    The plan is built on the host; the jitted call recompiles only for a new set of shapes.
    """
    plan = vit_plan(grid_thw, cfg)
    n = len(plan.perm)
    if tuple(np.shape(patches)) != (n, cfg.patch_dim):
        raise ValueError(f"patches shape {np.shape(patches)} != ({n}, {cfg.patch_dim}) implied by grid_thw")
    return vit_apply_fn(cfg)(params, patches, plan)
