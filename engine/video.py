"""Decoded video in the diffusers output conventions, and mp4 writing that never loses a finished video."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["OUTPUT_TYPES", "postprocess", "check_output_path", "write_mp4", "read_mp4", "VideoWriteError"]

OUTPUT_TYPES = ("np", "pil", "pt", "latent")
VIDEO_SUFFIXES = (".mp4",)


class VideoWriteError(OSError):
    """Writing the video failed; ``fallback_path`` says where the frames were saved instead."""

    def __init__(self, message: str, fallback_path: Path | None):
        super().__init__(message)
        self.fallback_path = fallback_path


def postprocess(video: torch.Tensor, output_type: str):
    """VAE output [B, 3, F, H, W] in [-1, 1] -> diffusers' output types.

    "pt": float tensor [B, F, 3, H, W] in [0, 1]; "np": float32 array [B, F, H, W, 3] in [0, 1];
    "pil": a list (per video) of lists of PIL images.
    """
    frames = (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # [B, F, 3, H, W]
    if output_type == "pt":
        return frames
    arr = frames.permute(0, 1, 3, 4, 2).cpu().numpy()  # [B, F, H, W, 3]
    if output_type == "np":
        return arr
    if output_type == "pil":
        from PIL import Image

        u8 = (arr * 255).round().astype("uint8")
        return [[Image.fromarray(f) for f in vid] for vid in u8]
    raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))} (got {output_type!r})")


def to_uint8(frames) -> np.ndarray:
    """One video's frames ([F, H, W, 3] float in [0, 1], [F, 3, H, W] tensor, or PIL list) -> uint8 [F, H, W, 3]."""
    if isinstance(frames, list):
        return np.stack([np.asarray(im.convert("RGB")) for im in frames])
    if isinstance(frames, torch.Tensor):
        frames = frames.permute(0, 2, 3, 1).float().cpu().numpy()
    return (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)


def check_output_path(path: str | os.PathLike) -> Path:
    """Check, before any generation, that ``path`` can take an mp4: right suffix, existing writable
    directory, not a directory itself, not a read-only file."""
    p = Path(path).expanduser()
    if p.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"output file {p} must end in .mp4 (got {p.suffix or 'no suffix'!r}); try {p.with_suffix('.mp4')}")
    if p.is_dir():
        raise ValueError(f"output path {p} is a directory; give a file name such as {p / 'video.mp4'}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"the directory {parent} for the output file does not exist; create it first "
                         f"(mkdir -p {parent}) or choose another --out")
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"the output file {p} exists and is not writable; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"the directory {parent} is not writable; choose another --out")
    return p


def _write(path: Path, frames_u8: np.ndarray, fps: float) -> None:
    import imageio.v2 as imageio

    # Write to a sibling temp name and rename: a failed encode never leaves half a file at `path`.
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                ffmpeg_log_level="error") as w:
            for f in frames_u8:
                w.append_data(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_mp4(path: str | os.PathLike, frames, fps: float = 8) -> Path:
    """Write one video to ``path`` (H.264 mp4). On failure, the frames go to a temporary file instead
    (mp4, or raw .npy if encoding itself fails) and :class:`VideoWriteError` names it."""
    p = Path(path).expanduser()
    u8 = to_uint8(frames)
    try:
        _write(p, u8, fps)
        return p
    except Exception as e:
        fallback = _fallback_save(u8, fps, p.stem)
        raise VideoWriteError(f"could not write {p}: {e}. The video was saved to {fallback} instead", fallback) from e


def _fallback_save(u8: np.ndarray, fps: float, stem: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f"cogvx-{stem}-", suffix=".mp4")
    os.close(fd)
    try:
        _write(Path(name), u8, fps)
        return Path(name)
    except Exception:
        os.unlink(name)
        fd, name = tempfile.mkstemp(prefix=f"cogvx-{stem}-", suffix=".npy")
        os.close(fd)
        np.save(name, u8)
        return Path(name)


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """All frames of an mp4 as uint8 [F, H, W, 3] (iterating: ``list(reader)`` fails on some builds)."""
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path))
    try:
        return np.stack([f for f in reader])
    finally:
        reader.close()
