"""Video and image files: mp4 writing that never loses a finished video, and reading the images and
videos that condition a generation (PNG/JPEG/... through PIL, mp4/gif/webm through imageio)."""

from __future__ import annotations

import errno
import itertools
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_file, umask_mode

__all__ = ["VIDEO_SUFFIXES", "VideoWriteError", "check_output_path", "check_video_name", "check_fps", "to_uint8", "write_mp4",
           "read_video", "iter_video", "read_image", "MediaError", "MAX_INPUT_SIDE"]

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
            (f"No fallback file could be written in {tempfile.gettempdir()} either; the frames are still in the "
             "result object: free space and call result.save() again")
        raise VideoWriteError(f"could not write {p}: {_why(e, p)}. {where}", fallback) from e


def _why(e: Exception, p: Path) -> str:
    """The reason a write failed, in one line: a full disk says so (ffmpeg reports it as a broken pipe
    followed by its whole command line and log)."""
    text = str(e)
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in text:
        return f"the disk holding {p.parent if str(p.parent) else '.'} is full (no space left on device)"
    return _short(e)


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


MAX_INPUT_SIDE = 8192  # an image or video frame beyond this is refused before it is decoded


def _input_path(path, kind: str) -> Path:
    """A local file to read: URLs and directories are named as such (not as missing files)."""
    if isinstance(path, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path):
        raise MediaError(f"{kind} {path!r} is a URL; cogvx reads local files only: download it first and pass "
                         "the file's path")
    p = Path(path).expanduser()
    if p.is_dir():
        raise MediaError(f"{kind} {p} is a directory; give a file (an {kind} file, or a list of PIL images)")
    if not p.is_file():
        raise MediaError(f"{kind} file {p} does not exist")
    return p


def _short(e: Exception, limit: int = 300) -> str:
    """One line of a decoder's error: ffmpeg's report ends in the line that matters, after its banner."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("ffmpeg version", "built with", "configuration:", "lib",
                                                     "Copyright", "Input #", "Metadata:", "Duration:", "Stream #"))]
    text = (keep or lines or [type(e).__name__])[-1]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_side(w: int, h: int, p: Path, kind: str) -> None:
    if w > MAX_INPUT_SIDE or h > MAX_INPUT_SIDE:
        raise MediaError(f"{kind} {p} is {w}x{h} pixels; cogvx reads {kind}s up to {MAX_INPUT_SIDE} pixels a side "
                         "(it resizes them to the video size anyway): downscale it first")


def iter_video(path: str | os.PathLike, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """The frames of a video file (mp4, gif, webm, ...), one uint8 [H, W, 3] array at a time: the first
    ``max_frames`` (all when None), decoded only as they are asked for, so a caller that resizes each
    frame holds one full-size frame at a time. The frame size is checked before any frame is decoded."""
    import imageio.v2 as imageio

    p = _input_path(path, "video")
    try:
        reader = imageio.get_reader(str(p))
    except Exception as e:
        raise MediaError(f"cannot read video {p}: {_short(e)}; give an mp4/gif/webm file") from e
    try:
        size = reader.get_meta_data().get("size") if hasattr(reader, "get_meta_data") else None
        if isinstance(size, (tuple, list)) and len(size) == 2:
            _check_side(int(size[0]), int(size[1]), p, "video")
        it = itertools.islice(reader, max_frames)
        n = 0
        while True:
            try:
                frame = next(it)
            except StopIteration:
                break
            except Exception as e:
                raise MediaError(f"cannot decode video {p}: {_short(e)}; the file is damaged or not a video") from e
            frame = np.asarray(frame)
            if n == 0:
                _check_side(frame.shape[1], frame.shape[0], p, "video")
            n += 1
            yield _rgb(frame)
        if n == 0:
            raise MediaError(f"video {p} has no frames")
    finally:
        reader.close()


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> np.ndarray:
    """The frames of a video file as uint8 [F, H, W, 3]: all of them, or the first ``max_frames``."""
    return np.stack(list(iter_video(path, max_frames)))


def read_image(path: str | os.PathLike):
    """An image file (PNG, JPEG, WebP, TIFF, ...) as a loaded PIL image, in its own mode (a 16-bit or
    float image keeps its depth); its size is checked before its pixels are decoded."""
    from PIL import Image

    p = _input_path(path, "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size check below says it
            with Image.open(p) as im:
                _check_side(*im.size, p, "image")
                im.load()
                return im.copy()
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"cannot read image {p}: {_short(e)}; give a PNG/JPEG/WebP file") from e


def _rgb(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        return np.repeat(frame[..., None], 3, axis=2)
    return frame[..., :3]
