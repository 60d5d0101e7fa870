"""The Grain training pipeline: sources -> per-record rng sample building -> mixture -> token-budget packing
-> fixed-capacity stream batches (50 §6.4).

Per group (a `data.groups` entry): source (synthetic / our shards / reference Parquet) -> this process's
slice (`[process_index::process_count]`) -> shuffle(seed) -> repeat (reshuffled per epoch) ->
`random_map(build)`: the per-record numpy Generator draws the CFG drops, the raw timestep z and the
synthetic content, so every record is reproducible from (seed, index) alone. Groups are mixed with
per-sample weights (`MapDataset.mix`; a group's `loss_weight` scales its tokens' loss terms instead), then
`PackIterDataset` packs greedily into stream batches of exactly `capacities` and `batch(B)` stacks B packs
per process and step.

A curriculum (`data.phases`, optional): each phase draws its first `records` records (per process) with its
own group weights; then the groups' own weights hold for the rest of the run. Every group continues where
the earlier phases left it, so no record is drawn twice before its group's epoch ends.

State (`get_state`/`set_state`, JSON): Grain's parent state taken *before* the record the packer carries
into the next pack (none in drop-overflow mode), plus the corrupt-record counters. Restoring it and
continuing gives exactly the same batches as never stopping.

Corrupt records (undecodable media, malformed rows) are skipped and counted per source shard; a shard whose
bad fraction exceeds `max_bad_fraction` after `min_records_for_report` records is reported by name
(warning, or an error with `fail_on_bad_shard`).
"""
from __future__ import annotations

import copy
import logging
import sys
import zlib
from typing import Any

import grain
import numpy as np

from lance_jax.data import media as M
from lance_jax.data import media_records as MR
from lance_jax.data import pack as PK
from lance_jax.data import records as R
from lance_jax.packing import Capacities

log = logging.getLogger("lance_jax.data")


# ---------------------------------------------------------------- sources


class SyntheticSource:
    """`num_records` specs of one group: task drawn by index from `tasks`/`task_rates`, sizes from the group."""

    def __init__(self, group, seed: int = 0):
        self.g, self.seed = group, seed
        self.n = int(group.get("num_records", 1000))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = self.g
        rng = np.random.default_rng([self.seed, zlib.crc32(g["name"].encode()), int(i)])
        tasks = list(g["tasks"])
        rates = np.asarray(g.get("task_rates", None) or [1.0] * len(tasks), np.float64)
        task = tasks[rng.choice(len(tasks), p=rates / rates.sum())]
        grids = [tuple(x) for x in g.get("latent_grids", [(1, 2, 2)])]
        return dict(task=task, latent_grid=grids[rng.integers(len(grids))], vit_grid=tuple(g.get("vit_grid", (1, 4, 4))),
                    caption_len=int(rng.integers(*g.get("caption_len", (4, 12)))),
                    question_len=int(rng.integers(*g.get("question_len", (0, 6)))),
                    answer_len=int(rng.integers(*g.get("answer_len", (2, 10)))),
                    system_len=int(g.get("system_len", 12)), _source="synthetic:" + g["name"])


def make_source(group, seed: int):
    kind = group.get("source", "synthetic")
    if kind == "synthetic":
        return SyntheticSource(group, seed)
    if kind == "shards":
        from lance_jax.data.shards import ShardSource

        return ShardSource(group["path"])
    if kind == "reference":
        from lance_jax.data.shards import ReferenceSource

        return ReferenceSource(group["path"], group.get("dataset_type", None))
    raise ValueError(f"unknown data source {kind!r} (synthetic | shards | reference)")


# ---------------------------------------------------------------- sample building


def byte_ids(text: str, vocab: int) -> list[int]:
    """Tokenizer-free stand-in ids (UTF-8 bytes mod vocab): smoke runs on shards without a tokenizer."""
    return [b % vocab for b in (text or "").encode("utf-8")]


class Builder:
    """random_map transform: canonical row or synthetic spec -> sample record, or a `{"_bad": ...}` marker."""

    def __init__(self, group, cfg, media=None):
        self.g, self.cfg, self.media = group, cfg, media  # media: a `media_records.MediaRecordBuilder` or None
        self.vocab = min(cfg.vocab_size_eff, cfg.pad_token_id)
        self.logit_offset = MR.group_logit_offset(group)
        self.loss_weight = group_loss_weight(group)

    def __call__(self, row: dict, rng: np.random.Generator) -> dict:
        rec = self.record(row, rng)
        if "_bad" not in rec:
            rec["loss_weight"] = self.loss_weight
        return rec

    def record(self, row: dict, rng: np.random.Generator) -> dict:
        source = row.get("_source", self.g["name"])
        if "_bad" in row:
            return {"_bad": row["_bad"], "_source": source}
        try:
            if self.media is not None and "task" not in row:
                return self.media(row, rng, source=source)
            spec = row if "task" in row else self.spec_from_row(row, rng)
            return R.synthetic_record(spec, self.cfg, rng, text_drop=self.g.get("text_drop", 0.1),
                                      vit_drop=self.g.get("vit_drop", 0.1), text_vocab=self.vocab, source=source,
                                      logit_offset=self.logit_offset)
        except Exception as e:  # noqa: BLE001 - corrupt record: skipped and counted downstream
            return {"_bad": repr(e), "_source": source}

    def spec_from_row(self, row: dict, rng) -> dict:
        """Canonical row -> spec: decode media (validates them), bucket sizes -> grids, text -> ids.

        Text uses `byte_ids` and the latents are random (the tokenizer-free smoke path); with `data.tokenizer`
        set, rows go through `media_records.MediaRecordBuilder` instead (chat template via `lance_jax.sequence`,
        frozen VAE / ViT or the row's pre-encoded `vae_mu` / `vit_embed`).
        """
        g, els = self.g, row["elements"]
        tgt = max((i for i, e in enumerate(els) if e.get("is_target_candidate")), default=len(els) - 1)
        target, conds = els[tgt], els[:tgt]
        media = [e for e in conds if e["type"] in ("image", "video")]
        texts = [e for e in conds if e["type"] == "text"]
        sizes = [self.media_size(e) for e in media + ([target] if target["type"] != "text" else [])]
        spec: dict[str, Any] = dict(system_len=int(g.get("system_len", 12)))
        if row.get("system_prompt"):
            spec["system_ids"] = byte_ids(row["system_prompt"], self.vocab)
        vit_side, vae_side = int(g.get("vit_resolution", 616)), int(g.get("resolution", 768))
        if target["type"] == "text":
            if not media:
                raise ValueError("understanding row without media")
            kind = media[0]["type"]
            spec.update(task="i2t" if kind == "image" else "v2t", vit_grid=M.vit_grid(*sizes[0], vit_side),
                        question_ids=byte_ids(" ".join(t["text"] or "" for t in texts), self.vocab),
                        answer_ids=byte_ids(target["text"], self.vocab))
        else:
            kind = target["type"]
            spec.update(latent_grid=M.latent_grid(*sizes[-1], vae_side, self.cfg.latent_stride),
                        caption_ids=byte_ids(" ".join(t["text"] or "" for t in texts), self.vocab))
            if media:
                spec.update(task="i2i" if kind == "image" else "v2v", vit_grid=M.vit_grid(*sizes[0], vit_side),
                            cond_latent_grid=M.latent_grid(*sizes[0], vae_side, self.cfg.latent_stride))
            else:
                spec["task"] = "t2i" if kind == "image" else "t2v"
        return spec

    def media_size(self, e) -> tuple[int, int, int]:
        """(frames, height, width) after frame sampling; decodes the media (raises when corrupt)."""
        if e["type"] == "image":
            img = M.decode_image(e["media"])
            return 1, img.height, img.width
        n, fps, h, w = M.video_info(e["media"])
        return M.frame_count(n, fps, float(self.g.get("max_duration", 6.0))), h, w


# ---------------------------------------------------------------- packing


class PackIterDataset(grain.IterDataset):
    def __init__(self, parent, cfg, caps: Capacities, *, token_budget: int | None, drop_overflow: bool,
                 max_bad_fraction: float = 0.5, min_records_for_report: int = 20, fail_on_bad_shard: bool = False):
        super().__init__(parent)
        self.kw = dict(cfg=cfg, caps=caps, token_budget=token_budget, drop_overflow=drop_overflow,
                       max_bad_fraction=max_bad_fraction, min_records=min_records_for_report,
                       fail_on_bad_shard=fail_on_bad_shard)

    def __iter__(self):
        return PackIterator(self._parent.__iter__(), **self.kw)


class PackIterator(grain.DatasetIterator):
    def __init__(self, parent, *, cfg, caps, token_budget, drop_overflow, max_bad_fraction, min_records,
                 fail_on_bad_shard):
        super().__init__(parent)
        self.cfg, self.caps = cfg, caps
        self.packer = PK.Packer(caps, token_budget, drop_overflow)
        self.max_bad, self.min_records, self.fail = max_bad_fraction, min_records, fail_on_bad_shard
        self.carry_state = None  # parent state before the record carried in the open pack
        self.stats = dict(records=0, bad=0, too_long=0, dropped=0, packs=0, seen={}, bad_by_source={}, reported=[])

    def _account_bad(self, r):
        s = self.stats
        src = r.get("_source", "?")
        s["bad"] += 1
        s["bad_by_source"][src] = s["bad_by_source"].get(src, 0) + 1
        seen = s["seen"].get(src, 0) + 1
        s["seen"][src] = seen
        bad = s["bad_by_source"][src]
        if seen >= self.min_records and bad / seen > self.max_bad and src not in s["reported"]:
            s["reported"].append(src)
            msg = f"data source {src}: {bad} of {seen} records are corrupt (last: {r.get('_bad')})"
            if self.fail:
                raise RuntimeError(msg)
            log.warning(msg)

    def __next__(self):
        while True:
            before = self._parent.get_state() if not self.packer.drop_overflow else None
            r = next(self._parent)
            if "_bad" in r:
                self._account_bad(r)
                continue
            s = self.stats
            s["records"] += 1
            s["seen"][r["source"]] = s["seen"].get(r["source"], 0) + 1
            done, carried = self.packer.add(r)
            s["too_long"], s["dropped"] = self.packer.too_long, self.packer.dropped
            if done is None:
                continue
            self.carry_state = (before, r["source"]) if carried else None
            s["packs"] += 1
            return PK.pack_records(done, self.cfg, self.caps)

    def get_state(self):
        stats = copy.deepcopy(self.stats)
        if self.carry_state is None:
            return dict(parent=copy.deepcopy(self._parent.get_state()), stats=stats)
        parent, src = self.carry_state  # the carried record is re-read after a restore: uncount it
        stats["records"] -= 1
        stats["seen"][src] -= 1
        return dict(parent=copy.deepcopy(parent), stats=stats)

    def set_state(self, state):
        self._parent.set_state(copy.deepcopy(state["parent"]))
        self.stats = copy.deepcopy(state["stats"])
        self.packer.current, self.packer.used = [], (0, 0, 0, 0)
        self.packer.too_long, self.packer.dropped = self.stats["too_long"], self.stats["dropped"]
        self.carry_state = None


# ---------------------------------------------------------------- the pipeline


def group_loss_weight(group) -> float:
    """The group's `loss_weight` (default 1): the factor on its tokens' MSE and CE terms. The losses keep the
    reference's denominators (all supervised tokens of the batch), so 1 everywhere is the reference loss and
    0.5 halves the group's share of the gradient without changing how often its records are drawn."""
    w = float(group.get("loss_weight", 1.0))
    if not np.isfinite(w) or w < 0:
        raise ValueError(f"data group {group.get('name', '?')!r}: loss_weight must be a finite number >= 0, got {w}")
    return w


def capacities(data_cfg) -> Capacities:
    c = data_cfg.capacities
    return Capacities(int(c.und), int(c.gen), int(c.ce), int(c.vit))


def _checked_weights(label: str, weights: dict) -> dict:
    """weights, unless one is negative or none is positive (0: the group sits out)."""
    if any(float(w) < 0 for w in weights.values()) or not any(float(w) > 0 for w in weights.values()):
        raise ValueError(f"{label} weights must be >= 0 with one positive weight (0: the group sits out), got {weights}")
    return weights


def phase_plan(data_cfg) -> list[tuple[int | None, list[float]]]:
    """[(records or None for the open-ended rest, per-group weights)]: `data.phases`, then the groups' weights.

    A phase is dict(records=N, weights={group name: weight}); groups it does not name sit it out.
    """
    names = [g.get("name", f"group{i}") for i, g in enumerate(data_cfg.groups)]
    plan = []
    for k, phase in enumerate(data_cfg.get("phases", None) or []):
        weights = _checked_weights(f"data.phases[{k}]", dict(phase.get("weights", {})))
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(f"data.phases[{k}] names groups {unknown} that data.groups does not have {names}")
        if int(phase.get("records", 0)) < 1:
            raise ValueError(f"data.phases[{k}] needs records >= 1, got {dict(phase)}")
        plan.append((int(phase["records"]), [float(weights.get(n, 0.0)) for n in names]))
    own = _checked_weights("data.groups", {n: float(g.get("weight", 1.0)) for n, g in zip(names, data_cfg.groups)})
    plan.append((None, list(own.values())))
    return plan


def mixture(groups: list, weights: list[float]) -> grain.MapDataset:
    """The groups with positive weight, mixed in proportion (one group: itself)."""
    keep = [i for i, w in enumerate(weights) if w > 0]
    if len(keep) == 1:
        return groups[keep[0]]
    return grain.MapDataset.mix([groups[i] for i in keep], [weights[i] for i in keep])


def draws_per_group(weights: list[float], records: int) -> list[int]:
    """How many of the first `records` records of `mixture(groups, weights)` come from each group."""
    tags = [grain.MapDataset.source([i]).repeat() for i in range(len(weights))]
    mixed = mixture(tags, weights)
    return np.bincount([mixed[i] for i in range(records)], minlength=len(weights)).tolist()


def curriculum(groups: list, plan: list[tuple[int | None, list[float]]]) -> grain.MapDataset:
    """The phases' mixtures one after another; each group resumes after the records earlier phases drew."""
    parts, offsets = [], [0] * len(groups)
    for records, weights in plan[:-1]:
        parts.append(mixture([g[o:] for g, o in zip(groups, offsets)], weights)[:records])
        offsets = [o + n for o, n in zip(offsets, draws_per_group(weights, records))]
    rest = mixture([g[o:] for g, o in zip(groups, offsets)], plan[-1][1])
    if not parts:
        return rest
    # Grain sums the parts' lengths: the open-ended rest is cut so that the total still fits an index
    return grain.MapDataset.concatenate(parts + [rest[:sys.maxsize - sum(r for r, _ in plan[:-1])]])


def make_dataset(data_cfg, cfg, *, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """IterDataset of batches: dicts of (B, ...) arrays, B = data_cfg.batch_size // process_count packs."""
    seed = int(data_cfg.seed)
    groups = []
    for gi, g in enumerate(data_cfg.groups):
        ds = grain.MapDataset.source(make_source(g, seed))
        ds = ds[process_index::process_count]
        ds = ds.shuffle(seed=seed + 7919 * gi).repeat()
        ds = ds.random_map(Builder(g, cfg, MR.make_builder(g, cfg, data_cfg)), seed=seed + 104729 * (gi + 1))
        groups.append(ds)
    mixed = curriculum(groups, phase_plan(data_cfg))
    packed = PackIterDataset(mixed.to_iter_dataset(), cfg, capacities(data_cfg),
                             token_budget=data_cfg.get("token_budget", None),
                             drop_overflow=bool(data_cfg.get("drop_overflow", True)),
                             max_bad_fraction=float(data_cfg.get("max_bad_fraction", 0.5)),
                             min_records_for_report=int(data_cfg.get("min_records_for_report", 20)),
                             fail_on_bad_shard=bool(data_cfg.get("fail_on_bad_shard", False)))
    per_process = int(data_cfg.batch_size) // process_count
    if per_process < 1 or int(data_cfg.batch_size) % process_count:
        raise ValueError(f"batch_size {data_cfg.batch_size} does not split over {process_count} processes")
    return packed.batch(per_process)


def make_iterator(data_cfg, cfg, *, process_index: int = 0, process_count: int = 1):
    """A checkpointable iterator (`next`, `get_state`, `set_state`) of batches."""
    return iter(make_dataset(data_cfg, cfg, process_index=process_index, process_count=process_count))


def pack_stats(iterator) -> dict:
    """The packer's counters (records, bad, bad_by_source, reported, packs, ...) behind a batch iterator."""
    state = iterator.get_state()
    while "stats" not in state and "parent" in state:
        state = state["parent"]
    return state.get("stats", {})
