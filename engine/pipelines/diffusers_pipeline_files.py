"""``from_pretrained`` / ``save_pretrained`` of the diffusers-compatible pipelines.

Loading is cogvx's (strict, safetensors only, a saved quantized component loads as saved) with diffusers'
keywords: ``torch_dtype`` (one dtype, or {component: dtype, "default": dtype}), ``variant=``, ``device_map=``
and components passed in. Saving writes diffusers' layout (model_index.json and one folder per component,
safetensors), which diffusers' own ``from_pretrained`` reads.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from cogvx.quantize import check_runnable

from ..io.checkpoint import read_json, read_model_index
from ..loading import (
    load_scheduler,
    load_text_encoder,
    load_tokenizer,
    load_transformer,
    load_vae,
    read_quantization,
    required_components,
)
from ..models.schedulers import SCHEDULERS
from ..models.tasks import PIPELINE_CLASSES, kind_of_class, tasks_of_kind
from ..models.text_encoder import text_encoder_dtype
from ..models.tokenizer import PromptTokenizer
from ..quantizing import quantize_text_encoder, quantize_transformer, resolve_quantization
from ..runtime.devices import resolve_dtype
from .diffusers_components import as_scheduler, check_given
from .diffusers_files import (
    DIFFUSERS_VERSION,
    LOADING_LOG,
    check_from_pretrained_kwargs,
    component_dir,
    device_of_map,
    dtype_for,
    save_module,
    torch_dtype_of,
    variant_view,
)
from .diffusers_models import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel, adopt
from .diffusers_quant import pipeline_recipes

__all__ = ["PipelineFiles"]

_NAMES = ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")


def _t5_in(model, dtype: torch.dtype):
    """An explicitly asked float16 T5, as transformers keeps it: the feed-forward output projections ``wo``
    stay float32 (T5's activations overflow float16 there)."""
    warnings.warn("text_encoder in float16 (asked for explicitly): T5's activations can overflow float16; its "
                  "'wo' projections are kept in float32 as transformers does. bfloat16 or float32 are safe",
                  UserWarning, stacklevel=4)
    for name, m in model.named_modules():
        if not list(m.children()) and not name.endswith(".wo"):
            m.to(dtype)
    return model


def _load_scheduler(d: Path):
    name = read_json(d / "scheduler_config.json", "a diffusers scheduler_config.json").get("_class_name")
    if name is None or name in SCHEDULERS:
        return load_scheduler(d)
    try:
        import diffusers
    except ImportError as e:
        raise ValueError(f"{d} holds a {name}, a diffusers scheduler: install diffusers to load it, or use "
                         "CogVideoXDDIMScheduler / CogVideoXDPMScheduler") from e
    if not hasattr(diffusers, name):
        raise ValueError(f"{d}: unknown scheduler class {name!r}")
    return getattr(diffusers, name).from_pretrained(d)


class PipelineFiles:
    """Mixed into ``CogVideoXPipelineBase``."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype=None, *, variant: str | None = None,
                        device_map=None, **kwargs):
        """Load a diffusers-layout checkpoint (on the CPU unless ``device_map`` says a device, as diffusers);
        components passed in (``transformer=``, ``text_encoder=``, ...) are used as they are."""
        torch_dtype = torch_dtype_of(torch_dtype, kwargs)
        given = {c: kwargs.pop(c) for c in _NAMES if c in kwargs}
        qc = kwargs.pop("quantization_config", None)
        recipes = {c: r for c, r in (pipeline_recipes(qc) if qc is not None else {}).items() if c not in given}
        check_given(given)
        if "scheduler" in given:
            as_scheduler(given["scheduler"])
        check_from_pretrained_kwargs(kwargs, f"{cls.__name__}.from_pretrained")
        dev = device_of_map(device_map) or torch.device("cpu")
        for r in recipes.values():
            check_runnable(r, dev)
        d = component_dir(pretrained_model_name_or_path, None)
        index = read_model_index(d, {k: v for k, v in required_components().items() if k not in given},
                                 PIPELINE_CLASSES)
        kind = kind_of_class(index["_class_name"])
        if kind != cls.checkpoint_task:
            names = " or ".join(c for t in tasks_of_kind(kind) for c in t.pipeline_classes)
            raise ValueError(f"{d} is a {index['_class_name']} checkpoint: load it with {names}")
        dts = {c: dtype_for(torch_dtype, c) for c in _NAMES}
        tr_dt = resolve_dtype(dts["transformer"] if dts["transformer"] is not None else
                              getattr(given.get("transformer"), "dtype", torch.float32), dev)
        saved = {c: info for c in ("transformer", "text_encoder") if c not in given
                 and (info := read_quantization(d / c)) is not None}
        resolve_quantization(None, saved, dev, tr_dt, d)  # a saved quantized component loads in its dtype only
        parts = dict(given)
        for name in _NAMES:
            if name in parts:
                continue
            with variant_view(d / name, variant if name in ("transformer", "vae", "text_encoder") else None) as sub:
                parts[name] = cls._load_part(name, sub, dev, dts[name], tr_dt, torch_dtype, saved, parts)
            LOADING_LOG.info(f"Loaded {name} as {type(parts[name]).__name__} from `{name}` subfolder of {d}.")
        tok = parts["tokenizer"] if isinstance(parts["tokenizer"], PromptTokenizer) else None
        if "text_encoder" in recipes:
            quantize_text_encoder(parts["text_encoder"], recipes["text_encoder"], tok)
        if "transformer" in recipes:
            quantize_transformer(parts["transformer"], recipes["transformer"], tok, parts["text_encoder"], tr_dt)
        return cls(**{k: parts[k] for k in _NAMES})

    @staticmethod
    def _load_part(name, d: Path, dev, dt, tr_dt, torch_dtype, saved, parts):
        if name == "transformer":
            return adopt(CogVideoXTransformer3DModel, load_transformer(d, dev, tr_dt, info=saved.get("transformer")))
        if name == "vae":
            return adopt(AutoencoderKLCogVideoX, load_vae(d, dev, resolve_dtype(dt if dt is not None else tr_dt, dev)))
        if name == "text_encoder":
            explicit = isinstance(torch_dtype, dict) and dt is not None
            want = resolve_dtype(dt, dev) if explicit else text_encoder_dtype(tr_dt, dev)
            if want == torch.float16:  # only when asked for by name: load in float32, then as transformers does
                return _t5_in(load_text_encoder(d, dev, torch.float32, info=saved.get("text_encoder")), want)
            return load_text_encoder(d, dev, want, info=saved.get("text_encoder"))
        if name == "tokenizer":
            te = parts.get("text_encoder")
            return load_tokenizer(d, vocab_limit=te.config.vocab_size if te is not None else None)
        return _load_scheduler(d)

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None, max_shard_size: int | str | None = None, **kwargs) -> None:
        """diffusers' layout: model_index.json and a folder per component, safetensors only
        (``safe_serialization=False`` is written as safetensors too: cogvx never writes pickles)."""
        if kwargs.pop("push_to_hub", False):
            raise ValueError("save_pretrained(push_to_hub=True): cogvx does not upload; push the folder yourself")
        if kwargs:
            raise TypeError(f"save_pretrained got unsupported argument(s) {sorted(kwargs)}")
        out = Path(save_directory)
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"save_pretrained: {out} is a file, not a folder")
        out.mkdir(parents=True, exist_ok=True)
        if not safe_serialization:
            warnings.warn("save_pretrained(safe_serialization=False): cogvx writes safetensors only (never pickles)",
                          UserWarning, stacklevel=2)
        index = {"_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_VERSION}
        for name in _NAMES:
            part = self.components[name]
            index[name] = [None, None] if part is None else list(_library_and_class(name, part))
            if part is None:
                continue
            sub = out / name
            if name in ("transformer", "vae"):
                save_module(part, sub, variant, max_shard_size=max_shard_size)
            elif name == "text_encoder":
                part.save_pretrained(sub, variant=variant, safe_serialization=True)
            elif isinstance(part, PromptTokenizer):
                sub.mkdir(parents=True, exist_ok=True)
                for f in Path(part.source).parent.iterdir():
                    if f.is_file():
                        shutil.copy2(f, sub / f.name)
            elif hasattr(part, "save_pretrained"):
                part.save_pretrained(sub)
            else:  # cogvx's scheduler
                sub.mkdir(parents=True, exist_ok=True)
                cfg = {"_class_name": type(part).__name__, "_diffusers_version": DIFFUSERS_VERSION,
                       **part.config.to_dict()}
                (sub / "scheduler_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _library_and_class(name: str, part) -> tuple[str, str]:
    if name in ("transformer", "vae") or name == "scheduler":
        return "diffusers", type(part).__name__
    if isinstance(part, PromptTokenizer):
        return "transformers", "T5Tokenizer"
    return "transformers", type(part).__name__
