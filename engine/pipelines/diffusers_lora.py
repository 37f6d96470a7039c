"""diffusers' LoRA methods on the diffusers-compatible pipelines, over the engine's adapters
(``cogvx.engine.pipelines.lora``): a LoRA file, its folder (``weight_name=``) or a state dict."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .diffusers_files import component_dir

__all__ = ["LoraPipelineMethods", "lora_call_scale", "lora_scale"]


class LoraPipelineMethods:
    """Mixed into ``CogVideoXPipelineBase`` (which holds ``engine``)."""

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          weight_name: str | None = None, **kwargs) -> None:
        """A diffusers/peft CogVideoX LoRA: a ``.safetensors`` file, a folder holding one (``weight_name``
        picks it), or a state dict {key: tensor} in diffusers' or peft's key format."""
        src = pretrained_model_name_or_path_or_dict
        subfolder = kwargs.pop("subfolder", None)
        if kwargs:
            raise TypeError(f"load_lora_weights got unsupported argument(s) {sorted(kwargs)}")
        if self.engine is None:
            raise ValueError("load_lora_weights: this pipeline has no transformer to load a LoRA into")
        if isinstance(src, dict):
            bad = [k for k, v in src.items() if not isinstance(v, torch.Tensor)]
            if not src or bad:
                raise TypeError(f"load_lora_weights: a state dict must map keys to tensors (bad entries: {bad[:3]})")
            with tempfile.TemporaryDirectory(prefix="cogvx-lora-") as tmp:
                path = Path(tmp) / "pytorch_lora_weights.safetensors"
                save_file({k: v.detach().contiguous() for k, v in src.items()}, str(path))
                self.engine.load_lora(path, adapter_name)
            return
        if isinstance(src, (str, os.PathLike)) and Path(src).is_file() and subfolder is None and weight_name is None:
            self.engine.load_lora(Path(src), adapter_name)
            return
        path = component_dir(src, subfolder)
        self.engine.load_lora(path / weight_name if weight_name else path, adapter_name)

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        self.engine.set_adapters(adapter_names, adapter_weights)

    def fuse_lora(self, components=("transformer",), lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names=None) -> None:
        self.engine.fuse_lora(lora_scale, adapter_names)

    def unfuse_lora(self, components=("transformer",)) -> None:
        self.engine.unfuse_lora()

    def delete_adapters(self, adapter_names) -> None:
        self.engine.delete_adapters(adapter_names)

    def get_active_adapters(self) -> list[str]:
        return list(self.engine.lora.active)

    def unload_lora_weights(self) -> None:
        self.engine.unfuse_lora()
        self.engine.delete_adapters(self.engine.lora.names)


def lora_scale(attention_kwargs) -> float:
    if attention_kwargs is None:
        return 1.0
    if not isinstance(attention_kwargs, dict) or set(attention_kwargs) - {"scale"}:
        raise ValueError(f"attention_kwargs: cogvx honours only {{'scale': <LoRA scale>}} (got {attention_kwargs!r})")
    s = attention_kwargs.get("scale", 1.0)
    if isinstance(s, bool) or not isinstance(s, (int, float)):
        raise ValueError(f"attention_kwargs['scale'] must be a number (got {s!r})")
    return float(s)


@contextlib.contextmanager
def lora_call_scale(engine, scale: float):
    """diffusers scales every LoRA layer by attention_kwargs["scale"] for one call."""
    if engine is None or scale == 1.0 or not engine.lora.active:
        yield
        return
    with engine.lock:
        engine.lora.call_scale = scale
        engine.lora.apply(engine.transformer, engine.dtype)
        engine.forward.weights_changed()
    try:
        yield
    finally:
        with engine.lock:
            engine.lora.call_scale = 1.0
            engine.lora.apply(engine.transformer, engine.dtype)
            engine.forward.weights_changed()
