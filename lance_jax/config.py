"""Frozen model hyper-parameters, and the loader for the reference's json configs.

Two sources produce a `ModelConfig`:
  * an ml-collections config file (`configs/models/*.py`, overridable from the command line), and
  * a reference checkpoint folder (`llm_config.json` + `lance_config.json` + tokenizer files), which is
    how the released checkpoints and the golden parity sets describe themselves.

`python -m lance_jax.config --config configs/models/lance_3b_image.py --config.model.num_layers=2`
prints the resolved config and the parameter count.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import ml_collections

ATTENTION_IMPLS = ("auto", "dense", "blockwise")
REMAT_POLICIES = ("none", "full", "dots_saveable")
LATENT_STRIDES = {"wan2.2": 16, "pixel": 4}  # spatial compression of each autoencoder


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the Lance model computes with. Sizes follow 10-backbone §0."""

    # Language backbone (Qwen2.5 text, dual-stream MoT).
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int  # embedding / lm_head rows
    vocab_size_eff: int  # len(tokenizer): logits beyond it are sliced (training) or masked (decoding)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    dual_stream: bool = True  # Qwen2MoTDecoderLayer: *_moe_gen weights for latent tokens
    qk_norm_und: bool = True
    qk_norm_gen: bool = True
    # Released model rounds rotary inv_freq to bf16 (the whole module, buffers included, is cast to bf16).
    # Off for the fp32 goldens, on for real checkpoints (see README "Numerics").
    rope_bf16_inv_freq: bool = False

    # Special token ids and MRoPE index-builder constants.
    bos_token_id: int = 151644
    eos_token_id: int = 151645
    pad_token_id: int = 151643
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    image_token_id: int = 151655
    video_token_id: int = 151656
    spatial_merge_size: int = 2
    tokens_per_second: int = 2

    # Generation adapters.
    latent_channels: int = 48
    latent_patch_size: tuple[int, int, int] = (1, 1, 1)
    max_latent_size: int = 64
    max_num_frames: int = 121
    timestep_shift: float = 4.0
    ce_weight: float = 0.25
    mse_weight: float = 1.0
    timestep_embed_dim: int = 256
    vit_out_hidden_size: int = 2048
    # Pixel <-> latent codec: 'wan2.2' (the released VAE: 16x spatial, 4x temporal) or 'pixel' (parameter-free
    # 4x4 space-to-depth of RGB = 48 channels, 4x temporal by keyframes; the CPU demo's, models/pixel_autoencoder.py).
    autoencoder: str = "wan2.2"

    # Execution (not part of the checkpoint).
    dtype: str = "float32"  # activation / compute dtype
    param_dtype: str = "float32"
    attention_impl: str = "auto"
    attention_block_size: int = 512
    # blockwise: branch around tiles of packed rows whose query / key blocks share no sample (layers/attention.py);
    # pays off on CPU and TPU, not on GPU (a host sync per tile)
    attention_skip_empty_tiles: bool = False
    dense_attention_max_len: int = 4096
    scan_layers: bool = True
    remat_policy: str = "none"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl {self.attention_impl!r} not in {ATTENTION_IMPLS}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} not in {REMAT_POLICIES}")
        if self.autoencoder not in LATENT_STRIDES:
            raise ValueError(f"autoencoder {self.autoencoder!r} not in {sorted(LATENT_STRIDES)}")
        if self.autoencoder == "pixel" and self.latent_channels != 48:
            raise ValueError(f"the pixel autoencoder gives 4*4*3 = 48 latent channels, not {self.latent_channels}")
        if self.vocab_size_eff > self.vocab_size:
            raise ValueError(f"vocab_size_eff {self.vocab_size_eff} exceeds vocab_size {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        # The reference always derives it; a `head_dim` json field is ignored (10-backbone §0).
        return self.hidden_size // self.num_heads

    @property
    def latent_stride(self) -> int:
        """Pixels per latent token side (before `latent_patch_size`)."""
        return LATENT_STRIDES[self.autoencoder]

    @property
    def max_latent_frames(self) -> int:
        return self.max_num_frames // 4 + 1

    @property
    def patch_latent_dim(self) -> int:
        pt, ph, pw = self.latent_patch_size
        return pt * ph * pw * self.latent_channels

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


def model_config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a flat mapping (e.g. an ml-collections `config.model`); unknown keys are an error."""
    d = dict(d.to_dict() if isinstance(d, ml_collections.ConfigDict) else d)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown model config keys: {unknown}")
    for key in ("mrope_section", "latent_patch_size"):
        if key in d:
            d[key] = tuple(int(x) for x in d[key])
    return ModelConfig(**d)


def model_config_dict(cfg: ModelConfig) -> ml_collections.ConfigDict:
    """The inverse of `model_config_from_dict`, as an overridable ConfigDict."""
    d = dataclasses.asdict(cfg)
    for key in ("mrope_section", "latent_patch_size"):
        d[key] = list(d[key])
    return ml_collections.ConfigDict(d)


def tokenizer_length(model_dir: str) -> int | None:
    """len(tokenizer) of a reference model folder: base vocab plus added tokens not already in it."""
    tok_json = os.path.join(model_dir, "tokenizer.json")
    if os.path.exists(tok_json):
        import tokenizers

        return tokenizers.Tokenizer.from_file(tok_json).get_vocab_size(with_added_tokens=True)
    vocab_path = os.path.join(model_dir, "vocab.json")
    if not os.path.exists(vocab_path):
        return None
    with open(vocab_path) as f:
        ids = set(json.load(f).values())
    added_path = os.path.join(model_dir, "added_tokens.json")
    if os.path.exists(added_path):
        with open(added_path) as f:
            ids |= set(json.load(f).values())
    return len(ids)


def _special_token_ids(model_dir: str) -> dict[str, int]:
    """Ids the llm json does not carry, looked up by their literal strings like the reference does."""
    path = os.path.join(model_dir, "added_tokens.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        added = json.load(f)
    names = {"<|endoftext|>": "pad_token_id", "<|im_start|>": "bos_token_id", "<|im_end|>": "eos_token_id"}
    return {field: int(added[tok]) for tok, field in names.items() if tok in added}


def _require(d: Mapping[str, Any], key: str, where: str):
    if key not in d:
        raise KeyError(f"{where} has no field {key!r}")
    return d[key]


def load_reference_config(model_dir: str, **overrides) -> ModelConfig:
    """ModelConfig from a reference checkpoint folder (`llm_config.json`, `lance_config.json`, tokenizer).

    The released `llm_config.json` is the stock Qwen2.5-VL-3B one; Lance-specific runtime values
    (latent patch, max latent size, frames, qk-norm flags, loss weights) live in `lance_config.json`
    (the launch arguments). Missing `lance_config.json` falls back to the released launch values.
    """
    llm_path = os.path.join(model_dir, "llm_config.json")
    if not os.path.exists(llm_path):
        raise FileNotFoundError(f"{llm_path} not found: not a reference Lance checkpoint folder")
    with open(llm_path) as f:
        llm = json.load(f)
    lance = {}
    lance_path = os.path.join(model_dir, "lance_config.json")
    if os.path.exists(lance_path):
        with open(lance_path) as f:
            lance = json.load(f)
    where = llm_path
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    absent = [k for k in required if k not in llm]
    if absent:
        raise KeyError(f"{llm_path} lacks required field(s) {absent}")
    vision = llm.get("vision_config", {})
    rope_scaling = llm.get("rope_scaling") or {}
    layer_module = lance.get("layer_module", llm.get("layer_module", "Qwen2MoTDecoderLayer"))
    if layer_module not in ("Qwen2MoTDecoderLayer", "Qwen2DecoderLayer"):
        raise ValueError(f"unsupported layer_module {layer_module!r} (the MoE variant is dead in the reference)")
    qk_norm = lance.get("llm_qk_norm", llm.get("qk_norm", True))
    qk_und = lance.get("llm_qk_norm_und", llm.get("qk_norm_und", qk_norm))
    qk_gen = lance.get("llm_qk_norm_gen", llm.get("qk_norm_gen", qk_norm))
    if not (qk_und or qk_gen):  # reference quirk: `qk_norm` alone turns on both streams
        qk_und = qk_gen = bool(qk_norm)
    vocab = int(_require(llm, "vocab_size", where))
    veff = tokenizer_length(model_dir) or vocab
    vae = lance.get("vae_config", {})
    kw = dict(
        hidden_size=int(_require(llm, "hidden_size", where)),
        num_layers=int(_require(llm, "num_hidden_layers", where)),
        num_heads=int(_require(llm, "num_attention_heads", where)),
        num_kv_heads=int(llm.get("num_key_value_heads", llm["num_attention_heads"])),
        intermediate_size=int(_require(llm, "intermediate_size", where)),
        vocab_size=vocab,
        vocab_size_eff=min(veff, vocab),
        rms_norm_eps=float(llm.get("rms_norm_eps", 1e-6)),
        rope_theta=float(llm.get("rope_theta", 10000.0)),
        mrope_section=tuple(int(x) for x in rope_scaling.get("mrope_section", (16, 24, 24))),
        dual_stream=layer_module == "Qwen2MoTDecoderLayer",
        qk_norm_und=bool(qk_und),
        qk_norm_gen=bool(qk_gen),
        # The reference casts the whole module, rotary buffers included, to the checkpoint's dtype
        # (bf16 for the release): so bf16-rounded frequencies are the released behaviour.
        rope_bf16_inv_freq=llm.get("torch_dtype", "bfloat16") == "bfloat16",
        bos_token_id=int(llm.get("bos_token_id", 151644)),
        eos_token_id=int(llm.get("eos_token_id", 151645)),
        pad_token_id=int(llm.get("pad_token_id") or 151643),  # <|endoftext|>; overridden from the tokenizer below
        vision_start_token_id=int(llm.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(llm.get("vision_end_token_id", 151653)),
        image_token_id=int(llm.get("image_token_id", 151655)),
        video_token_id=int(llm.get("video_token_id", 151656)),
        spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
        tokens_per_second=int(vision.get("tokens_per_second", 2)),
        latent_channels=int(vae.get("z_channels", 48)),
        latent_patch_size=tuple(int(x) for x in lance.get("latent_patch_size", (1, 1, 1))),
        max_latent_size=int(lance.get("max_latent_size", 64)),
        max_num_frames=int(lance.get("max_num_frames", 121)),
        timestep_shift=float(lance.get("timestep_shift", 4.0)),
        ce_weight=float(lance.get("ce_weight", 0.25)),
        mse_weight=float(lance.get("mse_weight", 1.0)),
        vit_out_hidden_size=int(vision.get("out_hidden_size", llm["hidden_size"])),
    )
    kw.update(_special_token_ids(model_dir))
    kw.update(overrides)
    return ModelConfig(**kw)


def config_dict_from_file(path: str) -> ml_collections.ConfigDict:
    """Run a Python config file's `get_config()`; `FILE:ARG` passes ARG to it (as ml-collections does)."""
    import importlib.util

    arg = None
    if ":" in path and not os.path.exists(path):
        path, arg = path.split(":", 1)
    spec = importlib.util.spec_from_file_location("lance_config_file", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def _child(node, name: str, item: str):
    """node[name] for a path component `field` or `field[i]` (list entries, as train.py's config flags)."""
    field, *idx = name.replace("]", "").split("[")
    if field not in node:
        raise KeyError(f"override {item!r}: no config field {field!r}")
    node = node[field]
    for i in idx:
        if not i.isdigit() or int(i) >= len(node):
            raise KeyError(f"override {item!r}: {field} has no entry [{i}] ({len(node)} entries)")
        node = node[int(i)]
    return node


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
    """Apply `--config.a.b=VALUE` strings in place (VALUE read as a Python literal, else as a string);
    the field must exist (`a.list[i].b` reaches into a list), and ConfigDict keeps its type (an int stays
    an int)."""
    import ast

    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise ValueError(f"override {item!r} is not of the form --config.path.to.field=VALUE")
        dotted, raw = item[len("--config."):].split("=", 1)
        *parents, leaf = dotted.split(".")
        node = config
        for name in parents:
            node = _child(node, name, item)
        if leaf not in node:
            raise KeyError(f"override {item!r}: no config field {dotted!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node[leaf] = value
    return config


def _show_config_cli() -> None:
    """`python -m lance_jax.config --config FILE [--config.model.X=...]`: resolved config + parameter count."""
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "model config file (configs/models/*.py)")
    flags.mark_flags_as_required(["config"])

    def main(argv):
        del argv
        from lance_jax.models.lance import count_params

        cfg = model_config_from_dict(config_flag.value.model)
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        print(f"parameters: {count_params(cfg):,}")

    app.run(main)


if __name__ == "__main__":
    _show_config_cli()
