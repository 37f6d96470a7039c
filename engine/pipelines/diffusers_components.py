"""What a diffusers script hands a pipeline, as cogvx components.

- a diffusers ``CogVideoXTransformer3DModel`` / ``AutoencoderKLCogVideoX`` becomes cogvx's module of the same
  config, filled from its state dict with ``assign=True``: the tensors are the diffusers module's own (no
  second copy of the weights);
- cogvx's modules are used as they are (quantized or not), under their diffusers-named class;
- diffusers' ``CogVideoXDDIMScheduler`` / ``CogVideoXDPMScheduler`` become cogvx's (host-side coefficients);
  any other scheduler with ``set_timesteps`` and ``step`` (``DDIMScheduler()``, ``X.from_config(...)``) is used
  through its own methods;
- a transformers tokenizer is called as diffusers calls it; cogvx's ``PromptTokenizer`` as cogvx does.
"""

from __future__ import annotations

import torch

from ..io.safetensors import check_filled, load_into
from ..models.schedulers import SCHEDULERS, make_scheduler
from ..models.tokenizer import PromptTokenizer
from ..models.transformer import CogVideoXTransformer
from .diffusers_models import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel, adopt, config_dict

__all__ = ["as_transformer", "as_vae", "as_scheduler", "token_ids", "is_cogvx_scheduler", "check_given"]


def check_given(parts: dict) -> None:
    """Cheap type checks of components passed in, before anything is loaded or converted."""
    te, tok = parts.get("text_encoder"), parts.get("tokenizer")
    if te is not None and not (isinstance(te, torch.nn.Module) and hasattr(te, "config")):
        raise TypeError(f"text_encoder=: expected a transformers T5EncoderModel (got {type(te).__name__}); pass the "
                        "module, or leave text_encoder out to load the checkpoint's")
    if tok is not None and not callable(tok):
        raise TypeError(f"tokenizer=: expected a transformers tokenizer or cogvx's PromptTokenizer (got "
                        f"{type(tok).__name__})")
    for name in ("transformer", "vae"):
        m = parts.get(name)
        if m is not None and not isinstance(m, torch.nn.Module):
            raise TypeError(f"{name}=: expected a module (diffusers' or cogvx's), got {type(m).__name__}")


def _convert(module, cls, name: str):
    if module is None:
        return None
    if isinstance(module, cls.base):
        return adopt(cls, module)
    if type(module).__name__ == "OptimizedModule":  # what torch.compile(module) returns
        raise TypeError(f"{name}=: a torch.compile'd module; cogvx compiles the transformer itself (fullgraph, "
                        "static shapes, a persistent cache): keep the plain module and call pipe.engine.compile() "
                        "(or mode='max-autotune')")
    if not isinstance(module, torch.nn.Module) or type(module).__name__ != cls.__name__ or not hasattr(module, "config"):
        raise TypeError(f"{name}=: expected a {cls.__name__} (diffusers' or cogvx's), got "
                        f"{type(module).__module__}.{type(module).__name__}")
    with torch.device("meta"):
        ours = cls(**config_dict(module.config))
    try:
        load_into(ours, dict(module.state_dict()), where=f"{name}= (a diffusers {cls.__name__})")
    except Exception as e:
        raise ValueError(f"{name}=: this diffusers {cls.__name__} cannot become cogvx's module ({e}); pass its "
                         "unquantized, unfused form, or load the folder with cogvx's from_pretrained") from e
    check_filled(ours, f"{name}=")
    return ours.train(module.training).requires_grad_(False)


def as_transformer(module) -> CogVideoXTransformer3DModel | None:
    return _convert(module, CogVideoXTransformer3DModel, "transformer")


def as_vae(module) -> AutoencoderKLCogVideoX | None:
    vae = _convert(module, AutoencoderKLCogVideoX, "vae")
    if vae is not None and module is not vae:  # carry diffusers' switches over
        vae.use_tiling, vae.use_slicing = bool(getattr(module, "use_tiling", False)), \
            bool(getattr(module, "use_slicing", False))
    return vae


def is_cogvx_scheduler(scheduler) -> bool:
    return callable(getattr(scheduler, "schedule", None))


def as_scheduler(scheduler):
    """cogvx's scheduler for CogVideoX's two (host-side path); any other diffusers scheduler as it is."""
    if scheduler is None or is_cogvx_scheduler(scheduler):
        return scheduler
    name = type(scheduler).__name__
    if name in SCHEDULERS and hasattr(scheduler, "config"):
        return make_scheduler(config_dict(scheduler.config), name)
    if not (callable(getattr(scheduler, "set_timesteps", None)) and callable(getattr(scheduler, "step", None))):
        raise TypeError(f"scheduler: expected a diffusers scheduler (with set_timesteps and step) or cogvx's "
                        f"CogVideoXDDIMScheduler / CogVideoXDPMScheduler (got {type(scheduler).__name__})")
    return scheduler


def token_ids(tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """int64 [B, max_length] ids as diffusers' ``_get_t5_prompt_embeds`` makes them (padded to max_length,
    truncated, EOS added)."""
    if isinstance(tokenizer, PromptTokenizer):
        return tokenizer(texts, max_length=max_length).input_ids
    if not callable(tokenizer):
        raise TypeError(f"tokenizer: expected a transformers tokenizer or cogvx's PromptTokenizer (got "
                        f"{type(tokenizer).__name__})")
    out = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                    return_tensors="pt")
    return out.input_ids
