"""The transformer call of one generate: eager, compiled (each shape compiled once, on its first call, timed
apart as the "compile" stage), or a step cache's :class:`CachedDenoiser` over the forward's regions."""

from __future__ import annotations

from cogvx.kernels import attention_for

from ..runtime.profiling import Profile, stage, transformer_flops
from .cached_denoiser import build_cached_denoiser
from .step_cache import StepCache

__all__ = ["model_for"]


def model_for(engine, plan, text, cond, guidance, positions, schedule, prof: Profile,
              step_cache: StepCache | None = None):
    """The transformer call of this plan's shape: eager or compiled (compiled once per shape, timed
    apart as the "compile" stage), or with a step cache, a :class:`CachedDenoiser` over the forward's
    regions (compiled per region); sets the FLOP count and shape of the profile."""
    batch = plan.n * guidance.copies  # this rank's model batch
    nv = positions.grid[0] * positions.grid[1] * positions.grid[2]
    whole = plan.n * (2 if guidance.enabled else 1)  # the whole job's, on every rank
    prof.flops_per_step = transformer_flops(engine.config, whole, text.shape[1], nv)
    prof.shape = dict(batch=whole, latent_frames=plan.shape[1], latent_height=plan.shape[3],
                      latent_width=plan.shape[4], text_tokens=text.shape[1], video_tokens=nv)
    if engine.kernels == "auto" and engine.device.type == "cuda":
        attn = attention_for(engine.device, engine.config.num_attention_heads, text.shape[1] + nv, engine.dtype)
        engine.transformer.set_kernel_backend(engine._backend, attn)
    net = engine.transformer if engine.parallel is None else engine.parallel.net
    model = net if engine._compiled is None else engine._compiled
    warm_up = model
    if step_cache is not None:
        model = build_cached_denoiser(engine._regions, step_cache, schedule, cond, engine.dtype)
        warm_up = model.warm_up
    if engine._compiled is None:
        return model
    x = cond.model_input(cond.latents)
    key = (batch, tuple(x.shape[1:]), tuple(text.shape[1:]), cond.ofs is not None,
           step_cache.mode if step_cache is not None else None)
    if key not in engine._warm:
        # First call of a compiled shape: compile here, timed apart from the steps.
        with stage(prof, "compile", engine.device):
            t = schedule.timesteps(engine.device)[cond.start].expand(batch)
            warm_up(guidance.expand(x), text, t, positions, cond.ofs)
        engine._warm.add(key)
    return model
