"""The denoiser a step cache runs: the transformer forward in regions, and a host-side decision per step.

The regions, each a function of its own (compiled on its own, fullgraph, when the engine is compiled):

    first-block  embed + block 0 -> h1, r1 | change(r1, r1 at the last computed step) | blocks 1.. | head
    teacache     embed -> x               |                                           | blocks 0.. | head

A computed step runs all of them and keeps the residual of the blocks region (its output minus its
input); a reused step adds that residual to the first region's output (one elementwise add) and runs
the head. The decision is plain Python between regions, so no compiled graph holds a branch on a
tensor value (no graph break) and every region sees the same shapes on every step and every call of
a shape (no recompilation).

Host syncs: first-block reads one scalar (the change) per step that may be reused (after the warm-up
steps, before the cool-down steps, threshold > 0); on CUDA the host waits there for that step's
first block, so the launches of the rest of the step do not run ahead. That read is the only sync in
the loop. TeaCache's indicator depends on the timestep alone: it is computed for every step of the
call in one time-embedding call before the loop and read once, so the loop itself makes no read.
"""

from __future__ import annotations

import types

import numpy as np
import torch

from ..models.transformer import CogVideoXTransformer
from ..runtime.compiling import compile_module
from ..runtime.profiling import Profile, block_flops
from .conditioning import Conditioned
from .step_cache import StepCache, teacache_coefficients

__all__ = ["Regions", "CachedDenoiser", "build_cached_denoiser", "relative_l1", "teacache_indicator"]


# One function per region: torch.compile keys its graphs by code object, so regions that share code
# with different constant arguments would recompile each other.
def _embed_first_block(model, latents, text, timestep, positions, ofs):
    x, silu_temb = model.embed(latents, text, timestep, positions, ofs)
    h = model.blocks(x, silu_temb, positions, text.shape[1], 0, 1)
    return h, silu_temb, h - x


def _embed(model, latents, text, timestep, positions, ofs):
    return model.embed(latents, text, timestep, positions, ofs)


def _blocks_after_first(model, h, silu_temb, positions, n_text: int):
    out = model.blocks(h, silu_temb, positions, n_text, 1)
    return out, out - h


def _all_blocks(model, x, silu_temb, positions, n_text: int):
    out = model.blocks(x, silu_temb, positions, n_text, 0)
    return out, out - x


def _head(model, h, silu_temb, n_text: int, latent_shape):
    return model.head(h, silu_temb, n_text, latent_shape)


def _own_copy(fn):
    """``fn`` with a code object of its own. dynamo keeps compiled graphs on the code object, and it does not
    guard on the forward hooks a LoRA adds, so regions compiled after a weight change would otherwise find
    and run the graphs (with the frozen weights) of the regions before them."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def relative_l1(a: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """mean|a - prev| / mean|prev| over every element (the whole batch), a 0-d fp32 tensor (the means
    accumulate in fp32 without an fp32 copy of the [B, S, D] inputs)."""
    return (a - prev).abs().mean(dtype=torch.float32) / prev.abs().mean(dtype=torch.float32)


class Regions:
    """The region functions on one transformer, eager or each compiled (fullgraph, static shapes)."""

    def __init__(self, model: CogVideoXTransformer, compile_mode: bool | str = False, device=None,
                 backend: str = "inductor"):
        self.model = model
        fns = dict(embed_first_block=_embed_first_block, embed=_embed, blocks_after_first=_blocks_after_first,
                   all_blocks=_all_blocks, head=_head, change=relative_l1)
        if compile_mode:
            fns = {k: compile_module(_own_copy(f), compile_mode, device, backend) for k, f in fns.items()}
        self._fns = fns

    def embed_first_block(self, latents, text, timestep, positions, ofs):
        """(block 0's output h1 [B, S, D], SiLU(temb), block 0's residual h1 - x)."""
        return self._fns["embed_first_block"](self.model, latents, text, timestep, positions, ofs)

    def embed(self, latents, text, timestep, positions, ofs):
        """(joint tokens x [B, S, D], SiLU(temb))."""
        return self._fns["embed"](self.model, latents, text, timestep, positions, ofs)

    def blocks_after_first(self, h, silu_temb, positions, n_text: int):
        """(blocks 1.. on h, their residual)."""
        return self._fns["blocks_after_first"](self.model, h, silu_temb, positions, n_text)

    def all_blocks(self, x, silu_temb, positions, n_text: int):
        """(every block on x, their residual)."""
        return self._fns["all_blocks"](self.model, x, silu_temb, positions, n_text)

    def head(self, h, silu_temb, n_text: int, latent_shape):
        return self._fns["head"](self.model, h, silu_temb, n_text, latent_shape)

    def change(self, a, prev):
        return self._fns["change"](a, prev)


class CachedDenoiser:
    """Called by the denoising loop as the transformer is, ``model(x, text, t, positions, ofs)``, once
    per step (built for one generate call); decides per call whether to run every block.

    Records per step whether it was computed or reused and the indicator compared with the threshold
    (None where no decision was taken); :meth:`report` puts them in the call's profile.
    """

    def __init__(self, regions: Regions, cache: StepCache, num_steps: int, rescaled: list[float] | None = None,
                 coefficients_name: str | None = None):
        self.regions, self.cache, self.num_steps = regions, cache, num_steps
        self.first_block = cache.mode == "first-block"
        self._rescaled = rescaled  # teacache: the rescaled change of each step's time embedding
        self._coefficients_name = coefficients_name
        self._residual = None  # output minus input of the skippable blocks, at the last computed step
        self._probe = None  # first-block: block 0's residual at the last computed step
        self._sum = 0.0  # teacache: rescaled changes since the last computed step
        self._fresh = False  # the latents were replaced: the next step is computed
        self._k = 0
        self.computed: list[int] = []
        self.reused: list[int] = []
        self.indicator: list[float | None] = []
        self.host_reads = 0

    def __call__(self, latents, text, timestep, positions, ofs=None) -> torch.Tensor:
        c, r, k = self.cache, self.regions, self._k
        self._k += 1
        may_reuse = (self._residual is not None and not self._fresh and c.threshold > 0
                     and c.warmup_steps <= k < self.num_steps - c.cooldown_steps)
        self._fresh = False
        n_text = text.shape[1]
        value = None
        if self.first_block:
            h, silu_temb, probe = r.embed_first_block(latents, text, timestep, positions, ofs)
            if may_reuse:
                value = float(r.change(probe, self._probe))  # the step's one host read
                self.host_reads += 1
            reuse = value is not None and value < c.threshold
            if not reuse:
                self._probe = probe
        else:
            h, silu_temb = r.embed(latents, text, timestep, positions, ofs)
            if may_reuse:
                self._sum += self._rescaled[k]
                value = self._sum
            reuse = value is not None and value < c.threshold
            if not reuse:
                self._sum = 0.0
        self.indicator.append(value)
        if reuse:
            self.reused.append(k)
            h = h + self._residual
        else:
            self.computed.append(k)
            h, self._residual = (r.blocks_after_first if self.first_block else r.all_blocks)(
                h, silu_temb, positions, n_text)
        return r.head(h, silu_temb, n_text, latents.shape)

    def warm_up(self, latents, text, timestep, positions, ofs=None) -> None:
        """Run every region once (compiling them for this shape) without touching the cache state."""
        r = self.regions
        n_text = text.shape[1]
        if self.first_block:
            h, silu_temb, probe = r.embed_first_block(latents, text, timestep, positions, ofs)
            out, _ = r.blocks_after_first(h, silu_temb, positions, n_text)
            r.change(probe, out)
        else:
            h, silu_temb = r.embed(latents, text, timestep, positions, ofs)
            out, _ = r.all_blocks(h, silu_temb, positions, n_text)
        r.head(out, silu_temb, n_text, latents.shape)

    def watch(self, callback):
        """``callback`` as the loop calls it, noting when it hands back replacement latents."""
        if callback is None:
            return None

        def watched(owner, k, t, kwargs):
            out = callback(owner, k, t, kwargs)
            if isinstance(out, dict) and out.get("latents") is not None and out["latents"] is not kwargs["latents"]:
                self._fresh = True
            return out

        return watched

    def report(self, profile: Profile) -> None:
        """Which steps were computed and reused, the indicators, and the FLOPs the skipped blocks would
        have cost (``profile.shape`` and ``flops_per_step`` must be set)."""
        cfg = self.regions.model.config
        s = profile.shape
        skipped = cfg.num_layers - (1 if self.first_block else 0)
        profile.step_cache = dict(self.cache.to_dict(), indicator=self.indicator, host_reads=self.host_reads)
        if not self.first_block:
            profile.step_cache["coefficients"] = self._coefficients_name
        profile.steps_computed = list(self.computed)
        profile.steps_reused = list(self.reused)
        profile.flops_saved = len(self.reused) * skipped * block_flops(cfg, s["batch"], s["text_tokens"],
                                                                       s["video_tokens"])


@torch.no_grad()
def teacache_indicator(model: CogVideoXTransformer, timesteps: torch.Tensor, ofs: torch.Tensor | None,
                       dtype: torch.dtype, coefficients) -> list[float]:
    """TeaCache's rescaled change per step: poly(mean|e_k - e_{k-1}| / mean|e_{k-1}|) of the time embedding
    e_k of each timestep [n] (in the model dtype, as the model computes it), read to the host once;
    nan for step 0, which has no predecessor."""
    e = model.time_embed(timesteps, ofs, dtype).float()
    rel = ((e[1:] - e[:-1]).abs().mean(dim=1) / e[:-1].abs().mean(dim=1)).double().cpu().numpy()
    return [float("nan")] + [float(v) for v in np.polyval(np.asarray(coefficients, dtype=np.float64), rel)]


def build_cached_denoiser(regions: Regions, cache: StepCache, schedule, cond: Conditioned,
                          dtype: torch.dtype) -> CachedDenoiser:
    """The cached denoiser of one generate call (the steps ``cond.start ..`` of ``schedule``)."""
    n = len(schedule) - cond.start
    if cache.mode == "first-block":
        return CachedDenoiser(regions, cache, n)
    model = regions.model
    name, coefficients = ("custom", cache.coefficients) if cache.coefficients is not None else \
        teacache_coefficients(model.config)
    timesteps = schedule.timesteps(cond.latents.device)[cond.start:]
    return CachedDenoiser(regions, cache, n, teacache_indicator(model, timesteps, cond.ofs, dtype, coefficients),
                          name)
