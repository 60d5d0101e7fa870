"""Tokenizer and per-task sequence builder: exact parity with the reference-built golden layouts,
the spec's worked-example structure (20 §5), the token-count formulas (20 §4.4-4.6) and errors.

Golden inputs (captions, questions, grids) are recovered from the golden arrays themselves: captions by
decoding the modality-0 tokens, understanding texts by parsing the decoded template, grids from
`*_video_grid_thw` (VAE grids are [t, 2h, 2w]). Layouts are discovered from the npz keys.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from lance_jax import positions as P
from lance_jax import sequence as S
from lance_jax.config import tokenizer_length
from lance_jax.kv_plan import SampleLayout
from lance_jax.models.vae import num_latent_frames
from lance_jax.tokenizer import Tokenizer
from lance_jax.vision import vit_grid

_UND_RE = re.compile(
    r"^<\|im_start\|>system\n(?P<instr>.*?)<\|im_end\|>\n<\|im_start\|>user\n"
    r"<\|vision_start\|>(?:<\|video_pad\|>)+<\|vision_end\|>(?P<question>.*?)<\|im_end\|>\n"
    r"<\|im_start\|>assistant\n(?P<answer>.*)<\|im_end\|>$", re.S)


@pytest.fixture(scope="module")
def tok(golden):
    return Tokenizer.from_folder(golden.model_dir)


@pytest.fixture(scope="module")
def cfg(golden_cfg):
    return golden_cfg


def _latent(grid) -> tuple[int, int, int]:
    """VAE builder grid [t, 2h, 2w] -> latent grid (t, h, w)."""
    t, h2, w2 = (int(x) for x in grid)
    assert h2 % 2 == 0 and w2 % 2 == 0
    return t, h2 // 2, w2 // 2


def _rebuild_generation(task, ids, modality, grids, tok, cfg, *, training, pack_offset=0):
    caption = tok.decode(ids[modality == P.MODALITY_TEXT])
    grids = np.asarray(grids).reshape(-1, 3)
    kw = {}
    if task in S.EDIT_TASKS:
        kw = dict(source_vit_grid=grids[0], source_latent_grid=_latent(grids[1]))
    return S.build_generation(task, caption, tokenizer=tok, cfg=cfg, target_latent_grid=_latent(grids[-1]),
                              training=training, pack_offset=pack_offset, **kw)


def _parse_und(tok, ids):
    m = _UND_RE.match(tok.decode(ids))
    assert m, "golden understanding sample does not follow the template"
    return m["instr"], m["question"], m["answer"]


def _assert_layout(built: SampleLayout, ids, modality, split_lens, modes=None, grids=None):
    np.testing.assert_array_equal(built.input_ids, np.asarray(ids))
    np.testing.assert_array_equal(built.modality, np.asarray(modality))
    np.testing.assert_array_equal(built.split_lens, np.asarray(split_lens))
    if modes is not None:
        assert list(built.attn_modes) == list(modes)
    if grids is not None:
        np.testing.assert_array_equal(built.grids, np.asarray(grids).reshape(-1, 3))


# ---------------------------------------------------------------------------------------------------
# Tokenizer
def test_tokenizer_matches_golden_tokenizer_metadata(golden, tok):
    meta = golden.meta
    assert len(tok) == meta["len_tokenizer"] == tokenizer_length(golden.model_dir)
    for content, idx in meta["special_token_ids"].items():
        assert tok.token_id(content) == idx
    cfg = golden.model_config()
    assert tok.special_ids() == dict(
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
        image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id)
    assert tok.eos_token_id == tok.im_end_id and tok.bos_token_id == tok.im_start_id


def test_tokenizer_round_trips_every_golden_sequence(golden, tok):
    """Re-encoding the decoded golden ids gives the same ids (BPE merges and special splitting agree)."""
    arrays = golden.arrays("positions")
    names = [k for k in arrays if k.endswith("input_ids")]
    assert names
    for k in names:
        ids = arrays[k].tolist()
        assert tok.encode(tok.decode(ids)) == ids, k


def test_tokenizer_specials_normalisation_and_errors(tok, tmp_path):
    ids = tok.encode("<|im_start|>user\nA cat<|im_end|>")
    assert ids[0] == tok.im_start_id and ids[-1] == tok.im_end_id
    assert tok.encode("<|vision_start|><|video_pad|><|vision_end|>") == [tok.vision_start_id, tok.video_pad_id,
                                                                          tok.vision_end_id]
    assert tok.encode("caf\u0065\u0301") == tok.encode("caf\u00e9")  # NFC
    text = "the user\u2019s text \u00e9\u4e2d\n\n  x"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.im_end_id], skip_special_tokens=True) == ""
    with pytest.raises(KeyError, match="not in the tokenizer"):
        tok.token_id("<|no_such_token|>")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        Tokenizer.from_folder(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_folder(str(tmp_path / "missing"))


def test_tokenizer_json_round_trip(tok, tmp_path):
    """A folder with tokenizer.json (the released format) loads through the same class, same ids."""
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.from_folder(str(tmp_path))
    text = "<|im_start|>system\nDescribe the image.<|im_end|>\n<|vision_start|><|video_pad|><|vision_end|> ok"
    assert loaded.encode(text) == tok.encode(text)
    assert len(loaded) == len(tok) and loaded.special_ids() == tok.special_ids()


# ---------------------------------------------------------------------------------------------------
# Golden parity
def _position_layouts(golden, prefix):
    arrays = golden.arrays("positions")
    return sorted(k[:-len("_input_ids")] for k in arrays if k.startswith(prefix) and k.endswith("_input_ids")
                  and not k.endswith("_full_input_ids"))


def test_golden_generation_layouts_exact(golden, tok, cfg):
    arrays, meta = golden.arrays("positions"), golden.case_meta("positions")["layouts"]
    names = [n for n in _position_layouts(golden, "") if n.split("_", 1)[1] in S.GENERATION_TASKS]
    assert {n.split("_", 1)[0] for n in names} == {"infer", "train"}
    for name in names:
        stage, task = name.split("_", 1)
        ids, mod = arrays[f"{name}_input_ids"], arrays[f"{name}_sample_modality"]
        grids = arrays[f"{name}_video_grid_thw"]
        b = _rebuild_generation(task, ids, mod, grids, tok, cfg, training=stage == "train")
        _assert_layout(b.layout, ids, mod, arrays[f"{name}_split_lens"], meta[name]["attn_modes"], grids)
        assert b.caption_span is not None
        assert (mod[b.caption_span[0]:b.caption_span[1]] == 0).all() and (mod == 0).sum() == np.diff(b.caption_span)
        np.testing.assert_array_equal(np.full(len(ids), b.sample_task), arrays[f"{name}_sample_task"])
        if f"{name}_uncond_mask" in arrays:
            np.testing.assert_array_equal(b.layout.modality != P.MODALITY_TEXT, arrays[f"{name}_uncond_mask"])
        # the rebuilt layout drives the id builder to the golden MaPE ids
        tokens = P.RopeTokens.from_model_config(cfg)
        rope = P.sample_position_ids(b.layout.input_ids, b.layout.grids, b.layout.modality, b.layout.attn_modes,
                                     tokens)
        np.testing.assert_array_equal(rope, arrays[f"{name}_rope"])


def test_golden_t2i_training_uses_t2v_prompt(golden, tok, cfg):
    arrays = golden.arrays("positions")
    if "train_t2i_input_ids" not in arrays:
        pytest.skip("no train_t2i layout")
    text = tok.decode(arrays["train_t2i_input_ids"])
    assert S.system_prompt("t2i", training=True) in text and S.T2I_SYSTEM_PROMPT.replace("{v}", "image") not in text
    ids, mod, grids = (arrays[f"train_t2i_{k}"] for k in ("input_ids", "sample_modality", "video_grid_thw"))
    infer = _rebuild_generation("t2i", ids, mod, grids, tok, cfg, training=False)
    assert not np.array_equal(infer.layout.input_ids, ids)


def test_golden_gen_case_samples_exact(golden, tok, cfg):
    arrays, meta = golden.arrays("gen"), golden.case_meta("gen")
    tasks = sorted(k[:-len("_input_ids")] for k in arrays if k.endswith("_input_ids"))
    assert tasks
    for task in tasks:
        ids, mod = arrays[f"{task}_input_ids"], arrays[f"{task}_sample_modality"]
        grids = arrays[f"{task}_video_grid_thw"]
        b = _rebuild_generation(task, ids, mod, grids, tok, cfg, training=False)
        _assert_layout(b.layout, ids, mod, arrays[f"{task}_split_lens"], meta[f"{task}_attn_modes"], grids)
        if f"{task}_vit_grid_thw" in arrays:
            vit = [blk["grid"] for blk in b.vision_blocks if blk["kind"] == "vit"]
            np.testing.assert_array_equal(np.asarray(vit).reshape(-1, 3), arrays[f"{task}_vit_grid_thw"])


def test_golden_understanding_layouts_exact(golden, tok, cfg):
    arrays, meta = golden.arrays("positions"), golden.case_meta("positions")["layouts"]
    names = [n for n in _position_layouts(golden, "") if n.split("_", 1)[1] in S.UNDERSTANDING_TASKS]
    assert names
    for name in names:
        stage, task = name.split("_", 1)
        full = arrays[f"{name}_full_input_ids" if stage == "infer" else f"{name}_input_ids"]
        full_mod = arrays[f"{name}_sample_modality_full" if stage == "infer" else f"{name}_sample_modality"]
        grids = arrays[f"{name}_video_grid_thw"]
        instr, question, answer = _parse_und(tok, full)
        kw = dict(tokenizer=tok, cfg=cfg, vit_grid=grids[0], instruction=instr)
        train = S.build_understanding(task, question, answer=answer, **kw)
        np.testing.assert_array_equal(train.layout.input_ids, full)
        np.testing.assert_array_equal(train.layout.modality, full_mod)
        np.testing.assert_array_equal(train.layout.grids, grids)
        assert train.layout.attn_modes == meta[name]["attn_modes"]
        if f"{name}_split_lens" in arrays:
            np.testing.assert_array_equal(train.layout.split_lens, arrays[f"{name}_split_lens"])
        # CE: every answer token and the closing <|im_end|>, predicted from the previous position
        assert train.ce_labels[-1] == tok.im_end_id
        np.testing.assert_array_equal(full[train.ce_indexes + 1], train.ce_labels)
        assert tok.decode(train.ce_labels) == answer + "<|im_end|>"
        if stage == "infer":  # golden = prompt through 'assistant\n' + max_length <|endoftext|> fillers
            ctx = arrays[f"{name}_input_ids"]
            n_fill = 0
            while ctx[len(ctx) - 1 - n_fill] == tok.endoftext_id:
                n_fill += 1
            prompt = S.build_understanding(task, question, **kw)
            np.testing.assert_array_equal(prompt.layout.input_ids, ctx[:len(ctx) - n_fill])
            assert prompt.ce_indexes.size == 0
            assert prompt.layout.split_lens.sum() == len(prompt.layout.input_ids)
            np.testing.assert_array_equal(prompt.layout.split_lens[:-1], train.layout.split_lens[:-1])
            assert prompt.layout.attn_modes == train.layout.attn_modes
            rope = P.x2t_inference_position_ids(np.r_[prompt.layout.input_ids, ctx[len(ctx) - n_fill:]],
                                                prompt.layout.grids, P.RopeTokens.from_model_config(cfg))
            np.testing.assert_array_equal(rope, arrays[f"{name}_rope"])


def test_golden_und_case_exact(golden, tok, cfg):
    z = golden.arrays("und")
    instr, question, answer = _parse_und(tok, z["input_ids_full"])
    kw = dict(tokenizer=tok, cfg=cfg, vit_grid=z["vit_grid_thw"][0], instruction=instr)
    full = S.build_understanding("x2t_image", question, answer=answer, **kw)
    np.testing.assert_array_equal(full.layout.input_ids, z["input_ids_full"])
    np.testing.assert_array_equal(full.layout.split_lens, z["split_lens"])
    prompt = S.build_understanding("x2t_image", question, **kw)
    np.testing.assert_array_equal(prompt.layout.input_ids, z["context_ids"])
    # the KV prefill = every prompt token but the last (fed as the first decode query)
    lens = prompt.layout.split_lens.copy()
    lens[-1] -= 1
    np.testing.assert_array_equal(lens, z["prefill_chunk_lens"])
    assert full.ce_indexes[0] == len(z["context_ids"]) - 1


def test_golden_packed_training_samples_exact(golden, tok, cfg):
    """Every sample of the packed training batch, incl. the caption-cut quirk at non-zero offsets."""
    z, meta = golden.arrays("train_forward"), golden.case_meta("train_forward")
    order, modes = meta["sample_order"], meta["attn_modes"]
    lens, split_lens = z["sample_lens"], z["split_lens"]
    starts = np.r_[0, np.cumsum(lens)[:-1]]
    split_ends = np.cumsum(split_lens)
    ce_idx, ce_lab, mse, n_checked = [], [], [], 0
    for i, (task, off, n) in enumerate(zip(order, starts, lens)):
        if task == "pad":
            continue
        ids, mod = z["packed_text_ids"][off:off + n], z["sample_modality"][off:off + n]
        grids = z[f"video_grid_thw_{i}"]
        first = int(np.searchsorted(split_ends, off, side="right"))
        last = int(np.searchsorted(split_ends, off + n, side="left"))
        if task in S.UNDERSTANDING_TASKS:
            instr, question, answer = _parse_und(tok, ids)
            b = S.build_understanding(task, question, tokenizer=tok, cfg=cfg, vit_grid=grids[0], instruction=instr,
                                      answer=answer)
            ce_idx.append(b.ce_indexes + off)
            ce_lab.append(b.ce_labels)
        else:
            b = _rebuild_generation(task, ids, mod, grids, tok, cfg, training=True, pack_offset=int(off))
            tgt = b.target_block
            assert tgt["clean_latent_frames"] == (1 if task == "i2v" else 0)
            frame = tgt["latent_grid"][1] * tgt["latent_grid"][2]
            mse.append(np.arange(tgt["range"][0] + tgt["clean_latent_frames"] * frame, tgt["range"][1]) + off)
        _assert_layout(b.layout, ids, mod, split_lens[first:last + 1], modes[first:last + 1], grids)
        n_checked += 1
    assert n_checked >= 2
    np.testing.assert_array_equal(np.concatenate(ce_idx), z["ce_loss_indexes"])
    np.testing.assert_array_equal(np.concatenate(ce_lab), z["packed_label_ids"])
    np.testing.assert_array_equal(np.concatenate(mse), z["mse_loss_indexes"])


# ---------------------------------------------------------------------------------------------------
# Worked examples (spec 20 §5) — structure with the golden tokenizer (the real Qwen ids are not offline)
PREFIX = "<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\n"
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"


def _n(tok, text):
    return len(tok.encode(text))


def test_worked_example_a_t2i(tok, cfg):
    cap = "A red cat sits."
    b = S.build_generation("t2i", cap, tokenizer=tok, cfg=cfg, target_latent_grid=(1, 2, 2))
    p, c, s = _n(tok, PREFIX.format(S.system_prompt("t2i"))), _n(tok, cap), _n(tok, SUFFIX)
    lay = b.layout
    assert lay.split_lens.tolist() == [p, c, s, 6, 1]
    assert lay.attn_modes == ["causal", "causal", "causal", "noise", "causal"]
    assert lay.grids.tolist() == [[1, 4, 4]]
    assert b.caption_span == (p, p + c)
    assert lay.modality.tolist() == [-1] * p + [0] * c + [-1] * s + [1] * 6 + [-1]
    ids = lay.input_ids
    assert ids[p + c + s] == cfg.vision_start_token_id and ids[-2] == cfg.vision_end_token_id
    assert (ids[p + c + s + 1:-2] == cfg.video_token_id).all() and ids[-1] == cfg.eos_token_id
    assert b.vision_blocks == [dict(kind="vae", role="target", grid=(1, 4, 4), range=(p + c + s + 1, p + c + s + 5),
                                    span=(p + c + s, p + c + s + 6), num_tokens=4, modality=1, attn_mode="noise",
                                    latent_grid=(1, 2, 2), clean_latent_frames=0)]
    assert b.ce_indexes.size == 0 and b.sample_task == 0
    assert b.rendered == S.render_chat(S.system_prompt("t2i"), [cap], [None]) == S.CHAT_TEMPLATE.format(
        system=S.system_prompt("t2i"), user=cap, assistant=S.VISION_ITEM)
    # ids (example a): no shift, latents at (v+1, v+1+i_h, v+1+i_w), VE at v+3, tail at v+4
    rope = P.sample_position_ids(ids, lay.grids, lay.modality, lay.attn_modes, P.RopeTokens.from_model_config(cfg))
    v = p + c + s
    assert rope[:, v:].T.tolist() == [[v] * 3, [v + 1] * 3, [v + 1, v + 1, v + 2], [v + 1, v + 2, v + 1],
                                      [v + 1, v + 2, v + 2], [v + 3] * 3, [v + 4] * 3]
    # (a') text-uncond: exactly the caption removed
    dropped = S.build_generation("t2i", cap, tokenizer=tok, cfg=cfg, target_latent_grid=(1, 2, 2), drop_caption=True)
    np.testing.assert_array_equal(dropped.layout.input_ids, ids[lay.modality != 0])
    assert dropped.caption_span is None and dropped.layout.split_lens.tolist() == [p + s, 6, 1]


def test_worked_example_b_x2t_image(tok, cfg):
    instr, q, ans = "Look at the image carefully and answer the question.", "Any cats?", "Yes."
    assert instr == S.DEFAULT_X2T_INSTRUCTION
    grid = vit_grid(1, 56, 56)
    assert grid == (1, 4, 4)
    full = S.build_understanding("x2t_image", q, tokenizer=tok, cfg=cfg, vit_grid=grid, answer=ans)
    p, nq, s, na = _n(tok, PREFIX.format(instr)), _n(tok, q), _n(tok, SUFFIX), _n(tok, ans)
    lay = full.layout
    assert lay.split_lens.tolist() == [p, 6, nq + s + na + 1]
    assert lay.attn_modes == ["causal", "full", "causal"]
    assert lay.modality.tolist() == [-1] * p + [4] * 6 + [-1] * (nq + s + na + 1)
    assert full.caption_span is None and full.vision_blocks[0]["kind"] == "vit"
    assert full.vision_blocks[0]["range"] == (p + 1, p + 5)
    L = len(lay.input_ids)
    assert full.ce_indexes.tolist() == list(range(L - na - 2, L - 1))
    assert full.ce_labels.tolist() == tok.encode(ans) + [tok.im_end_id]
    prompt = S.build_understanding("x2t_image", q, tokenizer=tok, cfg=cfg, vit_grid=grid)
    assert prompt.layout.split_lens.tolist() == [p, 6, nq + s]
    np.testing.assert_array_equal(prompt.layout.input_ids, lay.input_ids[:L - na - 1])
    assert tok.decode(prompt.layout.input_ids).endswith("<|im_start|>assistant\n")
    # no question: omitted from the user turn
    bare = S.build_understanding("x2t_image", "", tokenizer=tok, cfg=cfg, vit_grid=grid)
    assert bare.layout.split_lens.tolist() == [p, 6, s]


def test_multi_turn_understanding_supervises_flagged_answers(tok, cfg):
    """Follow-up turns about the same ViT block: one conversation, one ViT block; CE labels are exactly the
    supervised answers (each through its <|im_end|>), and the first turn's prompt is the single-turn prompt."""
    q1, a1, q2, a2, q3, a3 = "Any cats?", "Yes.", "How many?", "Two.", "Colour?", "Black and white."
    grid = vit_grid(1, 56, 56)
    kw = dict(tokenizer=tok, cfg=cfg, vit_grid=grid)
    single = S.build_understanding("x2t_image", q1, answer=a1, **kw)
    multi = S.build_understanding("x2t_image", q1, answer=a1, follow_ups=[(q2, a2, False), (q3, a3, True)], **kw)
    assert multi.rendered == single.rendered + "\n" + "\n".join(
        f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>" for q, a in ((q2, a2), (q3, a3)))
    ids = multi.layout.input_ids
    np.testing.assert_array_equal(ids[:len(single.layout.input_ids)], single.layout.input_ids)
    assert len(multi.vision_blocks) == 1 and multi.layout.attn_modes == ["causal", "full", "causal"]
    # a1 and a3 are supervised (a2 is not), each with its closing <|im_end|>, predicted from the position before
    want = tok.encode(a1) + [tok.im_end_id] + tok.encode(a3) + [tok.im_end_id]
    assert multi.ce_labels.tolist() == want
    np.testing.assert_array_equal(ids[multi.ce_indexes + 1], multi.ce_labels)
    np.testing.assert_array_equal(multi.ce_indexes[:len(single.ce_indexes)], single.ce_indexes)
    assert multi.ce_indexes[-1] == len(ids) - 2
    a3_from = multi.ce_indexes[len(single.ce_indexes)] + 1
    assert tok.decode(ids[:a3_from]).endswith(f"{q3}<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="follow-up turns need the first turn's answer"):
        S.build_understanding("x2t_image", q1, follow_ups=[(q2, a2, True)], **kw)
    with pytest.raises(ValueError, match="follow-up answer"):
        S.build_understanding("x2t_image", q1, answer=a1, follow_ups=[(q2, "<|im_end|>", True)], **kw)


def test_worked_example_c_image_edit(tok, cfg):
    ins = "Remove the hat."
    b = S.build_generation("image_edit", ins, tokenizer=tok, cfg=cfg, target_latent_grid=(1, 2, 2),
                           source_vit_grid=(1, 4, 4), source_latent_grid=(1, 2, 2))
    p, c, s = _n(tok, PREFIX.format(S.system_prompt("image_edit"))), _n(tok, ins), _n(tok, SUFFIX)
    lay = b.layout
    assert lay.split_lens.tolist() == [p, 6, 6, c, s, 6, 1]
    assert lay.attn_modes == ["causal", "full", "full_noise", "causal", "causal", "noise", "causal"]
    assert lay.grids.tolist() == [[1, 4, 4]] * 3
    assert lay.modality.tolist() == [-1] * p + [4] * 6 + [2] * 6 + [0] * c + [-1] * s + [1] * 6 + [-1]
    assert [(blk["kind"], blk["role"]) for blk in b.vision_blocks] == [("vit", "source"), ("vae", "source"),
                                                                       ("vae", "target")]
    assert b.sample_task == 2 and b.caption_span == (p + 12, p + 12 + c)
    rope = P.sample_position_ids(lay.input_ids, lay.grids, lay.modality, lay.attn_modes,
                                 P.RopeTokens.from_model_config(cfg))
    assert rope[0, p] == 1000 and rope[0, p + 5] == 1003  # ViT T moved to 1000
    np.testing.assert_array_equal(rope[:, -7:-1], rope[:, p + 6:p + 12])  # target shares the source ids
    # training dropouts: text only / both visual conditions
    no_text = S.build_generation("image_edit", ins, tokenizer=tok, cfg=cfg, target_latent_grid=(1, 2, 2),
                                 source_vit_grid=(1, 4, 4), source_latent_grid=(1, 2, 2), drop_caption=True)
    np.testing.assert_array_equal(no_text.layout.input_ids, lay.input_ids[lay.modality != 0])
    no_vis = S.build_generation("image_edit", ins, tokenizer=tok, cfg=cfg, target_latent_grid=(1, 2, 2),
                                drop_vision=True)
    assert no_vis.layout.split_lens.tolist() == [p, c, s, 6, 1] and no_vis.layout.grids.tolist() == [[1, 4, 4]]


def test_worked_example_d_t2v_and_i2v(tok, cfg):
    cap = "A red cat sits."
    p, c, s = _n(tok, PREFIX.format(S.system_prompt("t2v"))), _n(tok, cap), _n(tok, SUFFIX)
    t2v = S.build_generation("t2v", cap, tokenizer=tok, cfg=cfg, target_latent_grid=(2, 2, 2))
    assert t2v.layout.split_lens.tolist() == [p, c, s, 10, 1] and t2v.layout.grids.tolist() == [[2, 4, 4]]
    assert "video" in S.system_prompt("t2v") and S.system_prompt("t2v") == S.system_prompt("i2v")
    i2v = S.build_generation("i2v", cap, tokenizer=tok, cfg=cfg, target_latent_grid=(2, 2, 2))
    _assert_layout(i2v.layout, t2v.layout.input_ids, t2v.layout.modality, t2v.layout.split_lens,
                   t2v.layout.attn_modes, t2v.layout.grids)
    assert i2v.target_block["clean_latent_frames"] == 1 and t2v.target_block["clean_latent_frames"] == 0
    assert S.system_prompt("t2i", training=True) == S.T2V_SYSTEM_PROMPT.replace("{v}", "image")


def test_worked_example_e_video_edit(tok, cfg):
    ins = "Make it red."
    vg, lg = vit_grid(10, 56, 56), (num_latent_frames(9), 2, 2)
    assert vg == (5, 4, 4) and lg == (3, 2, 2)
    b = S.build_generation("video_edit", ins, tokenizer=tok, cfg=cfg, target_latent_grid=lg, source_vit_grid=vg,
                           source_latent_grid=lg)
    p, c, s = _n(tok, PREFIX.format(S.system_prompt("video_edit"))), _n(tok, ins), _n(tok, SUFFIX)
    assert b.layout.split_lens.tolist() == [p, 22, 14, c, s, 14, 1]
    assert b.layout.grids.tolist() == [[5, 4, 4], [3, 4, 4], [3, 4, 4]]
    rope = P.sample_position_ids(b.layout.input_ids, b.layout.grids, b.layout.modality, b.layout.attn_modes,
                                 P.RopeTokens.from_model_config(cfg))
    assert rope[:, p + 21].tolist() == [1010, p + 10, p + 10]  # ViT VE; builder advanced by 9
    assert rope[0, p + 22] == p + 11  # source VAE VS


# ---------------------------------------------------------------------------------------------------
# Token counts (spec 20 §4.4-4.6) at released sizes (with the tiny tokenizer's text lengths)
@pytest.mark.parametrize("task,vit,source,target,expect", [
    ("t2i", None, None, (1, 768 // 16, 768 // 16), dict(target=2304)),
    ("i2v", None, None, (num_latent_frames(61), 480 // 16, 848 // 16), dict(target=25_440)),
    ("image_edit", vit_grid(1, 504, 896), (1, 576 // 16, 1024 // 16), (1, 576 // 16, 1024 // 16),
     dict(vit=576, source=2304, target=2304)),
    ("video_edit", vit_grid(70, 448, 812), (num_latent_frames(69), 30, 53), (num_latent_frames(69), 30, 53),
     dict(vit=16_240, source=28_620, target=28_620)),
])
def test_token_counts(tok, cfg, task, vit, source, target, expect):
    cap = "A red cat sits on a blue box."
    b = S.build_generation(task, cap, tokenizer=tok, cfg=cfg, target_latent_grid=target, source_vit_grid=vit,
                           source_latent_grid=source)
    counts = {blk["kind"] if blk["kind"] == "vit" else blk["role"]: blk["num_tokens"] for blk in b.vision_blocks}
    assert counts == expect
    prefix = _n(tok, PREFIX.format(S.system_prompt(task)))
    total = S.generation_length(task, _n(tok, cap), prefix_tokens=prefix, target_tokens=expect["target"],
                                vit_tokens=expect.get("vit", 0), source_tokens=expect.get("source", 0),
                                suffix_tokens=_n(tok, SUFFIX))
    assert b.num_tokens == total
    assert (b.layout.input_ids == cfg.video_token_id).sum() == sum(expect.values())


def test_t2v_121_frames_count(tok, cfg):
    assert num_latent_frames(121) == 31
    b = S.build_generation("t2v", "x", tokenizer=tok, cfg=cfg, target_latent_grid=(31, 30, 53))
    assert b.target_block["num_tokens"] == 49_290 and b.layout.split_lens[-2] == 49_292


def test_understanding_token_counts(tok, cfg):
    img = S.build_understanding("x2t_image", "Q?", tokenizer=tok, cfg=cfg, vit_grid=vit_grid(1, 672, 672))
    assert img.vision_blocks[0]["num_tokens"] == 576 and img.vision_blocks[0]["grid"] == (1, 48, 48)
    vid = S.build_understanding("x2t_video", "Q?", tokenizer=tok, cfg=cfg, vit_grid=vit_grid(69, 448, 812))
    assert vid.vision_blocks[0]["num_tokens"] == 16_240


# ---------------------------------------------------------------------------------------------------
# Errors
def test_system_prompts_exact():
    edit = S.system_prompt("video_edit")
    assert edit.count("user\u2019s") == 2 and "'" not in edit and edit.count("video") == 3
    assert S.system_prompt("image_edit") == edit.replace("video", "image")
    assert S.system_prompt("t2i") == S.T2I_SYSTEM_PROMPT.replace("{v}", "image")
    assert "visible" not in S.system_prompt("t2i")
    assert S.system_prompt("t2v", training=True) == S.system_prompt("t2v")
    assert S.caption_prompt(1, "video") == "Write an in-depth depiction of the video, covering all its aspects."
    assert "  attentively" in S.GRADIO_X2T_VIDEO_INSTRUCTION


def test_errors(tok, cfg):
    kw = dict(tokenizer=tok, cfg=cfg)
    with pytest.raises(ValueError, match="unsupported task"):
        S.build_generation("t2x", "a", target_latent_grid=(1, 2, 2), **kw)
    with pytest.raises(ValueError, match="not a generation task"):
        S.build_generation("x2t_image", "a", target_latent_grid=(1, 2, 2), **kw)
    with pytest.raises(ValueError, match="not an understanding task"):
        S.build_understanding("t2i", "a", vit_grid=(1, 4, 4), **kw)
    with pytest.raises(ValueError, match="source_vit_grid and source_latent_grid"):
        S.build_generation("image_edit", "a", target_latent_grid=(1, 2, 2), **kw)
    with pytest.raises(ValueError, match="source_latent_grid"):
        S.build_generation("video_edit", "a", target_latent_grid=(1, 2, 2), source_vit_grid=(1, 4, 4), **kw)
    with pytest.raises(ValueError, match="target_latent_grid is required"):
        S.build_generation("t2v", "a", target_latent_grid=None, **kw)
    with pytest.raises(ValueError, match="three positive ints"):
        S.build_generation("t2v", "a", target_latent_grid=(0, 2, 2), **kw)
    with pytest.raises(ValueError, match="takes no source_vit_grid"):
        S.build_generation("i2v", "a", target_latent_grid=(2, 2, 2), source_vit_grid=(1, 4, 4), **kw)
    with pytest.raises(ValueError, match="single latent frame"):
        S.build_generation("t2i", "a", target_latent_grid=(2, 2, 2), **kw)
    with pytest.raises(ValueError, match="divisible by the merge size"):
        S.build_understanding("x2t_image", "a", vit_grid=(1, 3, 4), **kw)
    with pytest.raises(ValueError, match="vit_grid is required"):
        S.build_understanding("x2t_video", "a", vit_grid=None, **kw)
    with pytest.raises(ValueError, match="special token text"):
        S.build_generation("t2i", "a <|video_pad|> b", target_latent_grid=(1, 2, 2), **kw)
    with pytest.raises(ValueError, match="disagree with the model config"):
        S.build_generation("t2i", "a", target_latent_grid=(1, 2, 2), tokenizer=tok,
                           cfg=cfg.replace(video_token_id=cfg.image_token_id))
    with pytest.raises(ValueError, match="no fixed system prompt"):
        S.system_prompt("x2t_video")


def test_caption_not_found(golden, cfg, tmp_path):
    """A caption whose in-context tokenisation differs (a merge across `user\\n`|caption) is an error, as in
    the reference. The tiny golden BPE has no newline merges, so add the stock Qwen2 `ĊĊ` one."""
    import json
    import shutil

    for name in ("vocab.json", "merges.txt", "added_tokens.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        shutil.copy(f"{golden.model_dir}/{name}", tmp_path / name)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    vocab["\u010a\u010a"] = max(max(vocab.values()), *golden.meta["special_token_ids"].values()) + 1
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with open(tmp_path / "merges.txt", "a") as f:
        f.write("\n\u010a \u010a\n")
    tok2 = Tokenizer.from_folder(str(tmp_path))
    assert len(tok2.encode("\n\n")) == 1 and tok2.special_ids()["video_token_id"] == cfg.video_token_id
    with pytest.raises(ValueError, match="not found in the tokenised sequence"):
        S.build_generation("t2i", "\nA cat", tokenizer=tok2, cfg=cfg, target_latent_grid=(1, 2, 2))
    assert S.build_generation("t2i", "A cat", tokenizer=tok2, cfg=cfg, target_latent_grid=(1, 2, 2)).caption_span


def test_caption_found_at_first_occurrence(tok, cfg):
    """The caption search takes the first exact run, as the reference (which can mis-tag, spec 20 §6.10)."""
    b = S.build_generation("t2i", "the", tokenizer=tok, cfg=cfg, target_latent_grid=(1, 1, 1))
    the = tok.encode("the")
    start = b.caption_span[0]
    assert b.layout.input_ids[start:start + len(the)].tolist() == the
    assert start == S._find_run(b.layout.input_ids, the)
    assert b.layout.split_lens.sum() == b.num_tokens
