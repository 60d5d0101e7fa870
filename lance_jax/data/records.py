"""Sample records: one rendered training sample, ready to pack (NumPy, host side).

A record is a dict:
  ids (L,) int32, modality (L,) int32, position_ids (3, L) int32 (final MaPE ids, 50 §2.9),
  split_lens (S,) int32, attn_modes list[str], grids (k, 3),
  vit_index (Nv,) int32 (sample-relative), vit_embeds (Nv, Dv) float32,
  vae_index (Ng,) int32, latents (Ng, P) float32 (clean x0 tokens, sequence order: conditions then target),
  latent_pos (Ng,) int32, timestep_logits (Ng,) float32 (z ~ N(0,1) per target item, -inf when clean),
  gen_item (Ng,) int32 (target item of the row within the sample, -1 for clean conditions),
  ce_index (Nc,) int32 (position predicting the label), ce_labels (Nc,) int32,
  source str (shard / group name, for corrupt-record accounting).

`layout_record` turns a `kv_plan.SampleLayout` + latents + ViT embeddings into a record (used with
`lance_jax.sequence` built samples and with the synthetic builder below). `synthetic_layout` renders
the reference's chat-template *structure* (50 §2.8-2.9: splits, modes, modality codes, placeholder
expansion) with given token ids, without a tokenizer: the CPU test / smoke path.
"""
from __future__ import annotations

import numpy as np

from lance_jax import positions as P
from lance_jax.kv_plan import SampleLayout, vision_tokens

TASKS = ("t2i", "t2v", "ff2v", "i2i", "v2v", "i2t", "v2t")
GEN_TASKS = ("t2i", "t2v", "ff2v", "i2i", "v2v")


def layout_record(layout: SampleLayout, cfg, *, latents: np.ndarray, vit_embeds: np.ndarray,
                  target_rows: np.ndarray, clean_target_rows: np.ndarray | None = None,
                  z: float | np.ndarray = 0.0, ce_index=(), ce_labels=(), source: str = "") -> dict:
    """target_rows: bool (Ng,) latent rows of the noisy target (one item); clean_target_rows: target rows kept
    clean (ff2v/flf2v condition frames, logit -inf, no MSE); z: the item's raw logit-normal draw."""
    vit_idx, vae_idx, latent_pos = vision_tokens(layout, cfg)
    if len(latents) != len(vae_idx):
        raise ValueError(f"{len(latents)} latent tokens for {len(vae_idx)} VAE positions")
    if len(vit_embeds) != len(vit_idx):
        raise ValueError(f"{len(vit_embeds)} ViT embeddings for {len(vit_idx)} ViT positions")
    target_rows = np.asarray(target_rows, bool)
    logits = np.where(target_rows, np.float32(z), -np.inf).astype(np.float32)
    if clean_target_rows is not None:
        logits[np.asarray(clean_target_rows, bool)] = -np.inf
    pos = P.sample_position_ids(layout.input_ids, layout.grids, layout.modality, layout.attn_modes,
                                P.RopeTokens.from_model_config(cfg))
    return dict(
        ids=layout.input_ids.astype(np.int32), modality=layout.modality.astype(np.int32), position_ids=pos,
        split_lens=layout.split_lens.astype(np.int32), attn_modes=list(layout.attn_modes), grids=layout.grids,
        vit_index=vit_idx.astype(np.int32), vit_embeds=np.asarray(vit_embeds, np.float32),
        vae_index=vae_idx.astype(np.int32), latents=np.asarray(latents, np.float32),
        latent_pos=latent_pos.astype(np.int32), timestep_logits=logits,
        gen_item=np.where(target_rows, 0, -1).astype(np.int32),
        ce_index=np.asarray(ce_index, np.int32), ce_labels=np.asarray(ce_labels, np.int32), source=source,
    )


class _Builder:
    def __init__(self):
        self.ids, self.mod, self.splits, self.modes = [], [], [], []
        self._open = 0  # tokens in the open causal split

    def text(self, ids, modality=P.MODALITY_SYSTEM):
        ids = list(ids)
        self.ids += ids
        self.mod += [modality] * len(ids)
        self._open += len(ids)

    def close(self):
        if self._open:
            self.splits.append(self._open)
            self.modes.append("causal")
            self._open = 0

    def vision(self, n, mode, modality, cfg):
        self.close()
        self.ids += [cfg.vision_start_token_id] + [cfg.video_token_id] * n + [cfg.vision_end_token_id]
        self.mod += [modality] * (n + 2)
        self.splits.append(n + 2)
        self.modes.append(mode)

    def layout(self, grids) -> SampleLayout:
        self.close()
        return SampleLayout(np.asarray(self.ids), np.asarray(self.mod), np.asarray(self.splits), self.modes,
                            np.asarray(grids, np.int64).reshape(-1, 3))


def synthetic_layout(task: str, cfg, *, system_ids, caption_ids=(), question_ids=(), answer_ids=(),
                     vit_grid=None, cond_latent_grid=None, target_latent_grid=None, glue_ids=(10, 11)):
    """(layout, answer span (start, stop) or None) of one sample in the reference's template structure.

    vit_grid: ViT [T/2, H/14, W/14]; latent grids are (t, h, w) latent tokens (the layout stores [t, 2h, 2w]).
    An empty caption_ids is a dropped (or absent) caption: omitted from the user turn.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; one of {TASKS}")
    im_start, im_end = cfg.bos_token_id, cfg.eos_token_id
    m = cfg.spatial_merge_size
    b, grids = _Builder(), []
    b.text([im_start, *system_ids, im_end, *glue_ids, im_start, *glue_ids])  # system turn, "user\n"
    if task in ("i2i", "v2v", "i2t", "v2t"):
        t, h, w = vit_grid
        b.vision(int(t * (h // m) * (w // m)), "full", P.MODALITY_REF_VIT, cfg)
        grids.append(vit_grid)
    if task in ("i2i", "v2v"):
        t, h, w = cond_latent_grid
        b.vision(t * h * w, "full_noise", P.MODALITY_REF_SOURCE, cfg)
        grids.append((t, m * h, m * w))
    answer = None
    if task in GEN_TASKS:
        b.text(caption_ids, P.MODALITY_TEXT)
        b.text([im_end, *glue_ids, im_start, *glue_ids])  # "<|im_end|>\n<|im_start|>assistant\n"
        t, h, w = target_latent_grid
        b.vision(t * h * w, "noise", P.MODALITY_NOISE, cfg)
        grids.append((t, m * h, m * w))
        b.text([im_end])
    else:
        b.text(question_ids)
        b.text([im_end, *glue_ids, im_start, *glue_ids])
        start = len(b.ids)
        b.text([*answer_ids, im_end])
        answer = (start, len(b.ids))
    return b.layout(grids), answer


def synthetic_record(spec: dict, cfg, rng: np.random.Generator, *, text_drop: float = 0.1, vit_drop: float = 0.0,
                     text_vocab: int | None = None, source: str = "synthetic", logit_offset: float = 0.0) -> dict:
    """A random sample of `spec` (task, caption_len, target/cond latent grids, vit_grid, question/answer lens):
    random text ids, random latents (instead of VAE outputs), random ViT embeddings; CFG caption dropout.

    spec keys: task; caption_len; latent_grid (t, h, w); cond_latent_grid; vit_grid; question_len; answer_len;
    system_len; or explicit system_ids / caption_ids / question_ids / answer_ids (e.g. from shard rows).
    logit_offset: added to the raw timestep logit (the group's ln `timestep_shift`, see `media_records`).
    """
    task = spec["task"]
    vocab = text_vocab or min(cfg.vocab_size_eff, cfg.pad_token_id)
    ids = lambda n: rng.integers(0, vocab, int(n)).tolist()  # noqa: E731
    given = lambda key, n: list(spec[key]) if spec.get(key) is not None else ids(n)  # noqa: E731
    system_ids = given("system_ids", spec.get("system_len", 12))
    caption = given("caption_ids", spec.get("caption_len", 8)) if task in GEN_TASKS else []
    keep_text = rng.random() >= text_drop  # reference: u > p keeps the caption (50 §2.6)
    if task in ("i2i", "v2v") and rng.random() < vit_drop:
        task = "t2i" if task == "i2i" else "t2v"  # the visual condition (both copies) dropped
    grid = tuple(spec.get("latent_grid", (1, 2, 2)))
    layout, answer = synthetic_layout(
        task, cfg, system_ids=system_ids, caption_ids=caption if keep_text else [],
        question_ids=given("question_ids", spec.get("question_len", 0)),
        answer_ids=given("answer_ids", spec.get("answer_len", 4)),
        vit_grid=tuple(spec.get("vit_grid", (1, 4, 4))), cond_latent_grid=tuple(spec.get("cond_latent_grid", grid)),
        target_latent_grid=grid)
    n_gen = int(np.isin(layout.modality, (P.MODALITY_NOISE, P.MODALITY_REF_SOURCE)).sum()
                - 2 * sum(md in ("noise", "full_noise") for md in layout.attn_modes))
    n_vit = int((layout.modality == P.MODALITY_REF_VIT).sum() - 2 * layout.attn_modes.count("full"))
    latents = rng.standard_normal((n_gen, cfg.patch_latent_dim), dtype=np.float32)
    vit = rng.standard_normal((n_vit, cfg.vit_out_hidden_size), dtype=np.float32)
    n_target = int(np.prod(grid)) if task in GEN_TASKS else 0
    target = np.zeros(n_gen, bool)
    target[n_gen - n_target:] = True
    clean = None
    if spec.get("task") == "ff2v":  # first latent frame is an in-place condition
        clean = np.zeros(n_gen, bool)
        clean[n_gen - n_target: n_gen - n_target + grid[1] * grid[2]] = True
    z = np.float32(rng.standard_normal(dtype=np.float32) + logit_offset)
    ce_index, ce_labels = (), ()
    if answer is not None:
        start, stop = answer
        ce_labels = layout.input_ids[start:stop]
        ce_index = np.arange(start - 1, stop - 1)
    return layout_record(layout, cfg, latents=latents, vit_embeds=vit, target_rows=target, clean_target_rows=clean,
                         z=z, ce_index=ce_index, ce_labels=ce_labels, source=source)
