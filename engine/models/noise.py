"""Gaussian noise drawn exactly as diffusers' ``randn_tensor`` draws it, so that a seed or a
``torch.Generator`` reproduces diffusers' latents, scheduler noise and VAE samples."""

from __future__ import annotations

import torch

__all__ = ["randn_like_diffusers"]


def randn_like_diffusers(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal tensor of ``shape`` on ``device`` (CPU if None) with ``dtype``.

    A CPU generator with a non-CPU ``device`` draws on the CPU and moves the result (same numbers on
    every device); a list of generators draws batch element ``k`` ([1, *shape[1:]]) from
    ``generator[k]``; a list of one generator is that generator.
    """
    device = torch.device(device) if isinstance(device, str) else device
    target = device or torch.device("cpu")
    rand_device = device
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, list) else generator).device.type
        if gen_type != target.type and gen_type == "cpu":
            rand_device = torch.device("cpu")
        elif gen_type != target.type and gen_type == "cuda":
            raise ValueError(f"cannot draw a {target} tensor from a {gen_type} generator; "
                             f"use a CPU generator or one on {target}")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for batch size {shape[0]}; pass one per batch element")
        parts = [torch.randn((1, *shape[1:]), generator=g, device=rand_device, dtype=dtype) for g in generator]
        return torch.cat(parts, dim=0).to(target)
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(target)
