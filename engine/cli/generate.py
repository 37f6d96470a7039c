"""``cogvx generate``: check every argument, load, generate, write the mp4, report the seed and times."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from cogvx.quantize import parse_recipe_spec
from tqdm import tqdm

from ..dev.tiny import ensure_tiny_checkpoint
from ..io.atomic import atomic_file
from ..io.lora import find_lora_file
from ..io.video import VideoWriteError, check_fps, check_output_path
from ..parallel import init_from_env
from ..pipelines.engine import Engine
from ..pipelines.lora import parse_lora_spec
from ..pipelines.request import check_sampling, check_video_shape
from ..pipelines.step_cache import parse_step_cache
from ..runtime.defaults import DEFAULTS, DEMO_DEFAULTS
from ..runtime.devices import default_device

__all__ = ["run"]



def _check_paths(args: argparse.Namespace) -> Path:
    out = check_output_path(args.out)
    check_fps(args.fps)
    for flag in ("profile_json", "profile_trace"):
        path = getattr(args, flag)
        if path is None:
            continue
        p, name = Path(path).expanduser(), f"--{flag.replace('_', '-')} {path}"
        if p.is_dir() or not p.parent.is_dir():
            raise ValueError(f"{name} must be a file in an existing directory")
        if (p.exists() and not os.access(p, os.W_OK)) or not os.access(p.parent, os.W_OK | os.X_OK):
            raise ValueError(f"{name} cannot be written (read-only file or directory); choose another path")
    if args.compile_cache_dir is not None and args.compile is None:
        raise ValueError("--compile-cache-dir applies with --compile only (it is inductor's cache); add --compile or "
                         "leave it out")
    for flag in ("image", "video", "control_video"):
        path = getattr(args, flag)
        if path is not None and not Path(path).expanduser().is_file():
            raise ValueError(f"--{flag.replace('_', '-')} {path} is not a file")
    return out


def run(args: argparse.Namespace) -> int:
    # Everything the user typed is checked before anything is loaded or generated.
    out = _check_paths(args)
    demo = args.model is None
    defaults = DEMO_DEFAULTS if demo else DEFAULTS
    # A real model's frame count is the engine's to choose: 49, or for a video input the video's length.
    frames = args.frames if args.frames is not None else defaults.num_frames if demo else None
    height = args.height if args.height is not None else defaults.height
    width = args.width if args.width is not None else defaults.width
    steps = args.steps if args.steps is not None else defaults.num_inference_steps
    check_video_shape(frames or 1, height, width)  # every CogVideoX VAE: 4x temporal, 8x spatial, patch 2
    check_sampling(steps, args.guidance)
    recipe = parse_recipe_spec(args.recipe) if args.recipe else None
    loras = [parse_lora_spec(spec) for spec in args.lora or ()]
    for path, _ in loras:
        find_lora_file(path)  # a missing or pickle LoRA fails before the model loads
    step_cache = None
    edges = {k: v for k, v in (("warmup_steps", args.step_cache_warmup), ("cooldown_steps", args.step_cache_cooldown))
             if v is not None}
    if args.step_cache is not None:
        step_cache = parse_step_cache(args.step_cache, **edges)
    elif edges:
        raise ValueError("--step-cache-warmup / --step-cache-cooldown apply with --step-cache MODE:THRESHOLD only")
    if step_cache is not None and args.parallel is not None:
        raise ValueError("--step-cache does not combine with --parallel yet: use one or the other")
    device = args.device or default_device()
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if args.parallel is not None and not init_from_env(device):
        raise ValueError(f"--parallel {args.parallel} runs one process per device: launch with `torchrun "
                         f"--nproc-per-node N -m cogvx.engine.cli generate --parallel {args.parallel} ...`")
    try:
        return _generate(args, out, demo, frames, height, width, steps, recipe, loras, device, dtype, step_cache)
    finally:
        if args.parallel is not None and dist.is_initialized():
            dist.destroy_process_group()


def _generate(args, out, demo, frames, height, width, steps, recipe, loras, device, dtype, step_cache) -> int:
    rank = dist.get_rank() if args.parallel is not None else 0
    say = print if rank == 0 else (lambda *a, **k: None)  # rank 0 speaks and writes for the group

    timings = {}
    t0 = time.perf_counter()
    if demo:
        if rank != 0:
            dist.barrier()  # rank 0 makes the demo checkpoint first
        model, made = ensure_tiny_checkpoint()
        if rank == 0 and args.parallel is not None:
            dist.barrier()
        say(f"No --model given: using the built-in tiny random-weight model at {model}"
            f"{' (made just now)' if made else ''}.\n"
            "Its weights are random, so the video will be noise. For real videos point --model at a "
            "CogVideoX checkpoint directory (diffusers layout, e.g. a download of THUDM/CogVideoX-5b).",
            file=sys.stderr)
    else:
        model = args.model
    compile_mode = {None: False, "default": True, "max-autotune": "max-autotune"}[args.compile]
    engine = Engine.load(model, device=device, dtype=dtype, scheduler=args.scheduler, kernels=args.kernels,
                         compile=compile_mode, compile_cache_dir=args.compile_cache_dir, recipe=recipe, lora=loras,
                         parallel=args.parallel, vae_dtype=args.vae_dtype, offload=args.offload)
    if args.vae_tiling:
        engine.vae.enable_tiling()
    timings["load"] = time.perf_counter() - t0

    bar = tqdm(total=steps, desc="denoising", unit="step", file=sys.stderr, disable=rank != 0)

    def on_step(eng, i, t, kw):
        bar.update(1)
        return None

    try:
        result = engine.generate(args.prompt, negative_prompt=args.negative_prompt, num_frames=frames,
                                 height=height, width=width, num_inference_steps=steps,
                                 guidance_scale=args.guidance, use_dynamic_cfg=args.dynamic_cfg, seed=args.seed,
                                 callback_on_step_end=on_step, output_type="np", profile_trace=args.profile_trace,
                                 image=args.image, video=args.video, strength=args.strength,
                                 control_video=args.control_video, step_cache=step_cache)
    finally:
        bar.close()
    timings.update(result.timings)
    if rank != 0:
        return 0
    try:
        written = result.save(out, fps=args.fps)[0]
    except VideoWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"seed: {result.seed}", file=sys.stderr)
        return 1
    f, h, w = result.frames.shape[1:4]
    print(f"wrote {written} ({f} frames, {w}x{h}, {args.fps:g} fps, seed {result.seed})")
    print("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    if step_cache is not None:
        p = result.profile
        saved = f"{p.flops_saved / 1e12:.1f} TFLOP" if p.flops_saved >= 1e12 else f"{p.flops_saved / 1e9:.1f} GFLOP"
        print(f"step cache: {len(p.steps_reused)} of {len(p.steps)} steps reused "
              f"({', '.join(map(str, p.steps_reused)) or 'none'}), {saved} saved")
    if args.profile:
        print(result.profile.table())
    if args.profile_json:
        with atomic_file(Path(args.profile_json).expanduser()) as tmp:  # a full disk leaves no empty file
            result.profile.to_json(tmp)
        print(f"profile written to {args.profile_json}")
    return 0
