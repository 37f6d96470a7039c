"""The call of the diffusers-compatible pipelines: diffusers' ``CogVideoX*Pipeline.__call__`` step for step, on
cogvx's components and transformer call (``engine.forward``: eager or compiled, step cache).

What diffusers' semantics need, and the native ``Engine.generate`` deliberately does not do, is here:
- the guidance weight is read from ``pipe._guidance_scale`` at every step, so a step callback that changes it
  changes the result (``use_dynamic_cfg`` overwrites it each step, as in diffusers);
- ``pipe._interrupt`` set by a callback skips the remaining steps; the callback may read and replace
  "latents", "prompt_embeds" and "negative_prompt_embeds" (``prompt_embeds`` is the CFG batch [uncond; cond]);
- any diffusers scheduler runs through its own ``set_timesteps`` / ``scale_model_input`` / ``step``; cogvx's
  CogVideoX schedulers keep their host-side coefficients;
- ``num_frames`` need not be 4k+1: the latents hold (num_frames - 1) // 4 + 1 frames, as in diffusers.
"""

from __future__ import annotations

import inspect
import math

import torch
from tqdm.auto import tqdm

from ..models.positions import latent_frames
from ..models.tasks import TASKS
from ..runtime.profiling import Profile
from .conditioning import condition
from .diffusers_components import is_cogvx_scheduler
from .guidance import Guidance
from .media import as_list, load_image, load_video
from .output import OUTPUT_TYPES, postprocess
from .request import Plan

__all__ = ["run_call", "CALLBACK_TENSOR_INPUTS"]

CALLBACK_TENSOR_INPUTS = ["latents", "prompt_embeds", "negative_prompt_embeds"]


class _ForeignSchedule:
    """What cogvx's conditioning and transformer call read of a schedule, for a diffusers scheduler."""

    def __init__(self, scheduler, timesteps: torch.Tensor, num_inference_steps: int, batch: int):
        self.scheduler, self.timesteps_all, self.num_inference_steps = scheduler, timesteps, num_inference_steps
        self.timesteps_host = [float(t) for t in timesteps]
        self.init_noise_sigma = scheduler.init_noise_sigma
        self.batch = batch
        self.start = 0

    def __len__(self) -> int:
        return len(self.timesteps_all)

    def timesteps(self, device=None) -> torch.Tensor:
        return self.timesteps_all.to(device)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, _t) -> torch.Tensor:
        t = self.timesteps_all[self.start:self.start + 1].repeat(self.batch)  # diffusers' latent_timestep
        return self.scheduler.add_noise(original, noise, t)


def _check_inputs(pipe, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width, tensor_inputs,
                  output_type):
    if height % 8 != 0 or width % 8 != 0:
        raise ValueError(f"`height` and `width` have to be divisible by 8 but are {height} and {width}.")
    bad = [k for k in tensor_inputs or () if k not in CALLBACK_TENSOR_INPUTS]
    if bad:
        raise ValueError(f"`callback_on_step_end_tensor_inputs` has to be in {CALLBACK_TENSOR_INPUTS}, but found {bad}")
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("Cannot forward both `prompt` and `prompt_embeds`: pass only one of them")
    if prompt is None and prompt_embeds is None:
        raise ValueError("Provide either `prompt` or `prompt_embeds`; cannot leave both undefined")
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise ValueError(f"`prompt` has to be of type `str` or `list` but is {type(prompt)}")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("Cannot forward both `negative_prompt` and `negative_prompt_embeds`: pass only one of them")
    if prompt_embeds is not None and negative_prompt_embeds is not None and \
            prompt_embeds.shape != negative_prompt_embeds.shape:
        raise ValueError(f"`prompt_embeds` and `negative_prompt_embeds` must have the same shape (got "
                         f"{tuple(prompt_embeds.shape)} and {tuple(negative_prompt_embeds.shape)})")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))} (got {output_type!r})")
    if pipe.engine is None:
        raise ValueError("this pipeline was built without a transformer: it can only encode_prompt(); pass "
                         "transformer=, vae= and scheduler= to generate")


def _timesteps(scheduler, n: int, timesteps, device, batch: int):
    """(schedule, its first index for the steps that run) of cogvx's scheduler or a diffusers one."""
    if is_cogvx_scheduler(scheduler):
        if timesteps is not None:
            raise ValueError("custom timesteps are not supported by CogVideoX's schedulers (nor in diffusers); pass "
                             "num_inference_steps")
        return scheduler.schedule(n)
    if timesteps is not None:
        if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
            raise ValueError(f"The current scheduler class {type(scheduler)}'s `set_timesteps` does not support custom "
                             "timestep schedules. Please check whether you are using the correct scheduler.")
        scheduler.set_timesteps(timesteps=timesteps, device=device)
        n = len(scheduler.timesteps)
    else:
        scheduler.set_timesteps(n, device=device)
    return _ForeignSchedule(scheduler, scheduler.timesteps, n, batch)


def _step_kwargs(scheduler, generator, eta) -> dict:
    params = set(inspect.signature(scheduler.step).parameters)
    return {k: v for k, v in (("eta", eta), ("generator", generator)) if k in params}


def _pixels(task, b, height, width, image, video, control_video):
    if task == "i2v":  # a list of images is one per prompt (a list of PIL images is one video elsewhere)
        images = list(image) if isinstance(image, (list, tuple)) else [image] * b
        if len(images) != b:
            raise ValueError(f"image is a list of {len(images)} but there are {b} prompt(s); give one image per "
                             "prompt, or a single image for all of them")
        return [load_image(x, height, width) for x in images]
    if task in ("v2v", "control"):
        what = "video" if task == "v2v" else "control_video"
        return [load_video(v, None, height, width, what) for v in as_list(video if task == "v2v" else control_video,
                                                                        b, what)]
    return None


@torch.no_grad()
def run_call(pipe, task: str, *, prompt, negative_prompt, height, width, num_frames, num_inference_steps, timesteps,
             guidance_scale, use_dynamic_cfg, eta, generator, latents, prompt_embeds, negative_prompt_embeds,
             output_type, callback_on_step_end, callback_on_step_end_tensor_inputs, max_sequence_length,
             strength=None, image=None, video=None, control_video=None):
    """One pipeline call with diffusers' semantics; returns the frames per ``output_type`` (latents for "latent")."""
    e = pipe.engine
    cfg = e.config if e is not None else None
    if hasattr(callback_on_step_end, "tensor_inputs"):  # diffusers' PipelineCallback objects
        callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
    if e is not None:
        height = height or cfg.sample_height * e.spatial_compression
        width = width or cfg.sample_width * e.spatial_compression
    _check_inputs(pipe, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width,
                  callback_on_step_end_tensor_inputs, output_type)
    pipe._guidance_scale, pipe._current_timestep, pipe._interrupt = guidance_scale, None, False
    b = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
    do_cfg = guidance_scale > 1.0
    device, dtype = e.device, e.dtype
    pixels = _pixels(task, b, height, width, image, video, control_video)  # a bad file fails before model work
    if task == "v2v" and latents is None:
        num_frames = pixels[0].shape[1]
    elif task == "control":
        num_frames = pixels[0].shape[1]
    elif latents is not None and task == "v2v":
        num_frames = (latents.shape[1] - 1) * e.temporal_compression + 1
    num_frames = num_frames or cfg.sample_frames
    pe, ne = pipe.encode_prompt(prompt, negative_prompt, do_cfg, 1, prompt_embeds, negative_prompt_embeds,
                                max_sequence_length, device, dtype)
    if do_cfg:
        pe = torch.cat([ne, pe], dim=0)
    sched = pipe.scheduler
    schedule = _timesteps(sched, num_inference_steps, timesteps, device, b)
    n = schedule.num_inference_steps
    start = n - min(int(n * strength), n) if task == "v2v" else 0  # diffusers' get_timesteps
    ts = schedule.timesteps(device)[start * sched.order:]
    n_run = n - start
    pipe._num_timesteps = len(ts)
    f_lat, extra = latent_frames(cfg, num_frames, e.temporal_compression)
    shape = (b, f_lat, cfg.out_channels_, height // e.spatial_compression, width // e.spatial_compression)
    plan = Plan(task=task, steps=n, b=b, videos_per_prompt=1, cfg=do_cfg, num_frames=num_frames, height=height,
                width=width, shape=shape, extra=extra, seed=None, max_length=pe.shape[1],
                strength=1.0 if strength is None else float(strength), pixels=pixels)
    foreign = not is_cogvx_scheduler(sched)
    if foreign:
        schedule.start = start * sched.order
    with e.lock, e.residency.session() as stages:  # each stage asks the residency for its component (offload)
        stages.stage("vae" if TASKS[task].vae_encodes else None)
        cond = condition(plan, vae=e.vae, scheduler=schedule if foreign else sched, schedule=schedule,
                         generator=generator, latents=latents, ofs_dim=cfg.ofs_embed_dim, device=device, dtype=dtype)
        stages.stage("transformer")
        guidance = Guidance(do_cfg, ())
        positions = e.forward.positions(shape[1], shape[3], shape[4])
        step_cache = getattr(e.transformer, "step_cache", None)
        model = e.forward.model_for(plan, pe, cond, guidance, positions, schedule, Profile(), step_cache)
        reuse = getattr(e.transformer, "attention_reuse", None)  # PAB / FasterCache (diffusers_attention_cache)
        model = reuse.denoiser(model) if reuse is not None else model
        x, state = cond.latents, None
        extra_kw = _step_kwargs(sched, generator, eta) if foreign else {}
        bar = tqdm(total=len(ts), **pipe.progress_bar_config)
        try:
            for i, t in enumerate(ts):
                if pipe._interrupt:
                    continue
                pipe._current_timestep = t
                inp = sched.scale_model_input(x, t) if foreign else x
                inp = guidance.expand(cond.model_input(inp))
                pred = model(inp, pe, t.expand(inp.shape[0]), positions, cond.ofs).float()
                if use_dynamic_cfg:
                    pipe._guidance_scale = 1 + guidance_scale * (
                        (1 - math.cos(math.pi * ((n_run - float(t)) / n_run) ** 5.0)) / 2)
                if do_cfg:
                    uncond, text = pred.chunk(2)
                    pred = uncond + pipe.guidance_scale * (text - uncond)
                if foreign:
                    x = sched.step(pred, t, x, **extra_kw, return_dict=False)[0]
                else:
                    x, state = sched.step(start + i, pred, x, state, generator=generator, schedule=schedule)
                x = x.to(pe.dtype)
                if callback_on_step_end is not None:
                    names = {"latents": x, "prompt_embeds": pe, "negative_prompt_embeds": ne}
                    out = callback_on_step_end(pipe, i, t, {k: names[k] for k in callback_on_step_end_tensor_inputs
                                                            or ()}) or {}
                    x = out.pop("latents", x)
                    pe = out.pop("prompt_embeds", pe)
                    ne = out.pop("negative_prompt_embeds", ne)
                bar.update()
        finally:
            bar.close()
            pipe._current_timestep = None
            if reuse is not None:
                reuse.reset()
        stages.stage()  # the transformer goes before the VAE comes (e.decode asks the residency for it)
        if output_type == "latent":
            return x
        return postprocess(e.decode(x[:, extra:]), output_type)
