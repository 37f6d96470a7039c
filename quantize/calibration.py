"""Sample inputs for recipes with static activation scales (``quanto-w8a8``).

quanto's W8A8 quantizes each Linear's input with one scale fixed at quantization time, measured
over whatever runs through the model while it calibrates. A ``calibrate(module)`` function runs
what a generation runs; the model side (the transformer on seeded noise at its native latent size,
a classifier-free guidance batch of these prompts, timesteps spread over the schedule) is built by
the engine, which knows the model; the text encoder's is here: the stock prompts, encoded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["CALIBRATION_PROMPTS", "text_encoder_calibration"]

CALIBRATION_PROMPTS = (
    "",
    "A panda, dressed in a small red jacket, strums an acoustic guitar in a serene bamboo forest.",
    "A drone shot of waves crashing against rugged cliffs at sunset, golden light on the water.",
)


def text_encoder_calibration(input_ids: torch.Tensor) -> Callable[[nn.Module], None]:
    """A ``calibrate(text_encoder)`` encoding the token ids [B, L] (e.g. of CALIBRATION_PROMPTS)."""

    def calibrate(model: nn.Module) -> None:
        model(input_ids=input_ids.to(model.device))

    return calibrate
