"""Data: shard writing/reading, reference layouts, packing, pipeline determinism and resume, corrupt records."""
import io
import json
import os

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lance_jax.config import config_dict_from_file, model_config_from_dict
from lance_jax.data import media as M
from lance_jax.data import pipeline as PL
from lance_jax.data import records as R
from lance_jax.data import schema as SC
from lance_jax.data.shards import ReferenceSource, ShardSource, ShardWriter
from lance_jax.data.write_shards import main as write_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cfg():
    return model_config_from_dict(config_dict_from_file(os.path.join(REPO, "configs/models/tiny.py")).model)


def data_cfg(drop_overflow=True, seed=0, groups=None):
    c = config_dict_from_file(os.path.join(REPO, "configs/train/tiny_synthetic.py")).data
    c.drop_overflow, c.seed = drop_overflow, seed
    if groups is not None:
        c.groups = groups
    return c


def png(w=40, h=30, mode="RGB"):
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (w, h), (200, 10, 10, 128) if mode == "RGBA" else (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("drop", [True, False])
def test_pipeline_deterministic_and_resumable(cfg, drop):
    d = data_cfg(drop)
    a, b = PL.make_iterator(d, cfg), PL.make_iterator(d, cfg)
    first = [next(a) for _ in range(2)]
    assert all(same(x, next(b)) for x in first)
    state = a.get_state()
    json.dumps(state)  # checkpointable as JSON
    cont = [next(a) for _ in range(3)]
    c = PL.make_iterator(d, cfg)
    c.set_state(state)
    assert all(same(x, next(c)) for x in cont)
    assert c.get_state() == a.get_state()
    other = next(PL.make_iterator(data_cfg(drop, seed=1), cfg))
    assert not same(first[0], other)


def test_phases_draw_their_groups_first_then_continue_without_repeats():
    """A phase draws its records from its own groups in its proportions; afterwards every group resumes at
    the record after the last one the phase took, and the groups' own weights hold."""
    groups = [grain.MapDataset.source([(name, i) for i in range(1000)]) for name in ("a", "b", "c")]
    plan = [(6, [0.0, 2.0, 1.0]), (None, [1.0, 1.0, 1.0])]
    mixed = PL.curriculum(groups, plan)
    first = [mixed[i] for i in range(6)]
    assert sorted(n for n, _ in first) == ["b"] * 4 + ["c"] * 2
    rest = [mixed[i] for i in range(6, 15)]
    assert sorted(n for n, _ in rest) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    for name in ("a", "b", "c"):  # per group: consecutive records, none twice
        seen = [i for n, i in first + rest if n == name]
        assert seen == list(range(len(seen)))
    assert PL.draws_per_group([0.0, 2.0, 1.0], 6) == [0, 4, 2]


def test_phases_in_the_pipeline(cfg):
    """data.phases reaches the iterator (the first records all come from the phase's group), is resumable,
    and a phase naming an unknown group or drawing nothing, or a negative group weight, is refused by name."""
    d = data_cfg(False)
    d.phases = [dict(records=10, weights=dict(und=1.0))]  # a batch here holds ~4 und records (or ~13 mixed)
    it = PL.make_iterator(d, cfg)
    next(it)
    seen = PL.pack_stats(it)["seen"]
    assert set(seen) == {"synthetic:und"}
    state = it.get_state()
    cont = [next(it) for _ in range(3)]
    seen = PL.pack_stats(it)["seen"]
    assert seen["synthetic:gen"] > 0 and seen["synthetic:und"] > 10
    again = PL.make_iterator(d, cfg)
    again.set_state(state)
    assert all(same(x, next(again)) for x in cont)
    d.phases = [dict(records=6, weights=dict(video=1.0))]
    with pytest.raises(ValueError, match="video"):
        PL.make_iterator(d, cfg)
    d.phases = [dict(records=6, weights=dict(und=0.0))]
    with pytest.raises(ValueError, match="positive weight"):
        PL.make_iterator(d, cfg)
    d.phases = []
    d.groups[0]["weight"], d.groups[1]["weight"] = 0.0, -1.0
    with pytest.raises(ValueError, match="weights must be >= 0"):
        PL.make_iterator(d, cfg)


def test_packed_batch_contents(cfg):
    batch = next(PL.make_iterator(data_cfg(), cfg))
    caps = PL.capacities(data_cfg())
    assert batch["und_ids"].shape == (2, caps.und) and batch["latents"].shape == (2, caps.gen, cfg.patch_latent_dim)
    for i in range(2):
        real_gen = batch["gen_index"][i] >= 0
        noisy = np.isfinite(batch["timestep_logits"][i])
        assert np.all(batch["gen_item"][i][noisy] >= 0) and not np.any(noisy & ~real_gen)
        n_ce = batch["ce_valid"][i].sum()
        assert n_ce > 0 and np.all(batch["ce_labels"][i][:n_ce] >= 0)
        vit_rows = batch["und_vit_slot"][i] >= 0
        assert np.all(batch["und_ids"][i][vit_rows] == cfg.video_token_id)
    # one z per target item: rows of the same item share their logit
    z, item = batch["timestep_logits"][0], batch["gen_item"][0]
    for k in np.unique(item[(item >= 0) & np.isfinite(z)]):
        assert len(np.unique(z[(item == k) & np.isfinite(z)])) == 1


def test_group_loss_weight_reaches_every_token_of_its_records(cfg):
    """A group's loss_weight is each of its records' factor on its latent rows and CE slots (padding 0);
    a bad value is refused by group name."""
    d = data_cfg()
    d.groups[0]["loss_weight"], d.groups[1]["loss_weight"] = 0.25, 3.0
    it = PL.make_iterator(d, cfg)
    seen = set()
    for _ in range(3):
        b = next(it)
        real_gen, real_ce = b["gen_index"] >= 0, b["ce_valid"]
        assert set(np.unique(b["gen_loss_weight"][real_gen])) <= {0.25, 3.0}
        assert set(np.unique(b["ce_loss_weight"][real_ce])) <= {0.25, 3.0}
        assert not b["gen_loss_weight"][~real_gen].any() and not b["ce_loss_weight"][~real_ce].any()
        seen |= set(np.unique(b["gen_loss_weight"][real_gen])) | set(np.unique(b["ce_loss_weight"][real_ce]))
    assert seen == {0.25, 3.0}
    plain = next(PL.make_iterator(data_cfg(), cfg))
    assert np.all(plain["gen_loss_weight"][plain["gen_index"] >= 0] == 1.0)
    d.groups[1]["loss_weight"] = -1.0
    with pytest.raises(ValueError, match=f"{d.groups[1]['name']}.*loss_weight must be"):
        PL.make_iterator(d, cfg)


def test_caption_dropout_and_ff2v(cfg):
    rng = np.random.default_rng(0)
    spec = dict(task="ff2v", caption_len=5, latent_grid=(3, 2, 2))
    r = R.synthetic_record(spec, cfg, rng, text_drop=0.0)
    assert np.sum(r["modality"] == 0) == 5
    assert np.all(np.isinf(r["timestep_logits"][:4])) and np.all(np.isfinite(r["timestep_logits"][4:]))
    dropped = R.synthetic_record(spec, cfg, rng, text_drop=1.0)
    assert np.sum(dropped["modality"] == 0) == 0


def test_synthetic_record_logit_offset(cfg):
    """The group's timestep shift reaches synthetic records too: same rng -> the same z plus the offset."""
    spec = dict(task="ff2v", caption_len=5, latent_grid=(3, 2, 2))
    plain = R.synthetic_record(spec, cfg, np.random.default_rng(4))
    shifted = R.synthetic_record(spec, cfg, np.random.default_rng(4), logit_offset=float(np.log(8.0)))
    noisy = np.isfinite(plain["timestep_logits"])
    assert noisy.sum() == 8 and np.array_equal(noisy, np.isfinite(shifted["timestep_logits"]))
    np.testing.assert_allclose(shifted["timestep_logits"][noisy], plain["timestep_logits"][noisy] + np.log(8.0),
                               rtol=0, atol=1e-6)


def test_frame_count_and_grids():
    assert [M.frame_count(int(s * 24), 24, 6) for s in (1, 2, 3, 6, 10)] == [9, 21, 33, 69, 69]
    assert M.frame_count(48, 24, 2) == 21
    assert M.latent_grid(1, 768, 768, 768) == (1, 48, 48)
    assert M.vit_grid(1, 616, 616, 616) == (1, 42, 42)


def test_shards_roundtrip_and_corrupt_records(cfg, tmp_path):
    w = ShardWriter(str(tmp_path / "good"), rows_per_shard=8, row_group_size=4)
    for i in range(16):
        w.write(dict(id=str(i), source_schema="text2image_general", elements=[
            SC.element("text", "user", text=f"a red square {i}"),
            SC.element("image", "assistant", media=png(32 + 16 * (i % 3), 32, "RGBA" if i % 2 else "RGB"),
                       is_target_candidate=True)]))
    index = w.close()
    assert index["num_rows"] == 16 and len(index["files"]) == 2
    src = ShardSource(str(tmp_path / "good"))
    assert len(src) == 16 and src[11]["id"] == "11" and src[11]["_source"] == "good/shard-00001.parquet"

    bad = ShardWriter(str(tmp_path / "bad"), rows_per_shard=100)
    for i in range(30):
        media = png() if i % 3 == 0 else b"not an image"
        bad.write(dict(id=str(i), source_schema="text2image_general", elements=[
            SC.element("text", "user", text="x"), SC.element("image", "assistant", media=media, is_target_candidate=True)]))
    bad.close()
    group = dict(name="t2i", source="shards", tasks=["t2i"], resolution=128, weight=1.0)
    d = data_cfg(groups=[dict(group, path=str(tmp_path / "good")), dict(group, name="bad", path=str(tmp_path / "bad"))])
    d.min_records_for_report, d.max_bad_fraction = 10, 0.5
    d.capacities.gen = 512
    it = PL.make_iterator(d, cfg)
    for _ in range(4):
        next(it)
    stats = PL.pack_stats(it)
    assert stats["bad"] > 0 and set(stats["bad_by_source"]) == {"bad/shard-00000.parquet"}
    assert stats["reported"] == ["bad/shard-00000.parquet"]
    d.fail_on_bad_shard = True
    with pytest.raises(Exception, match="bad/shard-00000.parquet"):
        it = PL.make_iterator(d, cfg)
        for _ in range(8):
            next(it)


def test_reference_layouts_and_cli(cfg, tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    pq.write_table(pa.table({"caption": [" a cat ", "a dog"], "image_bytes": [png(), png(64, 32)]}), ref / "t2i.parquet")
    pq.write_table(pa.table({"caption_i": ["Describe."], "caption_q": [""], "caption_a": ["A square."],
                             "image_bytes": [png()]}), ref / "x2t.parquet")
    src = ReferenceSource(str(ref))
    rows = [src[i] for i in range(len(src))]
    assert [r["source_schema"] for r in rows] == ["text2image_general", "text2image_general", "x2t_general"]
    assert rows[0]["elements"][0]["text"] == "a cat" and rows[2]["system_prompt"] == "Describe."
    index = write_shards(["--input", str(ref), "--out", str(tmp_path / "out")])
    assert index["num_rows"] == 3
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(png())
        (folder / f"{i}.txt").write_text(f"caption {i}")
    assert write_shards(["--input", str(folder), "--out", str(tmp_path / "out2")])["num_rows"] == 3
    row = ShardSource(str(tmp_path / "out2"))[1]
    assert row["elements"][0]["text"] == "caption 1" and row["elements"][1]["width"] == 40
    # the understanding row builds into a record with CE targets
    b = PL.Builder(dict(name="und", tasks=["i2t"], vit_resolution=112), cfg)
    r = b(src[2], np.random.default_rng(0))
    assert "_bad" not in r and len(r["ce_labels"]) == len("A square.") + 1
