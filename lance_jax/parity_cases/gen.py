"""Parity case `gen`: KV-cached generation (t2i, image_edit) with and without text CFG.

Every step of the reference's `validation_gen_KVcache` is checked: token layout, MaPE ids of both
CFG branches (incl. the released position quirk of the caption-free cache), the prefilled context's
embeddings and hidden states, the step-0 query, per-step velocities and the whole Euler trajectory.
"""
from __future__ import annotations

import numpy as np

from lance_jax.parity import (TOL_EXACT, TOL_LLM, TOL_MODULE, TOL_TRAJECTORY, CaseResult, Golden, compare,
                              time_jitted)

CASE = "gen"


def _tasks(z: dict) -> list[str]:
    return sorted(k[: -len("_input_ids")] for k in z if k.endswith("_input_ids"))


def _natural(streams, batch: dict, row: int, n: int):
    from lance_jax import packing

    return packing.natural_order(np.asarray(streams[0][row]), np.asarray(streams[1][row]), batch["und_index"][row],
                                 batch["gen_index"][row], n)


def sample_latents(z: dict, task: str, layout, cfg) -> np.ndarray:
    """One row per VAE token: clean condition latents from `padded_latent_i`, target rows from the noise."""
    from lance_jax import packing
    from lance_jax.kv_plan import vision_tokens

    noise = z[f"{task}_noise_init_all"]
    _, vae_idx, _ = vision_tokens(layout, cfg)
    rows = noise.copy()
    items = sorted(k for k in z if k.startswith(f"{task}_padded_latent_"))
    cond = [packing.latent_tokens(z[k], cfg.latent_patch_size) for k in items]
    target = np.isin(vae_idx, z[f"{task}_mse_loss_indexes"])
    if cond:
        stacked = np.concatenate(cond)[: len(rows)]
        rows[~target] = stacked[~target]
    return rows


def run(golden: Golden, benchmark: int) -> CaseResult:
    import jax

    from lance_jax.convert import load_reference_params
    from lance_jax.kv_plan import SampleLayout, plan_generation
    from lance_jax.models.backbone import KVCache
    from lance_jax.models.lance import Lance
    from lance_jax.sampling import CFGConfig, denoise, schedule

    z, meta = golden.arrays(CASE), golden.case_meta(CASE)
    cfg = golden.model_config()
    inference = golden.meta_lance_config().get("inference", {})
    params = load_reference_params(golden.model_dir, cfg)
    model = Lance(cfg)
    times = schedule(int(inference["validation_num_timesteps"]), float(inference["validation_timestep_shift"]))
    rows, timings = [compare(CASE, "timesteps", times, z["timesteps"], TOL_EXACT)], {}
    for task in _tasks(z):
        layout = SampleLayout(z[f"{task}_input_ids"], z[f"{task}_sample_modality"], z[f"{task}_split_lens"],
                              meta[f"{task}_attn_modes"], z[f"{task}_video_grid_thw"])
        plan = plan_generation(layout, cfg, sample_latents(z, task, layout, cfg))

        def row(name, ours, tol, golden_name=None):
            rows.append(compare(CASE, f"{task}:{name}", ours, z[f"{task}_{golden_name or name}"], tol))

        row("packed_vae_token_indexes", plan.debug["vae_token_indexes"], TOL_EXACT)
        for name in ("ctx_cond_pos", "ctx_uncond_pos", "gen_query_pos", "uncond_gen_query_pos"):
            row(name, plan.debug[name], TOL_EXACT)
        context = dict(plan.context)
        if f"{task}_vit_patches" in z:
            from lance_jax.models.vit import encode, load_vit_config, load_vit_params

            vcfg = load_vit_config(f"{golden.root}/vit")
            vit_out = np.asarray(encode(load_vit_params(f"{golden.root}/vit", vcfg), z[f"{task}_vit_patches"],
                                        z[f"{task}_vit_grid_thw"], vcfg))
            row("packed_vit_token_indexes", plan.debug["vit_token_indexes"], TOL_EXACT)
            row("vit_out", vit_out, TOL_MODULE)
            context["vit_embeds"] = np.repeat(vit_out[None], context["und_ids"].shape[0], axis=0)
        cap = context["und_ids"].shape[1] + context["latents"].shape[1]
        prefill = jax.jit(lambda p, b: model.apply({"params": p}, b, KVCache.empty(cfg, b["und_ids"].shape[0], cap),
                                                   method=Lance.extend))
        hidden, embeds, cache = prefill(params, context)
        for branch, b in (("cond", 0), ("uncond", 1)):
            n = plan.debug["n_ctx"][b]
            row(f"ctx_{branch}_embeds", _natural(embeds, context, b, n), TOL_MODULE)
            row(f"ctx_{branch}_hidden", _natural(hidden, context, b, n), TOL_LLM)
        n_query = plan.debug["gen_query_pos"].shape[1]
        x0 = plan.query["latents"][0]
        for variant, scale in (("cfg", float(inference["cfg_text_scale"])), ("nocfg", 1.0)):
            cfg_opts = CFGConfig(scale, tuple(inference["cfg_interval"]), inference["cfg_renorm_type"],
                                 float(inference["cfg_renorm_min"]))
            final, rec = denoise(model, params, plan.query, cache, x0, plan.noisy, times, cfg_opts, record=True,
                                 progress=False)
            real = slice(0, len(plan.target_vae_rows))
            xs = np.stack([np.asarray(r["x"])[real] for r in rec] + [np.asarray(final)[real]])
            row(f"{variant}_x_steps", xs, TOL_TRAJECTORY)
            grid = z[f"{task}_{variant}_x_final_thwc"].shape
            row(f"{variant}_x_final_thwc", np.asarray(final)[real].reshape(grid), TOL_TRAJECTORY)
            row(f"{variant}_v_cond", np.stack([np.asarray(r["v_cond"])[real] for r in rec]), TOL_TRAJECTORY)
            row(f"{variant}_step0_hidden_cond", _natural(rec[0]["hidden"], plan.query, 0, n_query), TOL_LLM)
            if variant == "nocfg":
                row("gen_query_embeds_step0", _natural(rec[0]["inputs"], plan.query, 0, n_query), TOL_MODULE)
                continue
            row("cfg_cfg_active", np.array([r["active"] for r in rec]), TOL_EXACT)
            row("cfg_v_uncond", np.stack([np.asarray(r["v_uncond"])[real] for r in rec]), TOL_TRAJECTORY)
            row("cfg_v_applied", np.stack([np.asarray(r["v"])[real] for r in rec]), TOL_TRAJECTORY)
        if benchmark:
            timings[f"{task}_prefill"] = time_jitted(prefill, params, context, repeats=benchmark)["median_s"]
    return CaseResult(rows, timings)
