"""cogvx.engine: CogVideoX inference. ``Engine.load(path)`` once, then ``engine.generate(...)``."""

from .pipelines.engine import Engine
from .pipelines.output import GenerationResult
from .pipelines.step_cache import StepCache

__all__ = ["Engine", "GenerationResult", "StepCache"]
