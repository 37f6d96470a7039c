"""cogvx.engine: CogVideoX inference. ``Engine.load(path)`` once, then ``engine.generate(...)``."""

from cogvx.quantize import quiet_library_logs

quiet_library_logs()  # first: importing the pipelines imports transformers' T5, which imports torchao

from .pipelines.engine import Engine  # noqa: E402
from .pipelines.output import GenerationResult  # noqa: E402
from .pipelines.diffusers_pipelines import (  # noqa: E402
    CogVideoXFunControlPipeline,
    CogVideoXImageToVideoPipeline,
    CogVideoXPipeline,
    CogVideoXVideoToVideoPipeline,
)
from .pipelines.diffusers_models import (  # noqa: E402
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXPipelineOutput,
    CogVideoXTransformer3DModel,
    export_to_video,
)

__all__ = [
    "Engine", "GenerationResult",
    # diffusers' names, on cogvx (change `from diffusers import ...` to `from cogvx.engine import ...`)
    "CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline", "CogVideoXFunControlPipeline",
    "CogVideoXTransformer3DModel", "AutoencoderKLCogVideoX", "CogVideoXDDIMScheduler", "CogVideoXDPMScheduler",
    "CogVideoXPipelineOutput", "export_to_video",
]
