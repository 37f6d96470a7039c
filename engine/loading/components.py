"""Build the components of a diffusers-layout CogVideoX checkpoint: the transformer, VAE and T5 encoder
on the meta device filled with ``assign=True`` (never materialized twice), the tokenizer and the
scheduler; a quantized component folder (``quantization.json``) loads as saved, never re-quantized.

Cheap checks run first: every config is validated and compared with the safetensors headers, and
every shape is checked, before a single weight is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cogvx.quantize import QUANTIZABLE
from cogvx.quantize.settings import Runtime
from cogvx.quantize.torchao_format import cat_rows

from ..io.checkpoint import CheckpointError, read_json, read_model_index
from ..io.lora import SAVED_LORA_DIR, read_lora, read_saved_adapters
from ..io.safetensors import (
    check_filled,
    check_index,
    check_shapes,
    load_into,
    read_headers,
    read_tensors,
    weight_files,
)
from ..models.config import ConfigError, TransformerConfig, VAEConfig
from ..models.lora import LoraError, is_plain_linear, merge_into_weight, pairs_by_layer, resolve_targets
from ..models.schedulers import SCHEDULERS, make_scheduler
from ..models.tasks import PIPELINE_CLASSES, TASKS, kind_of_class
from ..models.text_encoder import build_text_encoder, text_encoder_dtype, tie_embedding
from ..models.transformer import CogVideoXTransformer, build_transformer
from ..models.vae import CogVideoXVAE
from ..quantizing import apply_runtime_settings, quantize_text_encoder, quantize_transformer, resolve_quantization
from .quantized import checked_headers, load_quantized, read_quantization
from .text import load_text_encoder, load_tokenizer, t5_config


# Components a pipeline needs, with the file each must hold (the tokenizer's files are checked by its loader).
_REQUIRED = {"transformer": "config.json", "scheduler": "scheduler_config.json", "text_encoder": "config.json",
             "tokenizer": None, "vae": "config.json"}


DEFERRABLE = ("text_encoder", "transformer", "vae")  # what CPU residency can read again per stage


def required_components() -> dict[str, str | None]:
    return dict(_REQUIRED)


def read_config(cls, path: Path):
    """A TransformerConfig or VAEConfig from a diffusers ``config.json``; errors name the file and key."""
    what = "transformer" if cls is TransformerConfig else "VAE"
    d = read_json(path, f"the {what} config.json of a diffusers checkpoint (a JSON object)")
    try:
        return cls.from_dict(d, where=str(path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from e


def load_transformer(transformer_dir: str | Path, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, fuse_qkv: bool = False,
                     info: dict[str, Any] | None = None) -> CogVideoXTransformer:
    """Transformer from a diffusers ``transformer/`` folder (plain or quantized); every key consumed,
    every parameter filled. The config is checked against the weight headers before anything is built."""
    d = Path(transformer_dir)
    cfg = read_config(TransformerConfig, d / "config.json")
    info = info if info is not None else read_quantization(d)
    files, headers = checked_headers(d, info, "transformer_blocks", cfg.num_layers)
    model = build_transformer(cfg)
    if info is not None:
        # torchao weights stored with q/k/v apart are fused at load when asked, or when they were exported
        # from a fused model ("fuse_qkv": true)
        fuse_after = (fuse_qkv or info.get("fuse_qkv") is True) and not info.get("fused_qkv") \
            and info["backend"] == "torchao"
        if fuse_qkv and not info.get("fused_qkv") and not fuse_after:
            raise CheckpointError(
                f"{d} was quantized with separate q/k/v projections and {info['backend']} weights cannot be fused at "
                "load time; load it with fuse_qkv=False, or export from an engine loaded with fuse_qkv=True")
        if info.get("fused_qkv"):
            model.fuse_qkv()  # on the meta device: only the module structure changes
        load_quantized(model, d, info, headers, device, dtype)
        if fuse_after:  # torchao per-row weights: their stored parts are joined
            try:
                model.fuse_qkv(cat=cat_rows)
            except ValueError as e:
                raise CheckpointError(f"{d}: {e}; load it with fuse_qkv=False") from e
        apply_runtime_settings(model, Runtime.from_dict(info["recipe"].get("settings", {})))
    else:
        check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}, headers, d / "config.json")
        load_into(model, dict(read_tensors(files, device)), where=f"transformer checkpoint {d}", dtype=dtype,
                  device=device)
        if fuse_qkv:
            model.fuse_qkv()
    check_filled(model, str(d))
    return model.eval().requires_grad_(False)


def load_vae(vae_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> CogVideoXVAE:
    """The VAE of a diffusers ``vae/`` folder (config.json + safetensors, single or sharded), in eval mode.
    Built on the meta device and filled with ``assign=True``; every key consumed, every parameter filled."""
    d = Path(vae_dir)
    if not d.is_dir():
        raise CheckpointError(f"VAE directory {d} does not exist; pass the vae/ folder of a diffusers-layout "
                              "CogVideoX checkpoint")
    cfg = read_config(VAEConfig, d / "config.json")
    files = weight_files(d)
    headers = read_headers(files)
    check_index(d, headers)
    with torch.device("meta"):
        model = CogVideoXVAE(cfg)
    check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}, headers, d / "config.json")
    load_into(model, dict(read_tensors(files, device)), where=f"VAE checkpoint {d}", dtype=dtype, device=device)
    return model.eval().requires_grad_(False)


def load_scheduler(source: str | Path, class_name: str | None = None):
    """A scheduler from a diffusers ``scheduler/`` directory or its ``scheduler_config.json``."""
    path = Path(source)
    if path.is_dir():
        path = path / "scheduler_config.json"
    if class_name is not None and class_name not in SCHEDULERS:
        raise ValueError(f"unsupported scheduler class {class_name!r}; accepted: {', '.join(SCHEDULERS)}")
    config = read_json(path, "a diffusers scheduler_config.json (a JSON object)")
    try:
        return make_scheduler(config, class_name)
    except (ValueError, TypeError) as e:  # the file's values: name the file
        raise CheckpointError(f"{path}: {e}") from e


def skeleton(name: str, component_dir: Path, dtype: torch.dtype, fuse_qkv: bool = False) -> nn.Module:
    """``name``'s module built on the meta device in ``dtype`` (no weight read, no memory)."""
    d = Path(component_dir)
    if name == "transformer":
        model = build_transformer(read_config(TransformerConfig, d / "config.json"))
        if fuse_qkv:
            model.fuse_qkv()
    elif name == "text_encoder":
        model = build_text_encoder(t5_config(d))
        tie_embedding(model)
    elif name == "vae":
        with torch.device("meta"):
            model = CogVideoXVAE(read_config(VAEConfig, d / "config.json"))
    else:
        raise ValueError(f"no deferred loading for component {name!r}; accepted: {', '.join(DEFERRABLE)}")
    return model.to(dtype).eval().requires_grad_(False)


def load_components(model_dir: Path, device: torch.device, dtype: torch.dtype, *, fuse_qkv: bool = False,
                    scheduler: str | None = None, recipe=None, lora=(), defer=(), load_device=None) -> dict:
    """Every component of a checked checkpoint directory, loaded once.

    Returns a dict with "transformer", "scheduler", "tokenizer", "text_encoder", "vae", "recipes"
    ({component: recipe name} of what is quantized) and "task" ("t2v", "i2v" or "control", from
    model_index.json), "lora_merged" (the LoRAs merged into the weights) and "lora_pending" (those left
    for the caller to attach as side branches). ``lora``: (path, scale) pairs; when a recipe quantizes
    the transformer here they are merged before quantizing, otherwise they are pending.
    Cheap reads and checks come first (configs, recipe availability, quantization
    files, headers), so that a bad request or a broken checkpoint fails before weights are read.
    ``defer``: components to return as meta-device skeletons, their weights unread (CPU residency reads
    them per stage), unless they are quantized (on disk or by ``recipe``): those load now and stay.
    ``load_device``: where the weights load, when not on ``device`` where they run (offload: the CPU);
    recipes are checked for ``device``.
    """
    run_device, device = device, device if load_device is None else torch.device(load_device)
    index = read_model_index(model_dir, _REQUIRED, PIPELINE_CLASSES)
    task = kind_of_class(index["_class_name"])
    t_cfg = read_config(TransformerConfig, model_dir / "transformer" / "config.json")
    _check_task(task, t_cfg, model_dir)
    te_cfg = t5_config(model_dir / "text_encoder")
    if te_cfg.d_model != t_cfg.text_embed_dim:
        raise CheckpointError(f"{model_dir}: the text encoder gives {te_cfg.d_model}-dim embeddings but the "
                              f"transformer expects text_embed_dim={t_cfg.text_embed_dim}")
    read_config(VAEConfig, model_dir / "vae" / "config.json")
    saved = {c: info for c in QUANTIZABLE if (info := read_quantization(model_dir / c)) is not None}
    requested = resolve_quantization(recipe, saved, run_device, dtype, model_dir)
    lazy = {c for c in defer if c not in saved and c not in requested}
    # Adapters that ran as side branches on the quantized transformer when it was saved come back the same way.
    saved_lora = read_saved_adapters(model_dir / SAVED_LORA_DIR) if "transformer" in saved else []
    sched = load_scheduler(model_dir / "scheduler", class_name=scheduler)
    tokenizer = load_tokenizer(model_dir / "tokenizer", vocab_limit=te_cfg.vocab_size)
    # Every component's headers against its config before any weight is read (the loaders check again).
    checked_headers(model_dir / "transformer", saved.get("transformer"), "transformer_blocks", t_cfg.num_layers)
    checked_headers(model_dir / "text_encoder", saved.get("text_encoder"), "encoder.block", te_cfg.num_layers)
    check_index(model_dir / "vae", read_headers(weight_files(model_dir / "vae")))
    te_dtype = text_encoder_dtype(dtype, run_device)
    if "text_encoder" in lazy:
        text_encoder = skeleton("text_encoder", model_dir / "text_encoder", te_dtype)
    else:
        text_encoder = load_text_encoder(model_dir / "text_encoder", device, te_dtype, info=saved.get("text_encoder"))
    if "text_encoder" in requested:
        quantize_text_encoder(text_encoder, requested["text_encoder"], tokenizer)
    vae = skeleton("vae", model_dir / "vae", dtype) if "vae" in lazy else \
        load_vae(model_dir / "vae", device=device, dtype=dtype)
    if "transformer" in lazy:
        transformer = skeleton("transformer", model_dir / "transformer", dtype, fuse_qkv)
    else:
        transformer = load_transformer(model_dir / "transformer", device, dtype, fuse_qkv=fuse_qkv,
                                       info=saved.get("transformer"))
    lora, merged = saved_lora + list(lora or ()), []
    if "transformer" in requested:
        merged, lora = merge_loras(transformer, lora), []
        # a calibrated recipe runs the text encoder: a deferred one is read for this and dropped
        calib = load_text_encoder(model_dir / "text_encoder", device, te_dtype) \
            if "text_encoder" in lazy and requested["transformer"].needs_calibration else text_encoder
        quantize_transformer(transformer, requested["transformer"], tokenizer, calib, dtype)
        del calib
    recipes = {c: info["recipe"]["name"] for c, info in saved.items()}
    recipes.update({c: r.name for c, r in requested.items()})
    return dict(transformer=transformer, scheduler=sched, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                recipes=recipes, task=task, lora_merged=merged, lora_pending=lora)


def merge_loras(transformer: torch.nn.Module, specs) -> list[str]:
    """Merge LoRAs ((path, scale) pairs) into a full-precision transformer for good, before it is
    quantized; every file is read and checked against the model before any weight changes. Returns
    "file:scale" per LoRA."""
    loras = [(read_lora(path), float(scale)) for path, scale in specs]
    plans = [(lora, scale, resolve_targets(transformer, lora.modules, str(lora.path))) for lora, scale in loras]
    for lora, scale, targets in plans:
        for layer, pairs in pairs_by_layer(lora.modules, targets, scale).items():
            if not is_plain_linear(layer):
                raise LoraError(f"{lora.path}: cannot merge into the quantized layer {type(layer).__name__}")
            merge_into_weight(layer, pairs)
    return [f"{lora.path.name}:{scale:g}" for lora, scale, _ in plans]


# ----------------------------------------------------------------------------------------- helpers
def _check_task(kind: str, cfg: TransformerConfig, model_dir: Path) -> None:
    t = TASKS[kind]
    if not t.concat_channels and cfg.image_to_video:
        raise CheckpointError(f"{model_dir}: model_index.json names a {t.label} pipeline but the transformer "
                              f"takes {cfg.in_channels} input channels (conditioning latents): the index and the "
                              "transformer come from different checkpoints")
    if t.concat_channels and cfg.in_channels == cfg.out_channels_:
        raise CheckpointError(f"{model_dir}: model_index.json names a {t.label} pipeline but the "
                              f"transformer takes no conditioning channels (in_channels={cfg.in_channels})")
