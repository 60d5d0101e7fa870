"""Parity case `positions`: MaPE ids of every layout of positions.npz, exact."""
from __future__ import annotations

import time

import numpy as np

from lance_jax import positions as P
from lance_jax.parity import TOL_EXACT, CaseResult, Golden, Row, compare

CASE = "positions"




def position_layouts(golden: Golden) -> list[str]:
    """Layout names of positions.npz (`train_t2i`, `infer_x2t_image`, ...), discovered from its keys."""
    keys = golden.arrays("positions")
    return sorted(k[: -len("_input_ids")] for k in keys if k.endswith("_input_ids") and not k.endswith("_full_input_ids"))


def position_rows(golden: Golden, layout: str, tokens: P.RopeTokens) -> list[Row]:
    """Exact comparisons for one layout: builder, shift, text-CFG branch, x2t inference/train styles."""
    arrays = golden.arrays("positions")
    z = {k[len(layout) + 1:]: v for k, v in arrays.items() if k.startswith(layout + "_")}
    modes = golden.case_meta("positions")["layouts"].get(layout, {}).get("attn_modes")
    ids, grids = z["input_ids"], z["video_grid_thw"]
    rows = []

    def row(name, ours, want):
        rows.append(compare("positions", f"{layout}:{name}", ours, want, TOL_EXACT))

    if "rope_raw" in z:
        row("rope_raw", P.rope_index(ids, grids, tokens), z["rope_raw"])
        row("rope", P.sample_position_ids(ids, grids, z["sample_modality"], modes, tokens), z["rope"])
    else:  # understanding inference: context + pad ids, builder only (no MaPE shift, reference quirk 1)
        row("rope", P.x2t_inference_position_ids(ids, grids, tokens), z["rope"])
    if "uncond_rope" in z:
        keep, uncond = P.uncond_position_ids(ids, grids, z["sample_modality"], modes, z["split_lens"], tokens)
        row("uncond_mask", keep, z["uncond_mask"])
        row("uncond_rope", uncond, z["uncond_rope"])
    if "full_rope_train_style" in z:
        mod = z["sample_modality_full"]
        modes = modes or (["full"] if (mod == P.MODALITY_REF_VIT).any() else ["causal"])
        row("full_rope_train_style", P.sample_position_ids(z["full_input_ids"], grids, mod, modes, tokens),
            z["full_rope_train_style"])
    return rows


def run(golden: Golden, benchmark: int) -> CaseResult:
    tokens = P.RopeTokens.from_model_config(golden.model_config())
    layouts = position_layouts(golden)
    rows = [r for layout in layouts for r in position_rows(golden, layout, tokens)]
    timings = {}
    if benchmark:  # host NumPy work: wall time of all layouts
        runs = []
        for _ in range(benchmark):
            t0 = time.perf_counter()
            for layout in layouts:
                position_rows(golden, layout, tokens)
            runs.append(time.perf_counter() - t0)
        timings = {"host_median_s": float(np.median(runs))}
    return CaseResult(rows, timings)
