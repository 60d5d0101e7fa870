"""ViT input preprocessing as Lance does it (40 §B.2-B.3, 20 §4.2, §4.4), host side, NumPy + Pillow.

real pixels (PIL image, or uint8 frames (T, H, W, 3))
  -> bucket resize: centre crop to the nearest of six aspect buckets (sides multiples of 16),
     bicubic antialiased resize (PIL) to the bucket, to [0, 1]
  -> centre crop each side down to a multiple of 28 (patch 14 x merge 2)
  -> CLIP mean/std, layout (C, T, H, W); an image becomes 2 identical frames, an odd frame count gets
     its last frame repeated
  -> patches (N, C·2·14·14), rows (t, h/2, w/2, dh, dw) merge-group major, cols (C, tp, 14, 14);
     grid_thw (1, 3) = (T/2, H/14, W/14); (T/2)(H/28)(W/28) LLM tokens.

Not the stock Qwen processor (no smart_resize). Video frame *sampling* (12 fps, 4k+1 frames) happens
before this module.
"""
from __future__ import annotations

import math

import numpy as np

CLIP_MEAN = np.asarray([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.asarray([0.26862954, 0.26130258, 0.27577711], np.float32)
# (name, W/H) in the reference's order; ties in the bucket choice go to the earlier one.
ASPECT_RATIOS = (("21:9", 21 / 9), ("16:9", 16 / 9), ("4:3", 4 / 3), ("1:1", 1.0), ("3:4", 3 / 4), ("9:16", 9 / 16))
BUCKET_STRIDE = 16  # also for the ViT: its transform keeps the default stride (40 §B.2)
PATCH, TEMPORAL_PATCH, MERGE = 14, 2, 2
VIT_DIVISOR = PATCH * MERGE
MIN_INPUT_SIDE = PATCH  # an input side below one patch carries less than one ViT patch of content

# Lance `--resolution` presets -> ViT bucket side (20 §4.1).
VIT_PRESETS = {"image_256res": 224, "video_192p": 224, "image_512res": 448, "image_768res": 672,
               "video_360p": 476, "video_480p": 616}


# ----------------------------------------------------------------------------------------------
# Sizes (no pixels)
# ----------------------------------------------------------------------------------------------


def bucket_for_ratio(side: int, ratio: float, stride: int = BUCKET_STRIDE) -> tuple[int, int]:
    """(H, W) of the bucket of area ~side² and aspect W/H ~ ratio, sides multiples of `stride`.

    Two candidates (width first / height first), Python half-to-even rounding; keep the one whose W/H
    is closer to `ratio`, then the one whose area is closer to side², then the first.
    """
    area = side * side
    w1 = round(math.sqrt(area * ratio) / stride) * stride
    h1 = round(w1 / ratio / stride) * stride
    h2 = round(math.sqrt(area / ratio) / stride) * stride
    w2 = round(h2 * ratio / stride) * stride
    cands = [(h1, w1), (h2, w2)]
    if min(h1, w1, h2, w2) <= 0:
        raise ValueError(f"bucket side {side} is too small for stride {stride}")
    return min(cands, key=lambda hw: (abs(hw[1] / hw[0] - ratio), abs(hw[0] * hw[1] - area)))


def buckets(side: int, stride: int = BUCKET_STRIDE) -> dict[str, tuple[int, int]]:
    """{ratio name: (H, W)} for the six aspect buckets."""
    return {name: bucket_for_ratio(side, r, stride) for name, r in ASPECT_RATIOS}


def choose_bucket(height: int, width: int, side: int, stride: int = BUCKET_STRIDE) -> tuple[int, int]:
    """(H, W) of the bucket whose W/H is nearest the input's (first on ties)."""
    _check_input_size(height, width)
    ratio = width / height
    return min(buckets(side, stride).values(), key=lambda hw: abs(hw[1] / hw[0] - ratio))


def ratio_crop_box(height: int, width: int, ratio: float) -> tuple[int, int, int, int]:
    """(top, left, h, w): the largest centred crop with aspect W/H = ratio.

    Follows torchvision's RandomResizedCrop(scale=(1, 1), ratio=(r, r)); its random branch only fires
    when the input already has the ratio within rounding (offset <= ~1 px), taken here as centred.
    """
    w = int(round(math.sqrt(height * width * ratio)))
    h = int(round(math.sqrt(height * width / ratio)))
    if not (0 < w <= width and 0 < h <= height):
        if width / height < ratio:
            w, h = width, int(round(width / ratio))
        elif width / height > ratio:
            w, h = int(round(height * ratio)), height
        else:
            w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def divisible_crop_box(height: int, width: int, divisor: int) -> tuple[int, int, int, int]:
    """(top, left, h, w): centre crop of each side down to a multiple of `divisor` (offset rounded half-even)."""
    h, w = height - height % divisor, width - width % divisor
    if h == 0 or w == 0:
        raise ValueError(f"{height}x{width} is smaller than the divisor {divisor}")
    return round((height - h) / 2), round((width - w) / 2), h, w


def resized_size(height: int, width: int, side: int, divisor: int = VIT_DIVISOR,
                 stride: int = BUCKET_STRIDE) -> tuple[int, int]:
    """(H, W) after bucket resize and the divisible crop, for an input of height x width."""
    bh, bw = choose_bucket(height, width, side, stride)
    return divisible_crop_box(bh, bw, divisor)[2:]


def vit_grid(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """ViT grid (T/2, H/14, W/14) of a clip of `frames` preprocessed frames (an image: 1) of H x W."""
    if frames < 1:
        raise ValueError(f"need at least one frame, got {frames}")
    if height % VIT_DIVISOR or width % VIT_DIVISOR or height <= 0 or width <= 0:
        raise ValueError(f"ViT input {height}x{width} must have positive sides divisible by {VIT_DIVISOR}")
    t = frames + frames % TEMPORAL_PATCH  # image duplicated, odd counts padded with the last frame
    return t // TEMPORAL_PATCH, height // PATCH, width // PATCH


def vit_token_count(frames: int, height: int, width: int) -> int:
    """LLM tokens of the item: (T/2)(H/28)(W/28) (without the vision start/end tokens)."""
    t, h, w = vit_grid(frames, height, width)
    return t * (h // MERGE) * (w // MERGE)


def _check_input_size(height: int, width: int) -> None:
    if min(height, width) < MIN_INPUT_SIDE:
        raise ValueError(f"input {height}x{width} too small: each side needs at least {MIN_INPUT_SIDE} pixels")


# ----------------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------------


def image_to_rgb(image):
    """PIL image -> RGB the way Lance loads it: palette -> RGBA; RGBA composited on white; else convert."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, got {type(image).__name__}")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def check_frames(frames) -> np.ndarray:
    """Validate uint8 frames (T, H, W, 3) (an (H, W, 3) image is one frame)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 RGB, got dtype {frames.dtype}")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4:
        raise ValueError(f"frames must be (T, H, W, 3), got shape {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("empty video: no frames")
    if frames.shape[-1] != 3:
        raise ValueError(f"frames must have 3 (RGB) channels, got {frames.shape[-1]}")
    _check_input_size(*frames.shape[1:3])
    return frames


def resize_frames(frames, side: int, divisor: int = VIT_DIVISOR, stride: int = BUCKET_STRIDE) -> np.ndarray:
    """uint8 (T, H, W, 3) -> float32 (T, H', W', 3) in [0, 1]: bucket crop + bicubic resize + divisible crop.

    All frames share one crop. PIL's bicubic resize is antialiased (its filter widens when downscaling).
    """
    from PIL import Image

    frames = check_frames(frames)
    height, width = frames.shape[1:3]
    bh, bw = choose_bucket(height, width, side, stride)
    top, left, h, w = ratio_crop_box(height, width, bw / bh)
    dt, dl, ch, cw = divisible_crop_box(bh, bw, divisor)
    out = np.empty((len(frames), ch, cw, 3), np.float32)
    for i, frame in enumerate(frames):
        img = Image.fromarray(frame[top:top + h, left:left + w]).resize((bw, bh), Image.Resampling.BICUBIC)
        out[i] = np.asarray(img, np.float32)[dt:dt + ch, dl:dl + cw] / np.float32(255.0)
    return out


def clip_pixels(frames01: np.ndarray) -> np.ndarray:
    """[0, 1] frames (T, H, W, 3) -> CLIP-normalised (3, T', H, W); T' = 2 for one frame, T rounded up to even."""
    x = (np.asarray(frames01, np.float32) - CLIP_MEAN) / CLIP_STD
    if len(x) % TEMPORAL_PATCH:
        x = np.concatenate([x, np.repeat(x[-1:], TEMPORAL_PATCH - len(x) % TEMPORAL_PATCH, axis=0)])
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2))


def patchify(pixels: np.ndarray, patch: int = PATCH, temporal: int = TEMPORAL_PATCH, merge: int = MERGE):
    """(C, T, H, W) -> (patches (N, C·tp·p·p), grid_thw (1, 3) int32), rows (t, hb, wb, hs, ws)."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 4:
        raise ValueError(f"pixels must be (C, T, H, W), got shape {pixels.shape}")
    c, t, h, w = pixels.shape
    if t % temporal or h % (patch * merge) or w % (patch * merge) or 0 in pixels.shape:
        raise ValueError(f"pixels {pixels.shape}: T must be a positive multiple of {temporal}, H and W of "
                         f"{patch * merge}")
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = pixels.reshape(c, gt, temporal, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(1, 3, 6, 4, 7, 0, 2, 5, 8)  # (gt, hb, wb, hs, ws, C, tp, py, px)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, -1)), np.asarray([[gt, gh, gw]], np.int32)


def preprocess_frames(frames, side: int):
    """uint8 video frames (T, H, W, 3) -> (patches, grid_thw, pixels (3, T', H', W'))."""
    pixels = clip_pixels(resize_frames(frames, side))
    patches, grid = patchify(pixels)
    return patches, grid, pixels


def preprocess_image(image, side: int = VIT_PRESETS["image_768res"]):
    """PIL image (or uint8 (H, W, 3)) -> (patches, grid_thw, pixels (3, 2, H', W')), frame duplicated."""
    if not isinstance(image, np.ndarray):
        image = np.asarray(image_to_rgb(image))
    frames = check_frames(image)
    if len(frames) != 1:
        raise ValueError(f"an image has one frame, got {len(frames)} (use preprocess_video)")
    return preprocess_frames(frames, side)


def preprocess_video(frames, side: int = VIT_PRESETS["video_480p"]):
    """uint8 frames (T, H, W, 3), already sampled -> (patches, grid_thw, pixels); odd T padded."""
    frames = np.asarray(frames)
    if frames.ndim != 4:
        raise ValueError(f"video frames must be (T, H, W, 3), got shape {frames.shape}")
    return preprocess_frames(frames, side)


# ----------------------------------------------------------------------------------------------
# Media -> encoder inputs (shared by inference and training data)
# ----------------------------------------------------------------------------------------------


def floor_frames(n: int) -> int:
    """Pixel frames floored to 4k+1 (VAE temporal stride 4)."""
    if n < 1:
        raise ValueError(f"need at least one frame, got {n}")
    return 4 * ((int(n) - 1) // 4) + 1


def vae_pixels(frames: np.ndarray, side: int) -> np.ndarray:
    """uint8 frames (F, H, W, 3) -> VAE input (3, F', H', W') in [-1, 1] (bucket of `side`, stride 16)."""
    frames = np.asarray(frames)
    frames = frames[: floor_frames(len(frames))]
    from lance_jax import media

    return media.to_vae_pixels(resize_frames(frames, side, divisor=16))


def vit_inputs(frames: np.ndarray, side: int):
    """uint8 frames (F, H, W, 3) -> (patches (N, patch_dim), grid_thw (1, 3) int32)."""
    frames = np.asarray(frames)
    if len(frames) == 1:
        patches, grid, _ = preprocess_image(frames[0], side)
    else:
        patches, grid, _ = preprocess_video(frames, side)
    return patches, grid
