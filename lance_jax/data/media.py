"""Media decoding and sizes: images (PIL, white alpha composite), videos (PyAV), 4k+1 frame sampling,
aspect buckets (`lance_jax.vision`), latent / ViT token grids."""
from __future__ import annotations

import io

import numpy as np

from lance_jax import vision


def decode_image(data: bytes):
    """PIL RGB image; P -> RGBA, RGBA composited on white (50 §1.3). Raises on undecodable bytes."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, mask=img.split()[3])
        return bg
    return img.convert("RGB")


def video_info(data: bytes) -> tuple[int, float, int, int]:
    """(frames, fps, height, width) of a video (PyAV); fps rounded like the reference (fallback 24)."""
    import av

    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        frames = s.frames or sum(1 for _ in c.decode(video=0))
        fps = round(float(s.average_rate)) if s.average_rate else 24
        return int(frames), float(fps or 24), int(s.codec_context.height), int(s.codec_context.width)


def frame_count(total_frames: int, fps: float, max_duration: float, sample_fps: int = 12) -> int:
    """4k+1 frames of the 12 fps sampler (50 §2.2, 30 §9.3), the same one inference uses."""
    from lance_jax import media

    return media.sample_count(total_frames, round(fps), sample_fps, max_duration)


def frame_indices(total_frames: int, n: int) -> np.ndarray:
    """floor(linspace(0, total-1, n)): spread over the whole clip (reference quirk)."""
    return np.floor(np.linspace(0, total_frames - 1, n)).astype(np.int64)


def latent_grid(frames: int, height: int, width: int, side: int, stride: int = 16) -> tuple[int, int, int]:
    """Latent tokens (t, h, w) of a media item resized to its bucket at area side^2 (bucket stride 16) for a
    codec of spatial compression `stride` (16: the Wan VAE, 4: the pixel autoencoder)."""
    h, w = vision.choose_bucket(height, width, side)
    return ((frames - 1) // 4 + 1, h // stride, w // stride)


def vit_grid(frames: int, height: int, width: int, side: int) -> tuple[int, int, int]:
    """ViT grid [T/2, H/14, W/14] (buckets on the 16 grid, cropped to 28; images duplicated to 2 frames)."""
    h, w = vision.choose_bucket(height, width, side)
    h, w = h // 28 * 28, w // 28 * 28
    t = max(2, frames + (frames % 2))
    return (t // 2, h // 14, w // 14)


def decode_frames(e: dict, max_duration: float = 6.0) -> np.ndarray:
    """uint8 (F, H, W, 3) frames of an image / video element (videos: 4k+1 frames of the `multi_clips`
    sampler spread over the clip). Raises on undecodable bytes."""
    if e["type"] == "image":
        return np.asarray(decode_image(e["media"]))[None]
    import av

    n, fps, _, _ = video_info(e["media"])
    keep = frame_indices(n, frame_count(n, fps, max_duration))
    want, got = set(int(i) for i in keep), {}
    with av.open(io.BytesIO(e["media"])) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i in want:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= keep[-1]:
                break
    if not got:
        raise ValueError("video has no decodable frames")
    last = got[max(got)]
    return np.stack([got.get(int(i), last) for i in keep])
