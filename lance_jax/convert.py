"""The reference <-> lance-jax key table, and strict loading of the reference `model.safetensors`.

One declarative table says, for every tensor of the reference state dict (10-backbone §7), where it
lives in our param tree and whether it is a PyTorch Linear weight (out, in) that becomes a Flax
kernel (in..., out...). Everything else (loading, checking, the reverse direction) derives from it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from lance_jax.config import ModelConfig

GEN = "_moe_gen"

# Reference keys that are never loaded: the fixed sin-cos table is recomputed (10-backbone §7.5).
DROPPED_KEYS = ("latent_pos_embed.pos_embed",)

# Keys owned by modules that are not part of this table yet; loading skips them only when asked to.
VIT_PREFIX = "vit_model."


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One reference tensor <-> one param leaf (or one layer slice of a scanned leaf).

    transpose: a Linear weight (out, in) <-> kernel (in_1..in_k, out_1..out_m) with k = in_dims.
    ref_ndim:  for copied tensors, the reference rank (trailing param dims are merged into it).
    layer:     the layer index for per-layer tensors.
    stacked:   the param leaf stacks all layers (scanned layers): this rule is its slice `layer`.
    """

    ref: str
    path: tuple[str, ...]
    transpose: bool = False
    in_dims: int = 1
    ref_ndim: int = 1
    layer: int | None = None
    stacked: bool = False

    def ref_shape(self, param_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape the reference tensor must have, given our (per-layer) param shape."""
        if self.transpose:
            return (math.prod(param_shape[self.in_dims:]), math.prod(param_shape[: self.in_dims]))
        keep = param_shape[: self.ref_ndim - 1]
        return tuple(keep) + (math.prod(param_shape[self.ref_ndim - 1:]),)

    def to_param(self, ref: np.ndarray, param_shape: tuple[int, ...]) -> np.ndarray:
        return (ref.T if self.transpose else ref).reshape(param_shape)

    def to_ref(self, param: np.ndarray) -> np.ndarray:
        shape = self.ref_shape(param.shape)
        if self.transpose:
            return np.ascontiguousarray(param.reshape(shape[::-1]).T)
        return param.reshape(shape)


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


# ----------------------------------------------------------------------------------------------
# safetensors reading (no torch; bf16 through ml_dtypes; one tensor in memory at a time)
# ----------------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def safetensors_header(path: str) -> dict[str, dict]:
    """{key: {'dtype', 'shape', 'data_offsets'}} of a .safetensors file (metadata entry removed)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > os.path.getsize(path):
            raise ValueError(f"{path}: corrupt safetensors header length {n}")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def read_tensors(path: str, keys: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (key, array) from a .safetensors file, memory-mapped, in file order."""
    header = safetensors_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    wanted = header.keys() if keys is None else keys
    for key in wanted:
        info = header[key]
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        yield key, data[begin:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write tensors (any dtype of _ST_DTYPES, bf16 included) as .safetensors, atomically (tmp + rename)."""
    names = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
    header, offset = {}, 0
    for key, arr in tensors.items():
        arr_dtype = np.dtype(arr.dtype)
        if arr_dtype not in names:
            raise ValueError(f"tensor {key}: dtype {arr_dtype} cannot be stored in safetensors")
        nbytes = arr.size * arr_dtype.itemsize
        header[key] = {"dtype": names[arr_dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data section starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(tmp, path)


class CheckpointMismatchError(ValueError):
    """Raised once with every missing, unexpected and mis-shaped key listed."""


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def param_shapes(cfg: ModelConfig) -> dict:
    """Nested dict of our param shapes (from abstract evaluation, nothing allocated)."""
    import flax.linen as nn
    import jax

    from lance_jax.models.lance import init_params
    from lance_jax.packing import dummy_stream_batch

    abstract = jax.eval_shape(lambda r: init_params(cfg, r, dummy_stream_batch(cfg)), jax.random.PRNGKey(0))
    return jax.tree.map(lambda x: tuple(x.shape), nn.unbox(abstract))


def check_reference_keys(header: dict[str, dict], rules: list[KeyRule], shapes: dict, *, ignore_prefixes=()) -> None:
    """Raise CheckpointMismatchError listing all missing / unexpected / mis-shaped reference keys."""
    missing, misshaped = [], []
    for rule in rules:
        if rule.ref not in header:
            missing.append(rule.ref)
            continue
        shape = _get(shapes, rule.path)
        shape = shape[1:] if rule.stacked else shape
        want = rule.ref_shape(shape)
        got = tuple(header[rule.ref]["shape"])
        if got != want:
            misshaped.append(f"{rule.ref}: checkpoint {got}, model expects {want}")
    known = {r.ref for r in rules} | set(DROPPED_KEYS)
    unexpected = sorted(k for k in header if k not in known and not k.startswith(tuple(ignore_prefixes)))
    if missing or unexpected or misshaped:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                parts.append(f"{len(items)} {title} key(s):\n  " + "\n  ".join(items))
        raise CheckpointMismatchError("checkpoint does not match the model config:\n" + "\n".join(parts))


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
    check_reference_keys(header, rules, shapes, ignore_prefixes=ignore_prefixes)
    dtype = np.dtype(cfg.param_dtype)
    params: dict = {}
    by_key = {r.ref: r for r in rules}
    for key, tensor in read_tensors(path, [r.ref for r in rules]):
        rule = by_key[key]
        full_shape = _get(shapes, rule.path)
        if rule.stacked:
            try:
                stacked = _get(params, rule.path)
            except KeyError:
                stacked = np.zeros(full_shape, dtype)
                _set(params, rule.path, stacked)
            stacked[rule.layer] = rule.to_param(tensor, full_shape[1:]).astype(dtype)
        else:
            _set(params, rule.path, rule.to_param(tensor, full_shape).astype(dtype))
    return params


def reference_tensors(params: dict, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """The inverse direction: yield (reference key, array) for every rule, from our param tree."""
    for rule in key_table(cfg):
        leaf = np.asarray(_get(params, rule.path))
        if rule.stacked:
            leaf = leaf[rule.layer]
        yield rule.ref, rule.to_ref(leaf)
