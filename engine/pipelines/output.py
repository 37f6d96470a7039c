"""What ``Engine.generate`` returns: the latents, the decoded frames in diffusers' output types, the
profile, and ``save`` (mp4, never losing a finished video)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..io.video import VideoWriteError, check_fps, check_video_name, write_mp4
from ..runtime.profiling import Profile

__all__ = ["OUTPUT_TYPES", "GenerationResult", "postprocess"]

OUTPUT_TYPES = ("np", "pil", "pt", "latent")


def postprocess(video: torch.Tensor, output_type: str):
    """VAE output [B, 3, F, H, W] in [-1, 1] -> diffusers' output types.

    "pt": float tensor [B, F, 3, H, W] in [0, 1]; "np": float32 array [B, F, H, W, 3] in [0, 1];
    "pil": a list (per video) of lists of PIL images.
    """
    frames = (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # [B, F, 3, H, W]
    if output_type == "pt":
        return frames
    arr = frames.permute(0, 1, 3, 4, 2).cpu().numpy()  # [B, F, H, W, 3]
    if output_type == "np":
        return arr
    if output_type == "pil":
        from PIL import Image

        u8 = (arr * 255).round().astype("uint8")
        return [[Image.fromarray(f) for f in vid] for vid in u8]
    raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))} (got {output_type!r})")


@dataclass
class GenerationResult:
    """What ``Engine.generate`` returns.

    latents: denoised latents [B, F_lat, C, H/8, W/8] in the engine dtype (for CogVideoX 1.5 the
    padding frame the model needs is already dropped, as the diffusers pipeline does before decoding).
    frames: the decoded videos in diffusers' conventions: "np" float32 [B, F, H, W, 3] in [0, 1],
    "pt" [B, F, 3, H, W], "pil" a list of frame lists; None for output_type="latent".
    seed: the seed the initial noise was drawn from (chosen at random and reported when none was
    given; None when a generator or latents were passed). task: "t2v", "i2v", "v2v" or "control".
    profile: wall seconds per stage and per step, compile time, peak memory, achieved FLOP/s
    (``profile.table()``, ``profile.to_json()``).
    """

    latents: torch.Tensor
    frames: Any = None
    output_type: str = "latent"
    timesteps: list[int] = field(default_factory=list)
    guidance_scales: list[float] = field(default_factory=list)
    seed: int | None = None
    task: str = "t2v"
    profile: Profile = field(default_factory=Profile)
    rank: int = 0  # under Engine.load(parallel=...): this process's rank (frames are on rank 0)

    @property
    def timings(self) -> dict[str, float]:
        """Wall seconds per stage (``profile.stages``)."""
        return self.profile.stages

    def save(self, path: str | os.PathLike, fps: float = 8, all_videos: bool = False) -> list[Path]:
        """Write the first video to ``path`` as H.264 mp4 (the only format written), or with
        ``all_videos`` each as path_0.mp4, path_1.mp4, ...

        Each file is verified by reading it back before it is renamed into place. A video that cannot be
        written goes to a temporary file; after trying every video, :class:`~cogvx.engine.io.video.VideoWriteError`
        names each fallback: a finished generation is never lost.
        """
        if self.frames is None and self.rank != 0:
            return []  # a parallel generate decodes and writes on rank 0 only
        if self.frames is None:
            raise ValueError("this result holds latents only (output_type='latent'); generate with "
                             "output_type='np' (the default) to get frames to save")
        fps = check_fps(fps)
        p = check_video_name(path)
        videos = list(self.frames) if all_videos else [self.frames[0]]
        targets = [p] if len(videos) == 1 else [p.with_name(f"{p.stem}_{i}{p.suffix}") for i in range(len(videos))]
        t0 = time.perf_counter()
        written, errors = [], []
        for target, video in zip(targets, videos):
            try:
                written.append(write_mp4(target, video, fps))
            except VideoWriteError as e:
                errors.append(e)
        elapsed = time.perf_counter() - t0
        self.profile.stages["save"] = self.profile.stages.get("save", 0.0) + elapsed
        self.profile.total_seconds += elapsed
        if errors:
            err = VideoWriteError("; ".join(str(e) for e in errors), errors[0].fallback_path)
            err.fallback_paths = [e.fallback_path for e in errors]
            err.written = written
            raise err from errors[0]
        return written
