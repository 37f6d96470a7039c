"""Components that are read from the checkpoint only when a stage needs them (CPU residency,
``cogvx.engine.runtime.residency.Materialized``): a *skeleton* (the module on the meta device, in the
dtype it will run in: config, structure and hooks, no memory) and a *loader* that reads the weights
again, with the same checks as the first load, into a module of the skeleton's current structure."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .components import DEFERRABLE, load_transformer, load_vae
from .text import load_text_encoder

__all__ = ["reloader"]


def reloader(name: str, component_dir: Path, device: torch.device) -> Callable[[nn.Module], nn.Module]:
    """skeleton -> ``name`` freshly read from ``component_dir`` on ``device``, in the skeleton's dtype and
    structure (q/k/v fused if the skeleton's are)."""
    d = Path(component_dir)

    def load(skel: nn.Module) -> nn.Module:
        dtype = _floating_dtype(skel)
        if name == "transformer":
            return load_transformer(d, device, dtype, fuse_qkv=skel.transformer_blocks[0].attn1.to_qkv is not None)
        if name == "text_encoder":
            return load_text_encoder(d, device, dtype)
        return load_vae(d, device=device, dtype=dtype)

    if name not in DEFERRABLE:
        raise ValueError(f"no deferred loading for component {name!r}; accepted: {', '.join(DEFERRABLE)}")
    return load


def _floating_dtype(m: nn.Module) -> torch.dtype:
    return next((p.dtype for p in m.parameters() if p.is_floating_point()), torch.float32)
