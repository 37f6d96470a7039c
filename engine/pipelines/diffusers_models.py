"""diffusers' component entry points, returning cogvx's own modules: what a diffusers script calls
besides the pipeline, under the same names.

    from cogvx.engine import CogVideoXTransformer3DModel, AutoencoderKLCogVideoX
    transformer = CogVideoXTransformer3DModel.from_pretrained(path, subfolder="transformer", torch_dtype=torch.bfloat16)
    quantize_(transformer, Int8WeightOnlyConfig())   # torchao, on cogvx's transformer

The names are factories: ``from_pretrained`` returns a ``cogvx.engine.models.transformer.CogVideoXTransformer``
(or the VAE, a scheduler), loaded on the CPU as diffusers does, ready for ``.to(device)``, torchao's
``quantize_`` or a pipeline's ``transformer=`` argument.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io.checkpoint import resolve_model_dir
from ..io.video import write_mp4
from ..loading import load_scheduler, load_transformer, load_vae, read_quantization
from ..models.schedulers import make_scheduler
from ..runtime.devices import resolve_dtype

__all__ = ["CogVideoXTransformer3DModel", "AutoencoderKLCogVideoX", "CogVideoXDDIMScheduler", "CogVideoXDPMScheduler",
           "CogVideoXPipelineOutput", "export_to_video", "check_from_pretrained_kwargs", "component_dir",
           "torch_dtype_of"]

# from_pretrained keywords that change nothing here (the weights are local safetensors, loaded lazily)
_HARMLESS = {"local_files_only", "low_cpu_mem_usage", "use_safetensors", "cache_dir", "force_download"}


@dataclass
class CogVideoXPipelineOutput:
    """What a pipeline call returns with ``return_dict=True``: ``frames`` per ``output_type`` ("pil": a list
    per video of PIL images; "np": float32 [B, F, H, W, 3] in [0, 1]; "pt": [B, F, 3, H, W]; "latent": the
    latents [B, F_lat, C, h, w])."""

    frames: Any


def check_from_pretrained_kwargs(kwargs: dict[str, Any], what: str) -> None:
    """Refuse what cogvx cannot honour instead of ignoring it."""
    if kwargs.get("use_safetensors") is False:
        raise ValueError(f"{what}: use_safetensors=False asks for pickle weights, which cogvx never loads")
    if kwargs.get("variant") is not None:
        raise ValueError(f"{what}: variant={kwargs['variant']!r} is not supported; point at a folder whose "
                         "safetensors are the weights to load")
    unknown = sorted(set(kwargs) - _HARMLESS - {"variant"})
    if unknown:
        raise TypeError(f"{what} got unsupported argument(s) {unknown}; cogvx takes torch_dtype and subfolder "
                        "(quantize with torchao's quantize_ on the result, or with a cogvx recipe)")


def torch_dtype_of(torch_dtype, kwargs: dict[str, Any]):
    """diffusers renamed ``torch_dtype`` to ``dtype``: either is taken (not both)."""
    if "dtype" in kwargs:
        if torch_dtype is not None:
            raise TypeError("pass torch_dtype or dtype, not both")
        return kwargs.pop("dtype")
    return torch_dtype


def component_dir(path, subfolder: str | None) -> Path:
    d = resolve_model_dir(path)
    return d / subfolder if subfolder else d


def _dtype(torch_dtype) -> torch.dtype:
    return resolve_dtype(torch_dtype if torch_dtype is not None else torch.float32, torch.device("cpu"))


class _Factory:
    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} builds cogvx modules through from_pretrained(path, subfolder=..., "
                        "torch_dtype=...)")


class CogVideoXTransformer3DModel(_Factory):
    """``from_pretrained(path, subfolder="transformer", torch_dtype=...)`` -> cogvx's transformer (a
    quantized folder, cogvx's or torchao's format, loads quantized)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, torch_dtype=None, **kwargs):
        torch_dtype = torch_dtype_of(torch_dtype, kwargs)
        check_from_pretrained_kwargs(kwargs, "CogVideoXTransformer3DModel.from_pretrained")
        d = component_dir(pretrained_model_name_or_path, subfolder)
        return load_transformer(d, "cpu", _dtype(torch_dtype), info=read_quantization(d))


class AutoencoderKLCogVideoX(_Factory):
    """``from_pretrained(path, subfolder="vae", torch_dtype=...)`` -> cogvx's VAE (``enable_tiling``,
    ``enable_slicing`` as in diffusers)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, torch_dtype=None, **kwargs):
        torch_dtype = torch_dtype_of(torch_dtype, kwargs)
        check_from_pretrained_kwargs(kwargs, "AutoencoderKLCogVideoX.from_pretrained")
        return load_vae(component_dir(pretrained_model_name_or_path, subfolder), "cpu", _dtype(torch_dtype))


class _SchedulerFactory(_Factory):
    _name = ""

    @classmethod
    def from_config(cls, config, **overrides):
        """A cogvx scheduler of this class from another scheduler's ``.config`` (or a config dict)."""
        d = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        return make_scheduler({**d, **overrides}, cls._name)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs):
        check_from_pretrained_kwargs(kwargs, f"{cls.__name__}.from_pretrained")
        return load_scheduler(component_dir(pretrained_model_name_or_path, subfolder), cls._name)


class CogVideoXDDIMScheduler(_SchedulerFactory):
    """``from_config(pipe.scheduler.config, ...)`` -> cogvx's DDIM scheduler."""

    _name = "CogVideoXDDIMScheduler"


class CogVideoXDPMScheduler(_SchedulerFactory):
    """``from_config(pipe.scheduler.config, ...)`` -> cogvx's DPM scheduler."""

    _name = "CogVideoXDPMScheduler"


def export_to_video(video_frames, output_video_path: str | os.PathLike | None = None, fps: float = 10) -> str:
    """diffusers.utils.export_to_video for one video: a list of PIL images or of [H, W, 3] arrays (float in
    [0, 1] or uint8), an array [F, H, W, 3] or a tensor [F, 3, H, W]; H.264 mp4. Returns the path."""
    if output_video_path is None:
        fd, output_video_path = tempfile.mkstemp(suffix=".mp4")
        os.close(fd)
    if isinstance(video_frames, list) and video_frames and isinstance(video_frames[0], np.ndarray):
        video_frames = np.stack(video_frames)
    return str(write_mp4(output_video_path, video_frames, fps))
