"""The ``cogvx`` command line: ``generate``, ``make-tiny`` (and the quantization commands)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser"]

DEMO_DEFAULTS = dict(frames=9, height=96, width=128, steps=10)  # seconds on a CPU with the tiny model
REAL_DEFAULTS = dict(frames=49, height=480, width=720, steps=50)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogvx", description="CogVideoX text-to-video inference")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a video from a text prompt",
                       description="Generate a video. Without --model, runs a built-in tiny random-weight "
                                   "model (its output is noise) so the whole pipeline can be tried at once.")
    g.add_argument("--model", help="CogVideoX checkpoint directory (diffusers layout) or cached hub id; "
                                   "default: the built-in tiny random-weight demo model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--frames", type=int, help="number of frames, 4k+1 (default 49; demo model 9)")
    g.add_argument("--height", type=int, help="pixels, multiple of 16 (default 480; demo model 96)")
    g.add_argument("--width", type=int, help="pixels, multiple of 16 (default 720; demo model 128)")
    g.add_argument("--steps", type=int, help="denoising steps (default 50; demo model 10)")
    g.add_argument("--guidance", type=float, default=6.0, help="classifier-free guidance scale (default 6.0)")
    g.add_argument("--dynamic-cfg", action="store_true", help="use dynamic classifier-free guidance")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    g.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, "
                                                  "float32 on the CPU)")
    g.add_argument("--scheduler", choices=["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"], default=None)
    g.add_argument("--vae-tiling", action="store_true", help="decode in overlapping tiles (less memory)")
    g.add_argument("--fps", type=float, default=8)
    g.add_argument("--out", default="video.mp4", help="output mp4 path (default video.mp4)")
    g.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto",
                   help="fused Triton kernels (auto: on CUDA) or the PyTorch references")
    g.add_argument("--compile", nargs="?", const="default", choices=["default", "max-autotune"], default=None,
                   help="torch.compile the transformer (optionally with max-autotune)")
    g.add_argument("--profile", action="store_true", help="print time per stage, compile time, peak memory, "
                                                           "achieved FLOP/s")
    g.add_argument("--profile-json", default=None, help="also write the profile as JSON to this path")
    g.add_argument("--profile-trace", default=None, help="write a torch.profiler Chrome trace to this path")
    _add_recipe_flag(g)
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("make-tiny", help="write a small random-weight checkpoint in the diffusers layout")
    t.add_argument("--out", required=True, help="directory to create")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_make_tiny)

    _add_quantize_commands(sub)
    return parser


def _add_recipe_flag(p: argparse.ArgumentParser) -> None:
    try:
        from cogvx.quantize.cli import add_recipe_argument
    except ImportError:
        return
    add_recipe_argument(p)


def _add_quantize_commands(sub) -> None:
    try:
        from cogvx.quantize.cli import add_quantize_parser, add_recipes_parser
    except ImportError:
        return
    add_recipes_parser(sub)
    add_quantize_parser(sub)


def cmd_generate(args) -> int:
    import torch

    from .engine import Engine
    from .tiny import ensure_tiny_checkpoint
    from .validation import check_sampling, check_video_shape
    from .video import VideoWriteError, check_output_path

    # Everything the user typed is checked before anything is loaded or generated.
    out = check_output_path(args.out)
    demo = args.model is None
    defaults = DEMO_DEFAULTS if demo else REAL_DEFAULTS
    frames = args.frames if args.frames is not None else defaults["frames"]
    height = args.height if args.height is not None else defaults["height"]
    width = args.width if args.width is not None else defaults["width"]
    steps = args.steps if args.steps is not None else defaults["steps"]
    check_video_shape(frames, height, width)  # every CogVideoX VAE: 4x temporal, 8x spatial, patch 2
    check_sampling(steps, args.guidance, 1, max_steps=1000)
    for flag in ("profile_json", "profile_trace"):
        path = getattr(args, flag)
        if path is not None and (Path(path).is_dir() or not Path(path).expanduser().parent.is_dir()):
            raise ValueError(f"--{flag.replace('_', '-')} {path} must be a file in an existing directory")
    cuda = torch.cuda.is_available()
    device = args.device or ("cuda" if cuda else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")

    timings = {}
    t0 = time.perf_counter()
    if demo:
        model, made = ensure_tiny_checkpoint()
        print(f"No --model given: using the built-in tiny random-weight model at {model}"
              f"{' (made just now)' if made else ''}.\n"
              "Its weights are random, so the video will be noise. For real videos point --model at a "
              "CogVideoX checkpoint directory (diffusers layout, e.g. a download of THUDM/CogVideoX-5b).",
              file=sys.stderr)
    else:
        model = args.model
    recipe = getattr(args, "recipe", None)
    compile_mode = {None: False, "default": True, "max-autotune": "max-autotune"}[args.compile]
    engine = Engine.load(model, device=device, dtype=dtype, scheduler=args.scheduler, kernels=args.kernels,
                         compile=compile_mode, **({"recipe": recipe} if recipe else {}))
    if args.vae_tiling:
        engine.vae.enable_tiling()
    timings["load"] = time.perf_counter() - t0

    bar = _progress(steps)

    def on_step(eng, i, t, kw):
        bar.update(1)
        return None

    try:
        result = engine.generate(args.prompt, negative_prompt=args.negative_prompt, num_frames=frames,
                                 height=height, width=width, num_inference_steps=steps,
                                 guidance_scale=args.guidance, use_dynamic_cfg=args.dynamic_cfg, seed=args.seed,
                                 callback_on_step_end=on_step, output_type="np",
                                 profile_trace=args.profile_trace)
    finally:
        bar.close()
    timings.update(result.timings)
    t1 = time.perf_counter()
    try:
        written = result.save(out, fps=args.fps)[0]
    except VideoWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    timings["save"] = time.perf_counter() - t1
    f, h, w = result.frames.shape[1:4]
    print(f"wrote {written} ({f} frames, {w}x{h}, {args.fps:g} fps)")
    print("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    if args.profile:
        print(result.profile.table())
    if args.profile_json:
        result.profile.to_json(args.profile_json)
        print(f"profile written to {args.profile_json}")
    return 0


def _progress(total: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="denoising", unit="step", file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Null()


def cmd_make_tiny(args) -> int:
    from .tiny import make_tiny_checkpoint

    out = make_tiny_checkpoint(Path(args.out), seed=args.seed)
    print(f"wrote a tiny random-weight CogVideoX checkpoint to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        # Bad input: one clear line, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
