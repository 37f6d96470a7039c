"""The public entry point: ``Engine.load`` once, then ``engine.generate`` as often as needed."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .config import TransformerConfig
from .loader import load_components, resolve_model_dir
from .positions import Positions, make_positions
from .schedulers import guidance_scales, randn_like_diffusers
from .text_encoder import PromptTokenizer, encode_prompts
from .transformer import CogVideoXTransformer
from .vae import unscale_latents
from .video import OUTPUT_TYPES, postprocess, write_mp4
from .validation import check_prompts, check_sampling, check_video_shape, resolve_device, resolve_dtype

__all__ = ["Engine", "GenerationResult"]

log = logging.getLogger(__name__)

@dataclass
class GenerationResult:
    """What ``Engine.generate`` returns.

    latents: denoised latents [B, F_lat, C, H/8, W/8] in the engine dtype (for CogVideoX 1.5 the
    padding frame the model needs is already dropped, as the diffusers pipeline does before decoding).
    frames: the decoded videos in diffusers' conventions: "np" float32 [B, F, H, W, 3] in [0, 1],
    "pt" [B, F, 3, H, W], "pil" a list of frame lists; None for output_type="latent".
    timings: wall seconds per stage.
    """

    latents: torch.Tensor
    frames: Any = None
    output_type: str = "latent"
    timesteps: list[int] = field(default_factory=list)
    guidance_scales: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

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
        if len(videos) == 1:
            return [write_mp4(p, videos[0], fps)]
        return [write_mp4(p.with_name(f"{p.stem}_{i}{p.suffix}"), v, fps) for i, v in enumerate(videos)]


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
        """
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        model_dir = resolve_model_dir(model)
        parts = load_components(model_dir, dev, dt, fuse_qkv=fuse_qkv, scheduler=scheduler, recipe=recipe)
        return cls(**parts, device=dev, dtype=dt, model_dir=model_dir)

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
    ) -> GenerationResult:
        """Text-to-video denoising with classifier-free guidance (diffusers ``CogVideoXPipeline`` semantics).

        Returns a :class:`GenerationResult`; ``.latents`` is [B * num_videos_per_prompt, F_lat, C, H/8, W/8]
        with F_lat = (num_frames - 1) / 4 + 1. ``callback_on_step_end(engine, i, t, {"latents": x})``
        may return a dict with replacement "latents".
        """
        cfg = self.config
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        # ---- every check first: nothing heavy runs on bad input
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
        max_len = max_sequence_length or 226  # diffusers' default for every CogVideoX model
        do_cfg = guidance_scale > 1.0
        n = b * num_videos_per_prompt
        lat_frames = (num_frames - 1) // self.temporal_compression + 1
        pt = cfg.patch_size_t or 1
        extra = (pt - lat_frames % pt) % pt  # CogVideoX 1.5 needs F_lat divisible by patch_size_t
        shape = (n, lat_frames + extra, cfg.in_channels,
                 height // self.spatial_compression, width // self.spatial_compression)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for {n} video(s) of {num_frames} frames at "
                             f"{height}x{width} (got {tuple(latents.shape)})")
        positions = self.positions(shape[1], shape[3], shape[4])  # also rejects grids the model can't place

        # ---- text
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = self.encode(prompts, max_len)
            if do_cfg:
                neg = negative_prompt if negative_prompt is not None else ""
                neg = [neg] * b if isinstance(neg, str) else list(neg)
                negative_prompt_embeds = self.encode(neg, max_len)
        elif do_cfg and negative_prompt_embeds is None:
            negative_prompt_embeds = self.encode([""] * b, max_len)
        prompt_embeds = _repeat(prompt_embeds.to(self.device, self.dtype), num_videos_per_prompt)
        if do_cfg:
            negative_prompt_embeds = _repeat(negative_prompt_embeds.to(self.device, self.dtype), num_videos_per_prompt)
            text = torch.cat([negative_prompt_embeds, prompt_embeds])
        else:
            text = prompt_embeds
        timings["text_encode"] = time.perf_counter() - t0

        # ---- noise and schedule (host-side: the loop below never reads a tensor value)
        t1 = time.perf_counter()
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        timesteps = self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        ts_host = list(self.scheduler.timesteps_host)
        scales = guidance_scales(ts_host, num_inference_steps, guidance_scale, use_dynamic_cfg)
        if latents is None:
            latents = randn_like_diffusers(shape, generator, self.device, self.dtype)
        else:
            latents = latents.to(self.device, self.dtype)
        latents = latents * self.scheduler.init_noise_sigma

        state = None
        for i in range(len(ts_host)):
            model_in = torch.cat([latents, latents]) if do_cfg else latents
            t = timesteps[i].expand(model_in.shape[0])
            pred = self.transformer(model_in, text, t, positions).float()
            if do_cfg:
                uncond, cond = pred.chunk(2)
                pred = uncond + scales[i] * (cond - uncond)
            latents, state = self.scheduler.step(i, pred, latents, state, generator=generator)
            latents = latents.to(self.dtype)
            if callback_on_step_end is not None:
                out = callback_on_step_end(self, i, ts_host[i], {"latents": latents})
                if out and "latents" in out:
                    latents = out["latents"]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timings["denoise"] = time.perf_counter() - t1
        latents = latents[:, extra:]
        frames = None
        if output_type != "latent":
            t2 = time.perf_counter()
            frames = postprocess(self.decode(latents), output_type)
            timings["vae_decode"] = time.perf_counter() - t2
        return GenerationResult(latents=latents, frames=frames, output_type=output_type, timesteps=ts_host,
                                guidance_scales=scales, timings=timings)

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

    def save_quantized(self, out_dir: str | os.PathLike) -> Path:
        """Write this engine's (quantized) components as a diffusers-layout checkpoint that
        ``Engine.load`` reads back without re-quantizing; atomic (a temporary directory renamed at the end)."""
        from cogvx.quantize.serialization import save_quantized

        return save_quantized(self, out_dir)

    def encode(self, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
        """T5 embeddings [B, max_length, text_embed_dim] of prompts, in the engine dtype."""
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError("this engine has no text encoder; pass prompt_embeds")
        return encode_prompts(self.tokenizer, self.text_encoder, prompts,
                              max_length or 226, device=self.device, dtype=self.dtype)

    def positions(self, latent_frames: int, latent_h: int, latent_w: int) -> Positions:
        """Position tables for a latent shape, computed once per shape and kept on the device."""
        key = (latent_frames, latent_h, latent_w)
        if key not in self._positions:
            self._positions[key] = make_positions(self.config, latent_frames, latent_h, latent_w).to(self.device)
        return self._positions[key]


def _repeat(embeds: torch.Tensor, k: int) -> torch.Tensor:
    # Each prompt's videos are consecutive, as diffusers orders them.
    return embeds if k == 1 else embeds.repeat_interleave(k, dim=0)

