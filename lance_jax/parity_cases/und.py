"""Parity case `und`: x2t greedy decoding over a KV cache (the reference's `validation_und_KVcache`).

Checks the prefill (embeddings, un-shifted MaPE ids, hidden states), the ids of every fed token, the
raw logits of every step and the generated ids exactly.
"""
from __future__ import annotations

import numpy as np

from lance_jax.parity import TOL_EXACT, TOL_LLM, TOL_MODULE, CaseResult, Golden, compare

CASE = "und"


def run(golden: Golden, benchmark: int) -> CaseResult:
    import jax

    from lance_jax import packing
    from lance_jax.convert import load_reference_params
    from lance_jax.kv_plan import plan_understanding, understanding_layout
    from lance_jax.models.backbone import KVCache
    from lance_jax.models.lance import Lance
    from lance_jax.models.vit import encode, load_vit_config, load_vit_params
    from lance_jax.sampling import decode

    z, meta = golden.arrays(CASE), golden.case_meta(CASE)
    cfg = golden.model_config()
    params = load_reference_params(golden.model_dir, cfg)
    model = Lance(cfg)
    max_new = int(golden.scalar(CASE, "max_length"))
    layout = understanding_layout(z["context_ids"], z["split_lens"], meta["attn_modes"], z["vit_grid_thw"], cfg)
    plan = plan_understanding(layout, cfg, max_new)
    rows = []

    def row(name, ours, tol):
        rows.append(compare(CASE, name, ours, z[name], tol))

    vcfg = load_vit_config(f"{golden.root}/vit")
    vit_out = np.asarray(encode(load_vit_params(f"{golden.root}/vit", vcfg), z["vit_patches"], z["vit_grid_thw"], vcfg))
    row("vit_out", vit_out, TOL_MODULE)
    batch = dict(plan.prefill, vit_embeds=vit_out[None])
    n = len(z["context_ids"]) - 1
    cap = batch["und_ids"].shape[1] + batch["latents"].shape[1]
    cache = KVCache.empty(cfg, 1, cap + max_new)
    hidden, embeds, cache = jax.jit(lambda p, b, c: model.apply({"params": p}, b, c, method=Lance.extend))(
        params, batch, cache)

    def natural(streams):
        return packing.natural_order(np.asarray(streams[0][0]), np.asarray(streams[1][0]), batch["und_index"][0],
                                     batch["gen_index"][0], n)

    row("prefill_pos", plan.debug["prefill_pos"], TOL_EXACT)
    row("prefill_embeds", natural(embeds), TOL_MODULE)
    row("prefill_hidden", natural(hidden), TOL_LLM)
    row("decode_pos", plan.decode_positions, TOL_EXACT)
    ids, count, logits = decode(model, params, cache, plan.first_token, plan.decode_positions, plan.order0,
                                plan.split0, jax.random.PRNGKey(0), max_new_tokens=max_new,
                                vocab_eff=cfg.vocab_size_eff, eos_id=cfg.eos_token_id, record_logits=True)
    count = int(count)
    row("step_logits", np.asarray(logits)[:count], TOL_LLM)
    row("generated_ids", np.asarray(ids)[:count], TOL_EXACT)
    return CaseResult(rows)
