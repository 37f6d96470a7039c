"""Loading a diffusers-layout CogVideoX checkpoint: directory checks, hub-cache resolution,
and the transformer (built on the meta device, filled with ``assign=True``)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from .config import TransformerConfig
from .transformer import CogVideoXTransformer
from .weights import CheckpointError, load_into, read_state_dict

__all__ = [
    "resolve_model_dir", "read_model_index", "load_transformer", "build_transformer", "load_components",
    "quantize_transformer", "quantize_text_encoder", "text_encoder_dtype", "CheckpointError",
]

# Components a text-to-video pipeline needs, with the file each must hold.
REQUIRED = {
    "transformer": "config.json",
    "scheduler": "scheduler_config.json",
    "text_encoder": "config.json",
    "tokenizer": None,  # spiece.model or tokenizer.json; checked by the tokenizer loader
}


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a hub id (``org/name``) found in the local Hugging Face cache.

    Nothing is downloaded: an id that is not cached is an error saying how to fetch it.
    """
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    s = str(model)
    if p.exists():
        raise CheckpointError(f"{p} is a file; pass the checkpoint directory (the one holding model_index.json)")
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(s, local_files_only=True))
        except Exception as e:
            raise CheckpointError(
                f"{s!r} is not a local directory and is not in the local Hugging Face cache "
                f"({_hub_cache()}). cogvx never downloads at run time: fetch it first "
                f"(`huggingface-cli download {s}`) or pass a checkpoint directory"
            ) from e
    raise CheckpointError(
        f"checkpoint directory {p} does not exist; pass a diffusers-layout directory "
        "(holding model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/) or a cached hub id"
    )


def _hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return "~/.cache/huggingface/hub"


def read_model_index(model_dir: Path, components=REQUIRED) -> dict:
    """model_index.json, after checking that each needed component directory and file exists."""
    index_path = model_dir / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(
            f"{model_dir} has no model_index.json: not a diffusers-layout checkpoint directory"
        )
    index = json.loads(index_path.read_text())
    for name, needed in components.items():
        d = model_dir / name
        if not d.is_dir():
            raise CheckpointError(f"{model_dir} is incomplete: the {name}/ directory is missing")
        if needed and not (d / needed).is_file():
            raise CheckpointError(f"{model_dir} is incomplete: {name}/{needed} is missing")
    return index


def build_transformer(cfg: TransformerConfig, device="meta", dtype: torch.dtype | None = None) -> CogVideoXTransformer:
    """An uninitialized transformer on ``device`` (meta: no memory)."""
    with torch.device(device):
        model = CogVideoXTransformer(cfg)
    if dtype is not None and device != "meta":
        model = model.to(dtype)
    return model.eval().requires_grad_(False)


def load_transformer(
    transformer_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    fuse_qkv: bool = False,
) -> CogVideoXTransformer:
    """Transformer from a diffusers ``transformer/`` folder; every key consumed, every parameter filled."""
    d = Path(transformer_dir)
    cfg = TransformerConfig.from_json(d / "config.json")
    model = build_transformer(cfg)
    state = read_state_dict(d)
    load_into(model, state, where=f"transformer checkpoint {d}", dtype=dtype, device=device)
    if fuse_qkv:
        model.fuse_qkv()
    return model


def load_components(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    *,
    fuse_qkv: bool = False,
    scheduler: str | None = None,
    with_vae: bool = True,
    recipe: str | dict[str, str] | None = None,
) -> dict:
    """Every component of a checked checkpoint directory, loaded once.

    Returns a dict with "transformer", "scheduler", "tokenizer", "text_encoder" and "vae" (None when
    ``with_vae`` is False), and "recipes" ({component: recipe name} of what is quantized). Cheap reads
    and checks come first (recipe names and availability, quantization files), so that a bad request
    or a broken checkpoint fails before gigabytes of weights are read.

    recipe: a recipe name for the transformer or {component: name} (``cogvx.quantize.RECIPES``),
        applied after loading the full-precision weights. A component folder that holds a quantized
        checkpoint (``quantization.json``) loads as saved, never re-quantized; asking for a different
        recipe for it is an error.
    """
    from .schedulers import load_scheduler
    from .text_encoder import PromptTokenizer, load_text_encoder

    read_model_index(model_dir, {**REQUIRED, **({"vae": "config.json"} if with_vae else {})})
    t_cfg = TransformerConfig.from_json(model_dir / "transformer" / "config.json")
    requested, saved = _check_quantization(model_dir, device, dtype, recipe)
    sched = load_scheduler(model_dir / "scheduler", class_name=scheduler)
    tokenizer = PromptTokenizer.from_dir(model_dir / "tokenizer")
    te_dtype = text_encoder_dtype(dtype, device)
    if "text_encoder" in saved:
        from cogvx.quantize.serialization import load_quantized_text_encoder

        text_encoder = load_quantized_text_encoder(model_dir / "text_encoder", device, te_dtype,
                                                   info=saved["text_encoder"])
    else:
        text_encoder = load_text_encoder(model_dir / "text_encoder", device=device, dtype=te_dtype)
    if text_encoder.config.d_model != t_cfg.text_embed_dim:
        raise CheckpointError(
            f"{model_dir}: the text encoder gives {text_encoder.config.d_model}-dim embeddings but the "
            f"transformer expects text_embed_dim={t_cfg.text_embed_dim}"
        )
    if "text_encoder" in requested:
        quantize_text_encoder(text_encoder, requested["text_encoder"], tokenizer)
    vae = None
    if with_vae:
        from .vae import load_vae

        vae = load_vae(model_dir / "vae", device=device, dtype=dtype)
    if "transformer" in saved:
        from cogvx.quantize.serialization import load_quantized_transformer

        transformer = load_quantized_transformer(model_dir / "transformer", device, dtype, fuse_qkv=fuse_qkv,
                                                 info=saved["transformer"])
    else:
        transformer = load_transformer(model_dir / "transformer", device=device, dtype=dtype, fuse_qkv=fuse_qkv)
    if "transformer" in requested:
        quantize_transformer(transformer, requested["transformer"], tokenizer, text_encoder, dtype)
    recipes = {c: info["recipe"]["name"] for c, info in saved.items()}
    recipes.update({c: r.name for c, r in requested.items()})
    return dict(transformer=transformer, scheduler=sched, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                recipes=recipes)


def _check_quantization(model_dir: Path, device: torch.device, dtype: torch.dtype, recipe) -> tuple[dict, dict]:
    """(recipes to apply {component: Recipe}, quantized folders {component: quantization info}).

    Every recipe, requested or saved, must run on ``device``; a saved one loads only in the dtype it
    was exported in; a requested recipe for a component that is already quantized must be the saved
    one (it is then not applied again).
    """
    from cogvx.quantize import check_runnable, resolve_recipes
    from cogvx.quantize.filters import COMPONENTS
    from cogvx.quantize.serialization import check_load_dtype, read_quantization

    requested = resolve_recipes(recipe, device)
    saved = {}
    for comp in COMPONENTS:
        info = read_quantization(model_dir / comp)
        if info is None:
            continue
        name = info["recipe"]["name"]
        check_runnable(name, device)
        comp_dtype = text_encoder_dtype(dtype, device) if comp == "text_encoder" else dtype
        check_load_dtype(info, model_dir / comp, comp_dtype)
        if comp in requested:
            if requested[comp].name != name:
                raise CheckpointError(
                    f"{model_dir / comp} is already quantized with {name!r}; it loads as saved: drop "
                    f"recipe {requested[comp].name!r} for the {comp}, or quantize the full-precision checkpoint"
                )
            del requested[comp]
        saved[comp] = info
    return requested, saved


def quantize_transformer(transformer, recipe, tokenizer=None, text_encoder=None, dtype=torch.float32) -> None:
    """Apply ``recipe`` to a loaded transformer; a recipe with static activation scales is calibrated
    on a CFG pair of stock prompts embedded by ``text_encoder`` (``cogvx.quantize.calibration``)."""
    from cogvx.quantize import get_recipe, quantize_
    from cogvx.quantize.calibration import CALIBRATION_PROMPTS, transformer_calibration

    recipe = get_recipe(recipe)
    calibrate = None
    if recipe.needs_calibration:
        from .text_encoder import PromptTruncationWarning, encode_prompts

        if tokenizer is None or text_encoder is None:
            raise ValueError(f"recipe {recipe.name!r} calibrates on prompt embeddings: pass tokenizer and text_encoder")
        with warnings.catch_warnings():  # a tiny test model's text length truncates the stock prompts
            warnings.simplefilter("ignore", PromptTruncationWarning)
            embeds = encode_prompts(tokenizer, text_encoder, list(CALIBRATION_PROMPTS[:2]),
                                    transformer.config.max_text_seq_length, dtype=dtype)
        calibrate = transformer_calibration(embeds)
    quantize_(transformer, recipe, "transformer", calibrate=calibrate)


def quantize_text_encoder(text_encoder, recipe, tokenizer=None) -> None:
    """Apply ``recipe`` to a loaded T5 encoder (calibrated on stock prompts when the recipe needs it)."""
    from cogvx.quantize import get_recipe, quantize_
    from cogvx.quantize.calibration import CALIBRATION_PROMPTS, text_encoder_calibration

    recipe = get_recipe(recipe)
    calibrate = None
    if recipe.needs_calibration:
        if tokenizer is None:
            raise ValueError(f"recipe {recipe.name!r} calibrates on prompts: pass the tokenizer")
        calibrate = text_encoder_calibration(tokenizer(list(CALIBRATION_PROMPTS)).input_ids)
    quantize_(text_encoder, recipe, "text_encoder", calibrate=calibrate)


def text_encoder_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """T5 overflows in fp16: it runs in bf16 on GPUs and fp32 on the CPU when fp16 is asked for."""
    return dtype if dtype != torch.float16 else (torch.bfloat16 if device.type == "cuda" else torch.float32)
