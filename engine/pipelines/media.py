"""Conditioning images and videos, from what users pass to what the VAE encodes: float [3, H, W] /
[3, F, H, W] in [-1, 1] at the requested size, resized as diffusers' ``VideoProcessor`` resizes them
(PIL images with Lanczos; arrays and tensors with nearest-neighbour interpolation), so a diffusers
script and cogvx see the same pixels.

Accepted: an image as a PIL image, a file path, a numpy array [H, W, 3] (uint8 0..255, uint16
0..65535 or float 0..1) or a tensor [3, H, W] (float 0..1, or -1..1); a video as a list of PIL images, a
file path (mp4/gif/webm, read with imageio), a numpy array [F, H, W, 3] or a tensor [F, 3, H, W], in the
same ranges. Values outside the range are refused (not clipped). A uint8 array is divided by 255
(diffusers would take it as 0..255 floats and clip). 16-bit PIL images (mode I;16, a 16-bit PNG) are
divided by 65535 and float ones (mode F, a float TIFF) taken as 0..1, where diffusers' ``convert("RGB")``
clips them to 255 or to black. A video file is decoded one frame at a time, each resized as it is read.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..io.video import MediaError, iter_video, read_image
from .checks import MAX_FRAMES

__all__ = ["MediaError", "load_image", "load_video", "as_list"]

_PATH = (str, os.PathLike)


def as_list(value, n: int, what: str, frames: bool = True) -> list:
    """One value per prompt: a single value is used for every prompt; a list must hold one per prompt.
    With ``frames`` (videos), a list of PIL images counts as one video; without (images), as one image
    per prompt."""
    if isinstance(value, (list, tuple)) and value and not (frames and isinstance(value[0], Image.Image)):
        if len(value) != n:
            raise ValueError(f"{what} is a list of {len(value)} but there are {n} prompt(s); give one {what} per "
                             f"prompt, or a single {what} for all of them")
        return list(value)
    return [value] * n


def _to_unit_float(arr: np.ndarray, what: str) -> np.ndarray:
    """uint8 (0..255), uint16 (0..65535) or float (0..1) -> float32 in [0, 1]; anything else refused."""
    if arr.size == 0:
        raise MediaError(f"the {what} array is empty (shape {arr.shape})")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise MediaError(f"{what} array must be uint8 (0..255), uint16 (0..65535) or float (0..1), not {arr.dtype}")
    if not np.isfinite(arr).all():
        raise MediaError(f"{what} array holds NaN or inf values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > 1:
        hint = ("; it looks like 0..255: pass it as uint8 (arr.astype(np.uint8)) or divide by 255" if hi <= 255 and
                lo >= 0 else "")
        raise MediaError(f"the {what} array holds float values from {lo:g} to {hi:g}; float {what}s must be in 0..1 "
                         f"(uint8 arrays 0..255){hint}")
    return arr.astype(np.float32)


def _check_tensor(t: torch.Tensor, what: str) -> torch.Tensor:
    """A dense tensor holding finite values in [-1, 1] (0..1, or already -1..1) -> the same on the CPU."""
    if t.layout != torch.strided:
        raise MediaError(f"the {what} tensor is {str(t.layout).replace('torch.', '')}; pass a dense tensor "
                         "(t.to_dense())")
    if t.is_meta:
        raise MediaError(f"the {what} tensor is on the meta device (no data); pass a tensor that holds pixels")
    if t.numel() == 0:
        raise MediaError(f"the {what} tensor is empty (shape {tuple(t.shape)})")
    t = t.detach().cpu()
    if not bool(torch.isfinite(t).all()):
        raise MediaError(f"the {what} tensor holds NaN or inf values")
    lo, hi = float(t.min()), float(t.max())
    if lo < -1 or hi > 1:
        raise MediaError(f"the {what} tensor holds values from {lo:g} to {hi:g}; {what} tensors must be in 0..1 (or "
                         "-1..1, taken as already normalized); divide 0..255 values by 255")
    return t


def _normalize(t: torch.Tensor) -> torch.Tensor:
    # diffusers: inputs with negative values are taken as already in [-1, 1]
    return t if bool(t.min() < 0) else 2.0 * t - 1.0


_DEEP = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def _pil_unit(im: Image.Image, height: int, width: int) -> np.ndarray:
    """One PIL image -> float32 [height, width, 3] in [0, 1], Lanczos-resized (diffusers' PIL path). 8-bit
    modes go through RGB; 16-bit (I;16, and I within 0..65535) and float (F, 0..1) greyscale keep their depth."""
    scale = _DEEP.get(im.mode)
    if scale is None:
        im = im.convert("RGB")
        if im.size != (width, height):
            im = im.resize((width, height), resample=Image.LANCZOS)
        return np.asarray(im).astype(np.float32) / 255.0
    a = np.asarray(im, dtype=np.float32)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > scale:
        rng = "0..1" if im.mode == "F" else "0..65535"
        raise MediaError(f"a mode-{im.mode} image holds values from {lo:g} to {hi:g}; cogvx takes {rng} for this mode "
                         f"(16-bit images 0..65535, float images 0..1): rescale it first")
    f = Image.fromarray(a / scale, mode="F")
    if f.size != (width, height):
        f = f.resize((width, height), resample=Image.LANCZOS)
    return np.repeat(np.clip(np.asarray(f), 0.0, 1.0)[..., None], 3, axis=-1)  # Lanczos overshoots, as uint8 clips


def _pil_frames(frames: list[Image.Image], height: int, width: int) -> torch.Tensor:
    """PIL images -> [N, 3, H, W] in [-1, 1]: Lanczos resize, to [0, 1], 2x - 1 (diffusers' PIL path)."""
    out = np.stack([_pil_unit(im, height, width) for im in frames])
    return 2.0 * torch.from_numpy(out.transpose(0, 3, 1, 2)) - 1.0


def _tensor_frames(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[N, 3, h, w] float -> [N, 3, H, W] in [-1, 1]: nearest resize, normalized when not already."""
    t = t.float()
    if t.shape[-2:] != (height, width):
        t = F.interpolate(t, size=(height, width))
    return _normalize(t)


def load_image(image, height: int, width: int) -> torch.Tensor:
    """One conditioning image -> float32 [3, height, width] in [-1, 1]."""
    if isinstance(image, _PATH):
        image = read_image(image)
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
        return _tensor_frames(_check_tensor(image, "image")[None], height, width)[0]
    raise MediaError(f"image must be a PIL image, a file path, a numpy array [H, W, 3] or a tensor [3, H, W] "
                     f"(got {type(image).__name__})")


def load_video(video, num_frames: int | None, height: int, width: int, what: str = "video") -> torch.Tensor:
    """One conditioning video -> float32 [3, F, height, width] in [-1, 1], its first ``num_frames`` frames
    (all of them when None). Fewer frames than ``num_frames`` is an error."""
    if isinstance(video, _PATH):
        out = _file_frames(video, num_frames, height, width, what)
    elif isinstance(video, (list, tuple)):
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
        video = _check_tensor(video, what)
        n = _check_count(video.shape[0], num_frames, what)
        out = _tensor_frames(video[:n], height, width)
    else:
        raise MediaError(f"{what} must be a list of PIL images, a file path, a numpy array [F, H, W, 3] or a tensor "
                         f"[F, 3, H, W] (got {type(video).__name__})")
    return out.permute(1, 0, 2, 3).contiguous()


def _file_frames(path, num_frames: int | None, height: int, width: int, what: str) -> torch.Tensor:
    """A video file's first ``num_frames`` frames (all, up to MAX_FRAMES, when None) -> [N, 3, H, W] in
    [-1, 1], each frame resized as it is decoded (uint8 at the video size kept, never the full-size video)."""
    kept = []
    for frame in iter_video(path, max_frames=num_frames or MAX_FRAMES):
        im = Image.fromarray(frame)
        if im.size != (width, height):
            im = im.resize((width, height), resample=Image.LANCZOS)
        kept.append(np.asarray(im))
    _check_count(len(kept), num_frames, what)
    out = np.stack(kept)
    del kept
    return 2.0 * (torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0) - 1.0


def _check_count(have: int, want: int | None, what: str) -> int:
    if have == 0:
        raise MediaError(f"the {what} has no frames")
    if want is None:
        return have
    if have < want:
        raise MediaError(f"the {what} has {have} frames but num_frames={want}; pass num_frames <= {have} "
                         f"(4k+1, e.g. {((have - 1) // 4) * 4 + 1}) or a longer {what}")
    return want

