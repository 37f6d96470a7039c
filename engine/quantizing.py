"""Applying quantization recipes to loaded components: which recipes a load asks for against what a
checkpoint already holds, and the calibration inputs of recipes with static activation scales
(the engine builds them: it knows the model's shapes and positions; ``cogvx.quantize`` does not)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cogvx.quantize import DTYPES, get_recipe, quantize_, resolve_recipes
from cogvx.quantize.calibration import CALIBRATION_PROMPTS, text_encoder_calibration
from cogvx.quantize.recipes import check_runnable
from cogvx.quantize.settings import Runtime

from .io.checkpoint import CheckpointError
from .models.positions import latent_frames, make_positions
from .models.text_encoder import encode_prompts, text_encoder_dtype
from .models.tokenizer import PromptTokenizer, PromptTruncationWarning

__all__ = ["resolve_quantization", "quantize_transformer", "quantize_text_encoder", "transformer_calibration",
           "apply_runtime_settings"]

# Recipe settings that are not about weights: what the transformer runs in besides its linears.


def apply_runtime_settings(transformer, runtime: Runtime) -> None:
    """Apply a recipe's runtime knobs (``cogvx.quantize.settings.Runtime``) to a (quantized) transformer:
    ``attention_dtype`` runs SDPA in that dtype; ``fused_gelu_quant`` runs the feed-forward's GELU and int8
    quantization as one kernel; ``attention_kernel="int8-cpu"`` attends on the CPU with the int8 kernel (a
    warning and SDPA where it cannot run). Those two are CPU kernels: a transformer on another device keeps
    the PyTorch path, without a warning. ``attention_kernel="int8-cuda"`` attends with the 8-bit Triton
    attention (``set_int8_gpu_attention``; its PyTorch reference off CUDA: the same numerics on every
    device). ``fp8_activations`` feeds the adaLN kernel's per-row fp8 output straight into the fp8 q/k/v and
    feed-forward-up GEMMs. Called after quantizing and after loading a quantized checkpoint, so both run
    alike."""
    if runtime.fp8_activations:
        transformer.set_fp8_activations(True)
    on_cpu = next(transformer.parameters()).device.type == "cpu"
    if runtime.fused_gelu_quant and on_cpu:
        why = transformer.fused_gelu_quant_missing()
        if why:
            warnings.warn(f"the recipe's fused GELU + int8 quantization kernel does not run here: {why}; the "
                          "feed-forward runs the same ops unfused (slower)", RuntimeWarning, stacklevel=2)
        transformer.set_fused_gelu_quant(True)
    if runtime.attention_kernel == "int8-cuda":  # the recipe's numerics on every device (the reference off CUDA)
        transformer.set_int8_gpu_attention(True)
    why = runtime.attention_kernel == "int8-cpu" and on_cpu and transformer.set_int8_cpu_attention(True)
    if why:
        warnings.warn(f"the recipe's int8 CPU attention does not run here: {why}; attention runs as SDPA "
                      "instead (the int8 linears still apply)", RuntimeWarning, stacklevel=2)
    if runtime.attention_dtype is not None:
        transformer.set_attention_dtype(getattr(torch, runtime.attention_dtype))


def resolve_quantization(recipe, saved: dict[str, dict[str, Any]], device: torch.device, dtype: torch.dtype,
                         model_dir: Path) -> dict:
    """The recipes to apply after loading ({component: Recipe}), given what is already quantized on disk
    (``saved``: {component: quantization info}).

    Every recipe, requested or saved, must run on ``device``; a saved one loads only in the dtype it was
    exported in; a requested recipe for a component that is already quantized must be the saved one
    (it is then not applied again).
    """
    requested = resolve_recipes(recipe, device)
    for comp, info in saved.items():
        name = info["recipe"]["name"]
        check_runnable(name, device)
        comp_dtype = text_encoder_dtype(dtype, device) if comp == "text_encoder" else dtype
        if DTYPES[info["dtype"]] != comp_dtype:
            raise CheckpointError(
                f"{model_dir / comp} was quantized in {info['dtype']} and its quantized weights keep that dtype's "
                f"scales; load it with dtype={info['dtype']} (got {str(comp_dtype).removeprefix('torch.')}), or "
                "export again from an engine loaded in the dtype you need")
        if comp in requested:
            if requested[comp].name != name:
                raise CheckpointError(
                    f"{model_dir / comp} is already quantized with {name!r}; it loads as saved: drop "
                    f"recipe {requested[comp].name!r} for the {comp}, or quantize the full-precision checkpoint")
            del requested[comp]
    return requested


def transformer_calibration(text_embeds: torch.Tensor, *, timesteps=(999, 800, 600, 400, 200, 20),
                            seed: int = 0) -> Callable[[nn.Module], None]:
    """A ``calibrate(transformer)`` running one batch per timestep.

    text_embeds: [B, Nt, text_embed_dim] prompt embeddings (B = 2 for an uncond/cond pair), in the
    transformer's dtype and device. Latents: N(0, 1) noise [B, F_lat, C, H, W] at the config's
    sample size (sample_frames, sample_height x sample_width latents), drawn from ``seed``.
    """

    def calibrate(model: nn.Module) -> None:
        cfg = model.config
        dev, dt = text_embeds.device, text_embeds.dtype
        frames, _ = latent_frames(cfg, cfg.sample_frames, cfg.temporal_compression_ratio)
        b = text_embeds.shape[0]
        g = torch.Generator(device="cpu").manual_seed(seed)
        shape = (b, frames, cfg.in_channels, cfg.sample_height, cfg.sample_width)
        pos = make_positions(cfg, frames, cfg.sample_height, cfg.sample_width).to(dev)
        # The image-to-video 1.5 model also takes the ofs embedding (its pipeline passes 2.0).
        ofs = torch.full((b,), 2.0, device=dev) if cfg.ofs_embed_dim else None
        for t in timesteps:
            lat = torch.randn(shape, generator=g).to(dev, dt)
            model(lat, text_embeds, torch.full((b,), t, device=dev), pos, ofs)

    return calibrate


def quantize_transformer(transformer, recipe, tokenizer: PromptTokenizer | None = None, text_encoder=None,
                         dtype: torch.dtype = torch.float32) -> None:
    """Apply ``recipe`` to a loaded transformer; a recipe with static activation scales is calibrated
    on a CFG pair of stock prompts embedded by ``text_encoder``."""
    recipe = get_recipe(recipe)
    calibrate = None
    if recipe.needs_calibration:
        if tokenizer is None or text_encoder is None:
            raise ValueError(f"recipe {recipe.name!r} calibrates on prompt embeddings: pass tokenizer and text_encoder")
        with warnings.catch_warnings():  # a tiny test model's text length truncates the stock prompts
            warnings.simplefilter("ignore", PromptTruncationWarning)
            embeds = encode_prompts(tokenizer, text_encoder, list(CALIBRATION_PROMPTS[:2]),
                                    transformer.config.max_text_seq_length, dtype=dtype)
        calibrate = transformer_calibration(embeds)
    quantize_(transformer, recipe, "transformer", calibrate=calibrate)
    apply_runtime_settings(transformer, recipe.runtime)


def quantize_text_encoder(text_encoder, recipe, tokenizer: PromptTokenizer | None = None) -> None:
    """Apply ``recipe`` to a loaded T5 encoder (calibrated on stock prompts when the recipe needs it)."""
    recipe = get_recipe(recipe)
    calibrate = None
    if recipe.needs_calibration:
        if tokenizer is None:
            raise ValueError(f"recipe {recipe.name!r} calibrates on prompts: pass the tokenizer")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PromptTruncationWarning)
            calibrate = text_encoder_calibration(tokenizer(list(CALIBRATION_PROMPTS)).input_ids)
    quantize_(text_encoder, recipe, "text_encoder", calibrate=calibrate)
