"""Shared plumbing for the Triton kernels: optional triton import, backend choice, one-time warnings.

Triton decides between compiling and interpreting when each ``@triton.jit`` function is *defined*
(it reads ``TRITON_INTERPRET`` then), so whether a kernel may run on CPU tensors is a property of
the kernel object, fixed at import of its module, not of the environment at call time.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    jit = triton.jit
except ImportError:  # e.g. macOS: the kernel modules still import, the references still run
    triton = None
    tl = None
    HAS_TRITON = False

    def jit(fn):  # never launched: use_triton() refuses before any launch
        return fn


__all__ = ["HAS_TRITON", "BACKENDS", "resolve_backend", "use_triton", "warn_once", "is_interpreted"]

BACKENDS = ("torch", "triton")
_KERNEL_CHOICES = ("auto", "triton", "torch")
_WARNED: set[str] = set()


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was defined under TRITON_INTERPRET=1 (runs on CPU tensors, slowly)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def warn_once(reason: str) -> None:
    """Warn once per distinct reason. Silent while torch.compile traces (warnings.warn would break
    the graph); the fallback itself still happens there."""
    if torch.compiler.is_compiling() or reason in _WARNED:
        return
    _WARNED.add(reason)
    warnings.warn(reason, RuntimeWarning, stacklevel=3)


def resolve_backend(kernels: str, device: torch.device | str) -> str:
    """Map the user's ``Engine.load(kernels=...)`` onto a backend for the kernel dispatch functions.

    "auto": "triton" on CUDA when triton imports, else "torch". "triton": "triton" (on a CPU device
    the dispatchers still run the references unless TRITON_INTERPRET=1). "torch": "torch".
    """
    if kernels not in _KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {', '.join(map(repr, _KERNEL_CHOICES))} (got {kernels!r})")
    device = torch.device(device)
    if kernels == "torch":
        return "torch"
    if kernels == "auto":
        return "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    if device.type == "cuda" and not HAS_TRITON:
        raise RuntimeError(
            "kernels='triton' on a CUDA device needs the triton package, which failed to import; "
            "install triton or pass kernels='torch'"
        )
    return "triton"


def use_triton(backend: str, device: torch.device, kernel) -> bool:
    """Whether a dispatcher should launch ``kernel`` for tensors on ``device`` (before shape checks).

    backend "torch": never. "triton": on CUDA always (RuntimeError without triton); on CPU only when
    the kernel was defined under TRITON_INTERPRET=1, otherwise the reference runs, silently, as the
    design asks (the kernels are a CUDA feature).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))} (got {backend!r})")
    if backend == "torch":
        return False
    if not HAS_TRITON:
        if device.type == "cuda":
            raise RuntimeError(
                "backend='triton' on a CUDA tensor needs the triton package, which failed to import; "
                "install triton or use backend='torch'"
            )
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and is_interpreted(kernel)


def device_of(t: torch.Tensor):
    """Context that makes t's CUDA device current: Triton launches on the current device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
