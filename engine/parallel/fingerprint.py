"""A digest of an argument's value, equal on two ranks exactly when the ranks passed the same value:
what the ranks compare (one all-gather) before a parallel load or generate does any heavy work; and
one of a checkpoint's files, so that ranks which reach different copies of a checkpoint (a changed
weight on one node) are told before they make a wrong video."""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["digest", "digests", "checkpoint_digest"]

_BLOCK = 8 << 20  # uint64 words per summed block (64 MiB)
_SMALL = 1 << 20  # files up to this size are hashed whole


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


def _file_digest(h, path: Path) -> None:
    """Every byte of ``path`` into ``h``: small files hashed whole; large ones (weights) as the wrapping
    uint64 sums of their 64 MiB blocks plus the tail bytes, which numpy computes at memory speed (about
    8 GB/s warm on one core, against 0.6 GB/s for SHA-256): any changed word changes its block's sum."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        if size <= _SMALL:
            h.update(f.read())
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            words = np.frombuffer(m, dtype=np.uint64, count=size // 8)
            full = words.size // _BLOCK * _BLOCK
            if full:
                h.update(words[:full].reshape(-1, _BLOCK).sum(axis=1, dtype=np.uint64).tobytes())
            h.update(words[full:].sum(dtype=np.uint64).tobytes())
            h.update(m[size // 8 * 8:])
            del words


def checkpoint_digest(model_dir: Path) -> bytes:
    """32 bytes over every file a load reads: model_index.json and each component folder it names (names,
    sizes, contents; folders in name order). Two copies of one checkpoint agree; a changed weight does not."""
    h = hashlib.sha256()
    _file_digest(h, model_dir / "model_index.json")
    for comp in sorted(p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(q for q in comp.rglob("*") if q.is_file() and not q.name.startswith(".")):
            h.update(str(f.relative_to(model_dir)).encode())
            _file_digest(h, f)
    return h.digest()
