"""What each task puts into the one denoising loop: the initial latents, the channels concatenated to
the model input every step, the extra model inputs (ofs), and the first step.

    text-to-video   noise
    image-to-video  noise; concatenated: the image's latents in frame 0, zeros after (ofs 2.0 for 1.5)
    video-to-video  the video's latents noised to the first step's timestep; the schedule starts part-way
    control video   noise; concatenated: the control video's latents

Each follows its diffusers pipeline (``CogVideoX{ImageToVideo,VideoToVideo,FunControl}Pipeline``)
operation for operation, including the order in which the generator is drawn from (image and video
latents are sampled from the VAE's distribution with the generator before the noise is drawn; control
latents take the distribution's mode, after the noise), so a seed reproduces diffusers' result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.noise import randn_like_diffusers
from ..models.schedulers import Schedule
from ..models.tasks import TASKS
from ..models.vae import CogVideoXVAE, scale_latents
from .request import Plan

__all__ = ["Conditioned", "CONDITIONING", "condition", "first_step"]


@dataclass
class Conditioned:
    """The loop's inputs for one call.

    latents: initial latents [N, F, C, h, w] (scaled by the scheduler's init sigma), engine dtype.
    concat: [N, F, C', h, w] concatenated to the latents along channels each step, or None.
    ofs: [1] extra model input of CogVideoX 1.5 I2V (2.0, as diffusers passes), or None.
    start: index of the first step of the schedule that runs (video-to-video skips the first ones).
    """

    latents: torch.Tensor
    concat: torch.Tensor | None
    ofs: torch.Tensor | None
    start: int

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        """The transformer's input for ``latents`` [N, F, C, h, w]: with ``concat`` joined along channels."""
        return latents if self.concat is None else torch.cat([latents, self.concat], dim=2)


def first_step(schedule: Schedule, task: str, strength: float) -> int:
    """The schedule index the loop starts at: 0, or for a task that takes a strength (video-to-video)
    diffusers' ``get_timesteps`` (``n - min(int(n * strength), n)``)."""
    n = schedule.num_inference_steps
    return n - min(int(n * strength), n) if TASKS[task].takes_strength else 0


def _encode(vae: CogVideoXVAE, pixels: list[torch.Tensor], generator, sample: bool, dtype) -> torch.Tensor:
    """VAE latents [N, F_lat, C, h, w] of each video (or image) [3, (F,) H, W] in [-1, 1], encoded one at a
    time as diffusers does; sampled from the distribution with the generator, or its mode."""
    w = vae.decoder.conv_out.conv.weight
    out = []
    for i, px in enumerate(pixels):
        x = px.to(w.device, w.dtype)
        x = (x[:, None] if x.ndim == 3 else x)[None]  # [1, 3, F, H, W]
        dist = vae.encode(x)
        gen = generator[i] if isinstance(generator, list) and len(generator) > 1 else generator
        out.append(dist.sample(gen) if sample else dist.mode())
    return torch.cat(out).to(dtype).permute(0, 2, 1, 3, 4)


def _text_to_video(plan, vae, scheduler, schedule, start, noise, latents, generator, device, dtype):
    return (noise() if latents is None else latents.to(device, dtype)), None


def _image_to_video(plan, vae, scheduler, schedule, start, noise, latents, generator, device, dtype):
    shape = plan.shape
    img = scale_latents(_encode(vae, plan.pixels, generator, True, dtype), vae.config)  # [N, 1, C, h, w]
    pad = torch.zeros((shape[0], shape[1] - 1, *img.shape[2:]), device=device, dtype=dtype)
    concat = torch.cat([img.to(device), pad], dim=1)
    return (noise() if latents is None else latents.to(device, dtype)), concat


def _video_to_video(plan, vae, scheduler, schedule, start, noise, latents, generator, device, dtype):
    if latents is not None:
        return latents.to(device, dtype), None
    # diffusers multiplies by the scaling factor here for every version (no invert_scale_latents)
    init = _encode(vae, plan.pixels, generator, True, dtype).to(device) * vae.config.scaling_factor
    return scheduler.add_noise(init, noise(), schedule.timesteps_host[start]), None


def _control_video(plan, vae, scheduler, schedule, start, noise, latents, generator, device, dtype):
    x = noise() if latents is None else latents.to(device, dtype)
    return x, (_encode(vae, plan.pixels, None, False, dtype) * vae.config.scaling_factor).to(device)


# task name (cogvx.engine.models.tasks.TASKS) -> (initial latents, concatenated channels or None)
CONDITIONING = {"t2v": _text_to_video, "i2v": _image_to_video, "v2v": _video_to_video, "control": _control_video}


def condition(plan: Plan, *, vae: CogVideoXVAE | None, scheduler, schedule: Schedule, generator,
              latents: torch.Tensor | None, ofs_dim: int | None, device: torch.device, dtype: torch.dtype) -> Conditioned:
    """Build the loop inputs of a checked plan (encodes conditioning pixels with the VAE)."""
    start = first_step(schedule, plan.task, plan.strength)
    ofs = torch.full((1,), 2.0, device=device, dtype=dtype) if ofs_dim else None

    def noise() -> torch.Tensor:
        return randn_like_diffusers(plan.shape, generator, device, dtype)

    x, concat = CONDITIONING[plan.task](plan, vae, scheduler, schedule, start, noise, latents, generator, device, dtype)
    return Conditioned(latents=x * scheduler.init_noise_sigma, concat=concat, ofs=ofs, start=start)
