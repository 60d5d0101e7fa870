"""Greedy token-budget packing of sample records into fixed-capacity stream batches (50 §2.11).

Records are appended while the pack's real tokens stay <= `token_budget` and every stream fits its
capacity (und, gen, CE, ViT); the first record that does not fit closes the pack. With
`drop_overflow` (the reference's behaviour at the released thresholds, a parity quirk) that record is
lost; otherwise it opens the next pack. Records larger than a whole pack are skipped (counted).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lance_jax import packing
from lance_jax.packing import Capacities


def record_sizes(r: dict) -> tuple[int, int, int, int]:
    """(und rows, gen rows, CE slots, ViT rows) of a record."""
    n_gen = len(r["vae_index"])
    return len(r["ids"]) - n_gen, n_gen, len(r["ce_index"]), len(r["vit_index"])


def fits(used: Sequence[int], add: Sequence[int], caps: Capacities, token_budget: int) -> bool:
    tot = [u + a for u, a in zip(used, add)]
    return tot[0] + tot[1] <= token_budget and all(t <= c for t, c in zip(tot, caps))


def pack_records(records: Sequence[dict], cfg, caps: Capacities) -> dict[str, np.ndarray]:
    """Concatenate records (reference order) -> one stream batch with exactly `caps` (+ vit_embeds, gen_item,
    and the per-token loss weights: each record's `loss_weight`, default 1, on its latent rows and CE slots)."""
    off, items = 0, 0
    cat = {k: [] for k in ("ids", "position_ids", "vit_index", "vae_index", "latents", "latent_pos",
                           "timestep_logits", "gen_item", "ce_index", "ce_labels", "vit_embeds",
                           "gen_loss_weight", "ce_loss_weight")}
    sample_lens, split_lens, modes = [], [], []
    for r in records:
        n = len(r["ids"])
        for k in ("ids", "latents", "latent_pos", "timestep_logits", "ce_labels", "vit_embeds"):
            cat[k].append(r[k])
        cat["position_ids"].append(r["position_ids"])
        w = float(r.get("loss_weight", 1.0))
        cat["gen_loss_weight"].append(np.full(len(r["vae_index"]), w, np.float32))
        cat["ce_loss_weight"].append(np.full(len(r["ce_index"]), w, np.float32))
        for k in ("vit_index", "vae_index", "ce_index"):
            cat[k].append(r[k] + off)
        gi = r["gen_item"]
        cat["gen_item"].append(np.where(gi >= 0, gi + items, -1))
        items += int(gi.max()) + 1 if len(gi) and gi.max() >= 0 else 0
        sample_lens.append(n)
        split_lens += list(r["split_lens"])
        modes += list(r["attn_modes"])
        off += n
    c = lambda k, ax=0: np.concatenate(cat[k], axis=ax)  # noqa: E731
    plan = packing.plan_stream_batch(
        token_ids=c("ids"), position_ids=c("position_ids", 1), sample_lens=sample_lens, split_lens=split_lens,
        attn_modes=modes, vit_token_indexes=c("vit_index"), vae_token_indexes=c("vae_index"), latents=c("latents"),
        latent_pos_ids=c("latent_pos"), timestep_logits=c("timestep_logits"), ce_indexes=c("ce_index"),
        ce_labels=c("ce_labels"), capacities=caps, gen_loss_weight=c("gen_loss_weight"),
        ce_loss_weight=c("ce_loss_weight"))
    vit = c("vit_embeds")
    vit_buf = np.zeros((caps.vit, cfg.vit_out_hidden_size), np.float32)
    vit_buf[: len(vit)] = vit
    plan["vit_embeds"] = vit_buf
    gen_item = np.full(caps.gen, -1, np.int32)
    gi = c("gen_item")
    gen_item[: len(gi)] = gi
    plan["gen_item"] = gen_item
    return plan


class Packer:
    """Stateful greedy packer: `add(record)` returns a finished pack (list of records) or None."""

    def __init__(self, caps: Capacities, token_budget: int | None = None, drop_overflow: bool = True):
        self.caps = caps
        self.budget = token_budget or (caps.und + caps.gen)
        self.drop_overflow = drop_overflow
        self.current: list[dict] = []
        self.used = (0, 0, 0, 0)
        self.too_long = 0
        self.dropped = 0

    def too_big(self, r) -> bool:
        return not fits((0, 0, 0, 0), record_sizes(r), self.caps, self.budget)

    def add(self, r: dict):
        """Returns (pack or None, carried: bool) - carried means `r` opened the next pack."""
        size = record_sizes(r)
        if self.too_big(r):
            self.too_long += 1
            return None, False
        if fits(self.used, size, self.caps, self.budget):
            self.current.append(r)
            self.used = tuple(u + a for u, a in zip(self.used, size))
            return None, False
        done = self.current
        if self.drop_overflow:
            self.dropped += 1
            self.current, self.used = [], (0, 0, 0, 0)
            return done, False
        self.current, self.used = [r], size
        return done, True
