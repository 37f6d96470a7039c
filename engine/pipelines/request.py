"""The arguments of one generate call and every check on them, run before any heavy work: each error
says what was wrong, what is accepted, and what to try. The result is a :class:`Plan`: what the call
will do (task, batch, latent shape, conditioning pixels), decided once."""

from __future__ import annotations

import os
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..models.config import TransformerConfig, latent_frame_count
from ..models.positions import latent_frames
from ..models.tasks import INPUTS, TASKS, tasks_of_kind
from ..runtime.defaults import DEFAULTS
from .checks import (
    MAX_FRAMES,
    MAX_TEXT_LENGTH,
    as_bool,
    as_int,
    as_number,
    check_generator,
    check_latents,
    check_prompts,
    check_sampling,
    check_video_shape,
)
from .media import as_list, load_image, load_video
from .output import OUTPUT_TYPES

__all__ = ["Request", "ModelFacts", "Plan", "plan_request", "trace_path", "FrameCountWarning"]

MAX_SEED = 2**64 - 1


class FrameCountWarning(UserWarning):
    """The decoded video will not have the requested number of frames."""


@dataclass
class Request:
    """Every argument of ``Engine.generate`` (see its docstring)."""

    prompt: Any = None
    negative_prompt: Any = None
    num_frames: Any = None
    height: Any = DEFAULTS.height
    width: Any = DEFAULTS.width
    num_inference_steps: Any = DEFAULTS.num_inference_steps
    guidance_scale: Any = DEFAULTS.guidance_scale
    use_dynamic_cfg: Any = False
    num_videos_per_prompt: Any = 1
    seed: Any = None
    generator: Any = None
    latents: Any = None
    prompt_embeds: Any = None
    negative_prompt_embeds: Any = None
    callback_on_step_end: Callable | None = None
    output_type: Any = "np"
    max_sequence_length: Any = None
    image: Any = None
    video: Any = None
    strength: Any = None
    control_video: Any = None


@dataclass(frozen=True)
class ModelFacts:
    """What the checks need to know of the loaded model."""

    config: TransformerConfig
    task: str  # the checkpoint's kind (cogvx.engine.models.tasks.KINDS): "t2v" (also runs "v2v"), "i2v", "control"
    temporal: int
    spatial: int
    latent_channels: int
    max_steps: int
    has_text_encoder: bool
    has_vae: bool
    device: torch.device
    dtype: torch.dtype


@dataclass
class Plan:
    """What a checked request will do."""

    task: str
    steps: int  # num_inference_steps of the schedule (video-to-video runs the last part of it)
    b: int  # prompts
    videos_per_prompt: int
    cfg: bool
    num_frames: int
    height: int
    width: int
    shape: tuple[int, ...]  # noise latents [N, F_lat (+ padding), C, h, w]
    extra: int  # padding latent frames at the front (CogVideoX 1.5), dropped after denoising
    seed: int | None
    max_length: int
    strength: float = 1.0
    pixels: list[torch.Tensor] | None = None  # per video: image [3, H, W] or video [3, F, H, W] in [-1, 1]

    @property
    def n(self) -> int:
        return self.b * self.videos_per_prompt


def _memory_floor(plan: Plan, facts: ModelFacts, output: bool) -> int:
    """A lower bound of the bytes the call needs beyond the loaded weights: the transformer's
    feed-forward activation of one layer and, when frames are returned, the decoded videos as float32."""
    cfg = facts.config
    n, f_lat, _, h, w = plan.shape
    pt = cfg.patch_size_t or 1
    tokens = (f_lat // pt) * (h // cfg.patch_size) * (w // cfg.patch_size) + plan.max_length
    elem = torch.finfo(facts.dtype).bits // 8
    act = n * (2 if plan.cfg else 1) * tokens * 4 * cfg.inner_dim * elem
    frames = n * 3 * (4 * latent_frame_count(plan.num_frames)) * plan.height * plan.width * 4 if output else 0
    return max(act, 2 * frames)


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def plan_request(req: Request, facts: ModelFacts) -> Plan:
    """Check every argument (cheap: nothing is encoded or generated) and decide what the call does."""
    cfg = facts.config
    if not facts.has_text_encoder and req.prompt is not None:
        raise ValueError("this engine has no text encoder; pass prompt_embeds")
    b = check_prompts(req.prompt, req.negative_prompt, req.prompt_embeds, req.negative_prompt_embeds,
                      cfg.text_embed_dim)
    task = _task(req, facts)
    steps, g = check_sampling(req.num_inference_steps, req.guidance_scale, facts.max_steps)
    as_bool("use_dynamic_cfg", req.use_dynamic_cfg)
    k = as_int("num_videos_per_prompt", req.num_videos_per_prompt, 1, 1024)
    if req.output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))} (got {req.output_type!r})")
    if req.output_type != "latent" and not facts.has_vae:
        raise ValueError("this engine was loaded without a VAE: only output_type='latent' is available")
    spec = TASKS[task]
    if spec.vae_encodes and not facts.has_vae:
        raise ValueError(f"{spec.label} encodes its input with the VAE, which this engine was loaded without")
    if req.seed is not None and req.generator is not None:
        raise ValueError("pass either seed or generator, not both")
    seed = None
    if req.seed is not None:
        seed = as_int("seed", req.seed, 0, MAX_SEED)
    if req.generator is not None:
        check_generator(req.generator, b * k)
    elif seed is None and req.latents is None:
        seed = secrets.randbits(63)  # reported in the result, so a video can be made again
    if req.callback_on_step_end is not None and not callable(req.callback_on_step_end):
        raise TypeError("callback_on_step_end must be callable as f(engine, step, timestep, {'latents': x})")
    max_length = _max_length(req, cfg)
    strength = 1.0
    if req.strength is not None and not spec.takes_strength:
        raise ValueError("strength applies to video-to-video only: pass video= (or the noised starting latents=) "
                         "with it")
    if spec.takes_strength:
        strength = as_number("strength", 0.8 if req.strength is None else req.strength, 0, 1,
                           "; strength is in (0, 1]: 1 replaces the video entirely, 0.8 is the usual value")
        if int(steps * strength) < 1:
            raise ValueError(f"strength={strength:g} with num_inference_steps={steps} leaves no step to run "
                             f"(int({steps} * {strength:g}) = 0); raise strength to at least {1 / steps:.3g} or "
                             "use more steps")

    # Sizes, and the conditioning pixels (read and resized now: a bad file fails before any model work).
    n = b * k
    height_width = (req.height, req.width)
    num_frames = req.num_frames
    pixels = None
    given = getattr(req, spec.input) if spec.input else None
    if spec.input_is_video and given is None and num_frames is None and isinstance(req.latents, torch.Tensor) \
            and req.latents.ndim == 5:
        num_frames = (req.latents.shape[1] - 1) * facts.temporal + 1  # starting latents given instead of a video
    elif spec.input_is_video and given is not None:
        check_video_shape(1, *height_width, facts.temporal, facts.spatial * cfg.patch_size)
        what = spec.input
        raw = as_list(given, b, what)
        want = None if num_frames is None else as_int("num_frames", num_frames, 1, MAX_FRAMES)
        vids = [load_video(v, want, req.height, req.width, what) for v in raw]
        if num_frames is None:
            num_frames = _frames_from_video(min(v.shape[1] for v in vids), cfg, facts.temporal)
            vids = [v[:, :num_frames] for v in vids]
        pixels = [v for v in vids for _ in range(k)]
    num_frames = DEFAULTS.num_frames if num_frames is None else num_frames
    f, height, width = check_video_shape(num_frames, *height_width, facts.temporal, facts.spatial * cfg.patch_size)
    if spec.input is not None and not spec.input_is_video:
        pixels = [img for img in (load_image(x, height, width) for x in as_list(given, b, spec.input, frames=False))
                  for _ in range(k)]
    f_lat, extra = latent_frames(cfg, f, facts.temporal)
    if extra and spec.strict_latent_frames:
        ok = [x for x in range(1, 200, facts.temporal) if latent_frame_count(x, facts.temporal) % (cfg.patch_size_t or 1) == 0]
        near = sorted(ok, key=lambda x: abs(x - f))[:2]
        raise ValueError(f"num_frames={f} gives {latent_frame_count(f, facts.temporal)} latent frames; this model "
                         f"(patch_size_t={cfg.patch_size_t}) needs a multiple of {cfg.patch_size_t} for "
                         f"{spec.label} (as diffusers); try num_frames {' or '.join(map(str, sorted(near)))}")
    if cfg.use_learned_positional_embeddings and (height // facts.spatial, width // facts.spatial) != \
            (cfg.sample_height, cfg.sample_width):
        raise ValueError(f"this checkpoint has learned positional embeddings for {cfg.sample_height * facts.spatial}x"
                         f"{cfg.sample_width * facts.spatial} videos; pass height={cfg.sample_height * facts.spatial}, "
                         f"width={cfg.sample_width * facts.spatial} (got {height}x{width})")
    shape = (n, f_lat, cfg.out_channels_, height // facts.spatial, width // facts.spatial)
    if req.latents is not None:
        check_latents(req.latents, shape, f"{n} video(s) of {f} frames at {height}x{width}")
    plan = Plan(task=task, steps=steps, b=b, videos_per_prompt=k, cfg=g > 1.0, num_frames=f, height=height, width=width,
                shape=shape, extra=extra, seed=seed, max_length=max_length, strength=strength, pixels=pixels)
    _check_memory(plan, facts, req.output_type != "latent")
    if req.output_type != "latent" and (f_lat - extra) % 2 == 0:
        out = 4 * (f_lat - extra)
        lo, hi = (f - 1) // 8 * 8 + 1, (f - 1) // 8 * 8 + 9
        warnings.warn(f"num_frames={f} gives {f_lat - extra} latent frames, an even count: the VAE decodes them to "
                      f"{out} frames (as diffusers does), not {f}. Counts that come out exact are 8k+1, e.g. "
                      f"{lo} or {hi}", FrameCountWarning, stacklevel=4)
    return plan


def _task(req: Request, facts: ModelFacts) -> str:
    """The task of the checkpoint's kind whose input argument was given (cogvx.engine.models.tasks)."""
    given = [k for k in INPUTS if getattr(req, k) is not None]
    if len(given) > 1:
        raise ValueError(f"pass one of {', '.join(f'{k}=' for k in INPUTS)} (got {', '.join(sorted(given))})")
    runnable = tasks_of_kind(facts.task)
    own = runnable[0]
    wanted = given[0] if given else None
    if wanted is None and req.strength is not None and req.latents is not None:
        wanted = next((t.input for t in runnable if t.takes_strength), None)  # diffusers' noised starting latents
    for t in runnable:
        if t.input == wanted:
            if t.takes_strength and given and req.latents is not None:
                raise ValueError(f"pass either {wanted}= or latents= for {t.label}, not both (latents= with "
                                 "strength= are the already-noised starting latents, as diffusers takes them)")
            return t.name
    if own.input is not None:  # the checkpoint's own task needs its input
        raise ValueError(f"this is {own.checkpoint} checkpoint: pass {own.input}= ({own.input_help})"
                         + (f"; {wanted} is not taken by it" if wanted else ""))
    other = next(t for t in TASKS.values() if t.input == wanted)
    hint = "; ".join(f"pass {t.input}= for {t.label}" for t in runnable if t.input)
    raise ValueError(f"{wanted}= needs {other.checkpoint} checkpoint ({other.pipeline_classes[0]}); this checkpoint "
                     f"is {own.label}" + (f": {hint}" if hint else ""))


def _frames_from_video(have: int, cfg: TransformerConfig, temporal: int) -> int:
    """The most frames of a video of ``have`` frames this model takes: 4k+1, with a latent count that
    is a multiple of patch_size_t (CogVideoX 1.5)."""
    pt = cfg.patch_size_t or 1
    for f in range((have - 1) // temporal * temporal + 1, 0, -temporal):
        if latent_frame_count(f, temporal) % pt == 0:
            return f
    raise ValueError(f"the video has {have} frames; this model needs at least {(pt - 1) * temporal + 1}")


def _max_length(req: Request, cfg: TransformerConfig) -> int:
    if req.max_sequence_length is None:
        return cfg.max_text_seq_length if cfg.use_learned_positional_embeddings else 226
    n = as_int("max_sequence_length", req.max_sequence_length, 1, MAX_TEXT_LENGTH, "; 226 is what CogVideoX was trained with")
    if cfg.use_learned_positional_embeddings and n != cfg.max_text_seq_length:
        raise ValueError(f"this checkpoint's learned positional embeddings cover {cfg.max_text_seq_length} text "
                         f"tokens: max_sequence_length must be {cfg.max_text_seq_length} (got {n})")
    return n


def _check_memory(plan: Plan, facts: ModelFacts, output: bool) -> None:
    need = _memory_floor(plan, facts, output)
    have = _available_bytes(facts.device)
    if have is not None and need > have:
        raise ValueError(
            f"{plan.n} video(s) of {plan.num_frames} frames at {plan.height}x{plan.width} need at least "
            f"{need / 2**30:.1f} GiB on {facts.device}, but {have / 2**30:.1f} GiB is available; use fewer or "
            "smaller frames, fewer videos per call, or output_type='latent' and decode with VAE tiling")


def trace_path(path) -> Path:
    """A writable file path for a Chrome trace (checked before the call runs)."""
    p = Path(path).expanduser()
    if p.is_dir() or not p.parent.is_dir() or not os.access(p.parent, os.W_OK):
        raise ValueError(f"profile_trace {p} must be a file path in an existing, writable directory "
                         "(e.g. trace.json)")
    return p
