"""The vision components of a conversion: the ViT (standalone and/or bundled in the video checkpoint)
and the VAE, as orbax items, and their way back to the reference layout.

Released-checkpoint quirk (10-backbone §9.13): `Lance_3B_Video/model.safetensors` bundles `vit_model.*`
tensors beside the standalone `Qwen2.5-VL-ViT/vit.safetensors`. By default the standalone weights
win (`vit_source='standalone'`); when both exist and differ, the other set is kept as item
`vit_bundled` so that `to_torch` still writes every original tensor back bit-exactly.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np

from lance_jax.convert.keys import check_reference_keys
from lance_jax.convert.lance_keys import VIT_PREFIX
from lance_jax.convert.safetensors_io import st_dtype_name
from lance_jax.convert.sources import TensorSource, open_weights

VIT_FILE = "vit.safetensors"


def _vit_config(paths):
    """VitConfig from the standalone folder, else from the model's llm_config.json `vision_config`."""
    from lance_jax.models.vit import load_vit_config

    if paths.vit and os.path.isfile(os.path.join(paths.vit, "config.json")):
        return load_vit_config(paths.vit)
    with open(os.path.join(paths.model, "llm_config.json")) as f:
        vision = json.load(f).get("vision_config")
    if not vision:
        raise ValueError("the model bundles vit_model.* tensors but no ViT config was found "
                         "(no Qwen2.5-VL-ViT/config.json and no vision_config in llm_config.json)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.json")
        with open(path, "w") as f:
            json.dump(vision, f)
        return load_vit_config(path)


def _vit_component(item: str, cfg, source: TensorSource, prefix: str):
    from lance_jax.convert.converter import Component
    from lance_jax.convert.vit_keys import vit_key_table
    from lance_jax.models.vit import vit_param_shapes

    rules, shapes = vit_key_table(cfg, prefix), vit_param_shapes(cfg)
    header = {k: v for k, v in source.header().items() if k.startswith(prefix)}
    check_reference_keys(header, rules, shapes)
    return Component(item, rules, shapes, source)


def _same_tensors(a: TensorSource, b: TensorSource, prefix_b: str) -> bool:
    return all(np.array_equal(a.read(k).view(np.uint8), b.read(prefix_b + k).view(np.uint8))
               and a.shape(k) == b.shape(prefix_b + k) for k in a.keys())


@dataclasses.dataclass
class Vision:
    components: list
    reference_info: dict
    files: dict  # role -> source folder of small files to copy

    def reference(self, tmp: str) -> dict:
        from lance_jax.convert.converter import _copy_small_files

        copied = {role: _copy_small_files(folder, os.path.join(tmp, "reference", role))
                  for role, folder in self.files.items()}
        return {**self.reference_info, "vision_files": copied}


def vision_components(paths, model_source: TensorSource, vit_source: str = "standalone") -> Vision:
    """ViT (and VAE) components of a conversion, strictly checked, and what to_torch needs to know."""
    if vit_source not in ("standalone", "bundled"):
        raise ValueError(f"vit_source {vit_source!r} not in ('standalone', 'bundled')")
    comps, info, files = [], {}, {}
    bundled = any(k.startswith(VIT_PREFIX) for k in model_source.keys())
    standalone = paths.vit is not None and os.path.isfile(os.path.join(paths.vit, VIT_FILE))
    if bundled or standalone:
        cfg = _vit_config(paths)
        options = {}
        if standalone:
            src = TensorSource([os.path.join(paths.vit, VIT_FILE)])
            options["standalone"] = _vit_component("vit", cfg, src, "")
            info.update(vit_name=os.path.basename(os.path.normpath(paths.vit)), vit_keys=src.keys(),
                        vit_dtypes={k: st_dtype_name(src.dtype(k)) for k in src.keys()})
            files["vit"] = paths.vit
        if bundled:
            options["bundled"] = _vit_component("vit", cfg, model_source, VIT_PREFIX)
        chosen = vit_source if vit_source in options else next(iter(options))
        comps.append(options[chosen])
        info.update(vit_config=dataclasses.asdict(cfg), vit_standalone_item=None, vit_bundled_item=None)
        info["vit_" + chosen + "_item"] = "vit"
        if len(options) == 2:
            other = "bundled" if chosen == "standalone" else "standalone"
            if _same_tensors(options["standalone"].source, model_source, VIT_PREFIX):
                info["vit_" + other + "_item"] = "vit"
            else:  # keep both so that the way back is still bit-exact
                extra = dataclasses.replace(options[other], item="vit_" + other)
                comps.append(extra)
                info["vit_" + other + "_item"] = extra.item
    if paths.vae is not None:
        comp, vae_info, vae_files = _vae_component(paths)
        comps.append(comp)
        info.update(vae_info)
        files.update(vae_files)
    return Vision(comps, info, files)


def _vae_component(paths):
    """The VAE item: `vae_config.json` beside the weights (golden layout) or the released constants."""
    from lance_jax.convert.converter import Component
    from lance_jax.convert.vae_keys import vae_key_table
    from lance_jax.models.vae import VaeConfig, load_vae_config, vae_param_shapes

    folder = os.path.dirname(os.path.abspath(paths.vae))
    has_config = os.path.isfile(os.path.join(folder, "vae_config.json"))
    cfg = load_vae_config(folder) if has_config else VaeConfig()
    source = open_weights(paths.vae)
    rules, shapes = vae_key_table(cfg), vae_param_shapes(cfg)
    check_reference_keys(source.header(), rules, shapes)
    relpath = os.path.join(os.path.basename(folder), os.path.basename(paths.vae)) if has_config else \
        os.path.basename(paths.vae)
    info = dict(vae_path=relpath, vae_keys=source.keys(), vae_config=dataclasses.asdict(cfg),
                vae_dtypes={k: st_dtype_name(source.dtype(k)) for k in source.keys()})
    return Component("vae", rules, shapes, source), info, ({"vae": folder} if has_config else {})


class VisionWriters:
    """The reference-layout side of the vision items of a converted checkpoint."""

    def __init__(self, ckpt: str, manifest: dict):
        self.ckpt, self.ref = ckpt, manifest["reference"]
        self.vit_cfg = None
        if self.ref.get("vit_config"):
            from lance_jax.models.vit import VitConfig

            self.vit_cfg = VitConfig(**self.ref["vit_config"])  # __post_init__ restores tuples

    def _vit_reader(self, item: str, prefix: str):
        from lance_jax.convert.converter import ItemReader
        from lance_jax.convert.vit_keys import vit_key_table

        return ItemReader(self.ckpt, item, vit_key_table(self.vit_cfg, prefix))

    def bundled_readers(self) -> list:
        item = self.ref.get("vit_bundled_item")
        return [self._vit_reader(item, VIT_PREFIX)] if item else []

    def write(self, tmp: str, cast, progress: bool) -> list[str]:
        from lance_jax.convert.converter import write_reference_file

        written = []
        item = self.ref.get("vit_standalone_item")
        if item:
            folder = os.path.join(tmp, self.ref["vit_name"])
            os.makedirs(folder)
            for name in self.ref["vision_files"].get("vit", []):
                shutil.copy2(os.path.join(self.ckpt, "reference", "vit", name), folder)
            write_reference_file(os.path.join(folder, VIT_FILE), self.ref["vit_keys"], [self._vit_reader(item, "")],
                                 self.ref["vit_dtypes"], cast, progress)
            written.append(os.path.join(self.ref["vit_name"], VIT_FILE))
        if self.ref.get("vae_path"):
            written.append(self._write_vae(tmp, cast, progress))
        return written

    def _write_vae(self, tmp: str, cast, progress: bool) -> str:
        from lance_jax.convert.converter import ItemReader, write_reference_file
        from lance_jax.convert.pth_io import write_pth
        from lance_jax.convert.safetensors_io import ST_DTYPES
        from lance_jax.convert.vae_keys import vae_key_table
        from lance_jax.models.vae import VaeConfig

        cfg = VaeConfig(**self.ref["vae_config"])  # __post_init__ restores tuples
        reader = ItemReader(self.ckpt, "vae", vae_key_table(cfg))
        path = os.path.join(tmp, self.ref["vae_path"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for name in self.ref["vision_files"].get("vae", []):
            shutil.copy2(os.path.join(self.ckpt, "reference", "vae", name), os.path.dirname(path))
        keys, dtypes = self.ref["vae_keys"], self.ref["vae_dtypes"]
        if path.endswith((".pth", ".pt")):  # torch.save needs every tensor at once; the VAE is small
            write_pth(path, {k: reader.tensor(k).astype(cast or np.dtype(ST_DTYPES[dtypes[k]]), copy=False)
                             for k in keys})
        else:
            write_reference_file(path, keys, [reader], dtypes, cast, progress)
        return self.ref["vae_path"]


def describe_reference(paths) -> dict:
    """Per-component summary of the standalone vision files of a reference layout."""
    out = {}
    sources = {}
    if paths.vit and os.path.isfile(os.path.join(paths.vit, VIT_FILE)):
        sources["vit"] = TensorSource([os.path.join(paths.vit, VIT_FILE)])
    if paths.vae:
        sources["vae"] = open_weights(paths.vae)
    for name, src in sources.items():
        entries = {k: (src.shape(k), src.dtype(k)) for k in src.keys()}
        out[name] = dict(tensors=len(entries), parameters=int(sum(int(np.prod(s)) for s, _ in entries.values())),
                         dtypes=sorted({str(d) for _, d in entries.values()}), files=src.files,
                         keys={k: [list(s), str(d)] for k, (s, d) in entries.items()})
    return out
