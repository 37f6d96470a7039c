"""The public entry point: ``Engine.load`` once, then ``engine.generate`` as often as needed."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from cogvx.kernels import attention_for, resolve_backend

from .compiling import compile_transformer, use_cache_dir
from .config import TransformerConfig
from .loader import load_components, resolve_model_dir
from .positions import Positions, latent_frames, make_positions
from .profiling import PeakMemory, Profile, stage, transformer_flops
from .schedulers import guidance_scales, randn_like_diffusers
from .text_encoder import MAX_LENGTH, PromptTokenizer, check_vocab, encode_ids
from .transformer import CogVideoXTransformer
from .vae import unscale_latents
from .validation import check_prompts, check_sampling, check_video_shape, resolve_device, resolve_dtype
from .video import OUTPUT_TYPES, postprocess, write_mp4

__all__ = ["Engine", "GenerationResult"]

log = logging.getLogger(__name__)

@dataclass
class GenerationResult:
    """What ``Engine.generate`` returns.

    latents: denoised latents [B, F_lat, C, H/8, W/8] in the engine dtype (for CogVideoX 1.5 the
    padding frame the model needs is already dropped, as the diffusers pipeline does before decoding).
    frames: the decoded videos in diffusers' conventions: "np" float32 [B, F, H, W, 3] in [0, 1],
    "pt" [B, F, 3, H, W], "pil" a list of frame lists; None for output_type="latent".
    profile: wall seconds per stage and per step, compile time, peak memory, achieved FLOP/s
    (``profile.table()``, ``profile.to_json()``).
    """

    latents: torch.Tensor
    frames: Any = None
    output_type: str = "latent"
    timesteps: list[int] = field(default_factory=list)
    guidance_scales: list[float] = field(default_factory=list)
    profile: Profile = field(default_factory=Profile)

    @property
    def timings(self) -> dict[str, float]:
        """Wall seconds per stage (``profile.stages``)."""
        return self.profile.stages

    def save(self, path: str | os.PathLike, fps: float = 8, all_videos: bool = False) -> list[Path]:
        """Write the first video to ``path`` as mp4 (or, with ``all_videos``, each as path_0.mp4, path_1.mp4, ...).

        If writing fails, the frames are saved to a temporary file and the raised
        :class:`~cogvx.engine.video.VideoWriteError` names it: a finished generation is never lost.
        """
        if self.frames is None:
            raise ValueError("this result holds latents only (output_type='latent'); generate with "
                             "output_type='np' (the default) to get frames to save")
        p = Path(path)
        videos = list(self.frames) if all_videos else [self.frames[0]]
        t0 = time.perf_counter()
        if len(videos) == 1:
            out = [write_mp4(p, videos[0], fps)]
        else:
            out = [write_mp4(p.with_name(f"{p.stem}_{i}{p.suffix}"), v, fps) for i, v in enumerate(videos)]
        self.profile.stages["save"] = time.perf_counter() - t0
        return out


class Engine:
    """A loaded CogVideoX text-to-video model.

    Build with :meth:`Engine.load`; components are loaded once and reused by every ``generate``.
    """

    def __init__(self, *, transformer: CogVideoXTransformer, scheduler, tokenizer: PromptTokenizer | None,
                 text_encoder, vae=None, device: torch.device, dtype: torch.dtype, model_dir: Path | None = None,
                 recipes: dict[str, str] | None = None):
        self.transformer = transformer
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.dtype = dtype
        self.model_dir = model_dir
        self.vae = vae
        self.recipes = dict(recipes or {})  # component -> quantization recipe name
        # Every CogVideoX VAE compresses 4x in time and 8x in space.
        self.temporal_compression = vae.config.temporal_compression_ratio if vae is not None else 4
        self.spatial_compression = vae.config.spatial_scale if vae is not None else 8
        self._positions: dict[tuple, Positions] = {}
        self.kernels, self._backend = "torch", "torch"
        self._compiled = None  # the compiled transformer forward, when Engine.load(compile=...)
        self._warm: set[tuple] = set()  # shapes the compiled forward has already been compiled for
        if tokenizer is not None and text_encoder is not None:
            check_vocab(tokenizer, text_encoder)

    @property
    def config(self) -> TransformerConfig:
        return self.transformer.config

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        model: str | os.PathLike,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype = torch.float32,
        *,
        fuse_qkv: bool = False,
        scheduler: str | None = None,
        recipe: str | dict[str, str] | None = None,
        kernels: str = "auto",
        compile: bool | str = False,
        compile_cache_dir: str | os.PathLike | None = None,
    ) -> "Engine":
        """Load every component of a diffusers-layout CogVideoX checkpoint.

        model: a local directory (with model_index.json) or a hub id already in the local
            Hugging Face cache (nothing is downloaded).
        device: "cpu", "cuda" or "cuda:N"; dtype: torch.float32 / bfloat16 / float16 (or their names).
        fuse_qkv: fuse each attention's q/k/v projections into one GEMM after loading.
        scheduler: override the checkpoint's scheduler class ("CogVideoXDDIMScheduler" or
            "CogVideoXDPMScheduler").
        recipe: a quantization recipe name for the transformer, or {component: recipe name}
            (see ``cogvx recipes``). A quantized checkpoint directory loads as saved, without it.
        kernels: "auto" (Triton fused kernels on CUDA, PyTorch references elsewhere; attention by
            SDPA after the fused QK-norm + RoPE kernel), "triton" (every Triton kernel, the RoPE
            flash-attention included; on the CPU only under TRITON_INTERPRET=1) or "torch".
        compile: False, True or "max-autotune": compile the transformer forward (after quantization)
            with torch.compile(fullgraph=True); each new video shape compiles once, on its first
            generate, timed apart as the "compile" stage.
        compile_cache_dir: inductor's on-disk cache, shared across processes (default
            ~/.cache/cogvx/inductor, or $COGVX_COMPILE_CACHE).
        """
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        model_dir = resolve_model_dir(model)
        if compile not in (False, True, "max-autotune"):
            raise ValueError(f"compile must be False, True or 'max-autotune' (got {compile!r})")
        backend = resolve_backend(kernels, dev)
        parts = load_components(model_dir, dev, dt, fuse_qkv=fuse_qkv, scheduler=scheduler, recipe=recipe)
        return cls(**parts, device=dev, dtype=dt, model_dir=model_dir)._finish(backend, kernels, compile,
                                                                              compile_cache_dir)

    @classmethod
    def from_preset(
        cls,
        preset: str,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        recipe: str | dict[str, str] | None = None,
        kernels: str = "auto",
        compile: bool | str = False,
        compile_cache_dir: str | os.PathLike | None = None,
        text_encoder: bool = True,
        vae: bool = True,
        seed: int = 0,
    ) -> "Engine":
        """A real-shape model (``cogvx.engine.config.PRESETS``) with random weights, built on the device:
        for benchmarks when no checkpoint is on disk. dtype defaults to the preset's on CUDA, float32
        on the CPU; ``text_encoder=False`` / ``vae=False`` leave those out (pass prompt_embeds, and
        output_type="latent")."""
        from .config import get_preset
        from .loader import quantize_text_encoder, quantize_transformer
        from .random_model import random_components

        p = get_preset(preset)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype or (p.dtype if dev.type == "cuda" else torch.float32), dev)
        backend = resolve_backend(kernels, dev)
        if compile not in (False, True, "max-autotune"):
            raise ValueError(f"compile must be False, True or 'max-autotune' (got {compile!r})")
        requested = {}
        if recipe is not None:
            from cogvx.quantize import resolve_recipes

            requested = resolve_recipes(recipe, dev)
        parts = random_components(preset, dev, dt, text_encoder=text_encoder, vae=vae, seed=seed)
        if "text_encoder" in requested:
            quantize_text_encoder(parts["text_encoder"], requested["text_encoder"], parts["tokenizer"])
        if "transformer" in requested:
            quantize_transformer(parts["transformer"], requested["transformer"], parts["tokenizer"],
                                 parts["text_encoder"], dt)
        parts["recipes"] = {c: r.name for c, r in requested.items()}
        return cls(**parts, device=dev, dtype=dt)._finish(backend, kernels, compile, compile_cache_dir)

    def _finish(self, backend: str, kernels: str, compile, compile_cache_dir) -> "Engine":
        # "auto" starts with SDPA for attention and switches per shape where a recorded benchmark on
        # this GPU found the fused RoPE flash attention faster (cogvx.kernels.policy).
        self.transformer.set_kernel_backend(backend, "flash" if kernels == "triton" else "sdpa")
        self.kernels, self._backend = kernels, backend
        if compile:
            self.compile(compile, compile_cache_dir)
        return self

    def compile(self, mode: bool | str = True, cache_dir: str | os.PathLike | None = None, *,
                vae: bool = False) -> None:
        """Compile the transformer forward (fullgraph, static shapes) with a persistent cache.

        vae: also compile the VAE's frame-batch decoder. Off by default: on the 2-core CPU it gained
        nothing (real VAE, 5 latent frames at 64x96: 9.8 s compiled vs 9.5 s eager, after a 95 s
        compile), and it has not been measured on a GPU yet.
        """
        use_cache_dir(cache_dir)
        self._compiled = compile_transformer(self.transformer, mode, self.device)
        self._warm.clear()
        if vae and self.vae is not None:
            self.vae.compile_decoder(mode="max-autotune-no-cudagraphs" if mode == "max-autotune" else None)

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_frames: int = 49,
        height: int = 480,
        width: int = 720,
        num_inference_steps: int = 50,
        guidance_scale: float = 6.0,
        use_dynamic_cfg: bool = False,
        num_videos_per_prompt: int = 1,
        seed: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        callback_on_step_end: Callable | None = None,
        output_type: str = "np",
        max_sequence_length: int | None = None,
        profile_trace: str | os.PathLike | None = None,
    ) -> GenerationResult:
        """Text-to-video with classifier-free guidance (diffusers ``CogVideoXPipeline`` semantics).

        Returns a :class:`GenerationResult`: ``.latents`` [B * num_videos_per_prompt, F_lat, C, H/8, W/8]
        with F_lat = (num_frames - 1) / 4 + 1, ``.frames`` per ``output_type`` ("np" float32
        [B, F, H, W, 3] in [0, 1], "pt", "pil" or "latent" for none), ``.profile`` the cost per stage.
        ``callback_on_step_end(engine, i, t, {"latents": x})`` may return a dict with replacement
        "latents". ``profile_trace``: also write a torch.profiler Chrome trace to this path.
        """
        t_call = time.perf_counter()
        prof = Profile(device=str(self.device), dtype=str(self.dtype).replace("torch.", ""))
        args = dict(prompt=prompt, negative_prompt=negative_prompt, num_frames=num_frames, height=height,
                    width=width, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    num_videos_per_prompt=num_videos_per_prompt, seed=seed, generator=generator, latents=latents,
                    prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                    callback_on_step_end=callback_on_step_end, output_type=output_type)
        with stage(prof, "prepare", self.device):
            plan = self._check(**args)  # every check first: nothing heavy runs on bad input
            if profile_trace is not None:
                trace_path = _check_trace_path(profile_trace)
        tracer = _tracer(self.device) if profile_trace is not None else contextlib.nullcontext()
        with tracer as trace, PeakMemory(self.device) as mem:
            text = self._text(plan, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                              max_sequence_length or MAX_LENGTH, prof)  # diffusers' default for every model
            latents, ts_host, scales = self._denoise(plan, text, latents, seed, generator, num_inference_steps,
                                                     guidance_scale, use_dynamic_cfg, callback_on_step_end, prof)
            frames = None
            if output_type != "latent":
                with stage(prof, "vae_decode", self.device):
                    frames = postprocess(self.decode(latents), output_type)
        prof.memory = mem.result
        if profile_trace is not None:
            trace.export_chrome_trace(str(trace_path))
        prof.total_seconds = time.perf_counter() - t_call
        return GenerationResult(latents=latents, frames=frames, output_type=output_type, timesteps=ts_host,
                                guidance_scales=scales, profile=prof)

    def _check(self, *, prompt, negative_prompt, num_frames, height, width, num_inference_steps, guidance_scale,
               num_videos_per_prompt, seed, generator, latents, prompt_embeds, negative_prompt_embeds,
               callback_on_step_end, output_type) -> "_Plan":
        cfg = self.config
        if self.tokenizer is None and prompt is not None:
            raise ValueError("this engine has no text encoder; pass prompt_embeds")
        if cfg.in_channels != cfg.out_channels_:
            raise ValueError(
                f"{self.model_dir or 'this model'} is an image-to-video checkpoint (in_channels={cfg.in_channels}); "
                "generate() is text-to-video: load a text-to-video CogVideoX checkpoint"
            )
        b = check_prompts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, cfg.text_embed_dim)
        check_video_shape(num_frames, height, width, self.temporal_compression,
                          self.spatial_compression * cfg.patch_size)
        check_sampling(num_inference_steps, guidance_scale, num_videos_per_prompt,
                       self.scheduler.config.num_train_timesteps)
        if output_type != "latent" and self.vae is None:
            raise ValueError("this engine was loaded without a VAE: only output_type='latent' is available")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))} (got {output_type!r})")
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer (got {seed!r})")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError("callback_on_step_end must be callable as f(engine, step, timestep, {'latents': x})")
        n = b * num_videos_per_prompt
        lat_frames, extra = latent_frames(cfg, num_frames, self.temporal_compression)
        shape = (n, lat_frames, cfg.in_channels,
                 height // self.spatial_compression, width // self.spatial_compression)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for {n} video(s) of {num_frames} frames at "
                             f"{height}x{width} (got {tuple(latents.shape)})")
        positions = self.positions(shape[1], shape[3], shape[4])  # also rejects grids the model can't place
        return _Plan(b, num_videos_per_prompt, guidance_scale > 1.0, shape, extra, positions)

    def _text(self, plan: "_Plan", prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, max_len: int,
              prof: Profile) -> torch.Tensor:
        """Text embeddings of the whole CFG batch: [uncond; cond] (or cond only) [2N or N, Nt, Dtext]."""
        texts = []
        if prompt_embeds is None:
            texts.append([prompt] if isinstance(prompt, str) else list(prompt))
        if plan.cfg and negative_prompt_embeds is None:
            neg = negative_prompt if negative_prompt is not None else ""
            texts.insert(0, [neg] * plan.b if isinstance(neg, str) else list(neg))
        if texts:
            with stage(prof, "tokenize", self.device):
                ids = [self.tokenizer(t, max_length=max_len).input_ids for t in texts]
            with stage(prof, "text_encode", self.device):
                embeds = [self._encode_ids(i) for i in ids]
            if prompt_embeds is None:
                prompt_embeds = embeds.pop()
            if plan.cfg and negative_prompt_embeds is None:
                negative_prompt_embeds = embeds.pop()
        k = plan.videos_per_prompt
        cond = _repeat(prompt_embeds.to(self.device, self.dtype), k)
        if not plan.cfg:
            return cond
        return torch.cat([_repeat(negative_prompt_embeds.to(self.device, self.dtype), k), cond])

    def _denoise(self, plan, text, latents, seed, generator, steps, guidance_scale, use_dynamic_cfg, callback,
                 prof: Profile):
        """The denoising loop. Host-side schedule: the loop never reads a tensor value (no host sync);
        step times come from CUDA events read once at the end."""
        with stage(prof, "prepare", self.device):
            if seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(seed)
            timesteps = self.scheduler.set_timesteps(steps, device=self.device)
            ts_host = list(self.scheduler.timesteps_host)
            scales = guidance_scales(ts_host, steps, guidance_scale, use_dynamic_cfg)
            if latents is None:
                latents = randn_like_diffusers(plan.shape, generator, self.device, self.dtype)
            else:
                latents = latents.to(self.device, self.dtype)
            latents = latents * self.scheduler.init_noise_sigma
            batch = plan.shape[0] * (2 if plan.cfg else 1)
            nv = plan.positions.grid[0] * plan.positions.grid[1] * plan.positions.grid[2]
            prof.flops_per_step = transformer_flops(self.config, batch, text.shape[1], nv)
            if self.kernels == "auto" and self.device.type == "cuda":
                attn = attention_for(self.device, self.config.num_attention_heads, text.shape[1] + nv, self.dtype)
                self.transformer.set_kernel_backend(self._backend, attn)
            prof.shape = dict(batch=batch, latent_frames=plan.shape[1], latent_height=plan.shape[3],
                              latent_width=plan.shape[4], text_tokens=text.shape[1], video_tokens=nv)
        key = (batch, plan.shape[1:], tuple(text.shape[1:]))
        if self._compiled is not None and key not in self._warm:
            # First call of a compiled shape: compile here, timed apart from the steps.
            with stage(prof, "compile", self.device):
                self._step(torch.cat([latents] * (batch // latents.shape[0])), text,
                           timesteps[0].expand(batch), plan.positions)
            self._warm.add(key)
        clock = _StepClock(self.device)
        with stage(prof, "denoise", self.device):
            state = None
            clock.start()
            for i in range(len(ts_host)):
                model_in = torch.cat([latents, latents]) if plan.cfg else latents
                pred = self._step(model_in, text, timesteps[i].expand(batch), plan.positions).float()
                if plan.cfg:
                    uncond, cond = pred.chunk(2)
                    pred = uncond + scales[i] * (cond - uncond)
                latents, state = self.scheduler.step(i, pred, latents, state, generator=generator)
                latents = latents.to(self.dtype)
                if callback is not None:
                    out = callback(self, i, ts_host[i], {"latents": latents})
                    if out and "latents" in out:
                        latents = out["latents"]
                clock.tick()
        prof.steps = clock.seconds()
        return latents[:, plan.extra:], ts_host, scales

    def _step(self, latents, text, t, positions):
        fn = self._compiled if self._compiled is not None else self.transformer
        return fn(latents, text, t, positions)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoised latents [B, F_lat, C, h, w] -> video [B, 3, F, 8h, 8w] in [-1, 1] (VAE decode,
        frame-batched; tiled when ``engine.vae.enable_tiling()`` was called)."""
        if self.vae is None:
            raise ValueError("this engine was loaded without a VAE")
        c = self.vae.config.latent_channels
        if latents.ndim != 5 or latents.shape[2] != c:
            raise ValueError(f"latents must be [B, F_lat, {c}, h, w] for this VAE (got {tuple(latents.shape)})")
        out = self.vae.decode(unscale_latents(latents.permute(0, 2, 1, 3, 4), self.vae.config))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out

    def save_quantized(self, out_dir: str | os.PathLike, **kwargs) -> Path:
        """Write this engine's (quantized) components as a diffusers-layout checkpoint that
        ``Engine.load`` reads back without re-quantizing; atomic (a temporary directory renamed at the end).
        kwargs: ``overwrite``, ``max_shard_bytes`` (``cogvx.quantize.serialization.save_quantized``)."""
        from cogvx.quantize.serialization import save_quantized

        return save_quantized(self, out_dir, **kwargs)

    def encode(self, prompts: list[str], max_length: int = MAX_LENGTH) -> torch.Tensor:
        """T5 embeddings [B, max_length, text_embed_dim] of prompts, in the engine dtype."""
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError("this engine has no text encoder; pass prompt_embeds")
        return self._encode_ids(self.tokenizer(prompts, max_length=max_length).input_ids)

    def _encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return encode_ids(self.text_encoder, ids, self.device, self.dtype)

    def positions(self, latent_frames: int, latent_h: int, latent_w: int) -> Positions:
        """Position tables for a latent shape, computed once per shape and kept on the device."""
        key = (latent_frames, latent_h, latent_w)
        if key not in self._positions:
            self._positions[key] = make_positions(self.config, latent_frames, latent_h, latent_w).to(self.device)
        return self._positions[key]



@dataclass
class _Plan:
    """What the argument checks decided: prompt count, CFG, latent shape [N, F_lat(+pad), C, h, w]."""

    b: int
    videos_per_prompt: int
    cfg: bool
    shape: tuple[int, ...]
    extra: int  # padding latent frames (CogVideoX 1.5), dropped after denoising
    positions: Positions


class _StepClock:
    """Per-step wall times without a host sync inside the loop: CUDA events, read once at the end."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def _mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def start(self):
        self.marks = [self._mark()]

    def tick(self):
        self.marks.append(self._mark())

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def _check_trace_path(path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir() or not p.parent.is_dir() or not os.access(p.parent, os.W_OK):
        raise ValueError(f"profile_trace {p} must be a file path in an existing, writable directory "
                         "(e.g. trace.json)")
    return p


def _tracer(device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=acts, record_shapes=False)


def _repeat(embeds: torch.Tensor, k: int) -> torch.Tensor:
    # Each prompt's videos are consecutive, as diffusers orders them.
    return embeds if k == 1 else embeds.repeat_interleave(k, dim=0)

