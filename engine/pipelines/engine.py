"""The public entry point: ``Engine.load`` once, then ``engine.generate`` as often as needed.

The engine holds the components and orchestrates a call: check the request (``request``), embed the
prompts (``prompts``), condition the latents (``conditioning``), run the one loop (``denoise``),
decode (``output``). Everything a call computes lives in the call; one lock serializes the model work
of concurrent calls on one engine (the compiled graphs and the kernel switches are not thread-safe),
while their argument checks run at once.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from cogvx.kernels import resolve_backend
from cogvx.quantize import resolve_recipes

from ..dev.random_model import random_components
from ..io.checkpoint import resolve_model_dir
from ..loading import load_components
from ..models.config import TransformerConfig
from ..models.positions import Positions
from ..models.presets import get_preset
from ..models.tasks import TASKS
from ..models.text_encoder import check_vocab
from ..models.tokenizer import PromptTokenizer
from ..models.transformer import CogVideoXTransformer
from ..parallel import check_mode, make_mesh, parallel_device
from ..quantizing import quantize_text_encoder, quantize_transformer
from ..runtime.compiling import check_compile_mode, use_cache_dir
from ..runtime.defaults import DEFAULTS, default_dtype
from ..runtime.devices import resolve_device, resolve_dtype
from ..runtime.host_memory import keep_freed_memory
from ..runtime.profiling import PeakMemory, Profile, StepClock, export_trace, stage, tracer
from .conditioning import condition
from .denoise import denoise
from .guidance import Guidance, guidance_scales
from .lora import LoraAdapters
from .forward import Forward
from .component_calls import ComponentCalls
from .lora_methods import LoraMethods
from .offload import OffloadMethods, offload_plan
from .output import GenerationResult, postprocess
from .parallel import Parallel
from .prompts import embed_prompts
from .request import ModelFacts, Request, plan_request, trace_path
from .step_cache import StepCache, check_step_cache

__all__ = ["Engine"]


class Engine(LoraMethods, OffloadMethods, ComponentCalls):
    """A loaded CogVideoX model: text-to-video (and video-to-video on the same checkpoint),
    image-to-video, or Fun-Control, as ``model_index.json`` says.

    Build with :meth:`Engine.load`; components are loaded once and reused by every ``generate``.
    """

    def __init__(self, *, transformer: CogVideoXTransformer, scheduler, tokenizer: PromptTokenizer | None,
                 text_encoder, vae=None, device: torch.device, dtype: torch.dtype, model_dir: Path | None = None,
                 recipes: dict[str, str] | None = None, task: str | None = None):
        self.transformer = transformer
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.forward = Forward(transformer, device, dtype)  # the transformer call: kernels, compile, positions
        self.model_dir = model_dir
        self.vae = vae
        self.recipes = dict(recipes or {})  # component -> quantization recipe name
        cfg = transformer.config
        # A checkpoint's task comes from model_index.json; built in memory, from the input channels.
        self.task = task or ("i2v" if cfg.image_to_video else "t2v")
        # Every CogVideoX VAE compresses 4x in time and 8x in space.
        self.temporal_compression = int(vae.config.temporal_compression_ratio) if vae is not None else 4
        self.spatial_compression = vae.config.spatial_scale if vae is not None else 8
        # Serializes the model work of concurrent calls (compiled graphs and kernel switches are not
        # thread-safe) and every change of weights or placement.
        self.lock = threading.RLock()
        self.lora = LoraAdapters()  # LoRA adapters: load_lora, set_adapters, fuse_lora, unfuse_lora
        if tokenizer is not None and text_encoder is not None:
            check_vocab(tokenizer, text_encoder)

    @property
    def config(self) -> TransformerConfig:
        return self.transformer.config

    @property
    def device(self) -> torch.device:
        """Where the transformer call (and every stage) runs."""
        return self.forward.device

    @device.setter
    def device(self, value: torch.device) -> None:
        self.forward.to(value)  # the caller moves the modules

    @property
    def dtype(self) -> torch.dtype:
        return self.forward.dtype

    @dtype.setter
    def dtype(self, value: torch.dtype) -> None:
        self.forward.dtype = value

    @property
    def parallel(self) -> Parallel | None:
        """The parallel side when loaded with ``parallel=``, else None."""
        return self.forward.parallel

    @property
    def kernels(self) -> str:
        """The kernels asked for at load: "auto", "triton" or "torch"."""
        return self.forward.kernels

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        model: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        fuse_qkv: bool = False,
        scheduler: str | None = None,
        recipe: str | dict[str, str] | None = None,
        kernels: str = "auto",
        compile: bool | str = False,
        compile_cache_dir: str | os.PathLike | None = None,
        lora: list[tuple[str | os.PathLike, float]] | None = None,
        parallel: str | None = None,
        vae_dtype: str | torch.dtype | None = None,
        offload: str | None = None,
    ) -> "Engine":
        """Load every component of a diffusers-layout CogVideoX checkpoint.

        model: a local directory (with model_index.json) or a hub id already in the local
            Hugging Face cache (nothing is downloaded). Its ``_class_name`` decides the task:
            ``CogVideoXPipeline`` (text-to-video and video-to-video), ``CogVideoXImageToVideoPipeline``,
            ``CogVideoXFunControlPipeline``.
        device: "cpu", "cuda" or "cuda:N"; None (default): cuda if available, else cpu.
        dtype: torch.float32 / bfloat16 / float16 (or their names); None: bfloat16 on CUDA, float32 on the CPU.
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
            ~/.cache/cogvx/inductor, or $COGVX_COMPILE_CACHE; a TORCHINDUCTOR_CACHE_DIR you set wins
            over the default).
        lora: (path, scale) pairs of LoRAs. With a recipe for the transformer they are merged into its
            full-precision weights before quantizing; otherwise loaded as with :meth:`load_lora`.
        parallel: None, "cfg", "ulysses" or "cfg+ulysses": one video over the processes of the initialized
            torch.distributed process group (every rank calls load and generate with the same arguments;
            'cuda' means each rank's own GPU). "cfg": the guidance halves on 2 ranks; "ulysses": the video
            tokens sharded over every rank; "cfg+ulysses": both, on an even number of ranks. Frames are
            returned (and saved) on rank 0; every rank returns the latents.
        vae_dtype: the VAE's own dtype (None: ``dtype``). "bfloat16" on a CPU with AVX-512 BF16 decodes
            2x faster than float32 (40 dB SQNR of the frames on random weights; benchmarks/sweep.py --e2e).
        offload: None, "model", "group" or "sequential": where components wait between stages (:meth:`enable_offload`).
        """
        dev = resolve_device(parallel_device(device, check_mode(parallel)))
        mesh = make_mesh(parallel, dev)
        if mesh is not None:  # the ranks agree on the checkpoint (its contents, not its path) and the options
            model_dir = Parallel.agree_load(dict(device=dev.type, dtype=dtype, fuse_qkv=fuse_qkv, scheduler=scheduler,
                                                 recipe=recipe, kernels=kernels, compile=compile, parallel=parallel,
                                                 lora=[(str(p_), float(s_)) for p_, s_ in lora or []],
                                                 vae_dtype=str(vae_dtype)),
                                            mesh, model)
        dt = resolve_dtype(dtype or default_dtype(dev), dev)
        vae_dt = None if vae_dtype is None else resolve_dtype(vae_dtype, dev)  # bad input fails before the weights load
        model_dir = resolve_model_dir(model) if mesh is None else model_dir
        check_compile_mode(compile)
        backend = resolve_backend(kernels, dev)
        if dev.type == "cpu":
            keep_freed_memory()  # before the weights load (a bad COGVX_CPU_MALLOC fails here); see _finish
        if compile:
            use_cache_dir(compile_cache_dir)  # an unwritable cache fails now, not after the weights load
        parts = load_components(model_dir, dev, dt, fuse_qkv=fuse_qkv, scheduler=scheduler, recipe=recipe, lora=lora,
                                **offload_plan(offload, dev, parallel=parallel, compile=compile))
        merged, pending = parts.pop("lora_merged"), parts.pop("lora_pending")
        engine = cls(**parts, device=dev, dtype=dt, model_dir=model_dir)
        if vae_dt is not None and engine.vae is not None:
            engine.vae.to(vae_dt)
        engine.enable_offload(offload)
        engine.lora.baked = merged
        for path, scale in pending:
            engine.load_lora(path, scale=scale)
        return engine._finish(backend, kernels, compile, compile_cache_dir, mesh)

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
        t5_layers: int | None = None,
        parallel: str | None = None,
    ) -> "Engine":
        """A real-shape model (``cogvx.engine.models.presets.PRESETS``) with random weights, built on the
        device: for benchmarks when no checkpoint is on disk. dtype defaults to the preset's on CUDA,
        float32 on the CPU; ``text_encoder=False`` / ``vae=False`` leave those out (pass prompt_embeds,
        and output_type="latent"); ``t5_layers`` keeps that many of T5-XXL's 24 layers (CPU benchmarks);
        ``parallel``: as in :meth:`load`."""
        p = get_preset(preset)
        dev = resolve_device(parallel_device(device, check_mode(parallel)))
        mesh = make_mesh(parallel, dev)
        if mesh is not None:
            Parallel.agree_load(dict(preset=preset, device=dev.type, dtype=dtype, recipe=recipe, kernels=kernels,
                                     compile=compile, text_encoder=text_encoder, vae=vae, seed=seed,
                                     parallel=parallel), mesh)
        dt = resolve_dtype(dtype or default_dtype(dev, p.dtype), dev)
        backend = resolve_backend(kernels, dev)
        check_compile_mode(compile)
        if compile:
            use_cache_dir(compile_cache_dir)
        requested = resolve_recipes(recipe, dev) if recipe is not None else {}
        parts = random_components(preset, dev, dt, text_encoder=text_encoder, vae=vae, seed=seed, t5_layers=t5_layers)
        if "text_encoder" in requested:
            quantize_text_encoder(parts["text_encoder"], requested["text_encoder"], parts["tokenizer"])
        if "transformer" in requested:
            quantize_transformer(parts["transformer"], requested["transformer"], parts["tokenizer"],
                                 parts["text_encoder"], dt)
        parts["recipes"] = {c: r.name for c, r in requested.items()}
        return cls(**parts, device=dev, dtype=dt)._finish(backend, kernels, compile, compile_cache_dir, mesh)

    def _finish(self, backend: str, kernels: str, compile, compile_cache_dir, mesh=None) -> "Engine":
        if self.device.type == "cpu":
            keep_freed_memory()  # the step's activations are reused, not faulted in again each step
        self.forward.set_kernels(kernels, backend)
        if mesh is not None:
            self.forward.set_parallel(Parallel(mesh, self.transformer))
        if compile:
            self.compile(compile, compile_cache_dir)
        return self

    def compile(self, mode: bool | str = True, cache_dir: str | os.PathLike | None = None, *,
                vae: bool = False, backend: str = "inductor") -> None:
        """Compile the transformer forward (fullgraph, static shapes) with a persistent cache.
        ``backend``: "inductor", or a torch.compile debugging backend ("eager", "aot_eager").

        vae: also compile the VAE's frame-batch decoder. Off by default: on the 2-core CPU it gained
        nothing (real VAE, 5 latent frames at 64x96: 9.8 s compiled vs 9.5 s eager, after a 95 s
        compile), and it has not been measured on a GPU yet.
        """
        check_compile_mode(mode)
        use_cache_dir(cache_dir)
        with self.lock:
            self.forward.compile(mode, backend)
            if vae and self.vae is not None:
                self.vae.compile_decoder(mode="max-autotune-no-cudagraphs" if mode == "max-autotune" else None)

    # ------------------------------------------------------------------ generation
    def facts(self) -> ModelFacts:
        """What the argument checks need to know of this engine's model."""
        return ModelFacts(config=self.config, task=self.task, temporal=self.temporal_compression,
                          spatial=self.spatial_compression,
                          latent_channels=self.vae.config.latent_channels if self.vae is not None else
                          self.config.out_channels_,
                          max_steps=self.scheduler.config.num_train_timesteps,
                          has_text_encoder=self.tokenizer is not None and self.text_encoder is not None,
                          has_vae=self.vae is not None, device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def generate(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_frames: int | None = None,
        height: int = DEFAULTS.height,
        width: int = DEFAULTS.width,
        num_inference_steps: int = DEFAULTS.num_inference_steps,
        guidance_scale: float = DEFAULTS.guidance_scale,
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
        *,
        image=None,
        video=None,
        strength: float | None = None,
        control_video=None,
        check_finite: str = "warn",
        step_cache: StepCache | None = None,
    ) -> GenerationResult:
        """Generate videos with classifier-free guidance (diffusers' CogVideoX pipeline semantics).

        Text-to-video by default; ``image=`` on an image-to-video checkpoint (the first frame: a PIL
        image, a file path, an array [H, W, 3] or a tensor [3, H, W], or a list, one per prompt);
        ``video=`` (and ``strength``, default 0.8) on a text-to-video checkpoint for video-to-video;
        ``control_video=`` on a Fun-Control checkpoint. Videos: a list of PIL images, a file path
        (mp4/gif), an array [F, H, W, 3] or a tensor [F, 3, H, W]; inputs of another size are resized
        as diffusers' video processor does. ``num_frames`` defaults to 49, and for video inputs to the
        video's length (4k+1 frames of it).

        Returns a :class:`GenerationResult`: ``.latents`` [B * num_videos_per_prompt, F_lat, C, H/8, W/8]
        with F_lat = (num_frames - 1) / 4 + 1, ``.frames`` per ``output_type`` ("np" float32
        [B, F, H, W, 3] in [0, 1], "pt", "pil" or "latent" for none), ``.seed`` (drawn at random and
        reported when neither seed, generator nor latents is given), ``.profile`` the cost per stage.
        ``callback_on_step_end(engine, i, t, {"latents": x})`` may return a dict with replacement
        "latents". ``profile_trace``: also write a torch.profiler Chrome trace to this path.
        ``check_finite``: "warn" (default), "raise" or "off" when the latents turn NaN/inf.
        ``step_cache``: a :class:`StepCache` (e.g. ``StepCache(0.05)``, ``StepCache(0.2, mode="teacache")``)
        lets steps whose transformer input barely changed reuse the last computed step's block residual;
        the profile says which steps were reused and the FLOPs saved.
        """
        t_call = time.perf_counter()
        prof = Profile(device=str(self.device), dtype=str(self.dtype).replace("torch.", ""))
        req = Request(prompt=prompt, negative_prompt=negative_prompt, num_frames=num_frames, height=height, width=width,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      use_dynamic_cfg=use_dynamic_cfg, num_videos_per_prompt=num_videos_per_prompt, seed=seed,
                      generator=generator, latents=latents, prompt_embeds=prompt_embeds,
                      negative_prompt_embeds=negative_prompt_embeds, callback_on_step_end=callback_on_step_end,
                      output_type=output_type, max_sequence_length=max_sequence_length, image=image, video=video,
                      strength=strength, control_video=control_video)
        par = self.parallel

        def checked():  # every check first: nothing heavy runs on bad input
            if check_finite not in ("warn", "raise", "off"):
                raise ValueError(f"check_finite must be 'warn', 'raise' or 'off' (got {check_finite!r})")
            if check_step_cache(step_cache) is not None and par is not None:
                raise ValueError("step_cache does not combine with Engine.load(parallel=...) yet: use one or the other")
            return plan_request(req, self.facts()), trace_path(profile_trace) if profile_trace is not None else None

        with stage(prof, "prepare", self.device):
            # Parallel: the ranks agree on the arguments first, and a check that fails on one rank fails on all.
            args = dict(vars(req), profile_trace=profile_trace, check_finite=check_finite)
            plan, trace_file = checked() if par is None else par.plan(checked, args, req)
            schedule = self.scheduler.schedule(plan.steps)
        with self.lock:
            ctx = tracer(self.device) if trace_file is not None else contextlib.nullcontext()
            with ctx as trace, PeakMemory(self.device) as mem, self.residency.session(prof, self.device) as res:
                encodes = prompt_embeds is None or plan.cfg and negative_prompt_embeds is None
                res.stage("text_encoder" if encodes else None)
                text = embed_prompts(plan, self.tokenizer, self.text_encoder, prompt, negative_prompt, prompt_embeds,
                                     negative_prompt_embeds, device=self.device, dtype=self.dtype, profile=prof)
                gen = torch.Generator(device=self.device).manual_seed(plan.seed) if plan.seed is not None else generator
                res.stage("vae" if TASKS[plan.task].vae_encodes else None)
                with stage(prof, "encode" if TASKS[plan.task].vae_encodes else "prepare", self.device):
                    cond = condition(plan, vae=self.vae, scheduler=self.scheduler, schedule=schedule, generator=gen,
                                     latents=latents, ofs_dim=self.config.ofs_embed_dim, device=self.device,
                                     dtype=self.dtype)
                run_ts = list(schedule.timesteps_host[cond.start:])
                guidance = Guidance(plan.cfg, tuple(guidance_scales(run_ts, len(run_ts), guidance_scale,
                                                                    bool(use_dynamic_cfg))))
                if par is not None:
                    text, guidance = par.local(text, guidance)
                    par.comm.reset()
                positions = self.positions(plan.shape[1], plan.shape[3], plan.shape[4])
                res.stage("transformer")
                model = self.forward.model_for(plan, text, cond, guidance, positions, schedule, prof, step_cache)
                callback = model.watch(callback_on_step_end) if step_cache is not None else callback_on_step_end
                clock = StepClock(self.device)
                with stage(prof, "denoise", self.device):
                    out = denoise(model, self.scheduler, schedule, cond, text, guidance, positions, generator=gen,
                                  callback=callback, callback_owner=self, clock=clock, dtype=self.dtype,
                                  check_finite=check_finite)
                prof.steps = clock.seconds()
                if par is not None:
                    par.report_loop(prof, self.forward.compiled is not None, len(run_ts))
                if step_cache is not None:
                    model.report(prof)
                out = out[:, plan.extra:]
                frames = None
                res.stage("vae" if output_type != "latent" else None)
                if output_type != "latent":
                    with stage(prof, "vae_decode", self.device):
                        video = self.decode(out) if par is None else par.decode(self, out)
                        frames = None if video is None else postprocess(video, output_type)
            if par is not None:
                par.report_ranks(prof, time.perf_counter() - t_call)
            prof.memory = mem.result
            if trace_file is not None:
                export_trace(trace, trace_file)
        prof.total_seconds = time.perf_counter() - t_call
        return GenerationResult(latents=out, frames=frames, output_type=output_type, timesteps=run_ts,
                                guidance_scales=list(guidance.scales), seed=plan.seed, task=plan.task, profile=prof,
                                rank=0 if par is None else par.rank)

    def positions(self, latent_frames: int, latent_h: int, latent_w: int) -> Positions:
        """Position tables for a latent shape, computed once per shape and kept on the device."""
        return self.forward.positions(latent_frames, latent_h, latent_w)
