"""The owner of the transformer call: the one object that knows how the network is called.

It holds the network (plain, or the per-rank parallel one), the kernel and attention choice, the compile
mode and backend, the compiled forward and the step-cache regions, the shapes already compiled, the
position tables per latent shape and the device the call runs on. The engine, the LoRA methods, the step
cache and the diffusers classes ask it; nothing else holds or rebuilds these.

One rule after any weight or placement change (a LoRA loaded, fused, unfused or re-scaled, q/k/v fused, a
move to another device or dtype): :meth:`Forward.weights_changed`. A compiled graph holds the weights it
saw (frozen into the graph on the CPU), so it rebuilds the compiled forward and the regions alike and
forgets the warm shapes; the next call of each shape compiles again, timed as the "compile" stage.
"""

from __future__ import annotations

import torch

from cogvx.kernels import attention_for

from ..models.positions import Positions, make_positions
from ..models.transformer import CogVideoXTransformer
from ..runtime.compiling import check_compile_mode, compile_module
from ..runtime.profiling import Profile, stage, transformer_flops
from .cached_denoiser import Regions, build_cached_denoiser
from .step_cache import StepCache

__all__ = ["Forward"]


class Forward:
    """The transformer call of an engine (see the module docstring)."""

    def __init__(self, transformer: CogVideoXTransformer, device: torch.device, dtype: torch.dtype):
        self.transformer = transformer
        self.device = device
        self.dtype = dtype
        self.kernels = "torch"  # what the user asked for: "auto", "triton" or "torch"
        self.backend = "torch"  # what runs: "torch" or "triton"
        self.parallel = None  # a cogvx.engine.pipelines.parallel.Parallel when the call spans processes
        self.compile_mode: bool | str = False
        self.compile_backend = "inductor"
        self.compiled = None  # the compiled forward, or None (eager)
        self.regions = Regions(transformer)  # the forward in pieces, for step caching
        self._warm: set[tuple] = set()  # shapes the compiled forward has been compiled for
        self._positions: dict[tuple, Positions] = {}

    @property
    def config(self):
        return self.transformer.config

    @property
    def net(self):
        """The module a step calls: the transformer, or this rank's part of the parallel one."""
        return self.transformer if self.parallel is None else self.parallel.net

    # ------------------------------------------------------------------ choices
    def set_kernels(self, kernels: str, backend: str) -> None:
        """kernels: the user's "auto" / "triton" / "torch"; backend: what ``resolve_backend`` made of it.
        "auto" starts with SDPA for attention and switches per shape where a recorded benchmark on this GPU
        found the fused RoPE flash attention faster (``cogvx.kernels.attention_for``)."""
        self.transformer.set_kernel_backend(backend, "flash" if kernels == "triton" else "sdpa")
        self.kernels, self.backend = kernels, backend

    def set_parallel(self, parallel) -> None:
        self.parallel = parallel
        self.weights_changed()

    def compile(self, mode: bool | str, backend: str = "inductor") -> None:
        """Compile the forward and the step-cache regions (fullgraph, static shapes); ``mode`` False
        goes back to eager."""
        check_compile_mode(mode)
        self.compile_mode, self.compile_backend = mode, backend
        self.weights_changed()

    # ------------------------------------------------------------------ the one rebuild rule
    def weights_changed(self) -> None:
        """Rebuild what holds the weights it saw: the compiled forward and the regions; forget the warm
        shapes. Eager, nothing holds weights and this only forgets."""
        mode, dev, be = self.compile_mode, self.device, self.compile_backend
        self.compiled = compile_module(self.net, mode, dev, be) if mode else None
        self.regions = Regions(self.transformer, mode, dev, be)
        self._warm.clear()

    def to(self, device: torch.device) -> None:
        """Run on ``device`` from now on (the caller moves the modules): the position tables are rebuilt
        there and compiled graphs rebuilt for it."""
        self.device = device
        self._positions.clear()
        self.weights_changed()

    @property
    def warm_shapes(self) -> frozenset:
        """The (batch, input shape, text shape, ofs?, step-cache mode) keys compiled so far."""
        return frozenset(self._warm)

    # ------------------------------------------------------------------ a call
    def positions(self, latent_frames: int, latent_h: int, latent_w: int) -> Positions:
        """Position tables for a latent shape, computed once per shape and kept on the device."""
        key = (latent_frames, latent_h, latent_w)
        if key not in self._positions:
            self._positions[key] = make_positions(self.config, latent_frames, latent_h, latent_w).to(self.device)
        return self._positions[key]

    def model_for(self, plan, text, cond, guidance, positions: Positions, schedule, prof: Profile,
                  step_cache: StepCache | None = None):
        """The transformer call of this plan's shape: eager or compiled (compiled once per shape, timed
        apart as the "compile" stage), or with a step cache, a :class:`CachedDenoiser` over the regions
        (compiled per region); sets the FLOP count and shape of the profile."""
        batch = plan.n * guidance.copies  # this rank's model batch
        nv = positions.grid[0] * positions.grid[1] * positions.grid[2]
        whole = plan.n * (2 if guidance.enabled else 1)  # the whole job's, on every rank
        prof.flops_per_step = transformer_flops(self.config, whole, text.shape[1], nv)
        prof.shape = dict(batch=whole, latent_frames=plan.shape[1], latent_height=plan.shape[3],
                          latent_width=plan.shape[4], text_tokens=text.shape[1], video_tokens=nv)
        if self.kernels == "auto" and self.device.type == "cuda":
            attn = attention_for(self.device, self.config.num_attention_heads, text.shape[1] + nv, self.dtype)
            self.transformer.set_kernel_backend(self.backend, attn)
        model = self.net if self.compiled is None else self.compiled
        warm_up = model
        if step_cache is not None:
            model = build_cached_denoiser(self.regions, step_cache, schedule, cond, self.dtype)
            warm_up = model.warm_up
        if self.compiled is None:
            return model
        x = cond.model_input(cond.latents)
        key = (batch, tuple(x.shape[1:]), tuple(text.shape[1:]), cond.ofs is not None,
               step_cache.mode if step_cache is not None else None)
        if key not in self._warm:
            # First call of a compiled shape: compile here, timed apart from the steps.
            with stage(prof, "compile", self.device):
                t = schedule.timesteps(self.device)[cond.start].expand(batch)
                warm_up(guidance.expand(x), text, t, positions, cond.ofs)
            self._warm.add(key)
        return model
