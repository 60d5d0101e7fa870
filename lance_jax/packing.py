"""Host-side plan of a packed batch in stream-sorted layout (NumPy).

A packed sequence of N real tokens (several samples, reference order) becomes a *stream batch*:
rows [0, Cu) hold the und tokens (text, special tokens, ViT tokens) in sequence order, rows
[Cu, Cu+Cg) the gen tokens (VAE latents) in packing order, unused rows are padding. Every row keeps
its original index (`order`) so the attention predicate stays causal in the original order. The
capacities Cu, Cg (and the CE / ViT capacities) are static shapes: round them up to buckets so that
jit compiles once per bucket, not once per batch.

Stream batch keys (per packed sequence; `stack_stream_batches` adds the leading batch dim):
  und_ids (Cu,) int32             token ids of und rows (placeholder id on ViT rows, 0 on padding)
  und_vit_slot (Cu,) int32        row of `vit_embeds` for ViT rows, -1 elsewhere
  latents (Cg, P) float32         clean latent tokens x0 (zeros on padding)
  latent_pos_ids (Cg,) int32      row t*S^2 + h*S + w of the fixed 3-D sin-cos table
  timestep_logits (Cg,) float32   raw logits; -inf for clean conditions and padding (-> t = 0)
  position_ids (3, Cu+Cg) int32   MaPE ids
  order, sample, split, mode (Cu+Cg,) int32   mask ints; padding rows have sample = -1
  ce_rows (Kce,) int32            und rows whose next token is supervised
  ce_labels (Kce,) int32          the supervised ids (-100 on padding)
  ce_valid (Kce,) bool            real CE slots (they all count in the CE denominator)
  gen_loss_weight (Cg,), ce_loss_weight (Kce,) float32   optional: each token's factor on its loss term (its
                                  data group's `loss_weight`; 0 on padding). Absent: every factor is 1
  und_index (Cu,), gen_index (Cg,) int32   original sequence index of each row, -1 on padding
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import einops
import numpy as np

from lance_jax.layers.masking import mask_tokens_from_splits

IGNORE_LABEL = -100


class Capacities(NamedTuple):
    und: int
    gen: int
    ce: int
    vit: int


def round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def bucketed_capacities(n_und: int, n_gen: int, n_ce: int, n_vit: int, bucket: int = 128) -> Capacities:
    """Smallest bucket multiples that hold the given counts (gen/ce/vit may be 0 -> one bucket)."""
    return Capacities(round_up(n_und, bucket), round_up(n_gen, bucket), round_up(n_ce, bucket), round_up(n_vit, bucket))


def latent_tokens(latent: np.ndarray, patch: Sequence[int] = (1, 1, 1)) -> np.ndarray:
    """A latent (t, h, w, C) -> tokens (t'*h'*w', pt*ph*pw*C) in (t, h, w) raster order."""
    pt, ph, pw = patch
    t, h, w, _ = latent.shape
    if t % pt or h % ph or w % pw:
        raise ValueError(f"latent shape {latent.shape[:3]} is not divisible by the latent patch {tuple(patch)}")
    return einops.rearrange(latent, "(t pt) (h ph) (w pw) c -> (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)


def latent_position_ids(grid: Sequence[int], max_latent_size: int, max_latent_frames: int) -> np.ndarray:
    """(t*h*w,) rows f*S^2 + y*S + x of the fixed table for a latent token grid (t, h, w)."""
    t, h, w = (int(x) for x in grid)
    s = max_latent_size
    if h > s or w > s or t > max_latent_frames:
        raise ValueError(
            f"latent grid {tuple(grid)} exceeds the position table ({max_latent_frames} frames x {s} x {s}); "
            "raise max_latent_size / max_num_frames"
        )
    f, y, x = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return (f * s * s + y * s + x).reshape(-1).astype(np.int32)


def _pad(a: np.ndarray, n: int, fill) -> np.ndarray:
    if len(a) > n:
        raise ValueError(f"{len(a)} rows do not fit capacity {n}")
    out = np.full((n,) + a.shape[1:], fill, dtype=a.dtype)
    out[: len(a)] = a
    return out


def plan_stream_batch(
    *,
    token_ids: np.ndarray,
    position_ids: np.ndarray,
    sample_lens: Sequence[int],
    split_lens: Sequence[int],
    attn_modes: Sequence[str],
    vit_token_indexes: np.ndarray,
    vae_token_indexes: np.ndarray,
    latents: np.ndarray,
    latent_pos_ids: np.ndarray,
    timestep_logits: np.ndarray,
    ce_indexes: np.ndarray,
    ce_labels: np.ndarray,
    capacities: Capacities | None = None,
    bucket: int = 128,
    gen_loss_weight: np.ndarray | None = None,
    ce_loss_weight: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """One packed sequence (N real tokens, reference order) -> its stream batch (module docstring).

    vae_token_indexes / latents / latent_pos_ids / timestep_logits (/ gen_loss_weight) are aligned (one row
    per latent token, packing order); ce_loss_weight is aligned with ce_indexes; vit_token_indexes are in the
    order of the ViT output rows.
    """
    token_ids = np.asarray(token_ids, np.int32)
    n = len(token_ids)
    vae_idx = np.asarray(vae_token_indexes, np.int64)
    vit_idx = np.asarray(vit_token_indexes, np.int64)
    ce_idx = np.asarray(ce_indexes, np.int64)
    if not (len(vae_idx) == len(latents) == len(latent_pos_ids) == len(timestep_logits)):
        raise ValueError(
            f"latent rows disagree: {len(vae_idx)} vae indexes, {len(latents)} latents, "
            f"{len(latent_pos_ids)} position ids, {len(timestep_logits)} timesteps"
        )
    if position_ids.shape != (3, n):
        raise ValueError(f"position_ids shape {position_ids.shape} != (3, {n})")
    if len(ce_idx) != len(ce_labels):
        raise ValueError(f"{len(ce_idx)} CE indexes but {len(ce_labels)} labels")
    is_gen = np.zeros(n, bool)
    is_gen[vae_idx] = True
    und_idx = np.flatnonzero(~is_gen)
    if is_gen[vit_idx].any() or is_gen[ce_idx].any():
        raise ValueError("ViT tokens and CE positions must be und (non-latent) tokens")
    caps = capacities or bucketed_capacities(len(und_idx), len(vae_idx), len(ce_idx), len(vit_idx), bucket)

    row_of = np.full(n, -1, np.int64)  # original index -> und row
    row_of[und_idx] = np.arange(len(und_idx))
    vit_slot = np.full(n, -1, np.int32)
    vit_slot[vit_idx] = np.arange(len(vit_idx))

    mask = mask_tokens_from_splits(sample_lens, split_lens, attn_modes)
    if len(mask["order"]) != n:
        raise ValueError(f"sample/split lengths cover {len(mask['order'])} tokens, the sequence has {n}")
    und_rows, gen_rows = _pad(und_idx, caps.und, -1), _pad(vae_idx, caps.gen, -1)
    stream_index = np.concatenate([und_rows, gen_rows])
    real = stream_index >= 0

    def seq_field(values, fill):
        out = np.full(stream_index.shape + values.shape[1:], fill, values.dtype)
        out[real] = values[stream_index[real]]
        return out

    plan = dict(
        und_ids=_pad(token_ids[und_idx], caps.und, 0),
        und_vit_slot=_pad(vit_slot[und_idx], caps.und, -1),
        latents=_pad(np.asarray(latents, np.float32), caps.gen, 0.0),
        latent_pos_ids=_pad(np.asarray(latent_pos_ids, np.int32), caps.gen, 0),
        timestep_logits=_pad(np.asarray(timestep_logits, np.float32), caps.gen, -np.inf),
        position_ids=np.stack([seq_field(np.asarray(p, np.int32), 0) for p in position_ids]),
        order=seq_field(mask["order"], 0),
        sample=seq_field(mask["sample"], -1),
        split=seq_field(mask["split"], -1),
        mode=seq_field(mask["mode"], 0),
        ce_rows=_pad(row_of[ce_idx].astype(np.int32), caps.ce, 0),
        ce_labels=_pad(np.asarray(ce_labels, np.int32), caps.ce, IGNORE_LABEL),
        ce_valid=_pad(np.ones(len(ce_idx), bool), caps.ce, False),
        und_index=und_rows.astype(np.int32),
        gen_index=gen_rows.astype(np.int32),
    )
    for name, w, n_rows, cap in (("gen_loss_weight", gen_loss_weight, len(vae_idx), caps.gen),
                                 ("ce_loss_weight", ce_loss_weight, len(ce_idx), caps.ce)):
        if w is None:
            continue
        if np.shape(w) != (n_rows,):
            raise ValueError(f"{name} has shape {np.shape(w)}, expected ({n_rows},): one weight per row")
        plan[name] = _pad(np.asarray(w, np.float32), cap, 0.0)
    return plan


# field -> (which capacity sizes its row axis, fill value); the row axis is the last one except for latents.
_FIELDS = {
    "und_ids": ("und", 0), "und_vit_slot": ("und", -1), "und_index": ("und", -1),
    "latents": ("gen", 0.0), "latent_pos_ids": ("gen", 0), "timestep_logits": ("gen", -np.inf), "gen_index": ("gen", -1),
    "position_ids": ("seq", 0), "order": ("seq", 0), "sample": ("seq", -1), "split": ("seq", -1), "mode": ("seq", 0),
    "ce_rows": ("ce", 0), "ce_labels": ("ce", IGNORE_LABEL), "ce_valid": ("ce", False),
    "gen_loss_weight": ("gen", 0.0), "ce_loss_weight": ("ce", 0.0),  # optional fields
}


def stream_capacities(plan: dict[str, np.ndarray]) -> Capacities:
    """Capacities of a plan (batched or not); vit is the number of `vit_embeds` rows (0 if absent)."""
    vit = plan["vit_embeds"].shape[-2] if "vit_embeds" in plan else 0
    return Capacities(plan["und_ids"].shape[-1], plan["latents"].shape[-2], plan["ce_rows"].shape[-1], vit)


def pad_stream_batch(plan: dict[str, np.ndarray], capacities: Capacities) -> dict[str, np.ndarray]:
    """The same plan with larger capacities (padding rows appended; outputs of real rows unchanged)."""
    old = stream_capacities(plan)
    grow = {"und": capacities.und - old.und, "gen": capacities.gen - old.gen, "ce": capacities.ce - old.ce}
    if min(grow.values()) < 0 or capacities.vit < old.vit:
        raise ValueError(f"cannot shrink capacities {old} to {capacities}")
    out = dict(plan)
    for key, (kind, fill) in _FIELDS.items():
        if key not in plan:
            continue
        a = plan[key]
        axis = a.ndim - (2 if key == "latents" else 1)
        if kind == "seq":  # und rows then gen rows: pad each part
            und, gen = np.split(a, [old.und], axis=axis)
            out[key] = np.concatenate([_pad_axis(und, axis, grow["und"], fill), _pad_axis(gen, axis, grow["gen"], fill)], axis)
        else:
            out[key] = _pad_axis(a, axis, grow[kind], fill)
    if "vit_embeds" in plan:
        out["vit_embeds"] = _pad_axis(plan["vit_embeds"], plan["vit_embeds"].ndim - 2, capacities.vit - old.vit, 0.0)
    return out


def _pad_axis(a: np.ndarray, axis: int, n: int, fill) -> np.ndarray:
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, n)
    return np.pad(a, widths, constant_values=fill)


def stack_stream_batches(plans: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack plans into a batch (leading dim B), padding each to the largest capacities."""
    caps = Capacities(*np.max([stream_capacities(p) for p in plans], axis=0).tolist())
    padded = [pad_stream_batch(p, caps) for p in plans]
    keys = set(padded[0])
    if any(set(p) != keys for p in padded):
        raise ValueError("plans have different keys")
    return {k: np.stack([p[k] for p in padded]) for k in padded[0]}


def natural_order(und_rows: np.ndarray, gen_rows: np.ndarray, und_index: np.ndarray, gen_index: np.ndarray, n: int):
    """Scatter per-row values of one sequence (Cu, ...) and (Cg, ...) back to sequence order (n, ...)."""
    out = np.zeros((n,) + und_rows.shape[1:], und_rows.dtype)
    out[und_index[und_index >= 0]] = und_rows[und_index >= 0]
    out[gen_index[gen_index >= 0]] = gen_rows[gen_index >= 0]
    return out


def dummy_stream_batch(cfg, batch: int = 1, capacities: Capacities = Capacities(8, 8, 4, 4)) -> dict[str, np.ndarray]:
    """A shape-only stand-in (zeros) with the given capacities, for init and shape evaluation."""
    cu, cg, kce, kv = capacities
    n = cu + cg
    b = dict(
        und_ids=np.zeros((batch, cu), np.int32),
        und_vit_slot=np.full((batch, cu), -1, np.int32),
        latents=np.zeros((batch, cg, cfg.patch_latent_dim), np.float32),
        latent_pos_ids=np.zeros((batch, cg), np.int32),
        timestep_logits=np.zeros((batch, cg), np.float32),
        position_ids=np.zeros((batch, 3, n), np.int32),
        order=np.tile(np.arange(n, dtype=np.int32), (batch, 1)),
        sample=np.zeros((batch, n), np.int32),
        split=np.zeros((batch, n), np.int32),
        mode=np.zeros((batch, n), np.int32),
        ce_rows=np.zeros((batch, kce), np.int32),
        ce_labels=np.zeros((batch, kce), np.int32),
        ce_valid=np.ones((batch, kce), bool),
        vit_embeds=np.zeros((batch, kv, cfg.vit_out_hidden_size), np.float32),
    )
    return b
