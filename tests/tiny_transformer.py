"""The quantized tiny transformer and fixed input that the CPU int8 recipes' tests share (kept out of
helpers.py, which imports only torch)."""

from __future__ import annotations

import torch

from cogvx.engine.models.positions import make_positions
from cogvx.engine.models.presets import PRESETS
from cogvx.engine.models.transformer import build_transformer
from cogvx.engine.quantizing import quantize_transformer


def tiny_quantized_transformer(recipe: str, fuse_qkv: bool = False):
    """(config, model, inputs): the tiny preset's transformer with N(0, 0.2) weights (seed 0), q/k/v
    fused when asked, quantized with ``recipe``, and a fixed CFG-style input (latents [2, 3, C, 6, 10],
    text [2, 64, 32], t = 900 / 300, positions)."""
    torch.manual_seed(0)
    cfg = PRESETS["tiny"].transformer
    model = build_transformer(cfg, device="cpu")
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    if fuse_qkv:
        model.fuse_qkv()
    quantize_transformer(model, recipe)
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 3, 4, 6, 10, generator=g), torch.randn(2, 64, 32, generator=g), torch.tensor([900, 300]),
            make_positions(cfg, 3, 6, 10))
    return cfg, model, args
