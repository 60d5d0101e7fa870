"""Qwen2 byte-level BPE tokenizer (the one Lance uses), built with the `tokenizers` library.

`Tokenizer.from_folder(path)` loads `tokenizer.json` when the folder has one (the released
checkpoints' format). Otherwise it rebuilds the fast tokenizer that HF's `Qwen2Tokenizer` is
equivalent to from `vocab.json` + `merges.txt` (the format the tiny golden tokenizer ships in):

* normaliser: NFC (the slow tokenizer NFC-normalises the text before tokenising);
* pre-tokeniser: the Qwen2 split regex (isolated pieces), then byte-level mapping without prefix
  space and without its own regex;
* model: BPE without unknown token, continuing-subword prefix or end-of-word suffix;
* decoder: byte-level.

Added tokens come from `added_tokens.json` and `tokenizer_config.json:added_tokens_decoder` (and
`special_tokens_map.json`); they are registered as added tokens so that they are split out of the text
before the BPE, never normalised, and keep exactly their listed ids (spec 20 §1, 50 §2.8). No BOS/EOS
is added when encoding.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

# Qwen2Tokenizer.PRETOKENIZE_REGEX (also the Split pattern of the stock Qwen2 tokenizer.json).
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(tok) -> str | None:
    if isinstance(tok, str):
        return tok
    if isinstance(tok, dict):
        return tok.get("content")
    return None


def _added_token_specs(folder: str) -> dict[str, dict]:
    """content -> {id, special, lstrip, rstrip, single_word, normalized} from the HF side files."""
    specs: dict[str, dict] = {}
    added_path = os.path.join(folder, "added_tokens.json")
    if os.path.exists(added_path):
        for content, idx in _read_json(added_path).items():
            specs[content] = dict(id=int(idx), special=False)
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    special_names: set[str] = set()
    if os.path.exists(cfg_path):
        tcfg = _read_json(cfg_path)
        for idx, attrs in (tcfg.get("added_tokens_decoder") or {}).items():
            content = attrs["content"]
            spec = specs.setdefault(content, {})
            if "id" in spec and spec["id"] != int(idx):
                raise ValueError(f"{folder}: added token {content!r} has id {spec['id']} in added_tokens.json but "
                                 f"{idx} in tokenizer_config.json")
            spec.update(id=int(idx), special=bool(attrs.get("special", False)),
                        **{k: bool(attrs[k]) for k in ("lstrip", "rstrip", "single_word", "normalized") if k in attrs})
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            name = _token_content(tcfg.get(key))
            if name:
                special_names.add(name)
        special_names.update(filter(None, map(_token_content, tcfg.get("additional_special_tokens") or [])))
    map_path = os.path.join(folder, "special_tokens_map.json")
    if os.path.exists(map_path):
        smap = _read_json(map_path)
        for key, val in smap.items():
            vals = val if isinstance(val, list) else [val]
            special_names.update(filter(None, map(_token_content, vals)))
    for name in special_names:
        if name in specs:
            specs[name]["special"] = True
    return specs


def _rebuild_qwen2(folder: str):
    """A `tokenizers.Tokenizer` equivalent to HF's Qwen2Tokenizer(vocab.json, merges.txt) + added tokens."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    if not os.path.exists(merges_path):
        raise FileNotFoundError(f"{folder} has vocab.json but no merges.txt: cannot rebuild the BPE tokenizer")
    vocab = {str(k): int(v) for k, v in _read_json(vocab_path).items()}
    merges = []
    with open(merges_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            line = line.rstrip("\r\n")
            if (line_no == 0 and line.startswith("#version")) or not line.strip():
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{merges_path}:{line_no + 1}: malformed merge {line!r}")
            merges.append((parts[0], parts[1]))
    specs = _added_token_specs(folder)
    # Added tokens go into the model vocabulary too, so that each keeps its listed id even when the
    # ids have gaps (tokenizers reuses an existing vocabulary id for an added token). BPE never
    # produces them: no merge leads to them.
    by_id = {v: k for k, v in vocab.items()}
    for content, spec in specs.items():
        if "id" not in spec:
            continue
        other = by_id.get(spec["id"])
        if other is not None and other != content:
            raise ValueError(f"{folder}: id {spec['id']} is both {other!r} (vocab.json) and added token {content!r}")
        vocab[content] = spec["id"]
        by_id[spec["id"]] = content

    bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                     end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    tok = HFTokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for content, spec in sorted(specs.items(), key=lambda kv: kv[1].get("id", 1 << 62)):
        special = spec.get("special", False)
        added = AddedToken(content, single_word=spec.get("single_word", False), lstrip=spec.get("lstrip", False),
                           rstrip=spec.get("rstrip", False), normalized=spec.get("normalized", not special),
                           special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
        if "id" in spec and tok.token_to_id(content) != spec["id"]:
            raise ValueError(f"{folder}: added token {content!r} got id {tok.token_to_id(content)}, "
                             f"expected {spec['id']}")
    return tok


class Tokenizer:
    """Thin wrapper around a `tokenizers.Tokenizer` with the ids Lance needs."""

    def __init__(self, backend, source: str = "<memory>"):
        self._tok = backend
        self.source = source

    @classmethod
    def from_folder(cls, path: str) -> "Tokenizer":
        """`tokenizer.json` if present, else the Qwen2 BPE rebuilt from vocab.json + merges.txt."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer folder {path!r} does not exist")
        tok_json = os.path.join(path, "tokenizer.json")
        if os.path.exists(tok_json):
            from tokenizers import Tokenizer as HFTokenizer

            return cls(HFTokenizer.from_file(tok_json), path)
        if os.path.exists(os.path.join(path, "vocab.json")):
            return cls(_rebuild_qwen2(path), path)
        raise FileNotFoundError(f"{path!r} has no tokenizer files: expected tokenizer.json, or vocab.json + merges.txt "
                                f"(+ added_tokens.json / tokenizer_config.json)")

    # -- encoding -------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens in the text are split out; no BOS/EOS added."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (special tokens kept by default, as the reference's detokenisation)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise KeyError(f"token {token!r} is not in the tokenizer ({self.source})")
        return int(idx)

    def id_to_token(self, idx: int) -> str:
        tok = self._tok.id_to_token(int(idx))
        if tok is None:
            raise KeyError(f"id {idx} is not in the tokenizer ({self.source})")
        return tok

    def __len__(self) -> int:
        """len(tokenizer): base vocabulary plus added tokens (the effective logit width V_eff)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def backend(self):
        return self._tok

    # -- special ids ------------------------------------------------------------------------------------
    @property
    def im_start_id(self) -> int:
        return self.token_id(IM_START)

    @property
    def im_end_id(self) -> int:
        return self.token_id(IM_END)

    @property
    def endoftext_id(self) -> int:
        return self.token_id(ENDOFTEXT)

    @property
    def vision_start_id(self) -> int:
        return self.token_id(VISION_START)

    @property
    def vision_end_id(self) -> int:
        return self.token_id(VISION_END)

    @property
    def image_pad_id(self) -> int:
        return self.token_id(IMAGE_PAD)

    @property
    def video_pad_id(self) -> int:
        return self.token_id(VIDEO_PAD)

    # Lance's names for them (spec 20 §1).
    bos_token_id = im_start_id
    eos_token_id = im_end_id
    pad_token_id = endoftext_id

    def special_ids(self) -> dict[str, int]:
        return dict(bos_token_id=self.im_start_id, eos_token_id=self.im_end_id, pad_token_id=self.endoftext_id,
                    vision_start_token_id=self.vision_start_id, vision_end_token_id=self.vision_end_id,
                    image_token_id=self.image_pad_id, video_token_id=self.video_pad_id)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, len={len(self)})"
