"""The engine's calls of one component outside a generate (diffusers' ``pipe.encode_prompt`` /
``pipe.vae.decode`` counterparts, and the quantized export): each asks the engine's residency for the
component it needs, so they run the same with offload on (the component comes in for the call and goes
back after, see ``cogvx.engine.runtime.residency``)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from ..models.text_encoder import encode_ids
from ..models.tokenizer import MAX_LENGTH
from .quantized_export import save_quantized

__all__ = ["ComponentCalls"]


class ComponentCalls:
    """Mixed into Engine; uses its ``residency``, components, ``device`` and ``dtype``."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoised latents [B, F_lat, C, h, w] -> video [B, 3, F, 8h, 8w] in [-1, 1] (VAE decode,
        frame-batched; tiled when ``engine.vae.enable_tiling()`` was called)."""
        if self.vae is None:
            raise ValueError("this engine was loaded without a VAE")
        c = self.vae.config.latent_channels
        if latents.ndim != 5 or latents.shape[2] != c:
            raise ValueError(f"latents must be [B, F_lat, {c}, h, w] for this VAE (got {tuple(latents.shape)})")
        with self.residency.use("vae"):
            out = self.vae.decode(self.vae.decoder_input(latents)).to(self.dtype)  # the VAE may have its own dtype
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out

    def save_quantized(self, out_dir: str | os.PathLike, **kwargs) -> Path:
        """Write this engine's (quantized) components as a diffusers-layout checkpoint that
        ``Engine.load`` reads back without re-quantizing; atomic (a temporary directory renamed at the end).
        kwargs: ``overwrite``, ``max_shard_bytes`` (``cogvx.engine.pipelines.quantized_export.save_quantized``)."""
        with contextlib.ExitStack() as held:  # every component in memory while it is written
            for name in ("text_encoder", "transformer", "vae"):
                held.enter_context(self.residency.use(name))
            return save_quantized(self, out_dir, **kwargs)

    def encode(self, prompts: list[str], max_length: int = MAX_LENGTH) -> torch.Tensor:
        """T5 embeddings [B, max_length, text_embed_dim] of prompts, in the engine dtype."""
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError("this engine has no text encoder; pass prompt_embeds")
        with self.residency.use("text_encoder"):
            return encode_ids(self.text_encoder, self.tokenizer(prompts, max_length=max_length).input_ids,
                              self.device, self.dtype)
