"""Classifier-free guidance: the weight of each step and how the two halves of a batch combine."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["guidance_scales", "Guidance", "SplitGuidance"]


def guidance_scales(timesteps_host: list[int] | tuple[int, ...], num_inference_steps: int, guidance_scale: float,
                    use_dynamic_cfg: bool) -> list[float]:
    """Classifier-free guidance weight per step, as the diffusers CogVideoX pipelines compute it.

    Dynamic CFG evaluates diffusers' ``1 + g * (1 - cos(pi * ((n - t) / n) ** 5)) / 2`` with the
    *timestep* t (0..999), not the step index, so it is far from a smooth ramp; it is reproduced as
    is, from host ints, so the loop needs no ``t.item()``. ``num_inference_steps`` is the number of
    steps that run (video-to-video runs fewer than the schedule holds, and diffusers uses that count).
    """
    if not use_dynamic_cfg:
        return [float(guidance_scale)] * len(timesteps_host)
    n = num_inference_steps
    return [1 + guidance_scale * ((1 - math.cos(math.pi * ((n - t) / n) ** 5.0)) / 2) for t in timesteps_host]


@dataclass(frozen=True)
class Guidance:
    """CFG over a batch [uncond; cond] (``enabled``), with one weight per executed step."""

    enabled: bool
    scales: tuple[float, ...]

    @property
    def copies(self) -> int:
        """How many copies of the latents the model input holds."""
        return 2 if self.enabled else 1

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """The model input: [x; x] under CFG (the text batch is [uncond; cond])."""
        return torch.cat([x, x]) if self.enabled else x

    def combine(self, pred: torch.Tensor, k: int) -> torch.Tensor:
        """uncond + w_k * (cond - uncond) of the prediction for [uncond; cond], in its dtype."""
        if not self.enabled:
            return pred
        uncond, cond = pred.chunk(2)
        return uncond + self.scales[k] * (cond - uncond)


@dataclass(frozen=True)
class SplitGuidance(Guidance):
    """CFG with the two halves on different ranks: this rank's model input is its own half (one copy of the
    latents, its half of the text batch), and the model returns both halves' predictions (gathered across
    ranks), which combine as usual."""

    @property
    def copies(self) -> int:
        return 1

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        return x
