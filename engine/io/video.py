"""Video and image files: mp4 writing that never loses a finished video, and reading the images and
videos that condition a generation (PNG/JPEG/... through PIL, mp4/gif/webm through imageio)."""

from __future__ import annotations

import itertools
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_file, umask_mode

__all__ = ["VIDEO_SUFFIXES", "VideoWriteError", "check_output_path", "check_video_name", "check_fps", "to_uint8", "write_mp4",
           "read_video", "read_image", "MediaError"]

VIDEO_SUFFIXES = (".mp4",)  # what `write_mp4` writes: H.264 in an mp4 container, nothing else
MAX_FPS = 1000


class VideoWriteError(OSError):
    """Writing the video failed; ``fallback_path`` says where the frames were saved instead (for several
    videos, ``fallback_paths`` lists one per failed video and ``written`` the files that were written)."""

    def __init__(self, message: str, fallback_path: Path | None):
        super().__init__(message)
        self.fallback_path = fallback_path
        self.fallback_paths = [fallback_path]
        self.written: list[Path] = []


class MediaError(ValueError):
    """An image or video input that cannot be read or used."""


def to_uint8(frames) -> np.ndarray:
    """One video's frames ([F, H, W, 3] float in [0, 1], [F, 3, H, W] tensor, or PIL list) -> uint8 [F, H, W, 3]."""
    if isinstance(frames, list):
        return np.stack([np.asarray(im.convert("RGB")) for im in frames])
    if isinstance(frames, torch.Tensor):
        frames = frames.permute(0, 2, 3, 1).float().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)


def check_fps(fps) -> float:
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating)) \
            or not math.isfinite(fps) or not 0 < fps <= MAX_FPS:
        raise ValueError(f"fps must be a number in (0, {MAX_FPS}] (got {fps!r}); CogVideoX videos use 8 "
                         "(CogVideoX1.5: 16)")
    return float(fps)


def check_video_name(path: str | os.PathLike) -> Path:
    """``path`` names an mp4 file (suffix .mp4, not a directory)."""
    p = Path(path).expanduser()
    if p.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"output file {p} must end in .mp4: cogvx writes H.264 mp4 only "
                         f"(got {p.suffix or 'no suffix'!r}); try {p.with_suffix('.mp4')}")
    if p.is_dir():
        raise ValueError(f"output path {p} is a directory; give a file name such as {p / 'video.mp4'}")
    return p


def check_output_path(path: str | os.PathLike) -> Path:
    """Check, before any generation, that ``path`` can take an mp4: right suffix, existing writable
    directory, not a directory itself, not a read-only file."""
    p = check_video_name(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"the directory {parent} for the output file does not exist; create it first "
                         f"(mkdir -p {parent}) or choose another --out")
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"the output file {p} exists and is not writable; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"the directory {parent} is not writable; choose another --out")
    return p


def _even(u8: np.ndarray) -> np.ndarray:
    """H.264 (yuv420p) needs even frame sizes: pad an odd height or width by repeating the last row/column."""
    f, h, w, _ = u8.shape
    if h % 2 == 0 and w % 2 == 0:
        return u8
    warnings.warn(f"frames are {w}x{h}; H.264 needs even sizes, so the mp4 is padded to {w + w % 2}x{h + h % 2} "
                  "(last row/column repeated)", stacklevel=3)
    return np.pad(u8, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _write(path: Path, u8: np.ndarray, fps: float) -> None:
    import imageio.v2 as imageio

    with atomic_file(path) as tmp:
        with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                ffmpeg_log_level="error") as w:
            for f in u8:
                w.append_data(f)
        _verify(tmp, u8.shape)  # a full disk can leave a short, unreadable file without an error


def _verify(path: Path, shape: tuple[int, ...]) -> None:
    got = read_video(path)
    if got.shape[0] != shape[0] or got.shape[1:3] != shape[1:3]:
        raise OSError(f"the written file holds {got.shape[0]} frames of {got.shape[2]}x{got.shape[1]}, "
                      f"expected {shape[0]} of {shape[2]}x{shape[1]} (disk full?)")


def write_mp4(path: str | os.PathLike, frames, fps: float = 8) -> Path:
    """Write one video to ``path`` (H.264 mp4), verified by reading it back before it is renamed into
    place. On failure the frames go to a temporary file instead (mp4, or raw uint8 .npy [F, H, W, 3] if
    encoding itself fails) and :class:`VideoWriteError` names it."""
    fps = check_fps(fps)
    p = Path(path).expanduser()
    u8 = _even(to_uint8(frames))
    try:
        _write(p, u8, fps)
        return p
    except Exception as e:
        fallback = _fallback_save(u8, fps, p.stem)
        where = f"The video was saved to {fallback} instead" if fallback else \
            "No fallback file could be written either; the frames are still in the result object"
        raise VideoWriteError(f"could not write {p}: {e}. {where}", fallback) from e


def _fallback_save(u8: np.ndarray, fps: float, stem: str) -> Path | None:
    for suffix in (".mp4", ".npy"):
        fd, name = tempfile.mkstemp(prefix=f"cogvx-{stem}-", suffix=suffix)
        os.close(fd)
        os.chmod(name, umask_mode(0o666))
        try:
            if suffix == ".mp4":
                _write(Path(name), u8, fps)
            else:
                np.save(name, u8)
            return Path(name)
        except Exception:
            Path(name).unlink(missing_ok=True)
    return None


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> np.ndarray:
    """The frames of a video file (mp4, gif, webm, ...) as uint8 [F, H, W, 3]: all of them, or the first
    ``max_frames`` (a long video is never decoded whole for a few frames). Iterates: ``list(reader)``
    fails on some builds."""
    import imageio.v2 as imageio

    p = Path(path).expanduser()
    if not p.is_file():
        raise MediaError(f"video file {p} does not exist")
    try:
        reader = imageio.get_reader(str(p))
    except Exception as e:
        raise MediaError(f"cannot read video {p}: {e}; give an mp4/gif/webm file") from e
    try:
        frames = [np.asarray(f) for f in itertools.islice(reader, max_frames)]
    except Exception as e:
        raise MediaError(f"cannot decode video {p}: {e}; the file is damaged or not a video") from e
    finally:
        reader.close()
    if not frames:
        raise MediaError(f"video {p} has no frames")
    out = np.stack([_rgb(f) for f in frames])
    return out


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file (PNG, JPEG, WebP, ...) as uint8 [H, W, 3]."""
    from PIL import Image

    p = Path(path).expanduser()
    if not p.is_file():
        raise MediaError(f"image file {p} does not exist")
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise MediaError(f"cannot read image {p}: {e}; give a PNG/JPEG/WebP file") from e


def _rgb(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        return np.repeat(frame[..., None], 3, axis=2)
    return frame[..., :3]
