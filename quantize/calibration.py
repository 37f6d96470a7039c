"""Sample inputs for recipes with static activation scales (``quanto-w8a8``).

quanto's W8A8 quantizes each Linear's input with one scale fixed at quantization time, measured
over whatever runs through the model while it calibrates. These functions run what a generation
runs: the transformer on seeded noise at the model's native latent size, for a classifier-free
guidance batch (empty prompt + a stock prompt, embedded by the checkpoint's own text encoder), at
timesteps spread over the schedule; the text encoder on stock prompts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["CALIBRATION_PROMPTS", "transformer_calibration", "text_encoder_calibration"]

CALIBRATION_PROMPTS = (
    "",
    "A panda, dressed in a small red jacket, strums an acoustic guitar in a serene bamboo forest.",
    "A drone shot of waves crashing against rugged cliffs at sunset, golden light on the water.",
)


def transformer_calibration(text_embeds: torch.Tensor, *, timesteps=(999, 800, 600, 400, 200, 20),
                            seed: int = 0) -> Callable[[nn.Module], None]:
    """A ``calibrate(transformer)`` running one batch per timestep.

    text_embeds: [B, Nt, text_embed_dim] prompt embeddings (B = 2 for an uncond/cond pair), in the
    transformer's dtype and device. Latents: N(0, 1) noise [B, F_lat, C, H, W] at the config's
    sample size (sample_frames, sample_height x sample_width latents), drawn from ``seed``.
    """
    from cogvx.engine.positions import make_positions

    def calibrate(model: nn.Module) -> None:
        cfg = model.config
        dev, dt = text_embeds.device, text_embeds.dtype
        frames = (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1
        pt = cfg.patch_size_t or 1
        frames += (pt - frames % pt) % pt
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


def text_encoder_calibration(input_ids: torch.Tensor) -> Callable[[nn.Module], None]:
    """A ``calibrate(text_encoder)`` encoding the token ids [B, L] (e.g. of CALIBRATION_PROMPTS)."""

    def calibrate(model: nn.Module) -> None:
        model(input_ids=input_ids.to(model.device))

    return calibrate
