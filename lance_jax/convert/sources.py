"""Where the reference checkpoint lives, and lazy access to its tensors.

Two folder layouts are recognised:
  released  the downloads root: `Lance_3B*/` (model.safetensors or ema.safetensors or sharded files with
            an index json, llm_config.json, tokenizer), `Qwen2.5-VL-ViT/` (vit.safetensors + config.json),
            `Wan2.2_VAE.pth`;
  golden    the parity-set layout: `model/`, `vit/`, `vae/` (with vae_config.json).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np

from lance_jax.convert.safetensors_io import ST_DTYPES, read_tensors, safetensors_header
from lance_jax.convert.safetensors_io import st_dtype_name as st_name

RELEASED_VIT_DIR = "Qwen2.5-VL-ViT"
RELEASED_VAE_FILE = "Wan2.2_VAE.pth"


@dataclasses.dataclass(frozen=True)
class ReferencePaths:
    """The three components of a reference checkpoint (None = absent)."""

    layout: str  # 'released' | 'golden' | 'explicit'
    model: str | None  # folder with llm_config.json and the Lance safetensors
    vit: str | None  # folder with vit.safetensors + config.json
    vae: str | None  # the VAE weights file (.pth or .safetensors)


def _is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "llm_config.json"))


def find_reference(src: str | None, *, model: str | None = None, vit: str | None = None,
                   vae: str | None = None) -> ReferencePaths:
    """Locate the components under `src` (released or golden layout); explicit paths win."""
    layout, found = "explicit", {"model": None, "vit": None, "vae": None}
    if src is not None:
        if not os.path.isdir(src):
            raise FileNotFoundError(f"--src {src} is not a folder")
        if _is_model_dir(os.path.join(src, "model")):
            layout = "golden"
            vae_dir = os.path.join(src, "vae")
            vae_files = sorted(glob.glob(os.path.join(vae_dir, "*.safetensors"))) or sorted(
                glob.glob(os.path.join(vae_dir, "*.pth")))
            found = {"model": os.path.join(src, "model"), "vit": os.path.join(src, "vit"),
                     "vae": vae_files[0] if vae_files else None}
        else:
            candidates = sorted(d for d in glob.glob(os.path.join(src, "Lance_3B*")) if _is_model_dir(d))
            if len(candidates) > 1 and model is None:
                raise ValueError(f"several Lance checkpoints under {src}: {[os.path.basename(c) for c in candidates]}; "
                                 "choose one with --model")
            if not candidates and model is None:
                raise FileNotFoundError(f"no Lance checkpoint under {src}: expected model/ (golden layout) or "
                                        f"Lance_3B*/ with llm_config.json (released layout)")
            layout = "released"
            found = {"model": candidates[0] if candidates else None, "vit": os.path.join(src, RELEASED_VIT_DIR),
                     "vae": os.path.join(src, RELEASED_VAE_FILE)}
        found = {k: (v if v and os.path.exists(v) else None) for k, v in found.items()}
    explicit = {"model": model, "vit": vit, "vae": vae}
    for name, path in explicit.items():
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f"--{name} {path} does not exist")
    return ReferencePaths(layout, **{k: explicit[k] or found[k] for k in found})


class TensorSource:
    """Named tensors spread over one or more safetensors files, read lazily (memory-mapped)."""

    def __init__(self, files: list[str]):
        self.files = files
        self._where: dict[str, str] = {}
        self._info: dict[str, dict] = {}
        for path in files:
            for key, info in safetensors_header(path).items():
                if key in self._where:
                    raise ValueError(f"tensor {key} appears in both {self._where[key]} and {path}")
                self._where[key], self._info[key] = path, info

    def keys(self) -> list[str]:
        return list(self._where)

    def header(self) -> dict[str, dict]:
        return dict(self._info)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._info[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(ST_DTYPES[self._info[key]["dtype"]])

    def read(self, key: str) -> np.ndarray:
        if key not in self._where:
            raise KeyError(f"tensor {key} not found in {self.files}")
        return next(read_tensors(self._where[key], [key]))[1]


class PthSource(TensorSource):
    """The tensors of a torch zip checkpoint (`.pth`), read with the restricted unpickler (no torch).

    The archive's storages are read up front: a `.pth` has no lazy layout (the VAE is ~0.7 B params).
    """

    def __init__(self, path: str):
        from lance_jax.convert.pth_io import read_pth

        self.files = [path]
        self._tensors = read_pth(path)
        self._where = {k: path for k in self._tensors}
        self._info = {k: {"shape": list(v.shape), "dtype": st_name(v.dtype)} for k, v in self._tensors.items()}

    def read(self, key: str) -> np.ndarray:
        if key not in self._tensors:
            raise KeyError(f"tensor {key} not found in {self.files[0]}")
        return self._tensors[key]


def open_weights(path: str) -> TensorSource:
    """A lazy tensor source for a `.safetensors` or `.pth` file."""
    if path.endswith(".pth") or path.endswith(".pt"):
        return PthSource(path)
    return TensorSource([path])


def model_weight_files(model_dir: str, prefer: str = "model") -> list[str]:
    """The Lance weights of a model folder: model.safetensors, else ema.safetensors, or a sharded set."""
    order = ["model", "ema"] if prefer == "model" else ["ema", "model"]
    for stem in order:
        single = os.path.join(model_dir, f"{stem}.safetensors")
        if os.path.isfile(single):
            return [single]
        index = os.path.join(model_dir, f"{stem}.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not weight_map:
                raise ValueError(f"{index} has no weight_map")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(model_dir, f))]
            if missing:
                raise FileNotFoundError(f"{index} names missing shard(s) {missing}")
            return [os.path.join(model_dir, f) for f in files]
    raise FileNotFoundError(f"no model.safetensors / ema.safetensors (or sharded index) in {model_dir}")
