"""Per-task Lance sample construction: chat template, system prompts, placeholder expansion, splits.

Implements spec 20 §3 (template, system prompts, segmentation, modality codes, per-task layouts),
§4.4-4.6 (token counts) and 30 §4/§6 (inference sequences), 50 §2.7-2.9 (training samples):

1. the task's system prompt and user/assistant items are rendered into the two-turn chat template
   (every vision item is `<|vision_start|><|video_pad|><|vision_end|>`, images included) and the
   whole string is tokenised at once (BPE merges across item boundaries must match the reference);
2. each vision item's single `<|video_pad|>` is expanded to the block's token count;
3. generation tasks locate the caption/instruction as the first exact occurrence of its standalone
   tokenisation (code 0, its own causal split); understanding samples do not search;
4. the sequence is cut into splits: text runs `causal`, ViT blocks `full` (code 4), conditioning VAE
   blocks `full_noise` (code 2), the target VAE block `noise` (code 1).

Grids handed to the MRoPE builder (`positions.rope_index`), in block order: ViT `[T/2, H/14, W/14]`
(patch units), VAE `[t, 2h, 2w]` (latent grid with h, w doubled by the merge size).

The host-side result is a `kv_plan.SampleLayout` plus the caption span, per-block bookkeeping and, for
understanding training samples, the CE indexes/labels.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from lance_jax import positions as P
from lance_jax.kv_plan import SampleLayout
from lance_jax.tokenizer import (ENDOFTEXT, IM_END, IM_START, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START,
                                 Tokenizer)

TASKS = ("t2i", "t2v", "i2v", "image_edit", "video_edit", "x2t_image", "x2t_video")
GENERATION_TASKS = ("t2i", "t2v", "i2v", "image_edit", "video_edit")
EDIT_TASKS = ("image_edit", "video_edit")
UNDERSTANDING_TASKS = ("x2t_image", "x2t_video")

# ---------------------------------------------------------------------------------------------------
# Template (spec 20 §3.1). Rendered, then `.strip()` (the reference's trailing newline disappears).
CHAT_TEMPLATE = (IM_START + "system\n{system}" + IM_END + "\n" + IM_START + "user\n{user}" + IM_END + "\n"
                 + IM_START + "assistant\n{assistant}" + IM_END)
VISION_ITEM = VISION_START + VIDEO_PAD + VISION_END
ASSISTANT_ANCHOR = "assistant\n"  # understanding: the answer starts after its first occurrence

# System prompts (spec 20 §3.2; `{v}` = "image" / "video"; the apostrophes are U+2019).
T2I_SYSTEM_PROMPT = ("Describe the {v} by detailing the color, quantity, text, shape, size, texture, spatial "
                     "relationships of the objects and background:")
T2V_SYSTEM_PROMPT = ("Describe the {v} by detailing the color, quantity, visible text, shape, size, texture, spatial "
                     "relationships and motion/camera movements of the objects and background:")
EDIT_SYSTEM_PROMPT = ("Describe the key features of the input {v} (color, shape, size, texture, objects, "
                      "background), then explain how the user\u2019s text instruction should alter or modify the {v}. "
                      "Generate a new {v} that meets the user\u2019s requirements while maintaining consistency with "
                      "the original input where appropriate.")
IDIP_SYSTEM_PROMPT = ("Describe the key features of the input image (color, shape, size, texture, objects, background, "
                      "style), then incorporate the user\u2019s text description to generate a new {v} that satisfies "
                      "the user\u2019s requirements while preserving the essential identity and object or style "
                      "information from the reference input.")
MAZE_SYSTEM_PROMPT = ("Describe the key elements of the input maze image (layout, white path, black walls, blue star, "
                      "red flag, and overall background), then generate a 2D animation. The blue star should slide "
                      "smoothly along the white path, stop exactly on the red flag, and then acquire a trophy. Ensure "
                      "the blue star never crosses or enters the black maze walls. Keep the camera as a static "
                      "top-down view showing the entire maze.")
# Training understanding samples whose target is a bare caption: one of these, chosen at random.
CAPTION_PROMPTS = (
    "Generate a detailed and accurate description of the {v}, including all the key moments and visual details.",
    "Write an in-depth depiction of the {v}, covering all its aspects.",
    "Write an exhaustive depiction of the given {v}, capturing its essence and key moments.",
    "Describe the key features of the input {v}, including color, shape, size, texture, objects, background.",
)
DEFAULT_X2T_INSTRUCTION = "Look at the image carefully and answer the question."
# Gradio demo instructions (verbatim; the video one has two spaces).
GRADIO_X2T_IMAGE_INSTRUCTION = "View the image attentively and provide a suitable answer to the posed question."
GRADIO_X2T_VIDEO_INSTRUCTION = "View the video  attentively and provide a suitable answer to the posed question."
# Training VQA rows (`rewrite_VQA`).
VQA_INSTRUCTION = "View the video attentively and provide a suitable answer to the posed question."

# sample_task codes (spec 20 §2.4; bookkeeping only, never read by the model).
SAMPLE_TASK_CODES = {"t2v": 0, "idip": 1, "edit": 2, "refedit": 3, "maze": 3}

_SPECIAL_STRINGS = (IM_START, IM_END, VISION_START, VISION_END, VIDEO_PAD, IMAGE_PAD, ENDOFTEXT)


def media_word(task: str) -> str:
    """'image' or 'video': the `{v}` of the task's prompts."""
    _check_task(task)
    return "video" if task in ("t2v", "i2v", "video_edit", "x2t_video") else "image"


def system_prompt(task: str, *, training: bool = False) -> str:
    """The system prompt of a generation task (understanding samples carry their own instruction).

    training=True gives what the released fine-tuning data code uses: t2i gets the T2V text with
    v="image" (spec 20 §3.2, 50 §2.7); the other tasks are the same in training and inference.
    """
    _check_task(task)
    if task in UNDERSTANDING_TASKS:
        raise ValueError(f"task {task!r} has no fixed system prompt: pass the instruction to build_understanding")
    v = media_word(task)
    if task == "t2i":
        template = T2V_SYSTEM_PROMPT if training else T2I_SYSTEM_PROMPT
    elif task in ("t2v", "i2v"):
        template = T2V_SYSTEM_PROMPT
    else:
        template = EDIT_SYSTEM_PROMPT
    return template.replace("{v}", v)


def caption_prompt(index: int, v: str = "image") -> str:
    """One of the four training caption instructions (understanding with a bare-caption target)."""
    return CAPTION_PROMPTS[index].replace("{v}", v)


def render_chat(system: str, user: Sequence, assistant: Sequence, *, follow_ups: Sequence = ()) -> str:
    """The template string; items are text (str) or `None` for a vision item. follow_ups: further
    (user items, assistant items) turns of a multi-turn conversation, rendered after the first exchange."""
    def items(xs):
        return "".join(VISION_ITEM if x is None else x for x in xs)
    turns = [(user, assistant), *follow_ups]
    return (IM_START + "system\n" + system + IM_END + "\n"
            + "\n".join(IM_START + "user\n" + items(u) + IM_END + "\n" + IM_START + "assistant\n" + items(a) + IM_END
                        for u, a in turns)).strip()


# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BuiltSample:
    layout: SampleLayout  # ids with expanded placeholders, modality, splits, attn modes, grids
    caption_span: tuple[int, int] | None  # [start, stop) of the caption/instruction (modality 0), if any
    # per block in order: kind 'vit'|'vae', role 'source'|'target'|'reference', grid (as given to the
    # rope builder), range (placeholder [start, stop)), span (incl. vision start/end), num_tokens,
    # modality, attn_mode; VAE blocks also latent_grid (t, h, w); the target also clean_latent_frames
    vision_blocks: list[dict]
    ce_indexes: np.ndarray  # training x2t: positions whose next token is supervised (label index - 1)
    ce_labels: np.ndarray
    task: str = ""
    rendered: str = ""  # the template string before placeholder expansion
    sample_task: int = 0  # reference sample_task code (bookkeeping)

    @property
    def target_block(self) -> dict | None:
        blocks = [b for b in self.vision_blocks if b["role"] == "target"]
        return blocks[0] if blocks else None

    @property
    def num_tokens(self) -> int:
        return len(self.layout.input_ids)


@dataclasses.dataclass
class _Block:
    kind: str  # 'vit' | 'vae'
    role: str  # 'source' | 'target' | 'reference'
    grid: tuple[int, int, int]  # as given to the rope builder
    num_tokens: int
    modality: int
    attn_mode: str
    latent_grid: tuple[int, int, int] | None = None
    clean_latent_frames: int = 0


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unsupported task {task!r}; expected one of {TASKS}")


def _grid3(name: str, grid) -> tuple[int, int, int]:
    if grid is None:
        raise ValueError(f"{name} is required")
    arr = np.asarray(grid).reshape(-1)
    g = tuple(int(x) for x in arr)
    if len(g) != 3 or min(g) <= 0 or not np.array_equal(arr, np.asarray(g)):
        raise ValueError(f"{name} must be three positive ints, got {grid!r}")
    return g


def _vae_block(name: str, latent_grid, role: str, modality: int, mode: str, merge: int, clean_frames=0) -> _Block:
    t, h, w = _grid3(name, latent_grid)
    return _Block("vae", role, (t, merge * h, merge * w), t * h * w, modality, mode, (t, h, w), clean_frames)


def _vit_block(name: str, vit_grid, merge: int) -> _Block:
    t, h, w = _grid3(name, vit_grid)
    if h % merge or w % merge:
        raise ValueError(f"{name} {(t, h, w)}: the patch grid's h and w must be divisible by the merge size {merge}")
    return _Block("vit", "source", (t, h, w), t * (h // merge) * (w // merge), P.MODALITY_REF_VIT, "full")


def _check_text(name: str, text: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    bad = [s for s in _SPECIAL_STRINGS if s in text]
    if bad:
        raise ValueError(f"{name} contains special token text {bad}: it would break the template")


def _find_run(ids: np.ndarray, run: Sequence[int], start: int = 0) -> int:
    """Index of the first occurrence of `run` in ids[start:], or -1."""
    run = np.asarray(run, ids.dtype)
    n = len(run)
    if n == 0 or n > len(ids) - start:
        return -1
    cand = np.flatnonzero(ids[start:len(ids) - n + 1] == run[0]) + start
    for c in cand:
        if np.array_equal(ids[c:c + n], run):
            return int(c)
    return -1


def _token_ids(tokenizer: Tokenizer, cfg) -> tuple[int, int, int]:
    vs, ve, vp = tokenizer.vision_start_id, tokenizer.vision_end_id, tokenizer.video_pad_id
    want = (int(cfg.vision_start_token_id), int(cfg.vision_end_token_id), int(cfg.video_token_id))
    if (vs, ve, vp) != want:
        raise ValueError(f"tokenizer vision ids (start, end, video_pad) = {(vs, ve, vp)} disagree with the model "
                         f"config's {want}")
    return vs, ve, vp


def _expand(ids: np.ndarray, blocks: list[_Block], vs: int, ve: int, vp: int):
    """Replace each [VS, VP, VE] triple by [VS, VP x n, VE]; returns (ids, per-block VS index)."""
    triples = np.flatnonzero((ids[:-2] == vs) & (ids[1:-1] == vp) & (ids[2:] == ve)) if len(ids) >= 3 else []
    if len(triples) != len(blocks) or (ids == vp).sum() != len(blocks):
        raise ValueError(f"rendered sequence has {len(triples)} vision items for {len(blocks)} blocks")
    pieces, starts, cursor, out_len = [], [], 0, 0
    for t, b in zip(triples, blocks):
        pieces.append(ids[cursor:t + 1])
        out_len += t + 1 - cursor
        starts.append(out_len - 1)
        pieces.append(np.full(b.num_tokens, vp, ids.dtype))
        out_len += b.num_tokens
        cursor = t + 2  # the VE
    pieces.append(ids[cursor:])
    return np.concatenate(pieces), starts


def _cut_run(run_start: int, run_end: int, caption: tuple[int, int] | None, pack_offset: int) -> list[int]:
    """Causal split lengths of one text run; cut around the caption if it starts inside it (spec 20 §3.3).

    pack_offset > 0 reproduces the reference's packing quirk: the caption's sample-relative start is
    compared with the run's stream-absolute range and the cut points mix both.
    """
    n = run_end - run_start
    if caption is None:
        return [n]
    c0, c1 = caption
    a0, a1 = run_start + pack_offset, run_end + pack_offset
    if not (a0 <= c0 < a1):
        return [n]
    first, mid = c0 - a0, c1 - c0
    rest = n - first - mid
    if rest < 0:
        raise ValueError(f"caption cut [{first}, {mid}, {rest}] of a {n}-token run is invalid (pack_offset "
                         f"{pack_offset})")
    return [x for x in (first, mid, rest) if x > 0]


def _assemble(task: str, rendered: str, blocks: list[_Block], *, tokenizer: Tokenizer, cfg, caption: str | None,
              pack_offset: int = 0, sample_task: int = 0) -> tuple[BuiltSample, np.ndarray]:
    vs, ve, vp = _token_ids(tokenizer, cfg)
    raw = np.asarray(tokenizer.encode(rendered), np.int64)
    ids, vs_index = _expand(raw, blocks, vs, ve, vp)
    n = len(ids)
    modality = np.full(n, P.MODALITY_SYSTEM, np.int64)

    span = None
    if caption is not None:
        cap_ids = tokenizer.encode(caption)
        start = _find_run(ids, cap_ids)
        if start < 0:
            raise ValueError(f"caption {caption!r} not found in the tokenised sequence: its standalone tokenisation "
                             f"differs from the in-context one (e.g. leading/trailing whitespace or newlines)")
        span = (start, start + len(cap_ids))
        modality[span[0]:span[1]] = P.MODALITY_TEXT

    split_lens, modes, infos, cursor = [], [], [], 0
    for b, s in zip(blocks, vs_index):
        if s > cursor:
            cuts = _cut_run(cursor, s, span, pack_offset)
            split_lens += cuts
            modes += ["causal"] * len(cuts)
        stop = s + b.num_tokens + 2
        split_lens.append(stop - s)
        modes.append(b.attn_mode)
        modality[s:stop] = b.modality
        info = dict(kind=b.kind, role=b.role, grid=b.grid, range=(s + 1, stop - 1), span=(s, stop),
                    num_tokens=b.num_tokens, modality=b.modality, attn_mode=b.attn_mode)
        if b.kind == "vae":
            info["latent_grid"] = b.latent_grid
        if b.role == "target":
            info["clean_latent_frames"] = b.clean_latent_frames
        infos.append(info)
        cursor = stop
    if cursor < n:
        split_lens.append(n - cursor)
        modes.append("causal")
    if span is not None and any(i["span"][0] < span[1] and span[0] < i["span"][1] for i in infos):
        raise ValueError(f"caption tokens {span} overlap a vision block")

    layout = SampleLayout(input_ids=ids, modality=modality, split_lens=np.asarray(split_lens, np.int64),
                          attn_modes=modes, grids=np.asarray([b.grid for b in blocks], np.int64).reshape(-1, 3))
    empty = np.zeros(0, np.int64)
    sample = BuiltSample(layout=layout, caption_span=span, vision_blocks=infos, ce_indexes=empty, ce_labels=empty,
                         task=task, rendered=rendered, sample_task=sample_task)
    return sample, ids


# ---------------------------------------------------------------------------------------------------
def build_generation(task: str, caption: str | None, *, tokenizer: Tokenizer, cfg, target_latent_grid,
                     source_vit_grid=None, source_latent_grid=None, training: bool = False,
                     drop_caption: bool = False, drop_vision: bool = False, system: str | None = None,
                     pack_offset: int = 0) -> BuiltSample:
    """One generation sample (t2i, t2v, i2v, image_edit, video_edit).

    target_latent_grid: (t, h, w) latent tokens of the target (t = (F-1)//4 + 1, h = H/16, w = W/16);
    the builder gets [t, 2h, 2w]. Edit tasks also need source_vit_grid ([T/2, H/14, W/14], patch units)
    and source_latent_grid ((t, h, w)); at inference the target equals the source latent grid.
    i2v has the t2v layout: the first frame is latent frame 0 of the target (no extra block;
    `vision_blocks[-1]['clean_latent_frames'] == 1`).

    drop_caption: omit the caption item (training text dropout; the CFG uncond sequence of the reference
    is instead the conditional one with modality-0 tokens removed). drop_vision: edit training visual
    dropout (both source blocks omitted). training: training system prompt variants (t2i -> T2V text).
    system: override the system prompt. pack_offset: reproduce the reference's caption-cut quirk for a
    sample starting at that offset of a packed training stream (0 = correct cut).
    """
    _check_task(task)
    if task not in GENERATION_TASKS:
        raise ValueError(f"task {task!r} is not a generation task ({GENERATION_TASKS}); use build_understanding")
    merge = int(cfg.spatial_merge_size)
    sys_text = system_prompt(task, training=training) if system is None else system
    _check_text("system prompt", sys_text)
    if caption is not None:
        _check_text("caption", caption)
    use_caption = caption if (caption and not drop_caption) else None

    blocks: list[_Block] = []
    if task in EDIT_TASKS:
        if not drop_vision:
            if source_vit_grid is None or source_latent_grid is None:
                missing = [n for n, g in (("source_vit_grid", source_vit_grid),
                                          ("source_latent_grid", source_latent_grid)) if g is None]
                raise ValueError(f"task {task!r} needs {' and '.join(missing)}")
            blocks.append(_vit_block("source_vit_grid", source_vit_grid, merge))
            blocks.append(_vae_block("source_latent_grid", source_latent_grid, "source", P.MODALITY_REF_SOURCE,
                                     "full_noise", merge))
    else:
        extra = [n for n, g in (("source_vit_grid", source_vit_grid), ("source_latent_grid", source_latent_grid))
                 if g is not None]
        if extra:
            raise ValueError(f"task {task!r} takes no {' / '.join(extra)} (i2v's first frame is latent frame 0 "
                             f"of the target)")
        if drop_vision:
            raise ValueError(f"drop_vision only applies to edit tasks, not {task!r}")
    target = _vae_block("target_latent_grid", target_latent_grid, "target", P.MODALITY_NOISE, "noise", merge,
                        clean_frames=1 if task == "i2v" else 0)
    if task == "t2i" and target.latent_grid[0] != 1:
        raise ValueError(f"t2i needs a single latent frame, got target_latent_grid {target.latent_grid}")
    blocks.append(target)

    # User items: vision conditions first (ViT, then VAE), the text rotated to the end (spec 20 §3.1).
    user = [None] * (len(blocks) - 1) + ([use_caption] if use_caption is not None else [])
    rendered = render_chat(sys_text, user, [None])
    sample, _ = _assemble(task, rendered, blocks, tokenizer=tokenizer, cfg=cfg, caption=use_caption,
                          pack_offset=pack_offset,
                          sample_task=SAMPLE_TASK_CODES["edit" if task in EDIT_TASKS else "t2v"])
    return sample


def build_understanding(task: str, question: str | None, *, tokenizer: Tokenizer, cfg, vit_grid,
                        instruction: str = DEFAULT_X2T_INSTRUCTION, answer: str | None = None,
                        follow_ups: Sequence[tuple[str, str, bool]] = (), answer_loss: bool = True) -> BuiltSample:
    """One understanding sample (x2t_image, x2t_video): [system instruction] [ViT block, question] [answer].

    vit_grid: [T/2, H/14, W/14] (patch units). answer=None: the inference prompt, ending with
    `assistant\\n` (its last token is fed as the first decode query); splits [causal, full, causal].
    With an answer: the training sample incl. the closing `<|im_end|>`, with CE indexes (label index - 1)
    and labels for every token after the first `assistant\\n` through the final `<|im_end|>`.
    An empty question is omitted from the user turn.

    follow_ups (training only): further (question, answer, supervised) turns about the same ViT block, a
    fully specified multi-turn sample (the canonical rows' per-element `loss` flag). The first answer (unless
    answer_loss is False) and the supervised follow-up answers get labels from their `assistant\\n` through
    their `<|im_end|>`; the reference has no such rows (it cuts one target per visit) -- they give more
    answer tokens per encoded image. Without follow-ups the sample is exactly the reference's.
    """
    _check_task(task)
    if task not in UNDERSTANDING_TASKS:
        raise ValueError(f"task {task!r} is not an understanding task ({UNDERSTANDING_TASKS}); use build_generation")
    _check_text("instruction", instruction)
    if question is not None:
        _check_text("question", question)
    if answer is not None:
        _check_text("answer", answer)
    if follow_ups and answer is None:
        raise ValueError("follow-up turns need the first turn's answer (multi-turn samples are training samples)")
    if not answer_loss and not any(s for _, _, s in follow_ups):
        raise ValueError("answer_loss=False needs a supervised follow-up turn: the sample would have no CE label")
    for q, a, _ in follow_ups:
        _check_text("follow-up question", q)
        _check_text("follow-up answer", a)
    merge = int(cfg.spatial_merge_size)
    blocks = [_vit_block("vit_grid", vit_grid, merge)]
    user = [None] + ([question] if question else [])
    rendered = render_chat(instruction, user, [answer or ""], follow_ups=[([q], [a]) for q, a, _ in follow_ups])
    sample, ids = _assemble(task, rendered, blocks, tokenizer=tokenizer, cfg=cfg, caption=None,
                            sample_task=SAMPLE_TASK_CODES["t2v"])
    anchor = tokenizer.encode(ASSISTANT_ANCHOR)
    a = _find_run(ids, anchor)  # the reference takes the first occurrence
    if a < 0:
        raise ValueError("the rendered understanding sample has no 'assistant\\n' token run")
    answer_start = a + len(anchor)
    if answer_start <= sample.vision_blocks[-1]["span"][1]:
        raise ValueError("the first 'assistant\\n' token run lies before the end of the ViT block")
    if answer is None:
        lay = sample.layout
        ends = np.cumsum(lay.split_lens)
        k = int(np.searchsorted(ends, answer_start, side="left"))  # split holding the last prompt token
        lens = lay.split_lens[:k + 1].copy()
        lens[-1] -= int(ends[k] - answer_start)
        sample.layout = SampleLayout(input_ids=lay.input_ids[:answer_start], modality=lay.modality[:answer_start],
                                     split_lens=lens, attn_modes=list(lay.attn_modes[:k + 1]), grids=lay.grids)
    else:
        labels_at = np.concatenate(_answer_spans(ids, answer_start, anchor, tokenizer,
                                                 [answer_loss] + [bool(s) for _, _, s in follow_ups]))
        sample.ce_indexes = labels_at - 1
        sample.ce_labels = ids[labels_at].astype(np.int64)
    return sample


def _answer_spans(ids: np.ndarray, first_start: int, anchor: Sequence[int], tokenizer: Tokenizer,
                  supervised: Sequence[bool]) -> list[np.ndarray]:
    """Token indexes of each supervised assistant answer (through its `<|im_end|>`) of a multi-turn sample whose
    first answer starts at `first_start`; later answers start after the next `assistant\\n` run."""
    im_end = tokenizer.token_id(IM_END)
    spans, start = [], first_start
    for k, keep in enumerate(supervised):
        if k:
            a = _find_run(ids, anchor, start)
            if a < 0:
                raise ValueError(f"turn {k} of the multi-turn sample has no 'assistant\\n' token run")
            start = a + len(anchor)
        ends = np.flatnonzero(ids[start:] == im_end)
        if not len(ends):
            raise ValueError(f"answer {k} of the multi-turn sample has no closing {IM_END}")
        stop = start + int(ends[0]) + 1
        if keep:
            spans.append(np.arange(start, stop, dtype=np.int64))
        start = stop
    return spans


# ---------------------------------------------------------------------------------------------------
def text_token_count(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text))


def generation_length(task: str, caption_tokens: int, *, prefix_tokens: int, target_tokens: int,
                      vit_tokens: int = 0, source_tokens: int = 0, suffix_tokens: int = 5) -> int:
    """Total length per spec 20 §4.6: prefix + [ViT+2 + VAE+2] + C + suffix + (target+2) + 1."""
    _check_task(task)
    cond = (vit_tokens + 2 + source_tokens + 2) if task in EDIT_TASKS else 0
    return prefix_tokens + cond + caption_tokens + suffix_tokens + target_tokens + 2 + 1
