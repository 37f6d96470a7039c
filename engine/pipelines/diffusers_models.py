"""diffusers' component classes under their diffusers names, as cogvx's own modules.

    from cogvx.engine import CogVideoXTransformer3DModel, AutoencoderKLCogVideoX
    transformer = CogVideoXTransformer3DModel(num_attention_heads=4, attention_head_dim=8, ...)   # **config
    transformer = CogVideoXTransformer3DModel.from_pretrained(path, subfolder="transformer", torch_dtype=torch.bfloat16)
    quantize_(transformer, Int8WeightOnlyConfig())   # torchao, on cogvx's transformer

``CogVideoXTransformer3DModel`` *is* cogvx's transformer (a subclass adding diffusers' names: ``from_config``,
``save_pretrained``, ``dtype``, ``enable_cache``, q/k/v fusion); built from a config its random weights are the
ones diffusers draws from the same seed (the modules are created in diffusers' order). ``AutoencoderKLCogVideoX``
likewise for the VAE. Loading is cogvx's: strict (every key consumed, every parameter filled), safetensors only.
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

from cogvx.quantize import check_runnable

from ..io.checkpoint import read_json
from ..io.video import write_mp4
from ..loading import load_scheduler, load_transformer, load_vae, read_quantization
from ..models.config import TransformerConfig, VAEConfig
from ..models.schedulers import make_scheduler
from ..models.transformer import CogVideoXTransformer
from ..models.vae import CogVideoXVAE
from ..quantizing import quantize_transformer
from ..runtime.devices import resolve_dtype
from .diffusers_cache import CacheMethods
from .diffusers_files import check_from_pretrained_kwargs, component_dir, save_module, torch_dtype_of, variant_view
from .diffusers_quant import recipe_of

__all__ = ["AutoModel", "CogVideoXTransformer3DModel", "AutoencoderKLCogVideoX", "CogVideoXDDIMScheduler", "CogVideoXDPMScheduler",
           "CogVideoXPipelineOutput", "export_to_video", "config_dict", "adopt"]


class CogVideoXPipelineOutput(tuple):
    """What a pipeline call returns with ``return_dict=True``: ``.frames`` (also ``out[0]``, ``out["frames"]``,
    as diffusers' ``BaseOutput``) per ``output_type`` ("pil": a list per video of PIL images; "np": float32
    [B, F, H, W, 3] in [0, 1]; "pt": [B, F, 3, H, W]; "latent": the latents [B, F_lat, C, h, w])."""

    def __new__(cls, frames: Any):
        return super().__new__(cls, (frames,))

    @property
    def frames(self):
        return self[0]

    def __getitem__(self, key):
        return self.frames if key == "frames" else super().__getitem__(key)

    def keys(self):
        return ["frames"]

    def to_tuple(self) -> tuple:
        return (self.frames,)

    def __repr__(self) -> str:
        return f"CogVideoXPipelineOutput(frames={type(self.frames).__name__})"


def config_dict(config) -> dict[str, Any]:
    """A plain dict of a diffusers ``FrozenDict`` config, a cogvx config dataclass or a dict."""
    if dataclasses.is_dataclass(config):
        return dict(config.to_dict()) if hasattr(config, "to_dict") else dataclasses.asdict(config)
    if isinstance(config, dict):
        return dict(config)
    raise TypeError(f"expected a config dict or a model's .config (got {type(config).__name__})")


def adopt(cls, module: torch.nn.Module) -> torch.nn.Module:
    """Give a cogvx module its diffusers-named class (a subclass adding methods only, no state): the same
    object, its weights untouched."""
    if not isinstance(module, cls.base):
        raise TypeError(f"{cls.__name__} can adopt only a {cls.base.__name__} (got {type(module).__name__})")
    if type(module) is not cls:
        module.__class__ = cls
    return module


class _ModelMixin:
    """diffusers' ``ModelMixin`` names on a cogvx module."""

    _config_type: type
    _loader = None

    @property
    def dtype(self) -> torch.dtype:
        p = next((p for p in self.parameters() if p.is_floating_point()), None)
        return p.dtype if p is not None else torch.float32

    @property
    def device(self) -> torch.device:
        p = next(iter(self.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    @classmethod
    def from_config(cls, config, **overrides):
        """A module with random weights from another model's ``.config`` (or a config dict)."""
        return cls(**{**config_dict(config), **overrides})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, torch_dtype=None,
                        variant: str | None = None, **kwargs):
        """cogvx's module from a diffusers folder, on the CPU as diffusers loads it (``variant="fp16"`` reads
        ``diffusion_pytorch_model.fp16.safetensors``; ``quantization_config=TorchAoConfig("int8wo")`` applies
        the cogvx recipe it names, see ``diffusers_quant``)."""
        torch_dtype = torch_dtype_of(torch_dtype, kwargs)
        qc = kwargs.pop("quantization_config", None)
        check_from_pretrained_kwargs(kwargs, f"{cls.__name__}.from_pretrained")
        recipe = None
        if qc is not None:
            if cls is not CogVideoXTransformer3DModel:
                raise ValueError(f"{cls.__name__}.from_pretrained(quantization_config=...): cogvx's recipes quantize "
                                 "the transformer and the text encoder, not the VAE")
            recipe = recipe_of(qc)
            check_runnable(recipe, torch.device("cpu"))
        dt = resolve_dtype(torch_dtype if torch_dtype is not None else torch.float32, torch.device("cpu"))
        with variant_view(component_dir(pretrained_model_name_or_path, subfolder), variant) as d:
            model = adopt(cls, cls._load(d, dt))
        if recipe is not None:
            quantize_transformer(model, recipe, dtype=dt)
        return model

    def enable_layerwise_casting(self, storage_dtype=None, compute_dtype=None, **kwargs) -> None:
        """Refused: cogvx stores low-precision weights through its quantization recipes instead."""
        raise NotImplementedError(
            "enable_layerwise_casting(): cogvx does not store weights in one dtype and compute in another per layer; "
            "for float8 weight storage load with a recipe (Engine.load(path, recipe='fp8wo') or "
            "PipelineQuantizationConfig(quant_backend='torchao', quant_kwargs={'quant_type': 'float8wo'}))")

    def save_pretrained(self, save_directory: str | os.PathLike, variant: str | None = None,
                        safe_serialization: bool = True, **kwargs) -> None:
        """``config.json`` and ``diffusion_pytorch_model[.variant].safetensors``, loadable by diffusers. Always
        safetensors: ``safe_serialization=False`` (pickle) is written as safetensors too."""
        save_module(self, Path(save_directory), variant, **kwargs)


class CogVideoXTransformer3DModel(CacheMethods, _ModelMixin, CogVideoXTransformer):
    """cogvx's transformer under diffusers' name: ``CogVideoXTransformer3DModel(**config)``, ``from_config``,
    ``from_pretrained`` (a quantized folder, cogvx's or torchao's format, loads quantized), ``save_pretrained``."""

    base = CogVideoXTransformer

    def __init__(self, **config):
        super().__init__(TransformerConfig.from_dict(config, where="CogVideoXTransformer3DModel(**config)"))
        self.eval()

    @staticmethod
    def _load(d: Path, dtype: torch.dtype):
        return load_transformer(d, "cpu", dtype, info=read_quantization(d))

    @property
    def attn_processors(self) -> dict[str, object]:
        """diffusers' processor per attention, by the class name diffusers gives it (fused or not)."""
        return {f"transformer_blocks.{i}.attn1.processor":
                (FusedCogVideoXAttnProcessor2_0 if b.attn1.to_qkv is not None else CogVideoXAttnProcessor2_0)()
                for i, b in enumerate(self.transformer_blocks)}

    def fuse_qkv_projections(self) -> None:
        self.original_attn_processors = self.attn_processors
        self.fuse_qkv()

    def unfuse_qkv_projections(self) -> None:
        """Split each fused q/k/v projection back into three (full-precision weights)."""
        for blk in self.transformer_blocks:
            a = blk.attn1
            if a.to_qkv is None:
                continue
            w, bias = a.to_qkv.weight, a.to_qkv.bias
            for name, ws, bs in zip(("to_q", "to_k", "to_v"), w.chunk(3), bias.chunk(3) if bias is not None
                                    else (None,) * 3):
                lin = torch.nn.Linear(ws.shape[1], ws.shape[0], bias=bs is not None, device="meta")
                lin.weight = torch.nn.Parameter(ws.clone(), requires_grad=False)
                if bs is not None:
                    lin.bias = torch.nn.Parameter(bs.clone(), requires_grad=False)
                setattr(a, name, lin)
            a.to_qkv = None


class CogVideoXAttnProcessor2_0:
    """Stands for diffusers' processor of that name in ``attn_processors`` (cogvx's attention has none)."""


class FusedCogVideoXAttnProcessor2_0:
    """Stands for diffusers' fused processor in ``attn_processors``."""


class AutoencoderKLCogVideoX(_ModelMixin, CogVideoXVAE):
    """cogvx's VAE under diffusers' name (``enable_tiling``, ``enable_slicing`` as in diffusers)."""

    base = CogVideoXVAE

    def __init__(self, **config):
        super().__init__(VAEConfig.from_dict(config, where="AutoencoderKLCogVideoX(**config)"))
        self.eval()

    dtype = CogVideoXVAE.dtype

    @staticmethod
    def _load(d: Path, dtype: torch.dtype):
        return load_vae(d, "cpu", dtype)


class AutoModel:
    """diffusers' ``AutoModel.from_pretrained(path, subfolder=...)``: the class its ``config.json`` names."""

    def __init__(self, *args, **kwargs):
        raise TypeError("AutoModel is instantiated with AutoModel.from_pretrained(path, subfolder=...)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs):
        d = component_dir(pretrained_model_name_or_path, subfolder)
        name = read_json(d / "config.json", "a diffusers model config.json").get("_class_name")
        classes = {c.__name__: c for c in (CogVideoXTransformer3DModel, AutoencoderKLCogVideoX)}
        if name not in classes:
            raise ValueError(f"{d}/config.json names {name!r}; cogvx's AutoModel loads {sorted(classes)}")
        return classes[name].from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)


class _SchedulerFactory:
    _name = ""

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} builds cogvx schedulers through from_config(pipe.scheduler.config) "
                        "or from_pretrained(path, subfolder='scheduler')")

    @classmethod
    def from_config(cls, config, **overrides):
        """A cogvx scheduler of this class from another scheduler's ``.config`` (or a config dict)."""
        return make_scheduler({**config_dict(config), **overrides}, cls._name)

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
