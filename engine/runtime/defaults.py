"""The one home of the defaults a generate call falls back on, read by ``Engine``, its request checks,
``cogvx generate`` / ``cogvx eval`` and the evaluation settings (the diffusers-compatible classes follow
diffusers instead: the checkpoint's sample size, float32 unless ``torch_dtype`` says otherwise)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported on first use: `cogvx --help` reads these defaults without it
    import torch

__all__ = ["GenerateDefaults", "DEFAULTS", "DEMO_DEFAULTS", "default_dtype"]


@dataclass(frozen=True)
class GenerateDefaults:
    """CogVideoX's published sampling settings (49 frames at 720x480, 50 steps, guidance 6, 8 fps)."""

    num_frames: int = 49  # for video inputs: the video's length (4k+1 frames of it)
    height: int = 480
    width: int = 720
    num_inference_steps: int = 50
    guidance_scale: float = 6.0
    fps: int = 8


DEFAULTS = GenerateDefaults()
# `cogvx generate` without --model runs the tiny demo model: sizes that take seconds on a CPU.
DEMO_DEFAULTS = GenerateDefaults(num_frames=9, height=96, width=128, num_inference_steps=10)


def default_dtype(device: torch.device, preset_dtype: torch.dtype | None = None) -> torch.dtype:
    """What ``dtype=None`` means: on CUDA the model's own (a preset's, else bfloat16: fp16 overflows in T5
    and in the 5b transformer), on the CPU float32 (bf16 is emulated on CPUs without AVX-512 BF16 / AMX)."""
    import torch

    if torch.device(device).type == "cuda":
        return preset_dtype or torch.bfloat16
    return torch.float32
