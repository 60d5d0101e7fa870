"""Task names, resolution presets, settings, requests and results, and the checks done before any compute."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time
from typing import Any, Sequence

import numpy as np

from lance_jax import media


TASKS = ("t2i", "t2v", "i2v", "image_edit", "video_edit", "x2t_image", "x2t_video", "multi_edit")
GENERATION_TASKS = ("t2i", "t2v", "i2v", "image_edit", "video_edit", "multi_edit")
UNDERSTANDING_TASKS = ("x2t_image", "x2t_video")
EDIT_TASKS = ("image_edit", "video_edit", "multi_edit")
NEEDS_VIT = ("image_edit", "video_edit", "multi_edit", "x2t_image", "x2t_video")
NEEDS_VAE = GENERATION_TASKS

# Resolution presets -> (VAE stream side, ViT stream side) (30 §9.1).
RESOLUTION_PRESETS = {
    "image_256res": (256, 224), "video_192p": (256, 224), "image_512res": (512, 448), "image_768res": (768, 672),
    "video_360p": (480, 476), "video_480p": (640, 616),
}
DEFAULT_RESOLUTION = {"t2i": "image_768res", "image_edit": "image_768res", "x2t_image": "image_768res",
                      "multi_edit": "image_768res", "t2v": "video_480p", "i2v": "video_480p",
                      "video_edit": "video_480p", "x2t_video": "video_480p"}
DEFAULT_SIZE = (768, 768)  # t2i / t2v (shell defaults VIDEO_HEIGHT / VIDEO_WIDTH)
DEFAULT_FRAMES = 50  # t2v / i2v (shell NUM_FRAMES; floored to 4k+1 = 49)
GLOBAL_SEED = 2025  # reference `global_seed` (x WORLD_SIZE + rank on one process)
NOISE_SEED = 42  # the reference's initial-noise seed for every sample of a validation prompt file
DEFAULT_CONTEXT_BUDGET = 128_000  # Qwen2.5 max_position_embeddings when the checkpoint does not say


class InferenceError(ValueError):
    """A request that cannot run (bad task, input, size, prompt length or checkpoint): one clear message."""


# ----------------------------------------------------------------------------------------------
# Settings and requests
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Resolution:
    name: str
    vae_side: int
    vit_side: int


def resolve_resolution(spec, task: str | None = None) -> Resolution:
    """A preset name, an int VAE side, "VAE/VIT" or "VAE,VIT" sides, a (vae, vit) pair, or None (task default).

    A bare VAE side takes the ViT side of the preset with that VAE side, else the largest multiple of 28
    not above it.
    """
    if isinstance(spec, Resolution):
        return spec
    if spec is None:
        name = DEFAULT_RESOLUTION.get(task or "t2i", "image_768res")
        return Resolution(name, *RESOLUTION_PRESETS[name])
    if isinstance(spec, str) and spec in RESOLUTION_PRESETS:
        return Resolution(spec, *RESOLUTION_PRESETS[spec])
    try:
        if isinstance(spec, str):
            parts = [int(p) for p in spec.replace("/", ",").split(",")]
        elif isinstance(spec, (int, np.integer)):
            parts = [int(spec)]
        else:
            parts = [int(p) for p in spec]
    except (TypeError, ValueError):
        raise InferenceError(f"resolution {spec!r}: expected one of {sorted(RESOLUTION_PRESETS)}, a VAE side, or "
                             f"'VAE_SIDE/VIT_SIDE'") from None
    if len(parts) == 1:
        by_vae = {v: t for v, t in RESOLUTION_PRESETS.values()}
        parts.append(by_vae.get(parts[0], max(28, parts[0] // 28 * 28)))
    if len(parts) != 2 or min(parts) < 16:
        raise InferenceError(f"resolution {spec!r}: need a VAE side >= 16 and a ViT side >= 16")
    return Resolution(f"{parts[0]}/{parts[1]}", parts[0], parts[1])


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Sampler knobs; defaults are the released shell values (30 §3.1, §15)."""

    steps: int = 30
    shift: float = 3.5
    cfg_scale: float = 4.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm: str = "global"
    cfg_renorm_min: float = 0.0
    kv_position_quirk: bool = True  # the released KV path's caption-free cache ids (20 §3.8)
    sample_posterior: bool = True  # VAE encode samples the posterior (reference); False = its mean
    posterior_seed: int = GLOBAL_SEED
    fps: int = media.SAMPLE_FPS
    max_duration: float = media.MAX_DURATION

    def validate(self) -> "GenerationSettings":
        from lance_jax.sampling import RENORM_TYPES

        if int(self.steps) < 1:
            raise InferenceError(f"steps must be >= 1, got {self.steps}")
        if not float(self.shift) > 0:
            raise InferenceError(f"shift must be > 0, got {self.shift}")
        lo, hi = self.cfg_interval
        if not lo < hi:
            raise InferenceError(f"cfg interval ({lo}, {hi}] is empty")
        if self.cfg_renorm not in RENORM_TYPES:
            raise InferenceError(f"cfg renorm {self.cfg_renorm!r} not in {RENORM_TYPES}")
        if self.fps < 1 or self.max_duration <= 0:
            raise InferenceError(f"fps {self.fps} / max_duration {self.max_duration} must be positive")
        return self

    def cfg(self):
        from lance_jax.sampling import CFGConfig

        return CFGConfig(float(self.cfg_scale), (float(self.cfg_interval[0]), float(self.cfg_interval[1])),
                         self.cfg_renorm, float(self.cfg_renorm_min))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TextSettings:
    """Understanding decoding: greedy by default (the reference); temperature > 0 samples (top-p)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    # The released understanding inference builds unshifted position ids while training shifts the ViT block's
    # T ids to 1000+ (spec 20 §2.5, §6.1). False reproduces the release; True decodes with the training ids,
    # which a model trained only by us (the embedded demo) needs: its answers never saw the unshifted layout.
    training_positions: bool = False

    @property
    def greedy(self) -> bool:
        return not self.temperature > 0

    def validate(self) -> "TextSettings":
        if int(self.max_new_tokens) < 1:
            raise InferenceError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise InferenceError(f"temperature {self.temperature} must be >= 0 and top_p {self.top_p} in (0, 1]")
        return self

    def to_json(self) -> dict:
        return dict(dataclasses.asdict(self), greedy=self.greedy)


@dataclasses.dataclass
class Request:
    """One sample of a task, as `infer.py` or an input JSON describes it."""

    task: str
    prompt: str | Sequence[str] | None = None  # caption / instruction / question; multi_edit: the turns
    image: Any = None  # path or uint8 (H, W, 3)
    video: Any = None  # path or uint8 (F, H, W, 3) (already sampled)
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    resolution: Any = None
    seed: int = NOISE_SEED
    num_samples: int = 1
    index: int | str = 0
    system_prompt: str | None = None  # x2t instruction
    additional_info: dict | None = None

    def stem(self) -> str:
        return f"{self.index:06d}" if isinstance(self.index, (int, np.integer)) else str(self.index)


@dataclasses.dataclass
class GenerationResult:
    frames: np.ndarray  # (T, H, W, 3) uint8
    latent: np.ndarray  # (t, h, w, 48) float32: the final target latent
    info: dict  # prompt, seeds, sizes, token counts, timings

    @property
    def is_image(self) -> bool:
        return len(self.frames) == 1


@dataclasses.dataclass
class TextResult:
    text: str  # raw detokenised output incl. the stop token
    answer: str  # `<|im_end|>` removed, stripped
    token_ids: np.ndarray  # generated ids (stop token included)
    info: dict


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def floor_frames(frames: int) -> int:
    """Pixel frames floored to 4k+1 (30 §5, quirk 7); InferenceError for fewer than one."""
    from lance_jax import vision

    try:
        return vision.floor_frames(frames)
    except ValueError as err:
        raise InferenceError(str(err)) from None


def latent_frames(frames: int) -> int:
    return (int(frames) - 1) // 4 + 1


def parse_mesh(spec) -> dict[str, int] | None:
    """'fsdp=4,tensor=2' -> {'fsdp': 4, 'tensor': 2} (None / '' -> None)."""
    if spec is None or spec == "" or isinstance(spec, dict):
        return spec or None
    out = {}
    for part in str(spec).split(","):
        name, _, size = part.partition("=")
        try:
            out[name.strip()] = int(size)
        except ValueError:
            raise InferenceError(f"--mesh {spec!r}: expected AXIS=SIZE[,AXIS=SIZE...], e.g. fsdp=4,tensor=2") from None
    return out


def _seed(seed) -> int:
    seed = int(seed)
    if seed < 0:  # Gradio's -1: a fresh random seed, recorded
        seed = random.SystemRandom().randrange(0, 2 ** 31 - 1)
    return seed


class _Timer:
    def __init__(self):
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.times[name] = round(self.times.get(name, 0.0) + time.perf_counter() - t0, 4)


def _load_media(value, kind: str, settings: GenerationSettings) -> tuple[np.ndarray, dict]:
    """uint8 frames (T, H, W, 3) and an info dict from a path or an array."""
    if value is None:
        raise InferenceError(f"missing input {kind}")
    try:
        if isinstance(value, (str, os.PathLike)):
            if kind == "image":
                return media.read_media(value, "image")
            return media.read_media(value, "video", fps=settings.fps, max_duration=settings.max_duration)
        frames = np.asarray(value)
        if frames.dtype != np.uint8:
            raise InferenceError(f"{kind} array must be uint8 RGB, got {frames.dtype}")
        if kind == "image" and frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
            raise InferenceError(f"{kind} array must be (H, W, 3) / (T, H, W, 3) uint8, got shape {frames.shape}")
        if kind == "image" and len(frames) != 1:
            raise InferenceError(f"an image has one frame, got {len(frames)}")
        return frames, dict(kind=kind, path=None, height=frames.shape[1], width=frames.shape[2])
    except media.MediaError as err:
        raise InferenceError(str(err)) from None


def check_request(req: Request, cfg=None) -> None:
    """Host-only checks of a request (no model needed): task, inputs present and readable-looking, prompts,
    counts, and, given the model config, the t2i/t2v target size against the latent position table."""
    task = req.task
    if task not in TASKS:
        raise InferenceError(f"unknown task {task!r}; expected one of {TASKS}")
    where = f"sample {req.index!r} ({task})"
    needs = {"i2v": ("image",), "image_edit": ("image",), "x2t_image": ("image",), "video_edit": ("video",),
             "x2t_video": ("video",), "multi_edit": ("image", "video")}.get(task, ())
    if needs:
        given = [k for k in needs if getattr(req, k) is not None]
        if not given:
            raise InferenceError(f"{where}: missing input {' or '.join(needs)} (--{needs[0]})")
        for k in given:
            value = getattr(req, k)
            if isinstance(value, (str, os.PathLike)) and not os.path.isfile(value):
                raise InferenceError(f"{where}: input {k} {os.fspath(value)!r} not found")
    prompts = list(req.prompt) if (task == "multi_edit" and not isinstance(req.prompt, str) and req.prompt) else \
        [req.prompt]
    if task not in UNDERSTANDING_TASKS:
        for i, text in enumerate(prompts):
            if not isinstance(text, str) or not text.strip():
                what = f"instruction {i + 1}" if task == "multi_edit" else "prompt"
                raise InferenceError(f"{where}: missing {what} (--prompt)")
    elif req.prompt is not None and not isinstance(req.prompt, str):
        raise InferenceError(f"{where}: the question must be a string")
    if int(req.num_samples) < 1:
        raise InferenceError(f"{where}: num_samples must be >= 1")
    if req.frames is not None and int(req.frames) < 1:
        raise InferenceError(f"{where}: frames must be >= 1, got {req.frames}")
    if req.resolution is not None:
        resolve_resolution(req.resolution, task)
    if task in ("t2i", "t2v"):
        height, width = int(req.height or DEFAULT_SIZE[0]), int(req.width or DEFAULT_SIZE[1])
        if height < 16 or width < 16:
            raise InferenceError(f"{where}: size {height}x{width} is below 16 px")
        if cfg is not None:
            t = latent_frames(floor_frames(req.frames or DEFAULT_FRAMES)) if task == "t2v" else 1
            stride = cfg.latent_stride
            if height // stride > cfg.max_latent_size or width // stride > cfg.max_latent_size:
                raise InferenceError(f"{where}: {height}x{width} exceeds the checkpoint's latent position table "
                                     f"(at most {stride * cfg.max_latent_size} px per side)")
            if t > cfg.max_latent_frames:
                raise InferenceError(f"{where}: {4 * (t - 1) + 1} frames exceed the checkpoint's "
                                     f"{4 * (cfg.max_latent_frames - 1) + 1} (max_num_frames {cfg.max_num_frames})")


def _path_or_array(x):
    if x is None or isinstance(x, (str, os.PathLike)):
        return None if x is None else os.fspath(x)
    return f"<array {tuple(np.shape(x))}>"
