"""Conditioning images and videos, from what users pass to what the VAE encodes: float [3, H, W] /
[3, F, H, W] in [-1, 1] at the requested size, resized as diffusers' ``VideoProcessor`` resizes them
(PIL images with Lanczos; arrays and tensors with nearest-neighbour interpolation), so a diffusers
script and cogvx see the same pixels.

Accepted: an image as a PIL image, a file path, a numpy array [H, W, 3] (uint8 0..255 or float 0..1)
or a tensor [3, H, W] (0..1, or -1..1); a video as a list of PIL images, a file path (mp4/gif/webm,
read with imageio), a numpy array [F, H, W, 3] or a tensor [F, 3, H, W]. A uint8 array is divided by
255 (diffusers would take it as 0..255 floats and clip; the fix is the only difference).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..io.video import MediaError, read_image, read_video
from .checks import MAX_FRAMES

__all__ = ["MediaError", "load_image", "load_video", "as_list"]

_PATH = (str, os.PathLike)


def as_list(value, n: int, what: str) -> list:
    """One value per prompt: a single value is used for every prompt; a list must hold one per prompt.
    A video given as a list of PIL images counts as one video."""
    if isinstance(value, (list, tuple)) and value and not isinstance(value[0], Image.Image):
        if len(value) != n:
            raise ValueError(f"{what} is a list of {len(value)} but there are {n} prompt(s); give one {what} per "
                             f"prompt, or a single {what} for all of them")
        return list(value)
    return [value] * n


def _to_unit_float(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise MediaError(f"{what} array must be uint8 (0..255) or float (0..1), not {arr.dtype}")
    if not np.isfinite(arr).all():
        raise MediaError(f"{what} array holds NaN or inf values")
    return arr.astype(np.float32)


def _normalize(t: torch.Tensor) -> torch.Tensor:
    # diffusers: inputs with negative values are taken as already in [-1, 1]
    return t if bool(t.min() < 0) else 2.0 * t - 1.0


def _pil_frames(frames: list[Image.Image], height: int, width: int) -> torch.Tensor:
    """PIL images -> [N, 3, H, W] in [-1, 1]: Lanczos resize, /255, 2x - 1 (diffusers' PIL path)."""
    out = []
    for im in frames:
        im = im.convert("RGB")
        if im.size != (width, height):
            im = im.resize((width, height), resample=Image.LANCZOS)
        out.append(np.asarray(im).astype(np.float32) / 255.0)
    return 2.0 * torch.from_numpy(np.stack(out).transpose(0, 3, 1, 2)) - 1.0


def _tensor_frames(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[N, 3, h, w] float -> [N, 3, H, W] in [-1, 1]: nearest resize, normalized when not already."""
    t = t.float()
    if t.shape[-2:] != (height, width):
        t = F.interpolate(t, size=(height, width))
    return _normalize(t)


def load_image(image, height: int, width: int) -> torch.Tensor:
    """One conditioning image -> float32 [3, height, width] in [-1, 1]."""
    if isinstance(image, _PATH):
        image = Image.fromarray(read_image(image))
    if isinstance(image, Image.Image):
        return _pil_frames([image], height, width)[0]
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise MediaError(f"an image array must be [H, W, 3] (got shape {image.shape})")
        arr = _to_unit_float(image[..., :3] if image.shape[-1] != 1 else np.repeat(image, 3, -1), "image")
        return _tensor_frames(torch.from_numpy(arr.transpose(2, 0, 1))[None], height, width)[0]
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise MediaError(f"an image tensor must be float [3, H, W] (got {image.dtype} {tuple(image.shape)})")
        if not bool(torch.isfinite(image).all()):
            raise MediaError("the image tensor holds NaN or inf values")
        return _tensor_frames(image.detach().cpu()[None], height, width)[0]
    raise MediaError(f"image must be a PIL image, a file path, a numpy array [H, W, 3] or a tensor [3, H, W] "
                     f"(got {type(image).__name__})")


def load_video(video, num_frames: int | None, height: int, width: int, what: str = "video") -> torch.Tensor:
    """One conditioning video -> float32 [3, F, height, width] in [-1, 1], its first ``num_frames`` frames
    (all of them when None). Fewer frames than ``num_frames`` is an error."""
    if isinstance(video, _PATH):
        video = [Image.fromarray(f) for f in read_video(video, max_frames=num_frames or MAX_FRAMES)]
    if isinstance(video, (list, tuple)):
        if not video or not all(isinstance(f, Image.Image) for f in video):
            raise MediaError(f"a {what} given as a list must be a non-empty list of PIL images")
        frames = list(video)
        n = _check_count(len(frames), num_frames, what)
        out = _pil_frames(frames[:n], height, width)
    elif isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3:
            raise MediaError(f"a {what} array must be [F, H, W, 3] (got shape {video.shape})")
        n = _check_count(video.shape[0], num_frames, what)
        arr = _to_unit_float(video[:n], what)
        out = _tensor_frames(torch.from_numpy(arr.transpose(0, 3, 1, 2)), height, width)
    elif isinstance(video, torch.Tensor):
        if video.ndim != 4 or video.shape[1] != 3 or not video.is_floating_point():
            raise MediaError(f"a {what} tensor must be float [F, 3, H, W] (got {video.dtype} {tuple(video.shape)})")
        if not bool(torch.isfinite(video).all()):
            raise MediaError(f"the {what} tensor holds NaN or inf values")
        n = _check_count(video.shape[0], num_frames, what)
        out = _tensor_frames(video[:n].detach().cpu(), height, width)
    else:
        raise MediaError(f"{what} must be a list of PIL images, a file path, a numpy array [F, H, W, 3] or a tensor "
                         f"[F, 3, H, W] (got {type(video).__name__})")
    return out.permute(1, 0, 2, 3).contiguous()


def _check_count(have: int, want: int | None, what: str) -> int:
    if have == 0:
        raise MediaError(f"the {what} has no frames")
    if want is None:
        return have
    if have < want:
        raise MediaError(f"the {what} has {have} frames but num_frames={want}; pass num_frames <= {have} "
                         f"(4k+1, e.g. {((have - 1) // 4) * 4 + 1}) or a longer {what}")
    return want

