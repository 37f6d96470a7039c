"""cogvx.engine: model code, loader, Engine + generate."""

from .engine import Engine, GenerationResult

__all__ = ["Engine", "GenerationResult"]
