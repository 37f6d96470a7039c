"""The ``cogvx`` command line: one parser, one ``main``; each subcommand runs from its own module.

The parser is plain argparse, so ``cogvx --help`` answers at once; the module that runs a
subcommand (and imports torch and the models) is loaded by name only after the arguments parse.
Every error a user can cause ends in one line on stderr and exit status 2 (1 when a finished video
could not be written), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import shutil
import sys

from ..models.tasks import KINDS
from ..runtime.defaults import DEFAULTS, DEMO_DEFAULTS

__all__ = ["main", "build_parser"]

# subcommand -> module holding its run(args) function (loaded after parsing)
_RUNNERS = {
    "generate": "cogvx.engine.cli.generate",
    "make-tiny": "cogvx.engine.cli.tiny",
    "recipes": "cogvx.engine.cli.recipes",
    "quantize": "cogvx.engine.cli.quantize",
    "eval": "cogvx.engine.cli.eval",
}
SCHEDULERS = ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")
RECIPE_HELP = ("quantization recipe for the transformer, or component=recipe pairs "
               "(transformer=fp8dq-row,text_encoder=int8wo); `cogvx recipes` lists them")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogvx", description="CogVideoX inference: text-, image- and "
                                     "video-to-video and control-video generation, quantization recipes")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    t = sub.add_parser("make-tiny", help="write a small random-weight checkpoint in the diffusers layout")
    t.add_argument("--out", required=True, help="directory to create")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--task", choices=KINDS, default="t2v",
                   help="t2v: text-to-video (and video-to-video); i2v: image-to-video; control: Fun-Control")
    r = sub.add_parser("recipes", help="list quantization recipes and whether this machine runs them")
    r.add_argument("--device", default=None, help="device to check (default: cuda if available, else cpu)")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q = sub.add_parser("quantize", help="write a quantized copy of a checkpoint (diffusers layout)")
    q.add_argument("--model", required=True, help="full-precision checkpoint directory or cached hub id")
    q.add_argument("--recipe", required=True, metavar="NAME|COMP=NAME,...", help=RECIPE_HELP)
    q.add_argument("--out", required=True, help="output directory (written atomically; must not exist)")
    q.add_argument("--device", default=None, help="device to quantize on (default: cuda if available, else cpu)")
    q.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16: the dtype the quantized "
                   "checkpoint runs in (load it with the same dtype)")
    q.add_argument("--fuse-qkv", action="store_true", help="fuse q/k/v into one GEMM before quantizing")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _eval_parser(sub)
    return parser


def _generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate a video from a text prompt (and an image, a video or a control "
                                        "video)",
                       description="Generate a video. Without --model, runs a built-in tiny random-weight "
                                   "model (its output is noise) so the whole pipeline can be tried at once.")
    g.add_argument("--model", help="CogVideoX checkpoint directory (diffusers layout) or cached hub id; "
                                   "default: the built-in tiny random-weight demo model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--image", default=None, help="image-to-video: the first frame (PNG/JPEG file); needs an I2V "
                                                 "checkpoint")
    g.add_argument("--video", default=None, help="video-to-video: the input video (mp4/gif); text-to-video "
                                                 "checkpoints")
    g.add_argument("--strength", type=float, default=None, help="video-to-video: how much of the input to "
                                                                "replace, (0, 1] (default 0.8)")
    g.add_argument("--control-video", default=None, help="control video (mp4/gif) for Fun-Control checkpoints")
    g.add_argument("--frames", type=int, help="number of frames, 4k+1 (default 49, a video input's length; "
                                              "demo model 9)")
    g.add_argument("--height", type=int, help=f"pixels, multiple of 16 (default {DEFAULTS.height}; demo model {DEMO_DEFAULTS.height})")
    g.add_argument("--width", type=int, help=f"pixels, multiple of 16 (default {DEFAULTS.width}; demo model {DEMO_DEFAULTS.width})")
    g.add_argument("--steps", type=int, help=f"denoising steps (default {DEFAULTS.num_inference_steps}; demo model {DEMO_DEFAULTS.num_inference_steps})")
    g.add_argument("--guidance", type=float, default=DEFAULTS.guidance_scale,
                   help=f"classifier-free guidance scale (default {DEFAULTS.guidance_scale})")
    g.add_argument("--dynamic-cfg", action="store_true", help="use dynamic classifier-free guidance")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: drawn at random and printed)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    g.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, "
                                                  "float32 on the CPU)")
    g.add_argument("--scheduler", choices=SCHEDULERS, default=None)
    g.add_argument("--vae-tiling", action="store_true", help="decode in overlapping tiles (less memory)")
    g.add_argument("--vae-dtype", default=None, help="the VAE's own dtype (default: --dtype); bfloat16 decodes 2x "
                                                      "faster than float32 on CPUs with AVX-512 BF16")
    g.add_argument("--offload", choices=["model", "group", "sequential"], default=None,
                   help="keep components off the device between their stages: model (whole components moved to the "
                        "GPU for their stage), group (transformer blocks streamed in groups), sequential (one block "
                        "at a time, least memory); on a CPU each component is read from the checkpoint for its stage")
    g.add_argument("--fps", type=float, default=DEFAULTS.fps)
    g.add_argument("--out", default="video.mp4", help="output mp4 path (default video.mp4)")
    g.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto",
                   help="fused Triton kernels (auto: on CUDA) or the PyTorch references")
    g.add_argument("--compile", nargs="?", const="default", choices=["default", "max-autotune"], default=None,
                   help="torch.compile the transformer (optionally with max-autotune)")
    g.add_argument("--compile-cache-dir", default=None, help="inductor's persistent cache (default "
                   "~/.cache/cogvx/inductor or $COGVX_COMPILE_CACHE)")
    g.add_argument("--recipe", default=None, metavar="NAME|COMP=NAME,...", help=RECIPE_HELP)
    g.add_argument("--lora", action="append", default=None, metavar="PATH[:SCALE]",
                   help="a diffusers/peft CogVideoX LoRA (.safetensors file or its folder) and its weight "
                        "(default 1.0); repeat for several. With --recipe it is merged before quantizing")
    g.add_argument("--parallel", choices=["cfg", "ulysses", "cfg+ulysses"], default=None,
                   help="one video over several processes: run under `torchrun --nproc-per-node N -m "
                        "cogvx.engine.cli generate ...` (cfg: 2 processes; cfg+ulysses: an even number)")
    g.add_argument("--step-cache", default=None, metavar="MODE:THRESHOLD",
                   help="reuse the transformer's work on steps that barely change it: first-block:0.05 or "
                        "teacache:0.2 (higher: faster, further from the uncached video)")
    g.add_argument("--step-cache-warmup", type=int, default=None, metavar="N",
                   help="with --step-cache: the first N steps are always computed (default 2)")
    g.add_argument("--step-cache-cooldown", type=int, default=None, metavar="N",
                   help="with --step-cache: the last N steps are always computed (default 2)")
    g.add_argument("--profile", action="store_true", help="print time per stage, compile time, peak memory, "
                                                           "achieved FLOP/s")
    g.add_argument("--profile-json", default=None, help="also write the profile as JSON to this path")
    g.add_argument("--profile-trace", default=None, help="write a torch.profiler Chrome trace to this path")


def _eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="measure a quantization recipe on a checkpoint against its unquantized "
                                    "reference (PSNR, SSIM, SQNR), record or compare goldens",
                       description="Generate the same prompts and seeds with a reference and with a recipe; report "
                                   "per-video PSNR and SSIM of the frames and SQNR of the latents (report.json, "
                                   "contact_sheet.png in --out).")
    e.add_argument("--model", required=True, help="full-precision checkpoint directory (diffusers layout)")
    e.add_argument("--recipe", required=True, help="quantization recipe for the transformer, or component=recipe "
                                                   "pairs; 'none' runs the model unquantized")
    e.add_argument("--reference", choices=["fp32", "bf16", "none"], default="fp32",
                   help="what the recipe is measured against: the unquantized model in fp32 (default) or bf16, or "
                        "none (with --compare: only the goldens)")
    e.add_argument("--prompts", default=None, help="text file, one prompt per line (or a JSON list); default: "
                                                   "two stock prompts")
    e.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds, one video per prompt and seed "
                                                                      "(default 0)")
    e.add_argument("--frames", type=int, default=None, help="4k+1 (default 49)")
    e.add_argument("--height", type=int, default=None, help=f"default {DEFAULTS.height}")
    e.add_argument("--width", type=int, default=None, help=f"default {DEFAULTS.width}")
    e.add_argument("--steps", type=int, default=None, help=f"denoising steps (default {DEFAULTS.num_inference_steps})")
    e.add_argument("--guidance", type=float, default=None, help=f"default {DEFAULTS.guidance_scale}")
    e.add_argument("--device", default=None)
    e.add_argument("--dtype", default=None, help="dtype of the recipe run (default bfloat16 on CUDA, float32 on CPU)")
    e.add_argument("--out", default="cogvx-eval", help="folder for report.json and contact_sheet.png")
    e.add_argument("--record", default=None, metavar="DIR", help="write this run's outputs as goldens to DIR")
    e.add_argument("--compare", default=None, metavar="DIR", help="compare this run with goldens recorded in DIR "
                                                                   "(exit status 1 when a figure is under its floor)")
    e.add_argument("--min-psnr", type=_finite, default=70.0, help="frame PSNR floor for --compare, dB (default 70)")
    e.add_argument("--min-ssim", type=_finite, default=0.9999, help="frame SSIM floor for --compare (default 0.9999)")
    e.add_argument("--min-sqnr", type=_finite, default=60.0, help="latent SQNR floor for --compare, dB (default 60)")
    e.add_argument("--overwrite", action="store_true", help="replace --record DIR if it exists")


def _stdout_closed() -> bool:
    """True when stdout is a pipe whose reader has gone (poll reports an error on its write end); stdout
    then points at /dev/null so that the interpreter's exit does not complain again."""
    try:
        fd = sys.stdout.fileno()
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        closed = any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poll.poll(0))
    except (AttributeError, OSError, ValueError):
        return False
    if closed:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
    return closed


def _finite(text: str) -> float:
    """A float flag that must be a finite number: NaN compares false with everything, so a NaN floor would
    pass every video."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number (got {text!r})") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text!r}): a NaN or infinite floor "
                                         "cannot judge a figure; e.g. 70 (dB) or 0.9999 (SSIM)")
    return v


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runner = importlib.import_module(_RUNNERS[args.command])
        rc = runner.run(args)
        sys.stdout.flush()  # a closed pipe (`cogvx recipes | head`) shows here, not at interpreter exit
        return rc
    except BrokenPipeError:
        if _stdout_closed():
            return 0  # the reader stopped reading (head, less): nothing more to say
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, shutil.Error, ImportError, RuntimeError) as e:
        # Bad input, a broken checkpoint, a full disk: one clear line, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 1 if type(e).__name__ == "VideoWriteError" else 2


if __name__ == "__main__":
    sys.exit(main())
