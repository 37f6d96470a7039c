"""Files: checkpoint directories, safetensors, atomic writes, video and image files, the cache folder."""

from .checkpoint import CheckpointError

__all__ = ["CheckpointError"]
