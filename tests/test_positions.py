"""MaPE position ids: exact equality with the reference goldens + the spec's worked examples (spec 20 §5)."""
import numpy as np
import pytest

from conftest import GOLDEN_DIR
from lance_jax.parity_cases.positions import position_layouts, position_rows
from lance_jax import positions as P
from lance_jax.config import load_reference_config


def _token_ids():
    """(RopeTokens, vision_end_id) from the golden config; stock Qwen2.5 ids when it is absent."""
    if not (GOLDEN_DIR / "model" / "llm_config.json").is_file():  # hand-built tests do not need the goldens
        return P.RopeTokens(151652, 151655, 151656), 151653
    cfg = load_reference_config(str(GOLDEN_DIR / "model"))
    return P.RopeTokens.from_model_config(cfg), cfg.vision_end_token_id


TOK, VE = _token_ids()
VS, VP, TXT = TOK.vision_start_id, TOK.video_token_id, 1  # any non-special id stands for text


def test_golden_layouts_exact(golden, golden_cfg):
    """Every layout of positions.npz (train_*, infer_* incl. uncond and x2t variants), exact."""
    tokens = P.RopeTokens.from_model_config(golden_cfg)
    layouts = position_layouts(golden)
    assert any(name.startswith("train_") for name in layouts) and any(name.startswith("infer_") for name in layouts)
    rows = [r for name in layouts for r in position_rows(golden, name, tokens)]
    failed = [r.format() for r in rows if not r.passed]
    assert not failed, "\n".join(failed)
    assert {r.name.split(":")[1] for r in rows} >= {"rope_raw", "rope", "uncond_rope", "full_rope_train_style"}


def test_golden_packed_stream(golden):
    z, modes = golden.arrays("train_forward"), golden.case_meta("train_forward")["attn_modes"]
    n_real = len(z["sample_lens"]) - 1
    grids = [z[f"video_grid_thw_{i}"] for i in range(n_real)]
    got = P.packed_position_ids(z["packed_text_ids"], z["sample_lens"], grids, z["sample_modality"],
                                z["split_lens"], modes, TOK)
    np.testing.assert_array_equal(got, z["position_ids"])
    # pad-sample tokens, when present in the stream, get zeros
    pad_len = int(z["sample_lens"][-1])
    ids = np.concatenate([z["packed_text_ids"], np.full(pad_len, TXT)])
    mod = np.concatenate([z["sample_modality"], np.full(pad_len, -1)])
    padded = P.packed_position_ids(ids, z["sample_lens"], grids + [np.zeros((0, 3))], mod, z["split_lens"], modes, TOK)
    np.testing.assert_array_equal(padded[:, : got.shape[1]], got)
    assert not padded[:, got.shape[1]:].any()


# ---- hand-built layouts (spec 20 §5) ----

def _seq(*parts):
    """parts: (token list, modality code) -> (ids, modality)."""
    ids = np.concatenate([np.asarray(t, np.int64) for t, _ in parts])
    mod = np.concatenate([np.full(len(t), code) for t, code in parts])
    return ids, mod


def _block(n, pad=None):
    return [VS] + [VP if pad is None else pad] * n + [VE]


def _text(n):
    return [TXT] * n


def _cols(*runs):
    """Expected (3, L): ints p stand for a text-like (p, p, p) token, tuples for (T, H, W)."""
    cols = [(r, r, r) if isinstance(r, int) else r for run in runs for r in run]
    return np.array(cols, np.int32).T


def _t2i():  # example (a)
    ids, mod = _seq((_text(34), -1), (_text(5), 0), (_text(5), -1), (_block(4), 1), (_text(1), -1))
    return ids, mod, [(1, 4, 4)], ["causal"] * 3 + ["noise", "causal"], [34, 5, 5, 6, 1]


def _x2t():  # example (b)
    ids, mod = _seq((_text(18), -1), (_block(4), 4), (_text(11), -1))
    return ids, mod, [(1, 4, 4)], ["causal", "full", "causal"]


def _image_edit(target_grid=(1, 4, 4)):  # example (c)
    n_target = target_grid[0] * target_grid[1] * target_grid[2] // 4
    ids, mod = _seq((_text(64), -1), (_block(4), 4), (_block(4), 2), (_text(4), 0), (_text(5), -1),
                    (_block(n_target), 1), (_text(1), -1))
    modes = ["causal", "full", "full_noise", "causal", "causal", "noise", "causal"]
    return ids, mod, [(1, 4, 4), (1, 4, 4), target_grid], modes, [64, 6, 6, 4, 5, n_target + 2, 1]


LATENTS_2x2 = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]


def _at(base, offsets=LATENTS_2x2, t_shift=0):
    return [(base + t + t_shift, base + h, base + w) for t, h, w in offsets]


def test_t2i_example_and_uncond():
    ids, mod, grids, modes, splits = _t2i()
    expected = _cols(range(45), _at(45), [47, 48])
    np.testing.assert_array_equal(P.sample_position_ids(ids, grids, mod, modes, TOK), expected)
    keep, uncond = P.uncond_position_ids(ids, grids, mod, modes, splits, TOK)
    assert keep.sum() == 46 and not keep[34:39].any()
    np.testing.assert_array_equal(uncond, _cols(range(40), _at(40), [42, 43]))


def test_x2t_example_inference_vs_training():
    ids, mod, grids, modes = _x2t()
    raw = _cols(range(19), _at(19), [21], range(22, 33))
    np.testing.assert_array_equal(P.x2t_inference_position_ids(ids, grids, TOK), raw)
    trained = P.sample_position_ids(ids, grids, mod, modes, TOK)
    np.testing.assert_array_equal(trained, _cols(range(18), [(1000, 18, 18)], _at(19, t_shift=982),
                                                 [(1003, 21, 21)], range(22, 33)))
    np.testing.assert_array_equal(trained[:, 24:], raw[:, 24:])  # text after the ViT block is not re-based


def test_image_edit_example():
    ids, mod, grids, modes, splits = _image_edit()
    source = _cols([68], _at(69), [71])
    vit = _cols([(1000, 64, 64)], _at(65, t_shift=936), [(1003, 67, 67)])
    got = P.sample_position_ids(ids, grids, mod, modes, TOK)
    np.testing.assert_array_equal(got, np.concatenate(
        [_cols(range(64)), vit, source, _cols(range(72, 81)), source, _cols([85])], axis=1))
    raw = P.rope_index(ids, grids, TOK)
    np.testing.assert_array_equal(raw[:, 85:91], _cols([81], _at(82), [84]))
    _, uncond = P.uncond_position_ids(ids, grids, mod, modes, splits, TOK)
    np.testing.assert_array_equal(uncond, np.concatenate(
        [_cols(range(64)), vit, source, _cols(range(72, 77)), source, _cols([81])], axis=1))


def test_video_edit_example():
    ids, mod = _seq((_text(64), -1), (_block(20), 4), (_block(12), 2), (_text(4), 0), (_text(5), -1),
                    (_block(12), 1), (_text(1), -1))
    modes = ["causal", "full", "full_noise", "causal", "causal", "noise", "causal"]
    grids = [(5, 4, 4), (3, 4, 4), (3, 4, 4)]
    got = P.sample_position_ids(ids, grids, mod, modes, TOK)
    vit = got[:, 64:86]
    assert tuple(vit[:, 0]) == (1000, 64, 64) and tuple(vit[:, -1]) == (1010, 74, 74)
    np.testing.assert_array_equal(np.unique(vit[0, 1:-1]), [1001, 1003, 1005, 1007, 1009])
    source = got[:, 86:100]
    assert tuple(source[:, 0]) == (75, 75, 75) and tuple(source[:, -1]) == (81, 81, 81)
    np.testing.assert_array_equal(np.unique(source[0, 1:-1]), [76, 78, 80])
    np.testing.assert_array_equal(np.unique(source[1:, 1:-1]), [76, 77])
    np.testing.assert_array_equal(got[0, 100:104], [82, 83, 84, 85])
    assert P.rope_index(ids, grids, TOK)[0, 109] == 91
    np.testing.assert_array_equal(got[:, 109:123], source)
    assert tuple(got[:, -1]) == (98, 98, 98)


def test_edit_target_keeps_own_ids_when_counts_differ():
    ids, mod, grids, modes, _ = _image_edit(target_grid=(1, 4, 8))
    raw = P.rope_index(ids, grids, TOK)
    got = P.sample_position_ids(ids, grids, mod, modes, TOK)
    target = mod == P.MODALITY_NOISE
    np.testing.assert_array_equal(got[:, target], raw[:, target])
    assert got[0, 64] == 1000  # the ViT block still moves


def test_no_shift_without_full_split():
    ids, mod, grids, _ = _x2t()
    raw = P.rope_index(ids, grids, TOK)
    np.testing.assert_array_equal(P.sample_position_ids(ids, grids, mod, ["causal", "noise", "causal"], TOK), raw)
    np.testing.assert_array_equal(P.sample_position_ids(ids, grids, mod, ["causal", "full"], TOK, shift=False), raw)


def test_full_noise_target_opens_gate_and_ref_image_starts_at_2000():
    ids, mod = _seq((_text(7), -1), (_block(4), 3), (_text(2), -1))
    got = P.sample_position_ids(ids, [(1, 4, 4)], mod, ["causal", "full_noise_target", "causal"], TOK)
    np.testing.assert_array_equal(got, _cols(range(7), [(2000, 7, 7)], _at(8, t_shift=1993),
                                             [(2003, 10, 10)], [11, 12]))


def test_mape_shift_returns_new_array():
    ids, mod, grids, modes = _x2t()
    raw = P.rope_index(ids, grids, TOK)
    before = raw.copy()
    out = P.mape_shift(raw, mod, modes)
    np.testing.assert_array_equal(raw, before)
    assert out is not raw and out.dtype == np.int32 and out[0, 18] == 1000


def test_image_pad_block_has_temporal_stride_zero():
    ids, _ = _seq((_text(3), -1), (_block(8, pad=TOK.image_token_id), 4), (_text(1), -1))
    got = P.rope_index(ids, [(2, 4, 4)], TOK)
    np.testing.assert_array_equal(got[0, 4:12], np.full(8, 4))
    np.testing.assert_array_equal(got[:, 12:], _cols([6, 7]))


def test_uncond_drops_splits_that_become_empty():
    # artificial: the caption is the only 'full' split, so the reduced sample has no gate
    ids, mod = _seq((_text(3), -1), (_text(2), 0), (_block(4), 4))
    grids, modes, splits = [(1, 4, 4)], ["causal", "full", "causal"], [3, 2, 6]
    assert P.sample_position_ids(ids, grids, mod, modes, TOK)[0, 5] == 1000
    keep, uncond = P.uncond_position_ids(ids, grids, mod, modes, splits, TOK)
    np.testing.assert_array_equal(uncond, P.rope_index(ids[keep], grids, TOK))


def test_packed_restarts_per_sample():
    (a_ids, a_mod, a_grids, a_modes, a_splits), (b_ids, b_mod, b_grids, b_modes) = _t2i(), _x2t()
    ids, mod = np.concatenate([a_ids, b_ids]), np.concatenate([a_mod, b_mod])
    sample_lens, split_lens = [len(a_ids), len(b_ids), 5], a_splits + [18, 6, 11, 5]
    got = P.packed_position_ids(ids, sample_lens, [a_grids, b_grids], mod, split_lens,
                                a_modes + b_modes + ["causal"], TOK)
    np.testing.assert_array_equal(got[:, : len(a_ids)], P.sample_position_ids(a_ids, a_grids, a_mod, a_modes, TOK))
    np.testing.assert_array_equal(got[:, len(a_ids):], P.sample_position_ids(b_ids, b_grids, b_mod, b_modes, TOK))
    assert got[0, len(a_ids) + 18] == 1000  # only sample b has the full split


def test_errors():
    ids, mod, grids, modes = _x2t()
    with pytest.raises(ValueError, match="placeholders but grid"):
        P.rope_index(ids, [(1, 4, 8)], TOK)
    with pytest.raises(ValueError, match="1 vision blocks .* 2 grids"):
        P.rope_index(ids, grids * 2, TOK)
    with pytest.raises(ValueError, match="2 vision blocks .* 1 grids"):
        P.rope_index(np.concatenate([ids, _block(4)]), grids, TOK)
    with pytest.raises(ValueError, match="outside a vision_start"):
        P.rope_index(np.concatenate([ids, [VP]]), grids, TOK)
    with pytest.raises(ValueError, match="unknown attn mode"):
        P.sample_position_ids(ids, grids, mod, ["causal", "bidirectional", "causal"], TOK)
    with pytest.raises(ValueError, match="modality has"):
        P.sample_position_ids(ids, grids, mod[:-1], modes, TOK)
    with pytest.raises(ValueError, match="split_lens sum"):
        P.uncond_position_ids(ids, grids, mod, modes, [18, 6, 10], TOK)
    with pytest.raises(ValueError, match="split_lens but"):
        P.uncond_position_ids(ids, grids, mod, modes[:2], [18, 6, 11], TOK)
    with pytest.raises(ValueError, match="straddle"):
        P.packed_position_ids(np.concatenate([ids, ids]), [35, 35, 1], [grids, grids], np.concatenate([mod, mod]),
                              [18, 6, 20, 6, 20, 1], modes + modes, TOK)
    with pytest.raises(ValueError, match="input_ids has"):
        P.packed_position_ids(ids[:-1], [35, 1], [grids], mod[:-1], [18, 6, 11, 1], modes + ["causal"], TOK)
