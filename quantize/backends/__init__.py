"""Quantization backends, one module per library, each implementing :class:`Backend`.

Backends are imported lazily: a missing library makes only its own recipes unavailable, and
``cogvx recipes`` can print its table without importing any of them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["BACKENDS", "Backend", "get_backend", "backend_status", "backend_installed", "backend_version"]


class Backend(Protocol):
    """What every backend module provides."""

    def quantize(self, module: nn.Module, fqns: list[str], options, calibrate=None) -> None:
        """Quantize the named Linear layers of ``module`` in place, on real weights. ``options``: the
        backend's typed options (``cogvx.quantize.settings``)."""

    def is_quantized(self, layer: nn.Module) -> bool:
        """Whether ``layer`` is one this backend quantized."""

    def export_layer(self, layer: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(plain tensors keyed by the suffix after the layer's name, JSON-able metadata)."""

    def empty_layer(self, linear: nn.Linear, options, dtype: torch.dtype) -> nn.Module:
        """The quantized module form of ``linear`` on the meta device."""

    def expected_shapes(self, linear: nn.Linear, options, meta: dict[str, Any]) -> dict:
        """{suffix: shape} of the stored tensors, checked before anything is built."""

    def load_layer(self, layer: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any], device):
        """Assign the stored quantized weight (never a full-precision one)."""

# backend name -> (module, import name, pip distribution)
BACKENDS = {
    "torchao": ("cogvx.quantize.backends.torchao", "torchao", "torchao"),
    "quanto": ("cogvx.quantize.backends.quanto", "optimum.quanto", "optimum-quanto"),
    "bnb": ("cogvx.quantize.backends.bnb", "bitsandbytes", "bitsandbytes"),
    "native": ("cogvx.quantize.backends.native", "torch", "torch"),  # cogvx's own: needs only torch
}
_status: dict[str, tuple[bool, str]] = {}


def backend_status(name: str) -> tuple[bool, str]:
    """(importable, reason when not). Cached: importing a backend is slow."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    if name not in _status:
        _, imp, dist = BACKENDS[name]
        try:
            importlib.import_module(imp)
            _status[name] = (True, "")
        except ImportError as e:
            _status[name] = (False, f"{dist} is not installed (pip install {dist}): {e}")
        except Exception as e:  # a broken install raises anything
            _status[name] = (False, f"{dist} fails to import: {type(e).__name__}: {e}")
    return _status[name]


def backend_installed(name: str) -> tuple[bool, str]:
    """(installed, reason when not) without importing the library (fast: for listings); an import that
    was already tried and failed counts."""
    if name in _status and not _status[name][0]:
        return _status[name]
    _, imp, dist = BACKENDS[name]
    try:
        found = importlib.util.find_spec(imp) is not None
    except (ImportError, ValueError):
        found = False
    return (True, "") if found else (False, f"{dist} is not installed (pip install {dist})")


def backend_version(name: str) -> str:
    dist = BACKENDS[name][2]
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def get_backend(name: str) -> Backend:
    ok, why = backend_status(name)
    if not ok:
        raise ImportError(why)
    return importlib.import_module(BACKENDS[name][0])
