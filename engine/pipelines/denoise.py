"""The one denoising loop every task shares.

Host-side schedule: the loop never reads a tensor value (no host sync); the timesteps, the guidance
weights and the scheduler's coefficients are Python numbers computed before it starts, and step times
come from CUDA events read once at the end. What differs between tasks enters through
:class:`~cogvx.engine.pipelines.conditioning.Conditioned` (initial latents, concatenated channels, ofs,
first step); classifier-free guidance through :class:`~cogvx.engine.pipelines.guidance.Guidance`.
With a step cache the model is a :class:`~cogvx.engine.pipelines.cached_denoiser.CachedDenoiser`, which
decides per call; in first-block mode it reads one scalar per step that may be reused (its only sync).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from ..models.positions import Positions
from ..models.schedulers import Schedule
from ..runtime.profiling import StepClock
from .conditioning import Conditioned
from .guidance import Guidance

__all__ = ["denoise", "Denoiser", "NonFiniteWarning", "NonFiniteError"]

# model(latents [B, F, C(+C'), h, w], text [B, Nt, Dtext], timestep [B], positions, ofs) -> prediction
Denoiser = Callable[..., torch.Tensor]


class NonFiniteWarning(RuntimeWarning):
    """The latents turned NaN or inf during denoising."""


class NonFiniteError(FloatingPointError):
    """The latents turned NaN or inf during denoising (``check_finite="raise"``)."""


def denoise(model: Denoiser, scheduler, schedule: Schedule, cond: Conditioned, text: torch.Tensor,
            guidance: Guidance, positions: Positions, *, generator=None, callback=None, callback_owner=None,
            clock: StepClock | None = None, dtype: torch.dtype, check_finite: str = "warn") -> torch.Tensor:
    """Run steps ``cond.start .. len(schedule) - 1``; returns the denoised latents [N, F, C, h, w].

    ``callback(owner, k, t, {"latents": x})`` runs after each step (k counts the steps run) and may
    return {"latents": replacement} (same shape, floating, finite; checking that reads the tensor, so
    a callback that returns latents costs a host sync). ``check_finite``: "warn" (default) or "raise"
    when the latents turn non-finite, naming the first such step: tracked on the device (a reduction
    per step, no sync) and read once after the loop; "off" skips it.
    """
    latents = cond.latents
    batch = latents.shape[0] * guidance.copies
    timesteps = schedule.timesteps(latents.device)
    state = None
    steps = range(cond.start, len(schedule))
    first_bad = torch.full((), len(steps), device=latents.device, dtype=torch.int64)
    if clock is not None:
        clock.start()
    for k, i in enumerate(steps):
        x = cond.model_input(latents)
        pred = model(guidance.expand(x), text, timesteps[i].expand(batch), positions, cond.ofs).float()
        pred = guidance.combine(pred, k)
        latents, state = scheduler.step(i, pred, latents, state, generator=generator, schedule=schedule)
        latents = latents.to(dtype)
        if check_finite != "off":
            first_bad = torch.where(torch.isfinite(latents).all(), first_bad, first_bad.clamp(max=k))
        if callback is not None:
            latents = _callback_latents(callback(callback_owner, k, schedule.timesteps_host[i], {"latents": latents}),
                                        latents, k)
        if clock is not None:
            clock.tick()
    if check_finite != "off" and (bad := int(first_bad)) < len(steps):
        msg = (f"the latents turned NaN or inf at denoising step {bad} of {len(steps)}: the video will be black. "
               "Likely causes: float16 overflow (use bfloat16), a quantization recipe, or extreme guidance")
        if check_finite == "raise":
            raise NonFiniteError(msg)
        warnings.warn(msg, NonFiniteWarning, stacklevel=3)
    return latents


def _callback_latents(out, latents: torch.Tensor, k: int) -> torch.Tensor:
    """The latents a step callback hands back: unchanged for None or a dict without "latents"."""
    if out is None:
        return latents
    if not isinstance(out, dict):
        raise TypeError(f"callback_on_step_end must return None or a dict (got {type(out).__name__} at step {k})")
    if "latents" not in out:
        return latents
    new = out["latents"]
    if not isinstance(new, torch.Tensor) or new.shape != latents.shape or not new.is_floating_point():
        got = f"{new.dtype} {tuple(new.shape)}" if isinstance(new, torch.Tensor) else type(new).__name__
        raise ValueError(f"callback_on_step_end returned latents {got} at step {k}; expected a float tensor of "
                         f"shape {tuple(latents.shape)}")
    if new.is_meta:
        raise ValueError(f"callback_on_step_end returned latents on the meta device (no data) at step {k}")
    if not bool(torch.isfinite(new).all()):  # the callback already made the host wait
        raise ValueError(f"callback_on_step_end returned latents with NaN or inf values at step {k}")
    return new.to(latents.device, latents.dtype)

