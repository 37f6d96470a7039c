"""Quantization backends, one module per library, each with the same functions:

``version()``; ``quantize(module, fqns, options, calibrate=None)`` (in place, on real weights);
``is_quantized(layer)``; ``export_layer(layer) -> (tensors, meta)`` (plain tensors keyed by the
suffix after the layer's name, and JSON-able metadata); ``empty_layer(linear, options, dtype)``
(the quantized module form on the meta device); ``load_layer(layer, tensors, meta, device)``
(the stored quantized weight assigned, never a full-precision one); ``expected_shapes(linear, options,
meta)`` (suffix -> shape, checked before anything is built).

Backends are imported lazily: a missing library makes only its own recipes unavailable.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from types import ModuleType

__all__ = ["BACKENDS", "get_backend", "backend_status", "backend_version"]

# backend name -> (module, import name, pip distribution)
BACKENDS = {
    "torchao": ("cogvx.quantize.backends.torchao", "torchao", "torchao"),
    "quanto": ("cogvx.quantize.backends.quanto", "optimum.quanto", "optimum-quanto"),
    "bnb": ("cogvx.quantize.backends.bnb", "bitsandbytes", "bitsandbytes"),
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


def backend_version(name: str) -> str:
    dist = BACKENDS[name][2]
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def get_backend(name: str) -> ModuleType:
    ok, why = backend_status(name)
    if not ok:
        raise ImportError(why)
    return importlib.import_module(BACKENDS[name][0])
