"""Shared plumbing for the Triton kernels: optional triton import, one-time warnings, small helpers.

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

    def jit(fn):  # never launched: policy.use_triton() refuses before any launch
        return fn


__all__ = [
    "DTYPES",
    "HAS_TRITON",
    "device_of",
    "is_interpreted",
    "kernels_interpreted",
    "next_pow2",
    "shard_rows",
    "warn_once",
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what every kernel reads and writes
_WARNED: set[str] = set()


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was defined under TRITON_INTERPRET=1 (runs on CPU tensors, slowly)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


@jit
def _probe():
    pass


def kernels_interpreted() -> bool:
    """Whether this package's kernels were defined under TRITON_INTERPRET=1 (all are defined at
    import of cogvx.kernels, right after this module)."""
    return is_interpreted(_probe)


def warn_once(reason: str) -> None:
    """Warn once per distinct reason. Silent while torch.compile traces (warnings.warn would break
    the graph); the fallback itself still happens there."""
    if torch.compiler.is_compiling() or reason in _WARNED:
        return
    _WARNED.add(reason)
    warnings.warn(reason, RuntimeWarning, stacklevel=3)


def shard_rows(n_text: int, rows: int, row_offset: int = 0) -> tuple[int, int]:
    """(text rows, table row of the first video row) for ``rows`` rows of the joint [text; video]
    sequence whose first row is global row ``row_offset`` (a shard, under sequence parallelism).

    Row r is text when ``row_offset + r < n_text``; a video row uses RoPE table row
    ``row_offset + r - n_text``. The text rows come first, so the shard's text rows are
    ``[0, t)`` and its video rows ``[t, rows)``, starting at table row ``table_start``.

    With row_offset 0, n_text follows Python slice semantics (a negative n_text counts from the end
    of the rows), as the unsharded ops always did. A shard (row_offset > 0) has no end to count
    from, so there n_text must be >= 0.
    """
    if row_offset < 0:
        raise ValueError(f"row_offset must be >= 0, the global index of the shard's first row (got {row_offset})")
    if row_offset == 0:
        return min(max(n_text if n_text >= 0 else rows + n_text, 0), rows), 0
    if n_text < 0:
        raise ValueError(
            f"n_text must be >= 0 with row_offset > 0 (got n_text={n_text}, row_offset={row_offset}); "
            "pass the text length of the whole sequence"
        )
    return min(max(n_text - row_offset, 0), rows), max(row_offset - n_text, 0)


def device_of(t: torch.Tensor):
    """Context that makes t's CUDA device current: Triton launches on the current device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
