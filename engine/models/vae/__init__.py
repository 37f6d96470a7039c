"""The CogVideoX 3D causal VAE: ``model.CogVideoXVAE`` (frame-batched encode / decode, tiling),
``layers`` (its blocks) and ``tiling`` (diffusers' tile geometry and blending)."""

from .model import CogVideoXVAE, LatentDistribution, frame_batches, scale_latents, unscale_latents

__all__ = ["CogVideoXVAE", "LatentDistribution", "frame_batches", "scale_latents", "unscale_latents"]
