"""Checks of single generate arguments, run before any heavy work: each error says what was wrong,
what is accepted, and what to try. Integers may be Python or numpy integers; floats, bools and
strings where an integer belongs are refused with a message saying so."""

from __future__ import annotations

import math
import operator

import numpy as np
import torch

from ..models.tokenizer import check_unicode

__all__ = ["MAX_FRAMES", "MAX_GUIDANCE", "MAX_SIDE", "MAX_TEXT_LENGTH", "MAX_PROMPT_CHARS", "as_int", "as_number",
           "as_bool", "not_on_meta", "check_prompts", "check_video_shape", "check_sampling", "check_latents",
           "check_generator"]

MAX_GUIDANCE = 100.0
MAX_TEXT_LENGTH = 512  # T5 takes any length; the bound keeps a typo from costing minutes and gigabytes
MAX_FRAMES = 4097
MAX_SIDE = 8192
MAX_PROMPT_CHARS = 1_000_000


def as_int(name: str, value, lo: int, hi: int, hint: str = "") -> int:
    """An integer argument (Python or numpy integer; not bool, not float) in [lo, hi]."""
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (float, np.floating)):
        raise ValueError(f"{name} must be an integer (got {value!r}){hint}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer (got {type(value).__name__} {value!r}){hint}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be an integer from {lo} to {hi} (got {v}){hint}")
    return v


def as_number(name: str, value, lo: float, hi: float, hint: str = "") -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number (got {type(value).__name__} {value!r}){hint}")
    v = float(value)
    if not math.isfinite(v) or not lo <= v <= hi:
        raise ValueError(f"{name} must be a number from {lo:g} to {hi:g} (got {value!r}){hint}")
    return v


def as_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False (got {value!r})")
    return bool(value)


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
            if isinstance(negative_prompt, (list, tuple)) and nb != b:
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
        _check_length(name, value)
        return 1
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        for i, p in enumerate(value):
            _check_length(f"{name} {i}", p)
        return len(value)
    got = type(value).__name__ if not isinstance(value, (list, tuple)) else (
        "an empty list" if not value else f"a list holding {sorted({type(p).__name__ for p in value})}")
    raise TypeError(f"{name} must be a string or a non-empty list of strings (got {got})")


def _check_length(name: str, text: str) -> None:
    # T5 reads the first 226 tokens (about a thousand characters); tokenizing a huge string costs
    # seconds and gigabytes for nothing.
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} is {len(text)} characters; the text encoder reads only its first "
                         f"{MAX_TEXT_LENGTH} tokens (a few thousand characters): pass at most {MAX_PROMPT_CHARS}")
    check_unicode(name, text)


def not_on_meta(name: str, t: torch.Tensor) -> None:
    if t.is_meta:
        raise ValueError(f"{name} are on the meta device (no data); pass a tensor that holds values")


def _check_embeds(name: str, t, text_dim: int) -> None:
    if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[-1] != text_dim or not t.is_floating_point() \
            or t.shape[0] < 1 or not 1 <= t.shape[1] <= MAX_TEXT_LENGTH:
        shape = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a float tensor [batch, tokens <= {MAX_TEXT_LENGTH}, {text_dim}] (got {shape})")
    not_on_meta(name, t)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} holds NaN or inf values; the video would be all NaN")


def check_video_shape(num_frames, height, width, temporal: int = 4, spatial_multiple: int = 16) -> tuple[int, int, int]:
    """num_frames must give whole latent frames; height/width multiples of 16 (VAE 8 x patch 2)."""
    hint = ""
    if isinstance(num_frames, (int, np.integer)) and not isinstance(num_frames, bool) and num_frames >= 1:
        near = min(max(round((num_frames - 1) / temporal), 0) * temporal + 1, (MAX_FRAMES - 1) // temporal * temporal + 1)
        hint = f"; try {near}"  # the nearest 4k+1 within range (never the rejected value itself)
    f = as_int("num_frames", num_frames, 1, MAX_FRAMES, hint)
    if (f - 1) % temporal:
        raise ValueError(f"num_frames must be {temporal}k+1 (1, {temporal + 1}, {2 * temporal + 1}, ..., 49) "
                         f"so that it gives whole latent frames (got {f}){hint}")
    sides = []
    for name, v in (("height", height), ("width", width)):
        hint = ""
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0:
            hint = f"; try {min(max(round(v / spatial_multiple), 1) * spatial_multiple, MAX_SIDE)}"
        s = as_int(name, v, 1, MAX_SIDE, hint)
        if s < spatial_multiple or s % spatial_multiple:
            raise ValueError(f"{name} must be a positive multiple of {spatial_multiple} (got {s}){hint}")
        sides.append(s)
    return f, sides[0], sides[1]


def check_sampling(num_inference_steps, guidance_scale, max_steps: int = 1000) -> tuple[int, float]:
    """The step count and guidance scale, checked (the CLI checks them before loading anything)."""
    steps = as_int("num_inference_steps", num_inference_steps, 1, max_steps, "; 50 is the usual value")
    g = as_number("guidance_scale", guidance_scale, 0, MAX_GUIDANCE,
                "; 6.0 is the usual value, and values <= 1 turn classifier-free guidance off")
    return steps, g


def check_latents(latents, shape: tuple[int, ...], what: str) -> None:
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a tensor (got {type(latents).__name__})")
    if not latents.is_floating_point():
        raise ValueError(f"latents must be a floating-point tensor (got {latents.dtype}); draw them with torch.randn")
    if tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape} for {what} (got {tuple(latents.shape)})")
    not_on_meta("latents", latents)
    if not bool(torch.isfinite(latents).all()):
        raise ValueError("latents hold NaN or inf values; the video would be all NaN")


def check_generator(generator, n: int) -> None:
    gens = generator if isinstance(generator, list) else [generator]
    if not gens or not all(isinstance(g, torch.Generator) for g in gens):
        raise TypeError(f"generator must be a torch.Generator or a list of them (got {type(generator).__name__})")
    if isinstance(generator, list) and len(generator) not in (1, n):
        raise ValueError(f"got {len(generator)} generators for {n} video(s); pass one, or one per video")
