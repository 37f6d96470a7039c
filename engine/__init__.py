"""cogvx.engine: CogVideoX inference. ``Engine.load(path)`` once, then ``engine.generate(...)``.

The public names are resolved on first use (PEP 562), so that ``cogvx --help`` and ``cogvx recipes``,
which import parts of this package, do not pay for torch.compile, transformers and the quantization
libraries that the Engine pulls in. diffusers' names are here too: a diffusers script runs on cogvx by
changing ``from diffusers import ...`` to ``from cogvx.engine import ...``.
"""

from __future__ import annotations

import importlib

from .runtime.quiet import quiet_library_logs

quiet_library_logs()  # first: any part of the engine may import transformers' T5, which imports torchao

_PIPELINES = "cogvx.engine.pipelines"
_PUBLIC = {
    "Engine": f"{_PIPELINES}.engine",
    "GenerationResult": f"{_PIPELINES}.output",
    "StepCache": f"{_PIPELINES}.step_cache",
    **dict.fromkeys(["CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline",
                     "CogVideoXFunControlPipeline"], f"{_PIPELINES}.diffusers_pipelines"),
    **dict.fromkeys(["AutoModel", "CogVideoXTransformer3DModel", "AutoencoderKLCogVideoX", "CogVideoXDDIMScheduler",
                     "CogVideoXDPMScheduler", "CogVideoXPipelineOutput", "export_to_video"],
                    f"{_PIPELINES}.diffusers_models"),
    **dict.fromkeys(["TorchAoConfig", "PipelineQuantizationConfig"], f"{_PIPELINES}.diffusers_quant"),
    **dict.fromkeys(["FirstBlockCacheConfig", "PyramidAttentionBroadcastConfig", "FasterCacheConfig"],
                    f"{_PIPELINES}.diffusers_cache"),
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cogvx.engine' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_PUBLIC])
