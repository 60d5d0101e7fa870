"""Real-media training records: a canonical shard row (decoded media + caption / QA / edit instruction) ->
tokenised sample (`lance_jax.sequence`, training=True, CFG dropout) -> frozen VAE latents (posterior sample,
seeded per record) and ViT embeddings -> `records.layout_record`.

Pipeline tasks -> `sequence` tasks: t2i, t2v, ff2v -> i2v (first latent frame clean), i2i -> image_edit,
v2v -> video_edit, i2t -> x2t_image, v2t -> x2t_video. The task follows from the row: a text target is
understanding; a media target with a media condition is an edit; otherwise text-to-media (videos become
ff2v with the group's `task_rates` share of 'ff2v').

Per record, in this order, from the record's numpy Generator (reproducible from (seed, index)): the ff2v
draw, the caption dropout (`text_drop`: u < p drops), the edit visual dropout (`vit_drop`), the caption
prompt choice (bare-caption understanding), the VAE posterior key, the raw timestep logit z.

A group's `timestep_shift` (default 1) shifts its flow times on top of the model's `timestep_shift`: z is drawn
as N(ln(shift), 1), since s*sigmoid(z) / (1 + (s-1)*sigmoid(z)) = sigmoid(z + ln s). Host-drawn timesteps only
(`train.timesteps='host'`).

Pre-encoded elements (`vae_mu` [+ `vae_logvar`] with `latent_shape` [t, h, w, C], `vit_embed` with `vit_grid`,
float16) are used as they are (the posterior is then sampled on the host); other media are decoded, resized
to the group's buckets (`resolution` for the VAE, `vit_resolution` for the ViT) and encoded.
"""
from __future__ import annotations

import math
import os

import jax
import numpy as np

from lance_jax import sequence as SQ
from lance_jax import vision
from lance_jax.data import encoders as E
from lance_jax.data import media as M
from lance_jax.data import records as R
from lance_jax.packing import latent_tokens

TASK_MAP = {"t2i": "t2i", "t2v": "t2v", "ff2v": "i2v", "i2i": "image_edit", "v2v": "video_edit",
            "i2t": "x2t_image", "v2t": "x2t_video"}


def load_tokenizer(path: str):
    """A tokenizer folder, or a converted checkpoint (its `reference/model`)."""
    from lance_jax.tokenizer import Tokenizer

    sub = os.path.join(path, "reference", "model")
    return Tokenizer.from_folder(sub if os.path.isdir(sub) else path)


class MediaRecordBuilder:
    """(canonical row, rng) -> record. group: the data group (sides, drops, tasks); cfg: ModelConfig."""

    def __init__(self, group, cfg, *, tokenizer, encoders: E.FrozenEncoders | None):
        self.g, self.cfg, self.tok, self.enc = group, cfg, tokenizer, encoders
        self.vae_side = int(group.get("resolution", 768))
        self.vit_side = int(group.get("vit_resolution", 616))
        self.max_duration = float(group.get("max_duration", 6.0))
        self.text_drop = float(group.get("text_drop", 0.1))
        self.vit_drop = float(group.get("vit_drop", 0.1))
        self.logit_offset = group_logit_offset(group)
        tasks = list(group.get("tasks", []) or [])
        rates = list(group.get("task_rates", None) or [1.0] * len(tasks))
        self.ff2v_rate = (rates[tasks.index("ff2v")] / sum(rates)) if "ff2v" in tasks else 0.0

    # -- media ------------------------------------------------------------------------------------
    def _frames(self, e, cache):
        k = id(e)
        if k not in cache:
            cache[k] = M.decode_frames(e, self.max_duration)
        return cache[k]

    def _latent(self, e, rng, cache) -> np.ndarray:
        """(t, h, w, C) latent of a media element: pre-encoded posterior sample, or the VAE's."""
        seed = int(rng.integers(2**31 - 1))
        if e.get("vae_mu") is not None:
            shape = tuple(int(x) for x in e["latent_shape"])
            mu = np.frombuffer(e["vae_mu"], np.float16).reshape(shape).astype(np.float32)
            if e.get("vae_logvar") is None:
                return mu
            logvar = np.frombuffer(e["vae_logvar"], np.float16).reshape(shape).astype(np.float32)
            eps = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
            return mu + np.exp(0.5 * logvar) * eps
        if self.enc is None:
            raise ValueError("media element without pre-encoded latents and no encoder checkpoint (data.encoder_ckpt)")
        pixels = vision.vae_pixels(self._frames(e, cache), self.vae_side)
        return self.enc.vae(pixels, key=jax.random.PRNGKey(seed))

    def _vit(self, e, cache) -> tuple[np.ndarray, tuple[int, int, int]]:
        """(embeddings (N, D), ViT grid [T/2, H/14, W/14]) of a media element."""
        if e.get("vit_embed") is not None:
            grid = tuple(int(x) for x in e["vit_grid"])
            emb = np.frombuffer(e["vit_embed"], np.float16).astype(np.float32)
            return emb.reshape(-1, self.cfg.vit_out_hidden_size), grid
        if self.enc is None:
            raise ValueError("media element without a pre-encoded ViT embedding and no encoder checkpoint")
        patches, grid = vision.vit_inputs(self._frames(e, cache), self.vit_side)
        return self.enc.vit(patches, grid), tuple(int(x) for x in np.asarray(grid).reshape(-1))

    # -- records ----------------------------------------------------------------------------------
    def __call__(self, row: dict, rng: np.random.Generator, source: str = "") -> dict:
        els = row["elements"]
        tgt = max((i for i, e in enumerate(els) if e.get("is_target_candidate")), default=len(els) - 1)
        target, conds = els[tgt], els[:tgt]
        media = [e for e in conds if e["type"] in ("image", "video")]
        cache: dict = {}
        if target["type"] == "text":
            return self._understanding(row, media, conversation(conds, target), rng, cache, source)
        text = " ".join((e.get("text") or "").strip() for e in conds if e["type"] == "text").strip()
        return self._generation(media, text, target, rng, cache, source)

    def _generation(self, media, caption, target, rng, cache, source):
        kind = target["type"]
        if media:
            task = "image_edit" if kind == "image" else "video_edit"
        elif kind == "video":
            task = "i2v" if rng.random() < self.ff2v_rate else "t2v"
        else:
            task = "t2i"
        keep_text = rng.random() >= self.text_drop  # reference: u > p keeps the caption (50 §2.6)
        drop_vision = bool(media) and rng.random() < self.vit_drop
        blocks_latent, vit_embeds, src_vit_grid, src_latent_grid = [], np.zeros((0, self.cfg.vit_out_hidden_size),
                                                                                np.float32), None, None
        if media and not drop_vision:
            vit_embeds, src_vit_grid = self._vit(media[0], cache)
            src = self._latent(media[0], rng, cache)
            src_latent_grid = src.shape[:3]
            blocks_latent.append(src)
        tgt = self._latent(target, rng, cache)
        if task == "t2i" and tgt.shape[0] != 1:
            raise ValueError(f"t2i target latent has {tgt.shape[0]} frames")
        blocks_latent.append(tgt)
        s = SQ.build_generation(task, caption or None, tokenizer=self.tok, cfg=self.cfg,
                                target_latent_grid=tgt.shape[:3], source_vit_grid=src_vit_grid,
                                source_latent_grid=src_latent_grid, training=True, drop_caption=not keep_text,
                                drop_vision=drop_vision)
        patch = self.cfg.latent_patch_size
        latents = np.concatenate([latent_tokens(x, patch) for x in blocks_latent])
        n_target = len(latent_tokens(tgt, patch))
        target_rows = np.zeros(len(latents), bool)
        target_rows[len(latents) - n_target:] = True
        clean = None
        frames_clean = s.target_block.get("clean_latent_frames", 0)
        if frames_clean:
            t, h, w = s.target_block["latent_grid"]
            clean = np.zeros(len(latents), bool)
            start = len(latents) - n_target
            clean[start:start + frames_clean * h * w] = True
        z = np.float32(rng.standard_normal(dtype=np.float32) + self.logit_offset)
        return R.layout_record(s.layout, self.cfg, latents=latents, vit_embeds=vit_embeds, target_rows=target_rows,
                               clean_target_rows=clean, z=z, source=source)

    def _understanding(self, row, media, turns, rng, cache, source):
        if not media:
            raise ValueError("understanding row without media")
        (question, answer, answer_loss), follow_ups = turns[0], turns[1:]
        kind = media[0]["type"]
        task = "x2t_image" if kind == "image" else "x2t_video"
        prompt_i = int(rng.integers(len(SQ.CAPTION_PROMPTS)))
        if row.get("system_prompt"):
            instruction = row["system_prompt"]
        elif question:
            instruction = SQ.DEFAULT_X2T_INSTRUCTION
        else:
            instruction = SQ.caption_prompt(prompt_i, kind)
        embeds, grid = self._vit(media[0], cache)
        s = SQ.build_understanding(task, question or None, tokenizer=self.tok, cfg=self.cfg, vit_grid=grid,
                                   instruction=instruction, answer=answer, follow_ups=follow_ups,
                                   answer_loss=answer_loss)
        latents = np.zeros((0, self.cfg.patch_latent_dim), np.float32)
        return R.layout_record(s.layout, self.cfg, latents=latents, vit_embeds=embeds,
                               target_rows=np.zeros(0, bool), z=0.0, ce_index=s.ce_indexes, ce_labels=s.ce_labels,
                               source=source)


def group_logit_offset(group) -> float:
    """ln of the group's extra flow-time shift (`timestep_shift`, > 0; 1 = none)."""
    shift = float(group.get("timestep_shift", 1.0))
    if not shift > 0:
        raise ValueError(f"data group {group.get('name', '?')!r}: timestep_shift must be > 0, got {shift}")
    return math.log(shift)


def conversation(conds: list[dict], target: dict) -> list[tuple[str, str, bool]]:
    """(question, answer, supervised) turns of an understanding row: the user texts before each assistant
    text form its question; earlier assistant answers are supervised only when their `loss` flag is set
    (a fully specified multi-turn row); the target answer always is. One turn for a plain QA row."""
    turns, question = [], []
    for e in conds:
        if e["type"] != "text":
            continue
        text = (e.get("text") or "").strip()
        if e.get("role") == "assistant":
            turns.append((" ".join(question).strip(), text, bool(e.get("loss"))))
            question = []
        else:
            question.append(text)
    return turns + [(" ".join(question).strip(), (target.get("text") or "").strip(), True)]


def make_builder(group, cfg, data_cfg) -> MediaRecordBuilder | None:
    """The real-media builder when the data config names a tokenizer (`data.tokenizer`), else None.
    `data.encoder_ckpt`: converted checkpoint with the frozen ViT / VAE ('' = only pre-encoded media)."""
    tok_path = data_cfg.get("tokenizer", "") or ""
    if not tok_path:
        return None
    enc_path = data_cfg.get("encoder_ckpt", "") or ""
    enc = E.frozen_encoders(enc_path, data_cfg.get("encoder_dtype", None) or None) if enc_path else None
    return MediaRecordBuilder(group, cfg, tokenizer=_tokenizer(tok_path), encoders=enc)


_TOKENIZERS: dict = {}


def _tokenizer(path: str):
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = load_tokenizer(path)
    return _TOKENIZERS[path]
