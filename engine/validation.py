"""Checks of user input, run before any heavy work; each error says what was wrong, what is
accepted, and what to try."""

from __future__ import annotations

import math
import warnings

import torch

__all__ = ["resolve_device", "resolve_dtype", "check_prompts", "check_video_shape", "check_sampling"]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
MAX_GUIDANCE = 100.0


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' (or a torch.device), checked against this machine."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name; accepted: 'cpu', 'cuda', 'cuda:N'") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device {device!r} is not supported; accepted: 'cpu', 'cuda', 'cuda:N'")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} was requested but CUDA is not available on this machine "
            f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA); use device='cpu'"
        )
    index = dev.index or 0
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                         f"use 'cuda:0'..'cuda:{torch.cuda.device_count() - 1}'")
    return torch.device("cuda", index)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """float32, bfloat16 or float16 (or their short names), checked against the device."""
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; accepted: float32, bfloat16, float16")
        dtype = _DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype} is not supported; accepted: torch.float32, torch.bfloat16, torch.float16")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{torch.cuda.get_device_name(device)} does not support bfloat16; use float16 or float32")
    if device.type == "cpu" and dtype != torch.float32:
        warnings.warn(
            f"{dtype} on the CPU is very slow (no fast low-precision matmul on most CPUs); float32 is the fast "
            "CPU dtype", stacklevel=3,
        )
    return dtype


def check_prompts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, text_dim: int) -> int:
    """Validate prompts/embeddings; returns the number of prompts B."""
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("pass either prompt or prompt_embeds, not both")
    if prompt is None and prompt_embeds is None:
        raise ValueError("pass a prompt (a string or a list of strings) or prompt_embeds")
    if prompt is not None:
        b = _check_text("prompt", prompt)
        if negative_prompt is not None:
            nb = _check_text("negative_prompt", negative_prompt)
            if isinstance(negative_prompt, list) and nb != b:
                raise ValueError(f"negative_prompt has {nb} entries but prompt has {b}; give one per prompt "
                                 "or a single string")
        if negative_prompt_embeds is not None:
            raise ValueError("pass negative_prompt_embeds only together with prompt_embeds")
        return b
    _check_embeds("prompt_embeds", prompt_embeds, text_dim)
    b = prompt_embeds.shape[0]
    if negative_prompt is not None:
        raise ValueError("with prompt_embeds pass negative_prompt_embeds (not negative_prompt)")
    if negative_prompt_embeds is not None:
        _check_embeds("negative_prompt_embeds", negative_prompt_embeds, text_dim)
        if negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(f"negative_prompt_embeds has shape {tuple(negative_prompt_embeds.shape)} but "
                             f"prompt_embeds has {tuple(prompt_embeds.shape)}; they must match")
    return b


def _check_text(name: str, value) -> int:
    if isinstance(value, str):
        return 1
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return len(value)
    got = type(value).__name__ if not isinstance(value, (list, tuple)) else (
        "an empty list" if not value else f"a list holding {sorted({type(p).__name__ for p in value})}")
    raise TypeError(f"{name} must be a string or a non-empty list of strings (got {got})")


def _check_embeds(name: str, t, text_dim: int) -> None:
    if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[-1] != text_dim or not t.is_floating_point():
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a float tensor [batch, tokens, {text_dim}] (got {shape})")


def check_video_shape(num_frames, height, width, temporal: int = 4, spatial_multiple: int = 16) -> None:
    """num_frames must give whole latent frames; height/width multiples of 16 (VAE 8 x patch 2)."""
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1 or (num_frames - 1) % temporal:
        hint = ""
        if isinstance(num_frames, int) and num_frames >= 1:
            k = max(round((num_frames - 1) / temporal), 0)
            hint = f"; try {k * temporal + 1}"
        raise ValueError(f"num_frames must be {temporal}k+1 (1, {temporal + 1}, {2 * temporal + 1}, ..., 49) "
                         f"so that it gives whole latent frames (got {num_frames!r}){hint}")
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v < spatial_multiple or v % spatial_multiple:
            hint = ""
            if isinstance(v, int) and v > 0:
                hint = f"; try {max(round(v / spatial_multiple), 1) * spatial_multiple}"
            raise ValueError(f"{name} must be a positive multiple of {spatial_multiple} (got {v!r}){hint}")


def check_sampling(num_inference_steps, guidance_scale, num_videos_per_prompt, max_steps: int) -> None:
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) \
            or not 1 <= num_inference_steps <= max_steps:
        raise ValueError(f"num_inference_steps must be an integer from 1 to {max_steps} "
                         f"(got {num_inference_steps!r}); 50 is the usual value")
    if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool) \
            or not math.isfinite(guidance_scale) or not 0 <= guidance_scale <= MAX_GUIDANCE:
        raise ValueError(f"guidance_scale must be a number from 0 to {MAX_GUIDANCE:g} (got {guidance_scale!r}); "
                         "6.0 is the usual value, and values <= 1 turn classifier-free guidance off")
    if not isinstance(num_videos_per_prompt, int) or isinstance(num_videos_per_prompt, bool) \
            or num_videos_per_prompt < 1:
        raise ValueError(f"num_videos_per_prompt must be a positive integer (got {num_videos_per_prompt!r})")
