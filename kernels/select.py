"""Which attention path ``kernels="auto"`` takes on CUDA for a shape: SDPA after the fused
QK-norm + RoPE kernel, or the Triton flash attention that rotates its own Q/K tiles.

The choice is measured, not guessed: ``benchmarks/bench_rope_attention.py --record`` writes the
faster path per GPU and shape to ``attention_choice.json`` beside this file. A GPU or shape with
no measurement gets SDPA (the flash kernel has to earn its place).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["CHOICE_FILE", "attention_for", "choose", "shape_key"]

CHOICE_FILE = Path(__file__).with_name("attention_choice.json")


def shape_key(heads: int, seq_len: int, dtype: torch.dtype) -> str:
    return f"heads={heads},seq={seq_len},dtype={str(dtype).replace('torch.', '')}"


@lru_cache(maxsize=1)
def _table() -> dict:
    try:
        return json.loads(CHOICE_FILE.read_text())
    except (OSError, ValueError):
        return {}


def attention_for(device: torch.device, heads: int, seq_len: int, dtype: torch.dtype) -> str:
    """"flash" where a recorded benchmark on this GPU model found it faster at the nearest measured
    sequence length (same heads and dtype), else "sdpa". Always "sdpa" off CUDA."""
    if device.type != "cuda":
        return "sdpa"
    return choose(_table().get(torch.cuda.get_device_name(device), {}), heads, seq_len, dtype)


def choose(rows: dict[str, str], heads: int, seq_len: int, dtype: torch.dtype) -> str:
    """The recorded choice at the nearest measured sequence length with the same heads and dtype."""
    prefix = f"heads={heads},"
    suffix = f",dtype={str(dtype).replace('torch.', '')}"
    measured = [(abs(int(k.split(",")[1][4:]) - seq_len), v) for k, v in rows.items()
                if k.startswith(prefix) and k.endswith(suffix)]
    return min(measured)[1] if measured else "sdpa"
