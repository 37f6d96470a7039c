"""What diffusers' CogVideoX pipeline classes share, on the cogvx engine (the classes themselves:
``diffusers_pipelines``). A diffusers script runs by changing its
``from diffusers import ...`` line to ``from cogvx.engine import ...``.

    pipe = CogVideoXPipeline.from_pretrained(path, torch_dtype=torch.bfloat16)
    pipe.enable_model_cpu_offload(); pipe.vae.enable_tiling()
    video = pipe(prompt=prompt, num_frames=49, guidance_scale=6, generator=torch.Generator().manual_seed(42)).frames[0]

Every argument of diffusers' ``__call__`` is accepted. What cogvx cannot honour is refused with a
ValueError (custom ``timesteps``, which diffusers' CogVideoX schedulers refuse too; step-callback tensors
other than "latents"; ``attention_kwargs`` other than the LoRA "scale"; ``control_video_latents``) or,
where the result is unchanged, said once as a warning (model CPU offload on a machine without a GPU).
``eta`` is accepted and, as in diffusers, changes nothing: neither CogVideoX scheduler uses it.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from tqdm.auto import tqdm

from ..io.checkpoint import read_model_index
from ..loading import (
    load_scheduler,
    load_text_encoder,
    load_tokenizer,
    load_transformer,
    load_vae,
    read_quantization,
    required_components,
)
from ..models.lora import is_plain_linear
from ..models.tasks import PIPELINE_CLASSES, kind_of_class, tasks_of_kind
from ..models.text_encoder import text_encoder_dtype
from ..models.tokenizer import PromptTokenizer
from ..models.transformer import CogVideoXTransformer
from ..models.vae import CogVideoXVAE
from ..quantizing import resolve_quantization
from ..runtime.devices import resolve_device, resolve_dtype
from .diffusers_models import CogVideoXPipelineOutput, check_from_pretrained_kwargs, component_dir, torch_dtype_of
from .engine import Engine
from .output import postprocess

__all__ = ["CogVideoXPipelineBase"]

_CALLBACK_TENSORS = ("latents", "prompt_embeds", "negative_prompt_embeds")  # what diffusers allows
_warned: set[str] = set()


def _say_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


class CogVideoXPipelineBase:
    _task = "t2v"  # the checkpoint task (model_index.json) this class serves

    def __init__(self, engine: Engine):
        self.engine = engine
        self._offload: torch.device | None = None
        self._progress = {}
        self._guidance_scale, self._num_timesteps, self._interrupt = 6.0, 0, False
        self._attention_kwargs = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype=None, *, transformer=None, text_encoder=None,
                        vae=None, tokenizer=None, scheduler=None, **kwargs):
        """Load a diffusers-layout checkpoint on the CPU (as diffusers does; then ``.to("cuda")`` or
        ``enable_model_cpu_offload()``); components passed in are used as they are (a transformers
        ``T5EncoderModel``, cogvx's transformer and VAE, quantized by torchao's ``quantize_`` or not)."""
        torch_dtype = torch_dtype_of(torch_dtype, kwargs)
        check_from_pretrained_kwargs(kwargs, f"{cls.__name__}.from_pretrained")
        d = component_dir(pretrained_model_name_or_path, None)
        index = read_model_index(d, {k: None for k in required_components()}, PIPELINE_CLASSES)
        task = kind_of_class(index["_class_name"])
        if task != cls._task:
            names = " or ".join(c for t in tasks_of_kind(task) for c in t.pipeline_classes)
            raise ValueError(f"{d} is a {index['_class_name']} checkpoint: load it with {names}")
        _check_component("transformer", transformer, CogVideoXTransformer, "CogVideoXTransformer3DModel")
        _check_component("vae", vae, CogVideoXVAE, "AutoencoderKLCogVideoX")
        if tokenizer is not None and not isinstance(tokenizer, PromptTokenizer):
            raise TypeError("tokenizer=: pass cogvx's tokenizer (cogvx.engine.loading.load_tokenizer(path / "
                            "'tokenizer')) or leave it out: the checkpoint's is loaded")
        given = {c for c, m in (("transformer", transformer), ("text_encoder", text_encoder)) if m is not None}
        dev = _module_device(transformer) if transformer is not None else torch.device("cpu")
        dt = resolve_dtype(torch_dtype if torch_dtype is not None else _module_dtype(transformer), dev)
        saved = {c: info for c in ("transformer", "text_encoder") if c not in given
                 and (info := read_quantization(d / c)) is not None}
        resolve_quantization(None, saved, dev, dt, d)  # a saved quantized component loads in its dtype only
        if text_encoder is None:
            text_encoder = load_text_encoder(d / "text_encoder", dev, text_encoder_dtype(dt, dev),
                                             info=saved.get("text_encoder"))
        if tokenizer is None:
            tokenizer = load_tokenizer(d / "tokenizer", vocab_limit=text_encoder.config.vocab_size)
        vae = vae if vae is not None else load_vae(d / "vae", dev, dt)
        if transformer is None:
            transformer = load_transformer(d / "transformer", dev, dt, info=saved.get("transformer"))
        scheduler = scheduler if scheduler is not None else load_scheduler(d / "scheduler")
        recipes = {c: info["recipe"]["name"] for c, info in saved.items()}
        return cls(Engine(transformer=transformer, scheduler=scheduler, tokenizer=tokenizer, text_encoder=text_encoder,
                          vae=vae, device=dev, dtype=dt, model_dir=d, recipes=recipes, task=task))

    # ------------------------------------------------------------------ components and devices
    transformer = property(lambda self: self.engine.transformer)
    vae = property(lambda self: self.engine.vae)
    text_encoder = property(lambda self: self.engine.text_encoder)
    tokenizer = property(lambda self: self.engine.tokenizer)
    device = property(lambda self: self.engine.device)
    dtype = property(lambda self: self.engine.dtype)
    guidance_scale = property(lambda self: self._guidance_scale)
    do_classifier_free_guidance = property(lambda self: self._guidance_scale > 1)
    num_timesteps = property(lambda self: self._num_timesteps)
    interrupt = property(lambda self: self._interrupt)
    attention_kwargs = property(lambda self: self._attention_kwargs)
    vae_scale_factor_spatial = property(lambda self: self.engine.spatial_compression)
    vae_scale_factor_temporal = property(lambda self: self.engine.temporal_compression)

    @property
    def scheduler(self):
        return self.engine.scheduler

    @scheduler.setter
    def scheduler(self, value) -> None:
        if not hasattr(value, "schedule"):
            raise TypeError("pipe.scheduler must be a cogvx scheduler: use CogVideoXDPMScheduler.from_config("
                            "pipe.scheduler.config) imported from cogvx.engine")
        self.engine.scheduler = value

    @property
    def components(self) -> dict:
        e = self.engine
        return dict(transformer=e.transformer, vae=e.vae, text_encoder=e.text_encoder, tokenizer=e.tokenizer,
                    scheduler=e.scheduler)

    def to(self, device=None, dtype=None):
        """Move every component to ``device`` (a dtype other than the pipeline's is refused: reload with torch_dtype)."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if dtype is not None and dtype != self.engine.dtype:
            raise ValueError(f"cogvx pipelines keep the dtype they were loaded in ({self.engine.dtype}); reload with "
                             f"from_pretrained(..., torch_dtype={dtype})")
        if device is not None:
            dev = resolve_device(device)
            e = self.engine
            for m in (e.transformer, e.text_encoder, e.vae):
                if m is not None:
                    m.to(dev)
            e.device, self._offload = dev, None
            e.forward.to(dev)
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = "cuda") -> None:
        """Keep the components on the CPU and move each to the GPU only for its stage (text encoding,
        denoising, decoding). Without a GPU there is nothing to offload to: said once, and the pipeline runs
        on the CPU."""
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            _say_once("offload", "enable_model_cpu_offload(): this machine has no CUDA device, so there is nothing to "
                                 "offload to; the pipeline runs on the CPU")
            return
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", gpu_id or 0)
        self.to("cpu")
        self._offload = dev
        self.engine.device = dev

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = "cuda") -> None:
        _say_once("sequential", "enable_sequential_cpu_offload(): cogvx offloads whole components "
                                "(enable_model_cpu_offload) instead of each layer")
        self.enable_model_cpu_offload(gpu_id, device)

    def fuse_qkv_projections(self, transformer: bool = True, vae: bool = False) -> None:
        """Fuse each attention's q/k/v projections into one GEMM (full-precision weights only)."""
        if not transformer:
            return
        e = self.engine
        with e.lock:
            for blk in e.transformer.transformer_blocks:
                a = blk.attn1
                if a.to_qkv is None and not all(is_plain_linear(getattr(a, n)) for n in ("to_q", "to_k", "to_v")):
                    raise ValueError("fuse_qkv_projections(): the q/k/v weights are quantized and cannot be concatenated;"
                                     " fuse before quantizing (call it before quantize_)")
            e.transformer.fuse_qkv()
            e.lora.apply(e.transformer, e.dtype)  # side branches follow q/k/v onto the fused layer
            e.forward.weights_changed()

    def set_progress_bar_config(self, **kwargs) -> None:
        self._progress = dict(kwargs)

    # ------------------------------------------------------------------ LoRA (diffusers' names)
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          weight_name: str | None = None, **kwargs) -> None:
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            raise TypeError("load_lora_weights: pass the LoRA's .safetensors file or directory (cogvx reads LoRAs "
                            "from safetensors files, with their metadata)")
        path = component_dir(pretrained_model_name_or_path_or_dict, kwargs.pop("subfolder", None))
        if kwargs:
            raise TypeError(f"load_lora_weights got unsupported argument(s) {sorted(kwargs)}")
        self.engine.load_lora(path / weight_name if weight_name else path, adapter_name)

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        self.engine.set_adapters(adapter_names, adapter_weights)

    def fuse_lora(self, components=("transformer",), lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names=None) -> None:
        self.engine.fuse_lora(lora_scale, adapter_names)

    def unfuse_lora(self, components=("transformer",)) -> None:
        self.engine.unfuse_lora()

    def delete_adapters(self, adapter_names) -> None:
        self.engine.delete_adapters(adapter_names)

    def get_active_adapters(self) -> list[str]:
        return list(self.engine.lora.active)

    def unload_lora_weights(self) -> None:
        self.engine.unfuse_lora()
        self.engine.delete_adapters(self.engine.lora.names)

    # ------------------------------------------------------------------ generation
    def _call(self, *, prompt, negative_prompt, height, width, num_frames, num_inference_steps, timesteps,
              guidance_scale, use_dynamic_cfg, num_videos_per_prompt, eta, generator, latents, prompt_embeds,
              negative_prompt_embeds, output_type, return_dict, attention_kwargs, callback_on_step_end,
              callback_on_step_end_tensor_inputs, max_sequence_length, strength=None, **task):
        e, cfg = self.engine, self.engine.config
        if timesteps is not None:
            raise ValueError("custom timesteps are not supported: CogVideoX's schedulers set their own (diffusers "
                             "refuses them for these schedulers too); pass num_inference_steps")
        if task.pop("control_video_latents", None) is not None:
            raise ValueError("control_video_latents is not supported; pass control_video (frames) instead")
        scale = _lora_scale(attention_kwargs)
        if hasattr(callback_on_step_end, "tensor_inputs"):  # diffusers' PipelineCallback objects
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        wanted = list(callback_on_step_end_tensor_inputs or ())
        bad = [k for k in wanted if k not in _CALLBACK_TENSORS]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs has to be in {list(_CALLBACK_TENSORS)}, but found {bad}")
        if callback_on_step_end is not None and any(k != "latents" for k in wanted):
            raise ValueError("cogvx passes only 'latents' to step callbacks; callback_on_step_end_tensor_inputs="
                             f"{wanted} asks for prompt embeddings too")
        height = height or cfg.sample_height * e.spatial_compression
        width = width or cfg.sample_width * e.spatial_compression
        if num_frames is None and self._task in ("t2v", "i2v") and "video" not in task:
            num_frames = cfg.sample_frames
        self._guidance_scale, self._interrupt, self._attention_kwargs = guidance_scale, False, attention_kwargs
        run = num_inference_steps if strength is None else min(int(num_inference_steps * strength), num_inference_steps)
        self._num_timesteps = run
        bar = tqdm(total=run, **self._progress)

        def step(_, i, t, kw):
            out = callback_on_step_end(self, i, torch.tensor(t), kw) if callback_on_step_end is not None else None
            if isinstance(out, dict) and set(out) - {"latents"}:
                raise ValueError(f"the step callback returned {sorted(set(out) - {'latents'})}; cogvx step callbacks "
                                 "can replace only 'latents'")
            if self._interrupt:
                _say_once("interrupt", "pipe._interrupt was set in a step callback: cogvx cannot stop the loop early; "
                                       "the remaining steps ran")
            bar.update()
            return out

        args = dict(prompt=prompt, negative_prompt=negative_prompt, num_frames=num_frames, height=height, width=width,
                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    use_dynamic_cfg=use_dynamic_cfg, num_videos_per_prompt=num_videos_per_prompt, generator=generator,
                    latents=latents, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                    callback_on_step_end=step, max_sequence_length=max_sequence_length, strength=strength, **task)
        try:
            with _lora_call_scale(e, scale):
                if self._offload is None:
                    result = e.generate(**args, output_type=output_type)
                    frames = result.latents if output_type == "latent" else result.frames
                else:
                    frames = self._generate_offloaded(args, output_type)
        finally:
            bar.close()
        return CogVideoXPipelineOutput(frames=frames) if return_dict else (frames,)

    def _generate_offloaded(self, args: dict, output_type: str):
        """Text encoding, denoising and decoding, each with only its own component on the GPU."""
        e, dev = self.engine, self._offload
        cfg = e.config
        if args["prompt"] is not None:
            prompts = [args["prompt"]] if isinstance(args["prompt"], str) else list(args["prompt"])
            length = args["max_sequence_length"] or (cfg.max_text_seq_length if cfg.use_learned_positional_embeddings
                                                     else 226)
            with _on(dev, e.text_encoder):
                if args["prompt_embeds"] is None:
                    args["prompt_embeds"] = e.encode(prompts, length)
                if args["guidance_scale"] > 1 and args["negative_prompt_embeds"] is None:
                    neg = args["negative_prompt"] if args["negative_prompt"] is not None else ""
                    args["negative_prompt_embeds"] = e.encode([neg] * len(prompts) if isinstance(neg, str) else list(neg),
                                                              length)
            args["prompt"] = args["negative_prompt"] = None
        encodes = any(args.get(k) is not None for k in ("image", "video", "control_video"))
        with _on(dev, e.transformer, e.vae if encodes else None):
            latents = e.generate(**args, output_type="latent").latents
        if output_type == "latent":
            return latents
        with _on(dev, e.vae):
            return postprocess(e.decode(latents), output_type)


# ---------------------------------------------------------------------------------------- helpers
def _check_component(name: str, module, cls, factory: str) -> None:
    if module is not None and not isinstance(module, cls):
        raise TypeError(f"{name}=: got a {type(module).__module__}.{type(module).__name__}; pass cogvx's "
                        f"({factory}.from_pretrained from cogvx.engine)")


def _module_device(m) -> torch.device:
    return next(m.parameters()).device


def _module_dtype(m) -> torch.dtype:
    if m is None:
        return torch.float32
    p = next((p for p in m.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


def _lora_scale(attention_kwargs) -> float:
    if attention_kwargs is None:
        return 1.0
    if not isinstance(attention_kwargs, dict) or set(attention_kwargs) - {"scale"}:
        raise ValueError(f"attention_kwargs: cogvx honours only {{'scale': <LoRA scale>}} (got {attention_kwargs!r})")
    s = attention_kwargs.get("scale", 1.0)
    if isinstance(s, bool) or not isinstance(s, (int, float)):
        raise ValueError(f"attention_kwargs['scale'] must be a number (got {s!r})")
    return float(s)


@contextlib.contextmanager
def _lora_call_scale(engine: Engine, scale: float):
    """diffusers scales every LoRA layer by attention_kwargs["scale"] for one call."""
    if scale == 1.0 or not engine.lora.active:
        yield
        return
    with engine.lock:
        engine.lora.call_scale = scale
        engine.lora.apply(engine.transformer, engine.dtype)
        engine.forward.weights_changed()
    try:
        yield
    finally:
        with engine.lock:
            engine.lora.call_scale = 1.0
            engine.lora.apply(engine.transformer, engine.dtype)
            engine.forward.weights_changed()


@contextlib.contextmanager
def _on(device: torch.device, *modules):
    mods = [m for m in modules if m is not None]
    for m in mods:
        m.to(device)
    try:
        yield
    finally:
        for m in mods:
            m.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()

