"""MaPE 3-axis rotary position ids (host side, NumPy only).

Reproduces the reference's `get_rope_index` (Qwen2.5-VL MRoPE index builder) and
`shift_position_ids` (pro_type 10) for one sample, the text-CFG unconditional branch and a packed
training stream. See spec 20 §2.2-2.5, §3.8, §3.9 and 10 §3.2-3.3.

The builder is sequential over vision blocks, so it runs here, in the input pipeline, and the
jitted model receives int32 (3, L) arrays (rows T, H, W).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

MODALITY_SYSTEM, MODALITY_TEXT, MODALITY_NOISE, MODALITY_REF_SOURCE, MODALITY_REF_IMAGE, MODALITY_REF_VIT = (
    -1, 0, 1, 2, 3, 4)

ATTN_MODES = ("causal", "full", "full_noise", "noise", "full_noise_target")
# 'full_noise_target' is a dead knob of the reference that behaves as 'full'.
_GATE_MODES = frozenset({"full", "full_noise", "full_noise_target"})

# Hard-wired in the reference (its pos_shift argument is ignored).
VIT_T_START = 1000
REF_IMAGE_T_START = 2000


@dataclasses.dataclass(frozen=True)
class RopeTokens:
    """Token ids and constants the index builder needs, read from the model config."""
    vision_start_id: int
    image_token_id: int
    video_token_id: int
    spatial_merge_size: int = 2
    tokens_per_second: int = 2
    second_per_grid: float = 1.0  # Lance passes 1.0 for every block, so real fps never matters

    @classmethod
    def from_model_config(cls, cfg: Any) -> "RopeTokens":
        """From any object with ModelConfig's attribute names (`lance_jax.config.ModelConfig`)."""
        return cls(vision_start_id=int(cfg.vision_start_token_id), image_token_id=int(cfg.image_token_id),
                   video_token_id=int(cfg.video_token_id), spatial_merge_size=int(cfg.spatial_merge_size),
                   tokens_per_second=int(cfg.tokens_per_second))


def _as_grids(grids) -> np.ndarray:
    if grids is None:
        return np.zeros((0, 3), np.int64)
    g = np.asarray(grids, np.int64).reshape(-1, 3)
    if (g <= 0).any():
        raise ValueError(f"grids must be positive, got {g.tolist()}")
    return g


def _vision_blocks(ids: np.ndarray, tokens: RopeTokens) -> list[tuple[int, int]]:
    """(first placeholder index, placeholder count) of every `VS` + placeholder-run block, in order."""
    is_ph = (ids == tokens.image_token_id) | (ids == tokens.video_token_id)
    vs = np.flatnonzero(ids[:-1] == tokens.vision_start_id)
    starts = vs[is_ph[vs + 1]] + 1
    # A block's placeholders are the run of identical ids after its VS; run ends = where the id changes.
    changes = np.append(np.flatnonzero(ids[1:] != ids[:-1]) + 1, ids.size)
    ends = changes[np.searchsorted(changes, starts, side="right")]
    counts = ends - starts
    if counts.sum() != is_ph.sum():
        raise ValueError(f"{int(is_ph.sum() - counts.sum())} placeholder token(s) lie outside a "
                         "vision_start-opened block")
    return list(zip(starts.tolist(), counts.tolist()))


def rope_index(input_ids, grids, tokens: RopeTokens) -> np.ndarray:
    """MRoPE index builder (`get_rope_index`) for one sample.

    input_ids: (L,) int token ids, placeholders included. grids: (k, 3) declared grids (t, h, w), one
    per vision block in block order (ViT `[T/2, H/14, W/14]`, VAE `[t, 2h, 2w]`).
    Returns (3, L) int32 rows (T, H, W).
    """
    ids = np.asarray(input_ids).reshape(-1)
    g = _as_grids(grids)
    blocks = _vision_blocks(ids, tokens)
    if len(blocks) != len(g):
        raise ValueError(f"{len(blocks)} vision blocks in input_ids but {len(g)} grids")
    m = tokens.spatial_merge_size
    pos = np.empty((3, ids.size), np.int64)
    cursor, nxt = 0, 0
    for k, ((start, count), (gt, gh, gw)) in enumerate(zip(blocks, g.tolist())):
        if gh % m or gw % m:
            raise ValueError(f"grid {k} {[gt, gh, gw]}: h and w must be multiples of merge {m}")
        nh, nw = gh // m, gw // m
        if count != gt * nh * nw:
            raise ValueError(f"vision block {k} has {count} placeholders but grid {[gt, gh, gw]} "
                             f"implies t*(h/{m})*(w/{m}) = {gt * nh * nw}")
        pos[:, cursor:start] = nxt + np.arange(start - cursor)  # text run, VS included
        base = nxt + start - cursor
        # Image-pad blocks have temporal stride 0 (upstream Qwen2.5-VL); truncation as in `.long()`.
        sec = tokens.second_per_grid if ids[start] == tokens.video_token_id else 0.0
        t_ids = (np.arange(gt) * sec * tokens.tokens_per_second).astype(np.int64)
        tt, hh, ww = np.meshgrid(t_ids, np.arange(nh), np.arange(nw), indexing="ij")
        pos[:, start:start + count] = base + np.stack([tt.ravel(), hh.ravel(), ww.ravel()])
        cursor, nxt = start + count, base + max(int(t_ids[-1]), nh - 1, nw - 1) + 1
    pos[:, cursor:] = nxt + np.arange(ids.size - cursor)
    return pos.astype(np.int32)


def _check_modes(attn_modes: Sequence[str]) -> list[str]:
    modes = [str(m) for m in attn_modes]
    bad = sorted({m for m in modes if m not in ATTN_MODES})
    if bad:
        raise ValueError(f"unknown attn mode(s) {bad}; expected one of {ATTN_MODES}")
    return modes


def _move_t_start(pos: np.ndarray, sel: np.ndarray, t_start: int) -> None:
    if pos[:, sel].sum() != 0:  # the reference's skip-if-sum-is-zero test
        first_t = pos[0, np.flatnonzero(sel)[0]]
        pos[0, sel] += t_start - first_t


def mape_shift(position_ids, modality, attn_modes) -> np.ndarray:
    """MaPE shift (`shift_position_ids`) of one sample's builder ids; returns a new (3, L) int32 array.

    modality: (L,) per-token codes (MODALITY_*). attn_modes: the sample's split modes. Only when some
    split is full/full_noise: ViT (code 4) T row moved to start at 1000, ref-image (code 3) T row to
    2000, and the edit target (code 1) takes the source's (code 2) ids when their counts match.
    Nothing after a moved block is renumbered.
    """
    pos = np.array(position_ids, dtype=np.int64, copy=True)
    mod = np.asarray(modality).reshape(-1)
    if pos.ndim != 2 or pos.shape[0] != 3:
        raise ValueError(f"position_ids must be (3, L), got {pos.shape}")
    if mod.size != pos.shape[1]:
        raise ValueError(f"modality has {mod.size} entries but position_ids has {pos.shape[1]} tokens")
    if not _GATE_MODES.intersection(_check_modes(attn_modes)):
        return pos.astype(np.int32)
    _move_t_start(pos, mod == MODALITY_REF_VIT, VIT_T_START)
    _move_t_start(pos, mod == MODALITY_REF_IMAGE, REF_IMAGE_T_START)
    source, target = mod == MODALITY_REF_SOURCE, mod == MODALITY_NOISE
    # Unequal counts (other size/frame count, two sources) silently keep the target's own ids.
    if pos[:, source].sum() != 0 and source.sum() == target.sum():
        pos[:, target] = pos[:, source]
    return pos.astype(np.int32)


def sample_position_ids(input_ids, grids, modality, attn_modes, tokens: RopeTokens, *, shift=True) -> np.ndarray:
    """Ids of one sample as training and generation inference use them: builder (+ shift). (3, L) int32."""
    pos = rope_index(input_ids, grids, tokens)
    return mape_shift(pos, modality, attn_modes) if shift else pos


def x2t_inference_position_ids(input_ids, grids, tokens: RopeTokens) -> np.ndarray:
    """Understanding (x2t) inference ids: builder only, NO shift, as the reference decodes (spec 20 §6.1).

    Training shifted the same samples' ViT T ids to 1000+; use `sample_position_ids` for that style.
    """
    return rope_index(input_ids, grids, tokens)


def _reduced_splits(split_lens, attn_modes, keep: np.ndarray) -> tuple[np.ndarray, list[str]]:
    lens = np.asarray(split_lens, np.int64).reshape(-1)
    modes = _check_modes(attn_modes)
    if len(modes) != lens.size:
        raise ValueError(f"{lens.size} split_lens but {len(modes)} attn_modes")
    if lens.sum() != keep.size:
        raise ValueError(f"split_lens sum to {int(lens.sum())} but the sample has {keep.size} tokens")
    kept_before = np.concatenate([[0], np.cumsum(keep)])
    kept = kept_before[np.cumsum(lens)] - kept_before[np.cumsum(lens) - lens]
    return kept[kept > 0], [m for m, n in zip(modes, kept) if n > 0]


def uncond_position_ids(input_ids, grids, modality, attn_modes, split_lens, tokens: RopeTokens):
    """Text-CFG unconditional branch, clean definition (spec 20 §3.8): caption (code 0) tokens removed.

    Returns (keep_mask (L,) bool, ids (3, L') int32): builder on the reduced sequence (same grids),
    shifted with the reduced modality and the reduced split list (splits that become empty vanish).
    """
    ids = np.asarray(input_ids).reshape(-1)
    mod = np.asarray(modality).reshape(-1)
    if mod.size != ids.size:
        raise ValueError(f"modality has {mod.size} entries but input_ids has {ids.size}")
    keep = mod != MODALITY_TEXT
    _, modes = _reduced_splits(split_lens, attn_modes, keep)
    return keep, sample_position_ids(ids[keep], grids, mod[keep], modes, tokens)


def _sample_of_splits(split_lens: np.ndarray, sample_lens: np.ndarray) -> np.ndarray:
    if split_lens.sum() != sample_lens.sum():
        raise ValueError(f"split_lens sum to {int(split_lens.sum())} but sample_lens to {int(sample_lens.sum())}")
    split_ends, sample_ends = np.cumsum(split_lens), np.cumsum(sample_lens)
    owner = np.searchsorted(sample_ends, split_ends - split_lens, side="right")
    owner_of_end = np.searchsorted(sample_ends, split_ends, side="left")
    straddling = np.flatnonzero((owner != owner_of_end) & (split_lens > 0))
    if straddling.size:
        raise ValueError(f"split(s) {straddling.tolist()} straddle a sample boundary")
    return owner


def packed_position_ids(input_ids, sample_lens, grids_per_sample, modality, split_lens, attn_modes,
                        tokens: RopeTokens, *, has_pad_sample=True) -> np.ndarray:
    """Ids of a packed training stream (`Lance.forward`): builder + shift per sample, restarting at 0.

    input_ids, modality: (N,) stream arrays. sample_lens: (S,); with has_pad_sample the last entry is
    the filler pad sample, whose tokens may be absent from input_ids (then N = sum of the real
    samples) and otherwise get zeros. split_lens/attn_modes: global split list covering all S
    samples (pad split included). grids_per_sample: one (k_i, 3) grid list per real sample (an
    extra empty entry for the pad sample is accepted). Returns (3, N) int32.
    """
    ids = np.asarray(input_ids).reshape(-1)
    mod = np.asarray(modality).reshape(-1)
    s_lens = np.asarray(sample_lens, np.int64).reshape(-1)
    sp_lens = np.asarray(split_lens, np.int64).reshape(-1)
    modes = _check_modes(attn_modes)
    if len(modes) != sp_lens.size:
        raise ValueError(f"{sp_lens.size} split_lens but {len(modes)} attn_modes")
    n_real = s_lens.size - 1 if has_pad_sample else s_lens.size
    real_len = int(s_lens[:n_real].sum())
    if not real_len <= ids.size <= s_lens.sum() or (not has_pad_sample and ids.size != real_len):
        raise ValueError(f"input_ids has {ids.size} tokens but sample_lens {s_lens.tolist()} "
                         f"(has_pad_sample={has_pad_sample})")
    if mod.size != ids.size:
        raise ValueError(f"modality has {mod.size} entries but input_ids has {ids.size}")
    grids_per_sample = list(grids_per_sample)
    if len(grids_per_sample) == n_real + 1 and has_pad_sample and _as_grids(grids_per_sample[-1]).size == 0:
        grids_per_sample = grids_per_sample[:-1]
    if len(grids_per_sample) != n_real:
        raise ValueError(f"{len(grids_per_sample)} grid lists for {n_real} real samples")
    owner = _sample_of_splits(sp_lens, s_lens)
    out = np.zeros((3, ids.size), np.int32)
    offsets = np.cumsum(s_lens) - s_lens
    for i in range(n_real):
        sl = slice(int(offsets[i]), int(offsets[i] + s_lens[i]))
        sample_modes = [m for m, o in zip(modes, owner) if o == i]
        out[:, sl] = sample_position_ids(ids[sl], grids_per_sample[i], mod[sl], sample_modes, tokens)
    return out
