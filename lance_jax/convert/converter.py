"""Reference PyTorch checkpoint folders <-> one lance-jax orbax checkpoint, streaming and strict.

A converted checkpoint is a folder:
  lance_checkpoint.json   manifest: format version, model config, what the reference looked like
                          (layout, folder and file names, key order, per-tensor dtypes)
  language_model/         orbax PyTree item: params['language_model'] (scanned layers stacked)
  glue/                   orbax PyTree item: time_embedder, vae2llm, llm2vae
  vit/, vae/              orbax PyTree items of the vision tower and the VAE (when present)
  reference/<role>/       the reference's small files verbatim (json configs, tokenizer), for `to_torch`

Every component is a `Component`: a declarative key table (`*_keys.py`), our param shapes and a lazy
tensor source. Tensors are read one at a time and written slice by slice, so host memory stays near
the largest single tensor. Output folders appear only when complete (built under `<out>.partial`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Callable

import numpy as np
from tqdm import tqdm

from lance_jax.config import ModelConfig, load_reference_config, model_config_from_dict
from lance_jax.convert import orbax_io
from lance_jax.convert.keys import KeyRule, get_path, check_reference_keys
from lance_jax.convert.lance_keys import DROPPED_KEYS, VIT_PREFIX, key_table, param_shapes
from lance_jax.convert.safetensors_io import ST_DTYPES, st_dtype_name, write_safetensors_streaming
from lance_jax.convert.sources import ReferencePaths, TensorSource, model_weight_files

MANIFEST = "lance_checkpoint.json"
FORMAT = "lance-jax-checkpoint"
FORMAT_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt", ".index.json")
LATENT_TABLE_KEY = DROPPED_KEYS[0]
DTYPES = {"keep": None, "float32": np.dtype(np.float32), "bfloat16": np.dtype(ST_DTYPES["BF16"])}


@dataclasses.dataclass
class Component:
    """One orbax item: its rules (paths relative to the item), our param shapes, and where tensors come from."""

    item: str
    rules: list[KeyRule]
    shapes: dict
    source: TensorSource
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)  # rule key -> key actually read

    def read(self, key: str) -> np.ndarray:
        return self.source.read(self.aliases.get(key, key))

    def source_dtype(self, key: str) -> np.dtype:
        return self.source.dtype(self.aliases.get(key, key))

    def leaves(self, dtype: np.dtype | None):
        """{path: (full shape, dtype)} and the set of stacked (sliced) paths."""
        leaves, sliced = {}, set()
        for rule in self.rules:
            leaf_dtype = dtype or self.source_dtype(rule.ref)
            if rule.path in leaves and leaves[rule.path][1] != leaf_dtype:
                leaf_dtype = np.result_type(leaves[rule.path][1], leaf_dtype)
            leaves[rule.path] = (tuple(get_path(self.shapes, rule.path)), leaf_dtype)
            if rule.stacked:
                sliced.add(rule.path)
        return leaves, sliced


def _relative(rules: list[KeyRule], shapes: dict, keep: Callable[[tuple], bool], strip: int):
    rules = [dataclasses.replace(r, path=r.path[strip:]) for r in rules if keep(r.path)]
    sub = {k: v for k, v in shapes.items() if keep((k,))}
    for _ in range(strip):
        (sub,) = sub.values()
    return rules, sub


def lance_components(cfg: ModelConfig, source: TensorSource, *, tie_lm_head: bool = False) -> list[Component]:
    """The language model and glue items, after the strict key check of the whole Lance file."""
    rules, shapes = key_table(cfg), param_shapes(cfg)
    aliases = {}
    lm_head, embed = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"
    if tie_lm_head and lm_head not in source.keys():
        aliases[lm_head] = embed  # embed (V, H) through the Linear rule gives the tied kernel (H, V)
    header = source.header()
    header.update({k: header[v] for k, v in aliases.items()})
    check_reference_keys(header, rules, shapes, ignore_prefixes=(VIT_PREFIX,), dropped=DROPPED_KEYS)
    lm_rules, lm_shapes = _relative(rules, shapes, lambda p: p[0] == "language_model", 1)
    glue_rules, glue_shapes = _relative(rules, shapes, lambda p: p[0] != "language_model", 0)
    return [Component("language_model", lm_rules, lm_shapes, source, aliases),
            Component("glue", glue_rules, glue_shapes, source, aliases)]


def write_component(directory: str, comp: Component, dtype: np.dtype | None, progress: bool) -> None:
    leaves, sliced = comp.leaves(dtype)
    writer = orbax_io.StreamingWriter(os.path.join(directory, comp.item), leaves, sliced)
    for rule in tqdm(comp.rules, desc=f"write {comp.item}", disable=not progress, unit="tensor"):
        shape, leaf_dtype = leaves[rule.path]
        value = rule.to_param(comp.read(rule.ref), shape[1:] if rule.stacked else shape)
        writer.write(rule.path, value.astype(leaf_dtype, copy=False), rule.layer if rule.stacked else None)
    writer.close()


def _copy_small_files(src_dir: str, dst_dir: str) -> list[str]:
    os.makedirs(dst_dir, exist_ok=True)
    copied = []
    for name in sorted(os.listdir(src_dir)):
        path = os.path.join(src_dir, name)
        if os.path.isfile(path) and not name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, os.path.join(dst_dir, name))
            copied.append(name)
    return copied


def _check_output(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{os.path.abspath(out)} exists (pass --overwrite to replace it)")


def atomic_output(out: str, overwrite: bool, build: Callable[[str], dict]) -> dict:
    """Run build(tmp_dir) and move the result to `out` only if it succeeds; nothing half-written remains."""
    _check_output(out, overwrite)
    out = os.path.abspath(out)
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        result = build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return result


def to_jax(paths: ReferencePaths, out: str, *, dtype: str = "keep", vit_source: str = "standalone",
           tie_lm_head: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Convert the reference folders in `paths` into one orbax checkpoint at `out`; returns the manifest."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} not in {list(DTYPES)}")
    _check_output(out, overwrite)
    if paths.model is None:
        raise FileNotFoundError("no Lance model folder found (llm_config.json + model.safetensors); pass --model")
    from lance_jax.convert import components as extra

    cfg = load_reference_config(paths.model)
    source = TensorSource(model_weight_files(paths.model))
    comps = lance_components(cfg, source, tie_lm_head=tie_lm_head)
    vision = extra.vision_components(paths, source, vit_source)
    comps += vision.components

    def build(tmp: str) -> dict:
        for comp in comps:
            write_component(tmp, comp, DTYPES[dtype], progress)
        reference = dict(
            layout=paths.layout,
            model_name=os.path.basename(os.path.normpath(paths.model)),
            model_files=[os.path.basename(f) for f in source.files],
            model_keys=source.keys(),
            dtypes={k: st_dtype_name(source.dtype(k)) for k in source.keys()},
            latent_table_shape=list(source.shape(LATENT_TABLE_KEY)) if LATENT_TABLE_KEY in source.keys() else None,
            files={"model": _copy_small_files(paths.model, os.path.join(tmp, "reference", "model"))},
            **vision.reference(tmp),
        )
        manifest = dict(format=FORMAT, version=FORMAT_VERSION, items=[c.item for c in comps],
                        model_config=dataclasses.asdict(cfg), dtype=dtype, reference=reference,
                        options=dict(vit_source=vit_source, tie_lm_head=tie_lm_head))
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        return manifest

    return atomic_output(out, overwrite, build)


def read_manifest(ckpt: str) -> dict:
    path = os.path.join(ckpt, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{ckpt} is not a lance-jax checkpoint ({MANIFEST} missing)")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint format {manifest.get('format')} v{manifest.get('version')}")
    return manifest


def checkpoint_config(ckpt: str, **overrides) -> ModelConfig:
    """The ModelConfig stored in a converted checkpoint."""
    return model_config_from_dict({**read_manifest(ckpt)["model_config"], **overrides})


def restore_params(ckpt: str, shardings: dict | None = None) -> dict:
    """{'lance': Lance params, 'vit': ..., 'vae': ...} (present items only) from a converted checkpoint.

    shardings: an optional tree of the same shape (e.g. {'lance': sharding.param_shardings(...)}) so that
    every device reads only its own shard straight from disk.
    """
    manifest = read_manifest(ckpt)
    shardings = shardings or {}
    lance_sh = shardings.get("lance")
    out = {}
    lm = orbax_io.restore(os.path.join(ckpt, "language_model"), lance_sh and lance_sh["language_model"])
    glue_sh = lance_sh and {k: v for k, v in lance_sh.items() if k != "language_model"}
    out["lance"] = {"language_model": lm, **orbax_io.restore(os.path.join(ckpt, "glue"), glue_sh)}
    for item in ("vit", "vae"):
        if item in manifest["items"]:
            out[item] = orbax_io.restore(os.path.join(ckpt, item), shardings.get(item))
    return out


class ItemReader:
    """Reference tensors of one converted item, computed leaf slice by leaf slice through its rules."""

    def __init__(self, ckpt: str, item: str, rules: list[KeyRule]):
        self.directory = os.path.join(ckpt, item)
        self.rules = {r.ref: r for r in rules}
        self.specs = orbax_io.leaf_specs(self.directory)

    def __contains__(self, key: str) -> bool:
        return key in self.rules

    def shape(self, key: str) -> tuple[int, ...]:
        rule = self.rules[key]
        shape = self.specs[rule.path][0]
        return rule.ref_shape(shape[1:] if rule.stacked else shape)

    def tensor(self, key: str) -> np.ndarray:
        rule = self.rules[key]
        return rule.to_ref(orbax_io.read_leaf(self.directory, rule.path, rule.layer if rule.stacked else None))


def write_reference_file(path: str, keys: list[str], readers: list, dtypes: dict[str, str], cast, progress: bool,
                         special: dict[str, Callable[[], np.ndarray]] | None = None) -> None:
    """Stream `keys` (in this order) into one safetensors file, each from the reader that owns it."""
    special = special or {}

    def owner(key):
        for reader in readers:
            if key in reader:
                return reader
        raise KeyError(f"no converted item holds reference tensor {key}")

    def shape(key):
        return tuple(special[key]().shape) if key in special else owner(key).shape(key)

    def dtype(key):
        return cast or np.dtype(ST_DTYPES[dtypes[key]])

    entries = [(k, shape(k), dtype(k)) for k in keys]
    with tqdm(total=len(keys), desc=f"write {os.path.basename(path)}", disable=not progress, unit="tensor") as bar:
        def produce(key):
            value = special[key]() if key in special else owner(key).tensor(key)
            bar.update()
            return value.astype(dtype(key), copy=False)

        write_safetensors_streaming(path, entries, produce)


def lance_readers(ckpt: str, cfg: ModelConfig) -> list[ItemReader]:
    rules = key_table(cfg)
    lm = [dataclasses.replace(r, path=r.path[1:]) for r in rules if r.path[0] == "language_model"]
    glue = [r for r in rules if r.path[0] != "language_model"]
    return [ItemReader(ckpt, "language_model", lm), ItemReader(ckpt, "glue", glue)]


def to_torch(ckpt: str, out: str, *, dtype: str = "keep", overwrite: bool = False, progress: bool = True) -> list[str]:
    """Write the reference layout (folder and file names, keys, shapes, dtypes) from a converted checkpoint."""
    from lance_jax.convert import components as extra
    from lance_jax.models.lance import latent_position_table

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} not in {list(DTYPES)}")
    _check_output(out, overwrite)
    manifest = read_manifest(ckpt)
    cfg = model_config_from_dict(manifest["model_config"])
    ref = manifest["reference"]
    cast = DTYPES[dtype]
    vision = extra.VisionWriters(ckpt, manifest)
    special = {}
    if ref["latent_table_shape"]:
        frames = ref["latent_table_shape"][0] // cfg.max_latent_size ** 2
        special[LATENT_TABLE_KEY] = lambda: latent_position_table(cfg, frames)

    def build(tmp: str) -> list[str]:
        model_dir = os.path.join(tmp, ref["model_name"])
        os.makedirs(model_dir)
        for name in ref["files"]["model"]:
            shutil.copy2(os.path.join(ckpt, "reference", "model", name), model_dir)
        write_reference_file(os.path.join(model_dir, "model.safetensors"), ref["model_keys"],
                             lance_readers(ckpt, cfg) + vision.bundled_readers(), ref["dtypes"], cast, progress, special)
        return [os.path.join(ref["model_name"], "model.safetensors")] + vision.write(tmp, cast, progress)

    return atomic_output(out, overwrite, build)


def _summary(entries: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict:
    dtypes = sorted({str(np.dtype(d)) for _, d in entries.values()})
    return dict(tensors=len(entries), parameters=int(sum(int(np.prod(s)) for s, _ in entries.values())), dtypes=dtypes)


def describe(path: str) -> dict:
    """Per-component keys, shapes, dtypes and parameter counts of a converted or a reference checkpoint."""
    from lance_jax.convert.sources import find_reference

    if os.path.isfile(os.path.join(path, MANIFEST)):
        manifest = read_manifest(path)
        out = {"format": "lance-jax orbax", "components": {}}
        for item in manifest["items"]:
            specs = orbax_io.leaf_specs(os.path.join(path, item))
            out["components"][item] = dict(
                _summary(specs), leaves={".".join(p): [list(s), str(np.dtype(d))] for p, (s, d) in sorted(specs.items())})
        return out
    paths = find_reference(path)
    out = {"format": f"reference ({paths.layout} layout)", "components": {}}
    if paths.model:
        source = TensorSource(model_weight_files(paths.model))
        groups: dict[str, dict] = {}
        for key in source.keys():
            role = "vit (bundled)" if key.startswith(VIT_PREFIX) else "lance"
            groups.setdefault(role, {})[key] = (source.shape(key), source.dtype(key))
        for role, entries in groups.items():
            out["components"][role] = dict(_summary(entries), files=source.files,
                                           keys={k: [list(s), str(d)] for k, (s, d) in entries.items()})
    from lance_jax.convert import components as extra

    out["components"].update(extra.describe_reference(paths))
    return out
