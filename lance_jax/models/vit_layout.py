"""Host-side planning for the Qwen2.5-VL vision tower: everything that depends only on `grid_thw`.

The device never sees a grid. For a list of items (one `(t, h, w)` row each, in patches) the host
builds, in NumPy, fixed-shape int/float arrays (`VitPlan`) and the jitted ViT only gathers with them
(design §1.3 "host plans, device computes"). Conventions (40 §B.3, §B.5, §B.6):

* Patch rows arrive merge-group major: `(item, ti, hb, wb, hs, ws)`; `M = N / merge²` merged groups.
* The reference permutes merged groups into *window order* (`window_index`) before the blocks and
  un-permutes after the merger; we do the same so that every intermediate matches it.
* Attention segments are contiguous ranges of the window-ordered sequence: windows for window
  blocks, one temporal patch group (`gh·gw` patches) per item and `ti` for "full" blocks. Each set is
  laid out as a padded `(S, L)` gather table so that attention runs as a batch of S independent
  dense problems of length L: memory linear in tokens, never an N x N mask.
"""
from __future__ import annotations

from typing import NamedTuple

import ml_dtypes
import numpy as np


class Segments(NamedTuple):
    """A batch of attention rows over the window-ordered sequence.

    gather  (S, L) int32  sequence row of each slot (0 on padding)
    sample  (S, L) int32  segment id of each slot within its row, -1 on padding (the mask's `sample`:
                          slots attend exactly to the slots of their row with the same id)
    scatter (N,) int32    flat slot s*L + j of every sequence row, to read results back
    """

    gather: np.ndarray
    sample: np.ndarray
    scatter: np.ndarray


def check_grid(grid_thw, merge: int) -> np.ndarray:
    """(k, 3) int64 grid rows, validated: positive, h and w multiples of the merge size."""
    grid = np.asarray(grid_thw)
    if grid.ndim == 1:
        grid = grid[None]
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise ValueError(f"grid_thw must have shape (k, 3) with k >= 1, got {grid.shape}")
    if not np.issubdtype(grid.dtype, np.integer):
        raise ValueError(f"grid_thw must be integers, got {grid.dtype}")
    grid = grid.astype(np.int64)
    if (grid <= 0).any():
        raise ValueError(f"grid_thw entries must be positive, got {grid.tolist()}")
    if (grid[:, 1:] % merge).any():
        raise ValueError(f"grid h and w must be multiples of the merge size {merge}, got {grid.tolist()}")
    return grid


def num_patches(grid_thw) -> int:
    return int(np.prod(np.asarray(grid_thw), axis=-1).sum())


def window_index(grid_thw, window_merged: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's `get_window_index`: (window_index (M,) int32, cu_window_seqlens (S+1,) int32).

    window_index[j] = natural merged-group id of the j-th group in window order (per item: temporal
    groups, then windows in raster order, then groups in raster order inside the window; item offsets
    added). The merged grid is padded by `w - n % w` (a full extra window when already divisible);
    padded cells are dropped, and empty windows vanish from cu (unique_consecutive), in patch units.
    """
    grid = check_grid(grid_thw, merge)
    unit = merge * merge
    index, cu, offset = [], [0], 0
    for t, h, w in grid:
        mh, mw = h // merge, w // merge
        ph, pw = window_merged - mh % window_merged, window_merged - mw % window_merged
        nh, nw = (mh + ph) // window_merged, (mw + pw) // window_merged
        ids = np.full((t, mh + ph, mw + pw), -1, np.int64)
        ids[:, :mh, :mw] = np.arange(t * mh * mw).reshape(t, mh, mw)
        ids = ids.reshape(t, nh, window_merged, nw, window_merged).transpose(0, 1, 3, 2, 4)
        ids = ids.reshape(t, nh * nw, window_merged * window_merged)
        counts = (ids >= 0).sum(-1).reshape(-1)
        flat = ids.reshape(-1)
        index.append(flat[flat >= 0] + offset)
        cu.extend((np.cumsum(counts) * unit + cu[-1]).tolist())
        offset += t * mh * mw
    cu = np.asarray(cu, np.int64)
    keep = np.concatenate([[True], cu[1:] != cu[:-1]])  # torch.unique_consecutive
    return np.concatenate(index).astype(np.int32), cu[keep].astype(np.int32)


def full_cu_seqlens(grid_thw) -> np.ndarray:
    """(sum t + 1,) int32: one segment per (item, temporal patch group) of h·w patches."""
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    lens = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


def rotary_positions(grid_thw, merge: int) -> np.ndarray:
    """(N, 2) int32 (patch row, patch column) of every patch, natural (merge-major) row order."""
    rows = []
    for t, h, w in check_grid(grid_thw, merge):
        hpos = np.broadcast_to(np.arange(h)[:, None], (h, w))
        wpos = np.broadcast_to(np.arange(w)[None, :], (h, w))
        pos = np.stack([hpos, wpos], -1).reshape(h // merge, merge, w // merge, merge, 2)
        pos = pos.transpose(0, 2, 1, 3, 4).reshape(-1, 2)  # merge-group major, like the patch rows
        rows.append(np.tile(pos, (t, 1)))  # same positions for every temporal group
    return np.concatenate(rows).astype(np.int32)


def inv_frequencies(head_dim: int, theta: float, bf16: bool = False) -> np.ndarray:
    """(head_dim/4,) the vision rotary `inv_freq` = 1 / theta^(2k / (head_dim/2)), in float32 like torch.

    With `bf16` the buffer is rounded to bfloat16 as `model.to(bfloat16)` does (40 §B.5 quirk).
    """
    dim = head_dim // 2
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
    return inv.astype(ml_dtypes.bfloat16) if bf16 else inv


def angle_table(size: int, head_dim: int, theta: float, bf16: bool = False) -> np.ndarray:
    """(size, head_dim/4) float32 `position * inv_freq`; bf16: positions, product and result in bf16."""
    inv = inv_frequencies(head_dim, theta, bf16)
    pos = np.arange(size, dtype=np.float32).astype(inv.dtype)  # torch: arange(dtype=inv_freq.dtype)
    return np.outer(pos, inv).astype(inv.dtype).astype(np.float32)


def rotary_angles(grid_thw, head_dim: int, theta: float, merge: int, bf16: bool = False) -> np.ndarray:
    """(N, head_dim/2) float32 = the reference `rot_pos_emb`: [row angles, column angles], natural order."""
    pos = rotary_positions(grid_thw, merge)
    table = angle_table(int(pos.max()) + 1, head_dim, theta, bf16)
    return np.concatenate([table[pos[:, 0]], table[pos[:, 1]]], axis=1)


def rotary_cos_sin_tables(size: int, head_dim: int, theta: float, bf16: bool = False):
    """cos, sin (size, head_dim/4) float32 per position; bf16 rounds them like `emb.cos()` of a bf16 emb.

    Computed on the host so the rounding cannot be optimised away by XLA (excess-precision rewrites).
    """
    angles = angle_table(size, head_dim, theta, bf16)
    cos, sin = np.cos(angles), np.sin(angles)
    if bf16:
        cos, sin = (a.astype(ml_dtypes.bfloat16).astype(np.float32) for a in (cos, sin))
    return cos.astype(np.float32), sin.astype(np.float32)


def segment_tables(cu: np.ndarray, length: int) -> Segments:
    """Contiguous segments [cu[s], cu[s+1]) as a padded batch of S rows of `length` (one segment per row)."""
    cu = np.asarray(cu, np.int64)
    lens = np.diff(cu)
    if (lens <= 0).any() or lens.max() > length:
        raise ValueError(f"segment lengths {lens.tolist()} must be in [1, {length}]")
    j = np.arange(length)
    valid = j[None, :] < lens[:, None]
    gather = np.where(valid, cu[:-1, None] + j[None, :], 0)
    seg = np.repeat(np.arange(len(lens)), lens)
    scatter = seg * length + (np.arange(cu[-1]) - cu[:-1][seg])
    return Segments(gather.astype(np.int32), np.where(valid, 0, -1).astype(np.int32), scatter.astype(np.int32))


def single_sequence_segments(cu: np.ndarray) -> Segments:
    """The same segments as ONE row of N tokens told apart by their sample ids (the mask's `sample`).

    Same results as `segment_tables`, but attention then costs O(N²) memory with the dense kernel:
    kept as the baseline of `benchmarks/vit_memory.py` and for tests.
    """
    cu = np.asarray(cu, np.int64)
    n = int(cu[-1])
    sample = np.repeat(np.arange(len(cu) - 1), np.diff(cu))
    return Segments(np.arange(n, dtype=np.int32)[None], sample.astype(np.int32)[None], np.arange(n, dtype=np.int32))


class VitPlan(NamedTuple):
    """Everything the jitted ViT needs besides the patches; a pytree of fixed-shape arrays.

    perm     (N,) int32   natural patch row of each window-ordered row
    unperm   (M,) int32   window-ordered merged row of each natural merged row (argsort of window_index)
    rope_pos (N, 2) int32 (patch row, patch column) per window-ordered row
    rope_cos, rope_sin (P, head_dim/4) float32 per position, P = max grid side
    window, full: Segments for window blocks and for "full" (per temporal group) blocks
    """

    perm: np.ndarray
    unperm: np.ndarray
    rope_pos: np.ndarray
    rope_cos: np.ndarray
    rope_sin: np.ndarray
    window: Segments
    full: Segments


def vit_plan(grid_thw, cfg) -> VitPlan:
    """The plan for one ViT call over the items of `grid_thw` (k, 3); `cfg` is a `VitConfig`."""
    merge, unit = cfg.spatial_merge_size, cfg.spatial_merge_size ** 2
    grid = check_grid(grid_thw, merge)
    widx, cu_window = window_index(grid, cfg.window_merged, merge)
    perm = (widx[:, None].astype(np.int64) * unit + np.arange(unit)).reshape(-1)
    size = int(grid[:, 1:].max())
    cos, sin = rotary_cos_sin_tables(size, cfg.head_dim, cfg.rope_theta, cfg.rope_bf16_tables)
    full_len = int((grid[:, 1] * grid[:, 2]).max())
    return VitPlan(
        perm=perm.astype(np.int32),
        unperm=np.argsort(widx).astype(np.int32),
        rope_pos=rotary_positions(grid, merge)[perm],
        rope_cos=cos,
        rope_sin=sin,
        window=segment_tables(cu_window, cfg.window_patches),
        full=segment_tables(full_cu_seqlens(grid), full_len),
    )
