"""Media I/O for inference: images (Pillow) and videos (PyAV) in and out, as uint8 arrays.

    frame = read_image("cat.png")                      # (H, W, 3) uint8, RGB (palette/RGBA on white)
    frames, info = read_video("clip.mp4")              # (F, H, W, 3) uint8, F = 4k+1 frames at 12 fps (30 §9.3)
    write_png("out.png", frame); write_mp4("out.mp4", frames, fps=12)   # H.264 (libx264), yuv420p
    frames = to_uint8(video)                           # VAE output (3, T, H, W) in [-1, 1] -> (T, H, W, 3)

Sampling follows the reference: `fps_src = round(avg_fps)` (24 if unreadable), `d = min(n_src / fps_src,
max_duration)`, `n = round(12 d)`, `n -> 4 floor(n/4) + 1` if `n % 4` else `n - 3`; indices
`floor(linspace(0, n_src - 1, n))` over the whole clip (long clips are spread-sampled, not cut).
Every failure (missing file, undecodable data, no frames) raises `MediaError` with the path in it.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

SAMPLE_FPS = 12
MAX_DURATION = 6.0
DEFAULT_SOURCE_FPS = 24
TEMPORAL_FACTOR = 4
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".gif")


class MediaError(ValueError):
    """An input or output medium cannot be read or written."""


def _check_file(path: str, what: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MediaError(f"{what} {path!r} not found")
    if not os.path.isfile(path):
        raise MediaError(f"{what} {path!r} is not a file")
    if os.path.getsize(path) == 0:
        raise MediaError(f"{what} {path!r} is empty (0 bytes)")
    return path


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def read_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB. Palette images go through RGBA, RGBA is composited on white (as Lance loads)."""
    from PIL import Image, UnidentifiedImageError

    from lance_jax.vision import image_to_rgb

    path = _check_file(path, "image")
    try:
        with Image.open(path) as img:
            img.load()
            rgb = image_to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise MediaError(f"cannot read image {path!r}: {err}") from None
    arr = np.asarray(rgb, np.uint8)
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise MediaError(f"image {path!r} has no pixels (shape {arr.shape})")
    return arr


def write_png(path: str, frame: np.ndarray) -> str:
    """Write one uint8 RGB frame (H, W, 3) (or (1, H, W, 3)) as PNG; returns the path."""
    from PIL import Image

    frame = np.asarray(frame)
    if frame.ndim == 4 and frame.shape[0] == 1:
        frame = frame[0]
    _check_uint8_frames(frame[None] if frame.ndim == 3 else frame)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(frame).save(path, format="PNG")
    return path


# ----------------------------------------------------------------------------------------------
# Videos
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class VideoInfo:
    path: str
    source_frames: int  # decoded frames in the file
    source_fps: int  # round(avg fps), DEFAULT_SOURCE_FPS if unreadable
    duration: float  # seconds used: min(source_frames / source_fps, max_duration)
    indices: list[int]  # sampled source frame indices

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def sample_count(source_frames: int, source_fps: int, fps: int = SAMPLE_FPS, max_duration: float = MAX_DURATION,
                 temporal: int = TEMPORAL_FACTOR) -> int:
    """Frames kept from a clip: 4k+1 (30 §9.3), at least 1."""
    if source_frames < 1:
        raise MediaError("a video needs at least one frame")
    d = min(source_frames / max(source_fps, 1), max_duration)
    n = round(fps * d)
    n = temporal * (n // temporal) + 1 if n % temporal else n - temporal + 1
    return max(n, 1)


def sample_indices(source_frames: int, source_fps: int, fps: int = SAMPLE_FPS,
                   max_duration: float = MAX_DURATION) -> np.ndarray:
    """floor(linspace(0, n_src - 1, n)) over the whole clip."""
    n = sample_count(source_frames, source_fps, fps, max_duration)
    return np.floor(np.linspace(0, source_frames - 1, n)).astype(np.int64)


def _open_video(path: str):
    import av

    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise MediaError(f"cannot read video {path!r}: {err}") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"{path!r} has no video stream")
    return container


def _decode(path: str, keep=None):
    """Decode every frame; returns (count, {index: rgb uint8}) for indices in `keep` (all if None)."""
    import av

    container = _open_video(path)
    frames, count = {}, 0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if keep is None or count in keep:
                frames[count] = frame.to_ndarray(format="rgb24")
            count += 1
    except (av.error.FFmpegError, OSError) as err:
        if count == 0:
            raise MediaError(f"cannot decode video {path!r}: {err}") from None
        # a truncated tail: keep what decoded (decoders of reference pipelines do the same)
    finally:
        container.close()
    return count, frames


def video_metadata(path: str) -> tuple[int, int]:
    """(frame count from the container (0 if unknown), round(avg fps) or DEFAULT_SOURCE_FPS)."""
    container = _open_video(_check_file(path, "video"))
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = int(round(float(rate))) if rate else 0
        return int(stream.frames or 0), fps if fps > 0 else DEFAULT_SOURCE_FPS
    finally:
        container.close()


def read_video(path: str, *, fps: int = SAMPLE_FPS, max_duration: float = MAX_DURATION,
               sample: bool = True) -> tuple[np.ndarray, VideoInfo]:
    """(F, H, W, 3) uint8 frames sampled at `fps` to 4k+1 frames (sample=False: every frame), and VideoInfo."""
    path = _check_file(path, "video")
    declared, source_fps = video_metadata(path)
    if sample and declared > 0:
        idx = sample_indices(declared, source_fps, fps, max_duration)
        count, got = _decode(path, set(idx.tolist()))
        if count != declared:  # container metadata was wrong: sample again from the true count
            idx = sample_indices(count, source_fps, fps, max_duration) if count else idx
            count, got = _decode(path, set(idx.tolist()))
    else:
        count, got = _decode(path)
        idx = sample_indices(count, source_fps, fps, max_duration) if (sample and count) else np.arange(count)
    if count == 0:
        raise MediaError(f"video {path!r} has no decodable frames")
    frames = np.stack([got[int(i)] for i in idx])
    duration = min(count / source_fps, max_duration) if sample else count / source_fps
    return frames, VideoInfo(path, count, source_fps, float(duration), [int(i) for i in idx])


def _check_uint8_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise MediaError(f"expected uint8 RGB frames (T, H, W, 3), got {frames.dtype} {frames.shape}")
    return frames


def write_mp4(path: str, frames: np.ndarray, fps: int = SAMPLE_FPS, *, crf: int | None = None,
              pix_fmt: str = "yuv420p") -> str:
    """Write uint8 RGB frames (T, H, W, 3) as H.264 (libx264, `pix_fmt`) MP4 at `fps`; returns the path.

    yuv420p needs even sides: an odd side is padded by repeating the last row/column. yuv420p halves the
    chroma resolution (edges of small saturated shapes smear by ~30 levels); pix_fmt="yuv444p" with crf=0
    is lossless up to the RGB<->YUV rounding (<= 1 level), at the cost of players without High 4:4:4 support.
    """
    import av

    frames = _check_uint8_frames(frames)
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        if crf is not None:
            stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_media(path_stem: str, frames: np.ndarray, fps: int = SAMPLE_FPS) -> str:
    """`stem.png` for a single frame, `stem.mp4` otherwise (30 §11)."""
    frames = _check_uint8_frames(frames)
    if len(frames) == 1:
        return write_png(path_stem + ".png", frames[0])
    return write_mp4(path_stem + ".mp4", frames, fps)


def read_media(path: str, kind: str | None = None, **video_kw) -> tuple[np.ndarray, dict]:
    """(T, H, W, 3) uint8 frames of an image (T = 1) or a sampled video, and a small info dict."""
    kind = kind or ("video" if os.fspath(path).lower().endswith(VIDEO_EXTENSIONS[:-1]) else "image")
    if kind == "image":
        frame = read_image(path)
        return frame[None], dict(path=os.fspath(path), kind="image", height=frame.shape[0], width=frame.shape[1])
    if kind != "video":
        raise MediaError(f"unknown media kind {kind!r} (image or video)")
    frames, info = read_video(path, **video_kw)
    return frames, dict(kind="video", height=frames.shape[1], width=frames.shape[2], **info.to_json())


# ----------------------------------------------------------------------------------------------
# Pixel conversions
# ----------------------------------------------------------------------------------------------


def to_uint8(video) -> np.ndarray:
    """VAE output (3, T, H, W) (or (3, H, W)) in [-1, 1] -> (T, H, W, 3) uint8: clip, (x+1)/2*255, round."""
    x = np.asarray(video, np.float32)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[0] != 3:
        raise ValueError(f"expected a (3, T, H, W) video, got shape {x.shape}")
    x = np.clip(x, -1.0, 1.0)
    x = np.clip(np.round((x + 1.0) / 2.0 * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x.transpose(1, 2, 3, 0))


def to_vae_pixels(frames01: np.ndarray) -> np.ndarray:
    """[0, 1] frames (T, H, W, 3) -> VAE input (3, T, H, W) in [-1, 1]."""
    x = (np.asarray(frames01, np.float32) - np.float32(0.5)) / np.float32(0.5)
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2))
