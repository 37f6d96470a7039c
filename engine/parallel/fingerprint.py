"""A digest of an argument's value, equal on two ranks exactly when the ranks passed the same value:
what the ranks compare (one all-gather) before a parallel load or generate does any heavy work."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["digest", "digests"]


def _feed(h, value) -> None:
    if callable(value) and not isinstance(value, type):
        h.update(b"callable")  # callbacks may differ per rank (logging); only whether one is given must agree
        return
    h.update(type(value).__name__.encode())
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        h.update(repr(value).encode())
    elif isinstance(value, (os.PathLike, Path)):
        h.update(os.fspath(value).encode())
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    elif isinstance(value, torch.Generator):
        h.update(str(value.device).encode())
        h.update(value.get_state().numpy().tobytes())
    elif isinstance(value, dict):
        for k in sorted(value, key=repr):
            _feed(h, k)
            _feed(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(str(len(value)).encode())
        for v in value:
            _feed(h, v)
    elif hasattr(value, "tobytes") and hasattr(value, "size") and hasattr(value, "mode"):  # a PIL image
        h.update(f"{value.mode}{value.size}".encode())
        h.update(value.tobytes())
    else:
        h.update(repr(value).encode())


def digest(value) -> bytes:
    """32-byte SHA-256 of a value: numbers, strings, paths, tensors and arrays (dtype, shape, bytes),
    generators (their state), PIL images, and lists / tuples / dicts of them."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.digest()


def digests(args: dict) -> dict[str, bytes]:
    """{argument name: digest of its value}."""
    return {k: digest(v) for k, v in args.items()}
