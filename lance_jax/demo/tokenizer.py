"""The demo's tokenizer: a byte-level BPE trained on the synthetic scenes' texts (a few hundred ids instead
of Qwen's 151,936, so that the embedding and the logits stay tiny on a CPU).

It keeps everything the Lance templates need: the Qwen2 pre-tokeniser (split regex + byte level, so any
text still encodes), the seven special tokens, and no BOS/EOS added. The fixed template sentences Lance
puts around every sample (system prompts, understanding instructions, caption prompts) are registered as
added tokens: each becomes one id, so a t2i sample costs ~20 text tokens instead of ~60 -- the demo's
training time goes into the scene words and the latents.

Ids: the specials are 0..6 (in `SPECIALS` order), then the byte alphabet and every merge the corpus
supports (the trainer runs to saturation, so every scene word is one id and the size is a function of the
corpus alone), then the template sentences in `template_sentences()` order. `model_ids(tokenizer)` gives
the ModelConfig fields that must agree with it; configs/demo.py derives them from the same corpus.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

from lance_jax import sequence as SQ
from lance_jax.tokenizer import (ENDOFTEXT, IM_END, IM_START, IMAGE_PAD, QWEN2_PRETOKENIZE_REGEX, VIDEO_PAD,
                                 VISION_END, VISION_START, Tokenizer)

SPECIALS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
MAX_BPE_VOCAB = 4096  # a cap, not a target: the demo corpus saturates far below it
# How often each scene text counts against the template scaffolding when learning merges: the scene words
# must win the merges, the long template sentences are added tokens anyway.
SCENE_WEIGHT = 50


def template_sentences() -> list[str]:
    """Every fixed sentence the Lance templates insert (system prompts, instructions, caption prompts)."""
    out = []
    for task in ("t2i", "t2v", "image_edit", "video_edit"):
        for training in (False, True):
            out.append(SQ.system_prompt(task, training=training))
    for v in ("image", "video"):
        out += [SQ.caption_prompt(i, v) for i in range(len(SQ.CAPTION_PROMPTS))]
    out += [SQ.DEFAULT_X2T_INSTRUCTION, SQ.GRADIO_X2T_IMAGE_INSTRUCTION, SQ.GRADIO_X2T_VIDEO_INSTRUCTION,
            SQ.VQA_INSTRUCTION]
    return list(dict.fromkeys(out))  # unique, first-seen order


def _scaffolding() -> list[str]:
    """The chat template's own words (role names, newlines) as they appear around the texts."""
    return ["system\n", "user\n", "assistant\n", "\n"]


def build_tokenizer(texts: Iterable[str]):
    """A `tokenizers.Tokenizer` trained on `texts` (the scene captions, questions, answers, instructions)."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=MAX_BPE_VOCAB, min_frequency=1, show_progress=False,
                                  special_tokens=[AddedToken(s, special=True, normalized=False) for s in SPECIALS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [t for t in texts for _ in range(SCENE_WEIGHT)] + _scaffolding()
    tok.train_from_iterator(corpus, trainer=trainer)
    if tok.get_vocab_size() >= MAX_BPE_VOCAB:
        raise ValueError(f"demo BPE did not saturate below {MAX_BPE_VOCAB} ids: the corpus is not a demo corpus")
    tok.add_tokens([AddedToken(s, normalized=False) for s in template_sentences()])
    return tok


def write_tokenizer(folder: str, texts: Iterable[str]) -> Tokenizer:
    """Train and save `tokenizer.json` (+ a tokenizer_config.json naming the specials) into `folder`."""
    os.makedirs(folder, exist_ok=True)
    backend = build_tokenizer(texts)
    backend.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(dict(eos_token=IM_END, pad_token=ENDOFTEXT, model_max_length=4096,
                       additional_special_tokens=list(SPECIALS[1:])), f, indent=1)
    return Tokenizer.from_folder(folder)


def scene_texts() -> list[str]:
    """Every text the synthetic scenes produce (captions, questions, answers, edit instructions) for every
    shape, colour, background and direction -- held-out pairs included: the tokenizer is not a model and the
    held-out prompts must tokenize into the same words as the training ones."""
    from lance_jax.data import synthetic as SY

    texts = []
    for shape in SY.SHAPES:
        for color in SY.COLORS:
            texts.append(SY.edit_instruction(shape, color))
            for bg in SY.COLORS:
                scene = SY.Scene(shape, color, bg, (0.0, 0.0), 1.0)
                for direction in (None,) + SY.DIRECTIONS:
                    kinds = SY.VIDEO_QUESTIONS if direction else SY.IMAGE_QUESTIONS
                    texts += [t for kind in kinds for t in SY.question_answer(kind, scene, direction)]
    texts += [SY.x2t_instruction(k) for k in ("image", "video")]
    return list(dict.fromkeys(texts))


def demo_tokenizer() -> Tokenizer:
    """The demo tokenizer, in memory (deterministic: the same ids every time)."""
    return Tokenizer(build_tokenizer(scene_texts()), "<demo>")


def demo_model_ids() -> dict:
    """The ModelConfig token fields of the demo tokenizer (configs/demo.py)."""
    return model_ids(demo_tokenizer())


def model_ids(tokenizer: Tokenizer) -> dict:
    """The ModelConfig token fields a tokenizer implies (vocab_size: len rounded up to 64 rows)."""
    n = len(tokenizer)
    return dict(tokenizer.special_ids(), vocab_size_eff=n, vocab_size=-(-n // 64) * 64)
