"""Parity case `vit`: preprocessing (pixels -> patches), host plans, every ViT intermediate, packed call, connector.

Items (`image`, `video2`, ...) are discovered from the npz keys: an item is a prefix with `_grid_thw`
and `_patches`; a prefix with `_grid_thw` but no `_patches` is a packed call over several items (its
input is the concatenation of their patches, matched by grid and by the names its doc mentions).
Sizes come from the golden `vit/config.json` and `connector_variant/connector_config.json`.
"""
from __future__ import annotations

import os
import re

import numpy as np

from lance_jax.parity import TOL_EXACT, TOL_MODULE, CaseResult, Golden, Row, compare, time_jitted

CASE = "vit"


def vit_items(arrays) -> tuple[list[str], list[str]]:
    """(single items, packed groups): prefixes with `_grid_thw`, split by whether `_patches` exists."""
    prefixes = sorted(k[: -len("_grid_thw")] for k in arrays if k.endswith("_grid_thw"))
    return [p for p in prefixes if f"{p}_patches" in arrays], [p for p in prefixes if f"{p}_patches" not in arrays]


def packed_members(golden: Golden, group: str, items: list[str]) -> list[str]:
    """The items of a packed call, in order: the names its doc mentions if their grids fit, else unique grid matches."""
    z = golden.arrays(CASE)
    grids = z[f"{group}_grid_thw"]
    doc = golden.case_meta(CASE)["arrays"].get(f"{group}_grid_thw", {}).get("doc", "")
    mentioned = [it for _, it in sorted((doc.find(f"{it}_patches"), it) for it in items if f"{it}_patches" in doc)]

    def fits(names):
        return len(names) == len(grids) and all(np.array_equal(z[f"{n}_grid_thw"][0], g) for n, g in zip(names, grids))

    if fits(mentioned):
        return mentioned
    matches = [[it for it in items if np.array_equal(z[f"{it}_grid_thw"][0], g)] for g in grids]
    if any(len(m) != 1 for m in matches):
        raise ValueError(f"cannot tell which items make up packed call {group!r} (grids {grids.tolist()})")
    return [m[0] for m in matches]


def forward_fn(cfg):
    """jit(params, patches, plan) -> (tokens, {'intermediates': ...}) for the per-array comparisons."""
    import jax

    from lance_jax.models.vit import VisionTransformer

    model = VisionTransformer(cfg)
    return jax.jit(lambda params, patches, plan: model.apply({"params": params}, patches, plan,
                                                            mutable=["intermediates"]))


def item_rows(item: str, z, cfg, params, forward) -> list[Row]:
    """Every golden array of one item."""
    import jax

    from lance_jax import vision
    from lance_jax.models import vit_layout as L

    rows = []

    def row(name, ours, tol):
        if f"{item}_{name}" in z:
            rows.append(compare(CASE, f"{item}_{name}", ours, z[f"{item}_{name}"], tol))

    grid = z[f"{item}_grid_thw"]
    if f"{item}_pixels" in z:  # golden pixels are already resized and normalised (README D1)
        patches, pgrid = vision.patchify(z[f"{item}_pixels"], cfg.patch_size, cfg.temporal_patch_size,
                                         cfg.spatial_merge_size)
        row("patches", patches, TOL_EXACT)
        rows.append(compare(CASE, f"{item}_grid_thw", pgrid, grid, TOL_EXACT))
    widx, cu = L.window_index(grid, cfg.window_merged, cfg.spatial_merge_size)
    row("window_index", widx, TOL_EXACT)
    row("cu_window_seqlens", cu, TOL_EXACT)
    row("rot_pos_emb", L.rotary_angles(grid, cfg.head_dim, cfg.rope_theta, cfg.spatial_merge_size,
                                       cfg.rope_bf16_tables), TOL_MODULE)
    out, state = jax.device_get(forward(params, z[f"{item}_patches"], L.vit_plan(grid, cfg)))
    inter = state["intermediates"]
    row("patch_embed", inter["patch_embed"]["output"][0], TOL_MODULE)
    blocks = {int(m.group(1)): k for k in z if (m := re.fullmatch(rf"{re.escape(item)}_block(\d+)_out", k))}
    for i, key in sorted(blocks.items()):
        if i >= cfg.depth:
            rows.append(Row(CASE, key, np.inf, np.inf, TOL_MODULE, False, f"the config has {cfg.depth} blocks"))
            continue
        block = inter["blocks"]["output"][0][i] if cfg.scan_blocks else inter[f"blocks_{i}"]["output"][0]
        rows.append(compare(CASE, key, block, z[key], TOL_MODULE))
    row("merger_out", inter["merger"]["output"][0], TOL_MODULE)
    row("out", out, TOL_MODULE)
    return rows


def run(golden: Golden, benchmark: int) -> CaseResult:
    from lance_jax.models import connector as C
    from lance_jax.models import vit as V

    z = golden.arrays(CASE)
    vit_dir = os.path.join(golden.root, "vit")
    cfg = V.load_vit_config(vit_dir)
    params = V.load_vit_params(vit_dir, cfg)
    forward = forward_fn(cfg)
    items, groups = vit_items(z)
    rows = [r for item in items for r in item_rows(item, z, cfg, params, forward)]
    for group in groups:
        members = packed_members(golden, group, items)
        grid = np.concatenate([z[f"{m}_grid_thw"] for m in members])
        rows.append(compare(CASE, f"{group}_grid_thw", grid, z[f"{group}_grid_thw"], TOL_EXACT))
        patches = np.concatenate([z[f"{m}_patches"] for m in members])
        rows.append(compare(CASE, f"{group}_out", V.encode(params, patches, grid, cfg), z[f"{group}_out"], TOL_MODULE))
    connector_dir = os.path.join(golden.root, "connector_variant")
    for key in sorted(k for k in z if k.endswith("_connector_out")):
        ccfg = C.load_connector_config(connector_dir)
        cparams = C.load_connector_params(connector_dir, ccfg)
        ours = C.MLPConnector(ccfg).apply({"params": cparams}, z[key[: -len("_connector_out")] + "_out"])
        rows.append(compare(CASE, key, ours, z[key], TOL_MODULE))
    rows += lance_checkpoint_rows(golden, cfg, params)
    timings = {}
    if benchmark:  # the largest single-item call
        item = max(items, key=lambda it: len(z[f"{it}_patches"]))
        plan = V.vit_plan(z[f"{item}_grid_thw"], cfg)
        timings = time_jitted(V.vit_apply_fn(cfg), params, z[f"{item}_patches"], plan, repeats=benchmark)
    return CaseResult(rows, timings)


def lance_checkpoint_rows(golden: Golden, cfg, params) -> list[Row]:
    """`vit_model.*` inside the Lance checkpoint must hold the same tensors as vit.safetensors (README)."""
    import jax

    from lance_jax.convert.safetensors_io import safetensors_header
    from lance_jax.models import vit as V

    path = os.path.join(golden.model_dir, "model.safetensors")
    if not os.path.exists(path) or not any(k.startswith("vit_model.") for k in safetensors_header(path)):
        return []
    lance = V.load_vit_params(path, cfg, prefix="vit_model.")
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
    return [compare(CASE, "model.safetensors:vit_model.*", flat(lance), flat(params), TOL_EXACT)]
