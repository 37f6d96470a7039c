"""cogvx.kernels."""

from ._common import resolve_backend

__all__ = ["resolve_backend"]
