"""The built-in presets: the released CogVideoX models' shapes (what a benchmark needs to build one
with random weights when no checkpoint is on disk), CPU benchmark shapes, and a tiny test model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import TransformerConfig, VAEConfig

__all__ = ["ModelPreset", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class ModelPreset:
    """A model's transformer and VAE configs, its native dtype, video size and scheduler."""

    name: str
    transformer: TransformerConfig
    dtype: torch.dtype
    height: int
    width: int
    num_frames: int
    scheduler: str = "CogVideoXDDIMScheduler"
    vae: VAEConfig = field(default_factory=lambda: VAEConfig.real("5b"))
    notes: str = field(default="", compare=False)


_V10 = dict(time_embed_dim=512, text_embed_dim=4096, max_text_seq_length=226)
_5B = dict(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True, **_V10)
_15 = dict(patch_size_t=2, patch_bias=False, sample_height=300, sample_width=300, sample_frames=81, **_5B)
_DPM = "CogVideoXDPMScheduler"

PRESETS: dict[str, ModelPreset] = {
    "2b": ModelPreset("2b", TransformerConfig(num_attention_heads=30, num_layers=30, **_V10), torch.float16,
                      480, 720, 49, vae=VAEConfig.real("2b")),
    "5b": ModelPreset("5b", TransformerConfig(**_5B), torch.bfloat16, 480, 720, 49),
    "5b-i2v": ModelPreset(
        "5b-i2v", TransformerConfig(in_channels=32, out_channels=16, use_learned_positional_embeddings=True, **_5B),
        torch.bfloat16, 480, 720, 49),
    "1.5-5b": ModelPreset("1.5-5b", TransformerConfig(**_15), torch.bfloat16, 768, 1360, 81, scheduler=_DPM,
                          vae=VAEConfig.real("1.5")),
    "1.5-5b-i2v": ModelPreset(
        "1.5-5b-i2v", TransformerConfig(in_channels=32, out_channels=16, ofs_embed_dim=512, **_15),
        torch.bfloat16, 768, 1360, 81, scheduler=_DPM, vae=VAEConfig.real("1.5")),
    # The CPU benchmark shape: 2b block dimensions, 2 layers, 9 frames at 240x352, fp32.
    "cpu-bench": ModelPreset(
        "cpu-bench", TransformerConfig(num_attention_heads=30, num_layers=2, **_V10), torch.float32, 240, 352, 9,
        vae=VAEConfig.real("2b")),
    # The attention-heavy CPU benchmark shape: 1 layer of 2b width, 25 frames at 480x720 (7 x 30 x 45 =
    # 9,450 video + 226 text tokens, CFG batch 2). Attention's two matmuls are 46 % of the step's FLOPs
    # (``transformer_flops``; 49 % at the real 5b shape), against 9 % at cpu-bench.
    "cpu-long": ModelPreset(
        "cpu-long", TransformerConfig(num_attention_heads=30, num_layers=1, **_V10), torch.float32, 480, 720, 25,
        vae=VAEConfig.real("2b")),
    # Small enough for a 2-core CPU test; RoPE so the 5b code path is what the tests exercise.
    "tiny": ModelPreset(
        "tiny",
        TransformerConfig(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
            text_embed_dim=32, num_layers=2, sample_width=16, sample_height=12, sample_frames=9,
            max_text_seq_length=64, use_rotary_positional_embeddings=True,
        ),
        torch.float32, 96, 128, 9, vae=VAEConfig.tiny()),
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}") from None
