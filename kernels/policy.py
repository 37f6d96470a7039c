"""Which implementation runs: the user's ``kernels=`` choice, the per-call backend test, and the
measured choice between the two attention paths.

Attention: ``kernels="auto"`` on CUDA picks, per GPU model and shape, SDPA after the fused QK-norm +
RoPE kernel, or the Triton flash attention that rotates its own Q/K tiles. The choice is measured,
not guessed: ``benchmarks/bench_rope_attention.py --record`` writes the faster path per GPU and
shape to ``attention_choice.json`` beside this file. A missing file, or a GPU or shape with no
measurement, gets SDPA (the flash kernel has to earn its place).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from . import _common

__all__ = ["BACKENDS", "CHOICE_FILE", "attention_for", "choose", "resolve_backend", "shape_key", "use_triton"]

BACKENDS = ("torch", "triton")
KERNEL_CHOICES = ("auto", "triton", "torch")
CHOICE_FILE = Path(__file__).with_name("attention_choice.json")

REFERENCES_ON_CPU = (
    "kernels='triton' on the CPU runs the PyTorch references, not the Triton kernels: the kernels were "
    "defined without TRITON_INTERPRET=1. To run the Triton kernels on the CPU (slowly, through "
    "Triton's interpreter), set TRITON_INTERPRET=1 in the environment before importing cogvx; "
    "kernels='torch' runs the references without this warning."
)
NO_TRITON_ON_CPU = (
    "kernels='triton' on the CPU runs the PyTorch references: the triton package failed to import. "
    "Install triton and set TRITON_INTERPRET=1 to run the Triton kernels on the CPU; kernels='torch' "
    "runs the references without this warning."
)


def resolve_backend(kernels: str, device: torch.device | str) -> str:
    """Map the user's ``Engine.load(kernels=...)`` onto a backend for the kernel dispatch functions.

    "auto": "triton" on CUDA when triton imports, else "torch". "torch": "torch". "triton": "triton";
    on a CUDA device without triton a RuntimeError. On a CPU device the dispatchers run the Triton
    kernels only when they were defined under TRITON_INTERPRET=1; otherwise they run the references,
    and this function says so once (RuntimeWarning).
    """
    if kernels not in KERNEL_CHOICES:
        choices = ", ".join(map(repr, KERNEL_CHOICES))
        raise ValueError(f"kernels must be one of {choices} (got {kernels!r}); 'auto' picks the fastest available")
    device = torch.device(device)
    if kernels == "torch":
        return "torch"
    if kernels == "auto":
        return "triton" if device.type == "cuda" and _common.HAS_TRITON else "torch"
    if device.type == "cuda" and not _common.HAS_TRITON:
        raise RuntimeError(
            "kernels='triton' on a CUDA device needs the triton package, which failed to import; "
            "install triton or pass kernels='torch'"
        )
    if device.type != "cuda":
        if not _common.HAS_TRITON:
            _common.warn_once(NO_TRITON_ON_CPU)
        elif not _common.kernels_interpreted():
            _common.warn_once(REFERENCES_ON_CPU)
    return "triton"


def use_triton(backend: str, device: torch.device, kernel) -> bool:
    """Whether a dispatcher should launch ``kernel`` for tensors on ``device`` (before shape checks).

    backend "torch": never. "triton": on CUDA always (RuntimeError without triton); on CPU only when
    the kernel was defined under TRITON_INTERPRET=1, otherwise the reference runs (``resolve_backend``
    warned about that once, where the user chose the backend).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))} (got {backend!r})")
    if backend == "torch":
        return False
    if not _common.HAS_TRITON:
        if device.type == "cuda":
            raise RuntimeError(
                "backend='triton' on a CUDA tensor needs the triton package, which failed to import; "
                "install triton or use backend='torch'"
            )
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _common.is_interpreted(kernel)


def shape_key(heads: int, seq_len: int, dtype: torch.dtype) -> str:
    return f"heads={heads},seq={seq_len},dtype={str(dtype).replace('torch.', '')}"


@lru_cache(maxsize=1)
def _table() -> dict:
    try:
        return json.loads(CHOICE_FILE.read_text())
    except (OSError, ValueError):  # no measurement recorded (the usual case), or an unreadable file
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
                if k.startswith(prefix) and k.endswith(suffix)]  # fmt: skip
    return min(measured)[1] if measured else "sdpa"
