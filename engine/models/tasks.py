"""The tasks, as one table: what each CogVideoX task runs on, takes and encodes.

A checkpoint serves a *kind* (``model_index.json``'s ``_class_name`` decides it); a kind runs one or more
tasks (a text-to-video checkpoint also runs video-to-video). A generate call's task is the one of its
checkpoint's kind whose input argument it was given. A new CogVideoX variant is one record here plus its
conditioning function (``cogvx.engine.pipelines.conditioning.CONDITIONING``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Task", "TASKS", "KINDS", "INPUTS", "PIPELINE_CLASSES", "tasks_of_kind", "kind_of_class",
           "class_of_kind"]


@dataclass(frozen=True)
class Task:
    name: str  # "t2v", "i2v", "v2v", "control"
    label: str  # what the user calls it, in messages
    kind: str  # the checkpoint kind it runs on (the name of that kind's own task)
    checkpoint: str  # that kind's checkpoints, with their article, in messages ("an image-to-video")
    pipeline_classes: tuple[str, ...]  # diffusers' pipeline classes of this task (model_index.json names)
    input: str | None = None  # the generate argument that carries its conditioning: image / video / control_video
    input_is_video: bool = False  # the input is a video (read up to num_frames frames), else one image
    input_help: str = ""  # what the input may be, for "pass ...=" messages
    concat_channels: bool = False  # the transformer takes conditioning latents joined to the noise's channels
    takes_strength: bool = False  # starts part-way through the schedule (diffusers' strength)
    # The latent frame count must be a multiple of patch_size_t (CogVideoX 1.5) for the video it is given
    # (diffusers refuses others; text- and image-to-video pad the latents instead).
    strict_latent_frames: bool = False
    vae_encodes: str = ""  # what the VAE encodes before the loop ("" for nothing)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("t2v", "text-to-video", "t2v", "a text-to-video", ("CogVideoXPipeline",)),
    Task("i2v", "image-to-video", "i2v", "an image-to-video", ("CogVideoXImageToVideoPipeline",), input="image",
         input_help="the first frame: a PIL image, a file path, an array [H, W, 3] or a tensor [3, H, W]",
         concat_channels=True, vae_encodes="the first frame, sampled (joined to the noise's channels)"),
    Task("v2v", "video-to-video", "t2v", "a text-to-video", ("CogVideoXVideoToVideoPipeline",), input="video",
         input_is_video=True,
         input_help="a list of PIL images, an mp4/gif path, an [F, H, W, 3] array or an [F, 3, H, W] tensor",
         takes_strength=True, strict_latent_frames=True,
         vae_encodes="the video, sampled, scaled and noised to the first step's level"),
    Task("control", "control video", "control", "a Fun-Control", ("CogVideoXFunControlPipeline",),
         input="control_video", input_is_video=True, input_help="a pose/depth/edge video", concat_channels=True, strict_latent_frames=True,
         vae_encodes="the control video, its mode, scaled (joined to the noise's channels)"),
)}

KINDS = tuple(dict.fromkeys(t.kind for t in TASKS.values()))  # checkpoint kinds: "t2v", "i2v", "control"
INPUTS = tuple(t.input for t in TASKS.values() if t.input)  # every conditioning argument of generate

# model_index.json's _class_name -> the kind of checkpoint (a video-to-video pipeline saves a text-to-video
# checkpoint: the same components).
PIPELINE_CLASSES = {c: t.kind for t in TASKS.values() for c in t.pipeline_classes}


def tasks_of_kind(kind: str) -> list[Task]:
    """The tasks a checkpoint of this kind runs, its own first."""
    return sorted((t for t in TASKS.values() if t.kind == kind), key=lambda t: t.name != kind)


def kind_of_class(class_name: str) -> str:
    return PIPELINE_CLASSES[class_name]


def class_of_kind(kind: str) -> str:
    """The pipeline class a checkpoint of this kind is saved under (its own task's first class)."""
    return TASKS[kind].pipeline_classes[0]
