"""A real-shape pipeline with random weights, built straight on the target device: what GPU
benchmarks run when no checkpoint is on disk (the built-in presets of the released models)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import T5Config

from ..loading import load_tokenizer
from ..models.presets import get_preset
from ..models.schedulers import SCHEDULERS, SchedulerConfig
from ..models.text_encoder import build_text_encoder, text_encoder_dtype, tie_embedding
from ..models.transformer import build_transformer
from ..models.vae import CogVideoXVAE
from .tiny import tiny_t5_config
from .tiny_tokenizer import make_tiny_tokenizer

__all__ = ["random_components", "T5_XXL"]

# The released CogVideoX text encoder (T5 v1.1 XXL encoder, 4.7B parameters).
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, dropout_rate=0.0)


@torch.no_grad()
def _init_(module: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
    """Seeded normal weights, LayerNorm/GroupNorm weights at 1 and biases at 0, drawn on the module's device."""
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for mod in module.modules():
        for name, p in mod.named_parameters(recurse=False):
            if isinstance(mod, (nn.LayerNorm, nn.GroupNorm)) or name == "bias":
                p.fill_(1.0 if name == "weight" else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32) * std)
    return module


def random_components(preset: str, device: torch.device, dtype: torch.dtype, *, text_encoder: bool = True,
                      vae: bool = True, seed: int = 0, t5_layers: int | None = None) -> dict:
    """Engine components of a preset with random weights (keys as ``loading.load_components``).

    The tokenizer is a small sentencepiece model (its ids fall inside T5's vocabulary); the T5-XXL
    encoder is real-size unless the preset is ``tiny`` (``t5_layers``: keep only that many of its 24
    layers, e.g. for a CPU benchmark). Weights are materialized once, on ``device``.
    """
    p = get_preset(preset)
    cfg = p.transformer
    transformer = build_transformer(cfg).to_empty(device=device)
    _init_(transformer, seed)
    transformer = transformer.to(dtype)
    tok_dir = Path(tempfile.mkdtemp(prefix="cogvx-tok-"))
    make_tiny_tokenizer(tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    shutil.rmtree(tok_dir, ignore_errors=True)
    te = None
    if text_encoder:
        t5 = T5Config(**T5_XXL) if cfg.text_embed_dim == 4096 else tiny_t5_config(cfg.text_embed_dim, 32128)
        if t5_layers is not None:
            t5.num_layers = t5_layers
        te = _init_(build_text_encoder(t5).to_empty(device=device), seed + 1)
        tie_embedding(te)
        te = te.to(text_encoder_dtype(dtype, device)).eval().requires_grad_(False)
    v = None
    if vae:
        with torch.device("meta"):
            v = CogVideoXVAE(p.vae)
        v = _init_(v.to_empty(device=device), seed + 2).to(dtype).eval()
    scheduler = SCHEDULERS[p.scheduler](SchedulerConfig())
    return dict(transformer=transformer.eval().requires_grad_(False), scheduler=scheduler, tokenizer=tokenizer,
                text_encoder=te, vae=v, recipes={}, task="i2v" if cfg.image_to_video else "t2v")
