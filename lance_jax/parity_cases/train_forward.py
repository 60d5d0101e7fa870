"""Parity case `train_forward`: one packed multi-task batch through the training forward and loss.

The golden inputs are turned into a stream batch by the same host code users run (`positions`,
`packing`), so the case checks the whole path; the ViT output is fed from the golden (the ViT has
its own case).
"""
from __future__ import annotations

import numpy as np

from lance_jax import positions as P
from lance_jax.parity import TOL_EXACT, TOL_LLM, TOL_LOSS, TOL_MODULE, CaseResult, Golden, compare, time_jitted

CASE = "train_forward"




def real_splits(split_lens, attn_modes, n_tokens: int):
    """The splits covering the first n_tokens (drops the reference's trailing pad-sample split)."""
    ends = np.cumsum(split_lens)
    k = int(np.searchsorted(ends, n_tokens, side="left")) + 1
    if ends[k - 1] != n_tokens:
        raise ValueError(f"no split boundary at the end of the real tokens ({n_tokens})")
    return np.asarray(split_lens[:k]), list(attn_modes[:k])


def train_forward_inputs(golden: Golden, cfg):
    """Golden train_forward arrays -> (stream batch with batch dim 1, noise (1, Cg, P), extras for checks)."""
    from lance_jax import packing

    z = golden.arrays("train_forward")
    meta = golden.case_meta("train_forward")
    ids = z["packed_text_ids"]
    n = len(ids)
    sample_lens = z["sample_lens"][:-1]  # the last sample is the reference's flex-attention pad filler
    split_lens, modes = real_splits(z["split_lens"], meta["attn_modes"], n)
    grids = [z[f"video_grid_thw_{i}"] for i in range(len(sample_lens))]
    tokens = P.RopeTokens.from_model_config(cfg)
    position_ids = P.packed_position_ids(ids, sample_lens, grids, z["sample_modality"], split_lens, modes, tokens,
                                         has_pad_sample=False)
    shapes = z["patchified_vae_latent_shapes"]
    latents = np.concatenate([packing.latent_tokens(z[f"padded_latent_{i}"], cfg.latent_patch_size)
                              for i in range(len(shapes))])
    latent_pos = np.concatenate([packing.latent_position_ids(s, cfg.max_latent_size, cfg.max_latent_frames)
                                 for s in shapes])
    plan = packing.plan_stream_batch(
        token_ids=ids, position_ids=position_ids, sample_lens=sample_lens, split_lens=split_lens, attn_modes=modes,
        vit_token_indexes=z["packed_vit_token_indexes"], vae_token_indexes=z["packed_vae_token_indexes"],
        latents=latents, latent_pos_ids=latent_pos, timestep_logits=z["packed_timesteps_raw"],
        ce_indexes=z["ce_loss_indexes"], ce_labels=z["packed_label_ids"],
    )
    batch = packing.stack_stream_batches([plan])
    cu, cg = plan["und_ids"].shape[0], plan["latents"].shape[0]
    vit = np.zeros((1, packing.round_up(len(z["vit_out"]), 128), z["vit_out"].shape[1]), np.float32)
    vit[0, : len(z["vit_out"])] = z["vit_out"]  # the ViT is its own case; parity feeds its golden output
    batch["vit_embeds"] = vit
    noise = np.zeros((1, cg, latents.shape[1]), np.float32)
    noise[0, : len(z["noise"])] = z["noise"]
    extras = dict(n=n, position_ids=position_ids, latent_pos=latent_pos, cu=cu, cg=cg)
    return batch, noise, extras


def run(golden: Golden, benchmark: int, params: dict | None = None) -> CaseResult:
    """Compare every train_forward array; `params` defaults to the golden model.safetensors, loaded strictly
    (pass restored params to check a converted checkpoint)."""
    import jax

    from lance_jax import packing
    from lance_jax.convert import load_reference_params
    from lance_jax.layers.masking import MaskTokens, allowed_mask
    from lance_jax.models.lance import Lance

    case = CASE
    z = golden.arrays(case)
    cfg = golden.model_config()
    if params is None:
        params = load_reference_params(golden.model_dir, cfg)
    batch, noise, ex = train_forward_inputs(golden, cfg)
    n = ex["n"]
    model = Lance(cfg)

    @jax.jit
    def forward(params, batch, noise):
        return model.apply({"params": params}, batch, noise=noise, mutable=["intermediates"])

    out, state = forward(params, batch, noise)
    out, inter = jax.device_get((out, state["intermediates"]))
    und_index, gen_index = batch["und_index"][0], batch["gen_index"][0]

    def natural(streams):
        return packing.natural_order(np.asarray(streams[0][0]), np.asarray(streams[1][0]), und_index, gen_index, n)

    gen_real = gen_index >= 0
    mse_rows = out["mse_mask"][0] & gen_real
    rows = []

    def row(name, ours, tol):
        rows.append(compare(case, name, ours, z[name], tol))

    row("position_ids", ex["position_ids"], TOL_EXACT)
    row("packed_latent_position_ids", ex["latent_pos"], TOL_EXACT)
    # the reference lists text indexes then ViT indexes; routing is a set, so compare sorted
    rows.append(compare(case, "und_token_indexes", np.sort(und_index[und_index >= 0]),
                        np.sort(z["und_token_indexes"]), TOL_EXACT))
    row("gen_token_indexes", gen_index[gen_real], TOL_EXACT)
    cu = ex["cu"]
    tokens = MaskTokens(*(natural((batch[k][:, :cu], batch[k][:, cu:]))[None]
                          for k in ("order", "sample", "split", "mode")))
    golden_mask = z["attention_mask_dense"]  # covers the reference's pad sample too: real rows never see it
    rows.append(compare(case, "attention_mask_dense", np.asarray(allowed_mask(tokens, tokens))[0],
                        golden_mask[:n, :n], TOL_EXACT))
    rows.append(compare(case, "attention_mask_dense:real->pad", np.zeros((n, golden_mask.shape[1] - n), bool),
                        golden_mask[:n, n:], TOL_EXACT))
    row("packed_timesteps_effective", out["timesteps"][0][gen_real], TOL_MODULE)
    row("vae2llm_in", out["x_t"][0][gen_real], TOL_MODULE)
    row("time_embed", out["time_embed"][0][gen_real], TOL_MODULE)
    row("latent_pos_embed", out["latent_pos_embed"][0][gen_real], TOL_MODULE)
    row("llm_input_embeds", natural(out["input_embeds"]), TOL_MODULE)
    layer_out = inter["language_model"]["layers"]["output"][0]
    for i in range(cfg.num_layers):
        row(f"hidden_layer{i}", natural((layer_out[0][i], layer_out[1][i])), TOL_LLM)
    row("last_hidden_state", natural(out["hidden"]), TOL_LLM)
    ce_valid = batch["ce_valid"][0]
    row("ce_logits", out["ce_logits"][0][ce_valid], TOL_LLM)
    row("ce_per_token", out["ce_per_token"][0][ce_valid], TOL_LLM)
    row("v_pred", out["v_pred"][0][mse_rows], TOL_LLM)
    row("mse_per_elem", out["mse_per_elem"][0][mse_rows], TOL_LLM)
    for name in ("ce_loss", "mse_loss", "loss"):
        rows.append(compare(case, name, out[name], np.float32(golden.scalar(case, name)), TOL_LOSS))
    timings = time_jitted(forward, params, batch, noise, repeats=benchmark) if benchmark else {}
    return CaseResult(rows, timings)
