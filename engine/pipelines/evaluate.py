"""What a quantization recipe costs on a user's own checkpoint, and goldens to hold it to later.

``run_videos`` generates the same prompts and seeds on one engine; ``compare`` puts two runs side by
side: per video PSNR and SSIM of the decoded frames (float, [0, 1]) and SQNR of the denoised latents
(``cogvx.quantize.metrics``). ``write_goldens`` / ``read_goldens`` keep a run (float32 latents and
frames, safetensors, with the settings that made it) so that a later run can be compared with it:
same settings required, thresholds on the figures decide pass or fail.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from cogvx.quantize.metrics import psnr, sqnr, ssim

from ..io.atomic import atomic_directory
from ..io.checkpoint import CheckpointError, read_json
from ..io.safetensors import read_headers, read_tensors
from ..runtime.defaults import DEFAULTS
from .engine import Engine

__all__ = ["EvalSettings", "VideoRun", "run_videos", "compare", "write_goldens", "read_goldens", "read_prompts",
           "DEFAULT_PROMPTS", "GOLDENS_VERSION", "not_goldens"]

GOLDENS_VERSION = 1
GOLDENS_FILE = "goldens.json"
DEFAULT_PROMPTS = ("a red fox running through fresh snow, morning light",
                   "a wooden sailboat on a calm lake at sunset, slow camera pan")


@dataclass
class EvalSettings:
    """Everything that decides the videos (besides the model and the recipe)."""

    prompts: list[str]
    seeds: list[int]
    num_frames: int | None = None
    height: int = DEFAULTS.height
    width: int = DEFAULTS.width
    num_inference_steps: int = DEFAULTS.num_inference_steps
    guidance_scale: float = DEFAULTS.guidance_scale
    negative_prompt: str | None = None

    def videos(self) -> list[tuple[str, int]]:
        return [(p, s) for p in self.prompts for s in self.seeds]


@dataclass
class VideoRun:
    prompt: str
    seed: int
    latents: torch.Tensor  # [F_lat, C, h, w] float32, CPU
    frames: np.ndarray  # [F, H, W, 3] float32 in [0, 1]
    meta: dict = field(default_factory=dict)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """A prompts file: one prompt per line (blank lines and lines starting with '#' skipped), or a JSON list."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"--prompts {p} is not a file; give a text file with one prompt per line")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        prompts = json.loads(text)
        if not isinstance(prompts, list) or not all(isinstance(x, str) for x in prompts):
            raise ValueError(f"{p} must hold a JSON list of prompt strings")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{p} holds no prompt")
    return prompts


def run_videos(engine: Engine, settings: EvalSettings, on_video=None) -> list[VideoRun]:
    """One seeded generation per (prompt, seed), outputs kept on the CPU in float32."""
    runs = []
    for prompt, seed in settings.videos():
        r = engine.generate(prompt, negative_prompt=settings.negative_prompt, num_frames=settings.num_frames,
                            height=settings.height, width=settings.width,
                            num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                            seed=seed, output_type="np")
        runs.append(VideoRun(prompt, seed, r.latents[0].float().cpu(), np.asarray(r.frames[0], np.float32),
                             {"seconds": round(r.profile.total_seconds, 3)}))
        if on_video is not None:
            on_video(runs[-1])
    return runs


def _db(x: float) -> float | None:
    if math.isnan(x):
        raise ValueError("a figure came out NaN (a video holds NaN values); nothing can be judged from it")
    return None if math.isinf(x) else round(x, 3)  # JSON has no inf: None means "identical"


def compare(ref: list[VideoRun], test: list[VideoRun]) -> list[dict]:
    """Per video: prompt, seed, frame PSNR (dB) and SSIM, latent SQNR (dB) of ``test`` against ``ref``."""
    out = []
    for a, b in zip(ref, test, strict=True):
        if (a.prompt, a.seed) != (b.prompt, b.seed) or a.frames.shape != b.frames.shape:
            raise ValueError(f"cannot compare {a.prompt!r} seed {a.seed} {a.frames.shape} with {b.prompt!r} seed "
                             f"{b.seed} {b.frames.shape}")
        out.append({"prompt": a.prompt, "seed": a.seed, "psnr_db": _db(psnr(a.frames, b.frames)),
                    "ssim": round(ssim(a.frames, b.frames), 6), "latent_sqnr_db": _db(sqnr(a.latents, b.latents))})
    return out


def worst(rows: list[dict]) -> dict:
    """The lowest of each figure over the videos (None = identical everywhere)."""
    def low(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return min(vals) if vals else None

    return {"psnr_db": low("psnr_db"), "ssim": low("ssim"), "latent_sqnr_db": low("latent_sqnr_db")}


def write_goldens(out_dir: str | os.PathLike, runs: list[VideoRun], settings: EvalSettings, info: dict,
                  overwrite: bool = False) -> Path:
    """Write a run as goldens: goldens.json (settings, what made it) and one safetensors per video."""
    out = Path(out_dir).expanduser()
    with atomic_directory(out, overwrite=overwrite, replaceable=not_goldens) as tmp:
        files = []
        for i, r in enumerate(runs):
            name = f"video_{i:03d}.safetensors"
            save_file({"latents": r.latents.contiguous(), "frames": torch.from_numpy(np.ascontiguousarray(r.frames))},
                      str(tmp / name))
            files.append({"prompt": r.prompt, "seed": r.seed, "file": name})
        doc = {"goldens_version": GOLDENS_VERSION, "settings": asdict(settings), **info, "videos": files}
        (tmp / GOLDENS_FILE).write_text(json.dumps(doc, indent=1) + "\n")
    return out


def not_goldens(out: Path) -> str | None:
    """None when ``out`` holds goldens this module wrote (goldens.json and video_NNN.safetensors only)."""
    foreign = sorted(p.name for p in out.iterdir() if not (p.is_file() and (
        p.name == GOLDENS_FILE or (p.name.startswith("video_") and p.suffix == ".safetensors"))))
    if foreign:
        return f"it holds {', '.join(foreign[:5])}, which goldens do not"
    if not (out / GOLDENS_FILE).is_file():
        return f"it has no {GOLDENS_FILE}"
    return None


def read_goldens(goldens_dir: str | os.PathLike) -> tuple[EvalSettings, dict, list[VideoRun]]:
    """(settings, the rest of goldens.json, the recorded runs)."""
    d = Path(goldens_dir).expanduser()
    doc = read_json(d / GOLDENS_FILE, "a cogvx goldens file (written by `cogvx eval --record`)")
    if doc.get("goldens_version") != GOLDENS_VERSION:
        raise CheckpointError(f"{d / GOLDENS_FILE}: goldens_version {doc.get('goldens_version')!r} is not "
                              f"{GOLDENS_VERSION}; record the goldens again with this cogvx")
    try:
        settings = EvalSettings(**doc["settings"])
        listed = [(v["prompt"], int(v["seed"])) for v in doc["videos"]]
        if listed != settings.videos():
            raise CheckpointError(f"{d / GOLDENS_FILE} lists {len(listed)} video(s) but its settings make "
                                  f"{len(settings.videos())} (every prompt with every seed, in order); the file was "
                                  "edited or damaged: record the goldens again")
        runs = []
        for v in doc["videos"]:
            f = d / Path(v["file"]).name
            if not f.is_file():
                raise CheckpointError(f"{f} is missing: {d / GOLDENS_FILE} lists it; record the goldens again")
            read_headers([f])
            t = dict(read_tensors([f]))
            runs.append(VideoRun(v["prompt"], int(v["seed"]), t["latents"].float(), t["frames"].float().numpy()))
            _check_run(f, runs[-1], settings)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{d / GOLDENS_FILE} is damaged ({type(e).__name__}: {e}); record the goldens again") from e
    return settings, doc, runs


def _check_run(f: Path, run: VideoRun, settings: EvalSettings) -> None:
    """A recorded video is what its settings make: frames [F, height, width, 3] in [0, 1] (F matching
    num_frames when it is set, up to the VAE's 4k rounding) and finite latents [F_lat, C, h, w]."""
    fr, lat = run.frames, run.latents
    want = f"[F, {settings.height}, {settings.width}, 3]"
    if fr.ndim != 4 or fr.shape[1:] != (settings.height, settings.width, 3) or lat.ndim != 4:
        raise CheckpointError(f"{f}: frames {tuple(fr.shape)} and latents {tuple(lat.shape)} do not fit the goldens' "
                              f"settings (frames {want}, latents [F_lat, C, h, w]); record the goldens again")
    if settings.num_frames is not None and not 0 <= fr.shape[0] - settings.num_frames <= 3:
        raise CheckpointError(f"{f} holds {fr.shape[0]} frames but the goldens' settings say num_frames="
                              f"{settings.num_frames}; record the goldens again")
    if not (np.isfinite(fr).all() and bool(torch.isfinite(lat).all())):
        raise CheckpointError(f"{f} holds NaN or inf values: goldens must be finite (a PSNR against NaN is NaN, "
                              "which no floor can judge); record the goldens again")
    if fr.min() < 0 or fr.max() > 1:
        raise CheckpointError(f"{f}: frames span [{fr.min():g}, {fr.max():g}], outside [0, 1]; record the goldens again")
