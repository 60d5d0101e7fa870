"""Host plans of KV-cached inference: which chunks are prefilled and which one is queried (NumPy).

Generation (30-inference §3.4): the context = every split before the target `noise` split; the
caption-free context = those of its splits whose first token is not caption (modality 0); the query
= the noise split (vision start, latents, vision end). The whole context is prefilled in one pass:
the mask predicate gives exactly the reference's split-by-split prefill (causal splits attend to the
cache and causally inside, full splits bidirectionally). Released quirk (`kv_position_quirk`, on by
default): the caption-free cache keeps the *conditional* position ids, only its query uses ids
recomputed on the caption-free sequence (20 §3.8; golden `gen.npz:*_ctx_uncond_pos`).

Understanding (30 §6): the context minus its last token is prefilled; decoding feeds that last token
first, with un-shifted MaPE ids (reference quirk 1).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from lance_jax import packing
from lance_jax import positions as P
from lance_jax.config import ModelConfig


@dataclasses.dataclass
class SampleLayout:
    """One rendered sample: token ids with expanded placeholders, per-token modality, splits, grids."""

    input_ids: np.ndarray
    modality: np.ndarray
    split_lens: np.ndarray
    attn_modes: list[str]
    grids: np.ndarray  # (blocks, 3), vision blocks in order (ViT [T/2, H/14, W/14], VAE [t, 2h, 2w])

    def __post_init__(self):
        self.input_ids = np.asarray(self.input_ids, np.int64)
        self.modality = np.asarray(self.modality, np.int64)
        self.split_lens = np.asarray(self.split_lens, np.int64)
        self.grids = np.asarray(self.grids, np.int64).reshape(-1, 3)
        if len(self.split_lens) != len(self.attn_modes):
            raise ValueError(f"{len(self.split_lens)} splits but {len(self.attn_modes)} attention modes")
        if self.split_lens.sum() != len(self.input_ids) or len(self.modality) != len(self.input_ids):
            raise ValueError("split lengths, modality and input ids disagree in length")


def vision_tokens(layout: SampleLayout, cfg: ModelConfig):
    """(vit token indexes, vae token indexes, vae latent-table ids) in sequence order."""
    ids, pads = layout.input_ids, (layout.input_ids == cfg.video_token_id) | (layout.input_ids == cfg.image_token_id)
    starts = np.flatnonzero(ids == cfg.vision_start_token_id)
    blocks = [s for s in starts if s + 1 < len(ids) and pads[s + 1]]
    if len(blocks) != len(layout.grids):
        raise ValueError(f"{len(blocks)} vision blocks but {len(layout.grids)} grids")
    vit, vae, vae_pos = [], [], []
    m = cfg.spatial_merge_size
    for start, grid in zip(blocks, layout.grids):
        n = int(grid[0] * (grid[1] // m) * (grid[2] // m))
        rows = np.arange(start + 1, start + 1 + n)
        if layout.modality[start + 1] == P.MODALITY_REF_VIT:
            vit.append(rows)
        else:
            vae.append(rows)
            vae_pos.append(packing.latent_position_ids((grid[0], grid[1] // m, grid[2] // m), cfg.max_latent_size,
                                                       cfg.max_latent_frames))
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
    return cat(vit), cat(vae), cat(vae_pos)


def _chunk(ids, positions, split_lens, modes, vit_idx, vae_idx, latents, latent_pos, order0: int, split0: int,
           capacities=None):
    """A stream batch of one chunk whose mask ints continue after `order0` rows / `split0` splits."""
    plan = packing.plan_stream_batch(
        token_ids=ids, position_ids=positions, sample_lens=[len(ids)], split_lens=split_lens, attn_modes=modes,
        vit_token_indexes=vit_idx, vae_token_indexes=vae_idx, latents=latents, latent_pos_ids=latent_pos,
        timestep_logits=np.full(len(vae_idx), -np.inf, np.float32), ce_indexes=np.zeros(0, np.int64),
        ce_labels=np.zeros(0, np.int64), capacities=capacities, bucket=8)
    real = plan["sample"] >= 0
    plan["order"] = np.where(real, plan["order"] + order0, 0).astype(np.int32)
    plan["split"] = np.where(real, plan["split"] + split0, -1).astype(np.int32)
    return plan


def _restrict(indexes: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Indexes into a sequence -> indexes into its subsequence `keep` (bool), dropping removed ones."""
    new_index = np.cumsum(keep) - 1
    return new_index[indexes[keep[indexes]]]


@dataclasses.dataclass
class GenerationPlan:
    context: dict  # stream batch, batch row 0 conditional, row 1 caption-free (if text CFG)
    query: dict  # the noise split, same rows
    noisy: np.ndarray  # (Cg,) query gen rows that are integrated (False on clean rows and padding)
    target_vae_rows: np.ndarray  # which of the sample's VAE tokens the query's gen rows are
    debug: dict  # positions and sizes, for parity and inspection


def plan_generation(layout: SampleLayout, cfg: ModelConfig, vae_latents: np.ndarray, clean_rows: np.ndarray | None = None,
                    *, text_cfg: bool = True, kv_position_quirk: bool = True) -> GenerationPlan:
    """Context and query chunks for a generation sample.

    vae_latents: (Nvae, P) one row per VAE token of the sample (conditions clean, target rows = initial
    noise); clean_rows: (Nvae,) target rows that stay clean (i2v first frame).
    """
    tokens = P.RopeTokens.from_model_config(cfg)
    ids, modes = layout.input_ids, list(layout.attn_modes)
    rope = P.sample_position_ids(ids, layout.grids, layout.modality, modes, tokens)
    ends = np.cumsum(layout.split_lens)
    starts = ends - layout.split_lens
    noise = [i for i, m in enumerate(modes) if m == "noise"]
    if len(noise) != 1:
        raise ValueError(f"a generation sample needs exactly one 'noise' split, found {len(noise)}")
    k = noise[0]
    n_ctx, q0, q1 = int(starts[k]), int(starts[k]), int(ends[k])
    vit_idx, vae_idx, vae_pos = vision_tokens(layout, cfg)
    vae_latents = np.asarray(vae_latents, np.float32)
    if len(vae_latents) != len(vae_idx):
        raise ValueError(f"{len(vae_latents)} latent rows for {len(vae_idx)} VAE tokens")
    clean_rows = np.zeros(len(vae_idx), bool) if clean_rows is None else np.asarray(clean_rows, bool)
    in_ctx, in_query = vae_idx < n_ctx, (vae_idx >= q0) & (vae_idx < q1)

    def context(keep_tok, position_ids):
        kept_splits = [i for i in range(k) if keep_tok[starts[i]]]
        return _chunk(ids[keep_tok], position_ids, layout.split_lens[kept_splits], [modes[i] for i in kept_splits],
                      _restrict(vit_idx, keep_tok), _restrict(vae_idx[in_ctx], keep_tok), vae_latents[in_ctx],
                      vae_pos[in_ctx], 0, 0)

    def query(position_ids, order0):
        rel = vae_idx[in_query] - q0
        return _chunk(ids[q0:q1], position_ids, [q1 - q0], ["noise"], np.zeros(0, np.int64), rel,
                      vae_latents[in_query], vae_pos[in_query], order0, k)

    keep_cond = np.arange(len(ids)) < n_ctx
    contexts, queries = [context(keep_cond, rope[:, :n_ctx])], [query(rope[:, q0:q1], n_ctx)]
    debug = dict(ctx_cond_pos=rope[:, :n_ctx], gen_query_pos=rope[:, q0:q1], vit_token_indexes=vit_idx,
                 vae_token_indexes=vae_idx, n_ctx=[n_ctx])
    if text_cfg:
        keep_all, uncond_rope = P.uncond_position_ids(ids, layout.grids, layout.modality, modes, layout.split_lens,
                                                      tokens)
        keep_ctx = keep_all & keep_cond
        split_first_kept = np.array([keep_all[s] for s in starts[:k]])
        keep_ctx &= np.repeat(np.r_[split_first_kept, np.zeros(len(modes) - k, bool)], layout.split_lens)
        n_unc = int(keep_ctx.sum())
        ctx_pos = rope[:, keep_ctx] if kv_position_quirk else uncond_rope[:, :n_unc]
        uq0 = int(keep_all[:q0].sum())
        contexts.append(context(keep_ctx, ctx_pos))
        queries.append(query(uncond_rope[:, uq0:uq0 + (q1 - q0)], n_unc))
        debug.update(ctx_uncond_pos=ctx_pos, uncond_gen_query_pos=uncond_rope[:, uq0:uq0 + (q1 - q0)],
                     n_ctx=[n_ctx, n_unc])
    context_batch = packing.stack_stream_batches(contexts)
    query_batch = packing.stack_stream_batches(queries)
    cg = query_batch["latents"].shape[1]
    target_vae_rows = np.flatnonzero(in_query)
    noisy = np.zeros(cg, bool)
    noisy[: len(target_vae_rows)] = ~clean_rows[in_query]
    return GenerationPlan(context_batch, query_batch, noisy, target_vae_rows, debug)


@dataclasses.dataclass
class UnderstandingPlan:
    prefill: dict  # stream batch (batch 1) of the context minus its last token
    first_token: int  # the context's last token, fed at decode step 0
    decode_positions: np.ndarray  # (3, max_new_tokens) ids of the fed tokens
    order0: int
    split0: int
    debug: dict


def plan_understanding(layout: SampleLayout, cfg: ModelConfig, max_new_tokens: int, *, shift: bool = False):
    """Prefill and decode plan for an x2t sample whose layout ends with the assistant prompt (`...assistant\\n`).

    shift=False reproduces the released understanding inference (no MaPE shift); True uses training ids.
    """
    tokens = P.RopeTokens.from_model_config(cfg)
    ids = layout.input_ids
    n = len(ids)
    if n < 2:
        raise ValueError("an understanding context needs at least two tokens")
    filled = np.concatenate([ids, np.full(max_new_tokens, cfg.pad_token_id)])
    if shift:
        modality = np.concatenate([layout.modality, np.full(max_new_tokens, P.MODALITY_SYSTEM)])
        rope = P.sample_position_ids(filled, layout.grids, modality, list(layout.attn_modes) + ["causal"], tokens)
    else:
        rope = P.x2t_inference_position_ids(filled, layout.grids, tokens)
    split_lens = layout.split_lens.copy()
    split_lens[-1] -= 1  # the last context token is the first decode query
    keep = split_lens > 0
    vit_idx, vae_idx, _ = vision_tokens(layout, cfg)
    if len(vae_idx):
        raise ValueError("understanding samples carry no VAE latents")
    prefill = _chunk(ids[:-1], rope[:, : n - 1], split_lens[keep], [m for m, k in zip(layout.attn_modes, keep) if k],
                     vit_idx, np.zeros(0, np.int64), np.zeros((0, cfg.patch_latent_dim), np.float32),
                     np.zeros(0, np.int64), 0, 0)
    batch = packing.stack_stream_batches([prefill])
    decode_positions = rope[:, n - 1: n - 1 + max_new_tokens]
    return UnderstandingPlan(batch, int(ids[-1]), decode_positions, n - 1, int(keep.sum()),
                             dict(prefill_pos=rope[:, : n - 1], vit_token_indexes=vit_idx))


def understanding_layout(input_ids, split_lens, attn_modes, grids, cfg: ModelConfig) -> SampleLayout:
    """Layout of an x2t sample from its ids alone: every vision block is a ViT block (modality 4, incl. its
    start/end tokens), all other tokens are template/question text (-1). Splits are cut to len(input_ids)."""
    ids = np.asarray(input_ids, np.int64)
    modality = np.full(len(ids), P.MODALITY_SYSTEM, np.int64)
    inside = np.cumsum((ids == cfg.vision_start_token_id).astype(int) - np.r_[0, (ids == cfg.vision_end_token_id)[:-1]])
    modality[inside > 0] = P.MODALITY_REF_VIT
    ends = np.minimum(np.cumsum(split_lens), len(ids))
    lens = np.diff(np.r_[0, ends])
    keep = lens > 0
    return SampleLayout(ids, modality, lens[keep], [m for m, k in zip(attn_modes, keep) if k], grids)
