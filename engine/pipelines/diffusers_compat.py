"""What diffusers' CogVideoX pipeline classes share, on the cogvx engine (the classes themselves:
``diffusers_pipelines``). A diffusers script runs by changing its ``from diffusers import ...`` line to
``from cogvx.engine import ...``:

    pipe = CogVideoXPipeline.from_pretrained(path, torch_dtype=torch.bfloat16)        # or
    pipe = CogVideoXPipeline(tokenizer=tok, text_encoder=t5, vae=vae, transformer=transformer, scheduler=sched)
    video = pipe(prompt=prompt, num_frames=49, guidance_scale=6, generator=torch.Generator().manual_seed(42)).frames[0]

Components may be diffusers' or cogvx's modules, a transformers ``T5EncoderModel`` and tokenizer, any
diffusers scheduler (``diffusers_components``). The call follows diffusers step for step
(``diffusers_loop``); loading and saving are cogvx's (strict, safetensors only: ``diffusers_files``).
What cogvx cannot honour is refused with a clear error, or, where the result is unchanged, said once as a
warning (model CPU offload on a machine without a GPU).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from cogvx.kernels import resolve_backend

from ..models.lora import is_plain_linear
from ..models.text_encoder import encode_ids
from ..models.tokenizer import PromptTokenizer
from ..runtime.devices import resolve_device
from .diffusers_components import as_scheduler, as_transformer, as_vae, check_given, token_ids
from .diffusers_lora import LoraPipelineMethods, lora_call_scale, lora_scale
from .diffusers_loop import CALLBACK_TENSOR_INPUTS, run_call
from .diffusers_models import CogVideoXPipelineOutput
from .diffusers_pipeline_files import PipelineFiles
from .engine import Engine

__all__ = ["CogVideoXPipelineBase"]

_COMPONENTS = ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")
_warned: set[str] = set()


def _say_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


class CogVideoXPipelineBase(PipelineFiles, LoraPipelineMethods):
    checkpoint_task = "t2v"  # the checkpoint task (model_index.json) this class serves
    _callback_tensor_inputs = list(CALLBACK_TENSOR_INPUTS)
    _optional_components: list[str] = []
    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(self, tokenizer=None, text_encoder=None, vae=None, transformer=None, scheduler=None):
        """diffusers' constructor: each component diffusers' or cogvx's (or None: a pipeline without a
        transformer can still ``encode_prompt``)."""
        check_given(dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer))
        self._parts = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=as_vae(vae),
                           transformer=as_transformer(transformer), scheduler=as_scheduler(scheduler))
        self.progress_bar_config: dict = {}
        self._guidance_scale, self._num_timesteps, self._interrupt = 6.0, 0, False
        self._attention_kwargs, self._current_timestep = None, None
        self.engine = self._make_engine()

    def _make_engine(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Engine | None:
        p = self._parts
        tr = p["transformer"]
        if tr is None:
            return None
        ours = isinstance(p["tokenizer"], PromptTokenizer)  # the engine's own prompt path takes cogvx's tokenizer
        e = Engine(transformer=tr, scheduler=p["scheduler"], tokenizer=p["tokenizer"] if ours else None,
                   text_encoder=p["text_encoder"] if ours else None, vae=p["vae"],
                   device=device or tr.device, dtype=dtype or tr.dtype, task=self.checkpoint_task)
        e.forward.set_kernels("auto", resolve_backend("auto", e.device))  # as Engine.load's default
        return e

    # ------------------------------------------------------------------ components and devices
    def _replace(self, name: str, value) -> None:
        """``pipe.transformer = ...`` (or vae, text_encoder, tokenizer), as diffusers allows: the engine is
        rebuilt over the new set (adapters loaded on the old transformer go with it)."""
        check_given({name: value})
        self._parts[name] = {"transformer": as_transformer, "vae": as_vae}.get(name, lambda v: v)(value)
        self.engine = self._make_engine()

    transformer = property(lambda self: self._parts["transformer"], lambda self, v: self._replace("transformer", v))
    vae = property(lambda self: self._parts["vae"], lambda self, v: self._replace("vae", v))
    text_encoder = property(lambda self: self._parts["text_encoder"], lambda self, v: self._replace("text_encoder", v))
    tokenizer = property(lambda self: self._parts["tokenizer"], lambda self, v: self._replace("tokenizer", v))
    guidance_scale = property(lambda self: self._guidance_scale)
    do_classifier_free_guidance = property(lambda self: self._guidance_scale > 1)
    num_timesteps = property(lambda self: self._num_timesteps)
    interrupt = property(lambda self: self._interrupt)
    attention_kwargs = property(lambda self: self._attention_kwargs)
    current_timestep = property(lambda self: self._current_timestep)
    vae_scale_factor_spatial = property(lambda self: self.engine.spatial_compression if self.engine else 8)
    vae_scale_factor_temporal = property(lambda self: self.engine.temporal_compression if self.engine else 4)

    @property
    def device(self) -> torch.device:
        if self.engine is not None:
            return self.engine.device
        te = self._parts["text_encoder"]
        return te.device if te is not None else torch.device("cpu")

    _execution_device = device

    @property
    def dtype(self) -> torch.dtype:
        if self.engine is not None:
            return self.engine.dtype
        te = self._parts["text_encoder"]
        return te.dtype if te is not None else torch.float32

    @property
    def scheduler(self):
        return self._parts["scheduler"]

    @scheduler.setter
    def scheduler(self, value) -> None:
        self._parts["scheduler"] = as_scheduler(value)
        if self.engine is not None:
            self.engine.scheduler = self._parts["scheduler"]

    @property
    def components(self) -> dict:
        return dict(self._parts)

    def to(self, *args, **kwargs):
        """``to(device)``, ``to(dtype)``, ``to(device, dtype)`` or ``to(device=, dtype=)``: every module moves."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        if kwargs:
            raise TypeError(f"to() got unsupported argument(s) {sorted(kwargs)}")
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            else:
                device = a
        dev = resolve_device(device) if device is not None else None
        e = self.engine
        if e is not None and dev is not None:
            e.enable_offload(None)  # every component back whole, then all of them move
        for name in ("transformer", "text_encoder", "vae"):
            m = self._parts[name]
            if m is not None:
                m.to(device=dev, dtype=dtype)
        if e is not None:
            with e.lock:
                if dtype is not None:
                    e.dtype = dtype
                if dev is not None:
                    e.device = dev
                    e.forward.set_kernels("auto", resolve_backend("auto", dev))
                e.forward.weights_changed()
        return self


    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = "cuda") -> None:
        """Keep the components on the CPU and move each to the GPU only for its stage (text encoding,
        denoising, decoding): the engine's ``offload="model"``. Without a GPU there is nothing to offload to:
        said once, and the pipeline runs on the CPU (``Engine.load(..., offload="model")`` bounds a CPU's
        memory instead, reading each component from the checkpoint for its stage)."""
        self._offload_to("model", gpu_id, device)

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = "cuda") -> None:
        """The engine's ``offload="sequential"``: blocks streamed to the GPU one at a time (the VAE whole)."""
        self._offload_to("sequential", gpu_id, device)

    def enable_group_offload(self, onload_device, offload_device="cpu", offload_type: str = "block_level",
                             num_blocks_per_group: int | None = 1, use_stream: bool = False, **kwargs) -> None:
        """The engine's ``offload="group"``: the transformer's blocks streamed to ``onload_device`` in groups of
        ``num_blocks_per_group``, the next group's copy overlapped on a side stream with ``use_stream``;
        the text encoder and the VAE move whole for their stages. diffusers' leaf-level offload is the
        engine's "sequential"."""
        if offload_type not in ("block_level", "leaf_level"):
            raise ValueError(f"offload_type must be 'block_level' or 'leaf_level' (got {offload_type!r})")
        if torch.device(offload_device).type != "cpu":
            raise ValueError(f"offload_device must be the CPU (got {offload_device!r})")
        mode = "group" if offload_type == "block_level" else "sequential"
        self._offload_to(mode, None, onload_device, group_size=int(num_blocks_per_group or 1), use_stream=use_stream)

    def _offload_to(self, mode: str, gpu_id, device, **options) -> None:
        dev = torch.device(device)
        if dev.type != "cuda" or not torch.cuda.is_available():
            _say_once("offload", f"{mode} offload: there is no CUDA device, so there is nothing to offload to and the "
                                 "pipeline runs on the CPU (Engine.load(..., offload='model') bounds a CPU's memory)")
            return
        if dev.index is None:
            dev = torch.device("cuda", gpu_id or 0)
        e = self.engine
        e.enable_offload(None)
        e.device = dev
        e.enable_offload(mode, **options)

    def fuse_qkv_projections(self, transformer: bool = True, vae: bool = False) -> None:
        """Fuse each attention's q/k/v projections into one GEMM (full-precision weights only)."""
        if not transformer or self.engine is None:
            return
        e = self.engine
        with e.lock:
            for blk in e.transformer.transformer_blocks:
                a = blk.attn1
                if a.to_qkv is None and not all(is_plain_linear(getattr(a, n)) for n in ("to_q", "to_k", "to_v")):
                    raise ValueError("fuse_qkv_projections(): the q/k/v weights are quantized and cannot be concatenated;"
                                     " fuse before quantizing (call it before quantize_)")
            e.transformer.fuse_qkv_projections()
            e.lora.apply(e.transformer, e.dtype)  # side branches follow q/k/v onto the fused layer
            e.forward.weights_changed()

    def unfuse_qkv_projections(self, transformer: bool = True, vae: bool = False) -> None:
        """Undo :meth:`fuse_qkv_projections` (three projections again)."""
        if not transformer or self.engine is None:
            return
        e = self.engine
        with e.lock:
            if e.lora.names:
                raise ValueError("unfuse_qkv_projections(): unload the LoRA adapters first (unload_lora_weights())")
            e.transformer.unfuse_qkv_projections()
            e.forward.weights_changed()

    def enable_attention_slicing(self, slice_size="auto") -> None:
        """Accepted, and changes nothing: cogvx's attention (SDPA / flash) never holds the full score matrix."""

    def disable_attention_slicing(self) -> None:
        """See :meth:`enable_attention_slicing`."""

    def set_progress_bar_config(self, **kwargs) -> None:
        self.progress_bar_config = dict(kwargs)

    # ------------------------------------------------------------------ prompts
    def encode_prompt(self, prompt, negative_prompt=None, do_classifier_free_guidance: bool = True,
                      num_videos_per_prompt: int = 1, prompt_embeds=None, negative_prompt_embeds=None,
                      max_sequence_length: int = 226, device=None, dtype=None):
        """diffusers' ``encode_prompt``: (prompt_embeds, negative_prompt_embeds) [B * k, L, D] (the second
        None without guidance), from the text encoder without attention mask, as diffusers does."""
        device = device or self.device
        prompt = [prompt] if isinstance(prompt, str) else prompt
        batch_size = len(prompt) if prompt is not None else prompt_embeds.shape[0]
        if prompt_embeds is None:
            prompt_embeds = self._t5_embeds(prompt, num_videos_per_prompt, max_sequence_length, device, dtype)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt = negative_prompt or ""
            negative_prompt = batch_size * [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            if prompt is not None and type(prompt) is not type(negative_prompt):
                raise TypeError(f"`negative_prompt` should be the same type to `prompt`, but got "
                                f"{type(negative_prompt)} != {type(prompt)}.")
            if batch_size != len(negative_prompt):
                raise ValueError(f"`negative_prompt` has batch size {len(negative_prompt)}, but `prompt` has batch "
                                 f"size {batch_size}; they must match")
            negative_prompt_embeds = self._t5_embeds(negative_prompt, num_videos_per_prompt, max_sequence_length,
                                                     device, dtype)
        return prompt_embeds, negative_prompt_embeds

    def _t5_embeds(self, prompt, k: int, max_length: int, device, dtype) -> torch.Tensor:
        te, tok = self._parts["text_encoder"], self._parts["tokenizer"]
        if te is None or tok is None:
            raise ValueError("this pipeline has no text encoder and tokenizer: pass prompt_embeds (and "
                             "negative_prompt_embeds under guidance)")
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        with self.engine.residency.use("text_encoder") if self.engine is not None else contextlib.nullcontext():
            embeds = encode_ids(te, token_ids(tok, prompt, max_length), device, dtype or self.dtype)
        return embeds.repeat_interleave(k, dim=0) if k > 1 else embeds

    # ------------------------------------------------------------------ generation
    def _call(self, *, num_videos_per_prompt, return_dict, attention_kwargs, **args):
        """diffusers' CogVideoX pipelines force num_videos_per_prompt to 1 (one video per prompt, whatever is
        passed); so do these."""
        self._attention_kwargs = attention_kwargs
        task = "v2v" if "video" in args else self.checkpoint_task
        with lora_call_scale(self.engine, lora_scale(attention_kwargs)):
            frames = run_call(self, task, **args)
        return CogVideoXPipelineOutput(frames) if return_dict else (frames,)

# ---------------------------------------------------------------------------------------- helpers
