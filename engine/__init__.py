"""cogvx.engine: CogVideoX inference. ``Engine.load(path)`` once, then ``engine.generate(...)``.

The public names are resolved on first use (PEP 562), so that ``cogvx --help`` and ``cogvx recipes``,
which import parts of this package, do not pay for torch.compile, transformers and the quantization
libraries that the Engine pulls in.
"""

from __future__ import annotations

import importlib

__all__ = ["Engine", "GenerationResult"]

_PUBLIC = {"Engine": "cogvx.engine.pipelines.engine", "GenerationResult": "cogvx.engine.pipelines.output"}


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cogvx.engine' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_PUBLIC])
