"""Latency / memory / quality sweep of one denoising step over recipes x compile x kernels, with
diffusers' own transformer on the same weights as the peer row.

One step = one transformer forward on the CFG batch (2 x num_videos), as in the denoising loop.
Every row says its median, p20 and p80 over --repeats timed calls (after one warm-up call, whose
time is reported as compile time), peak memory, SQNR of its output against the unquantized eager
cogvx step, achieved GFLOP/s, and its ratio to the diffusers eager and compiled rows of the same run.
Peak memory is process-wide (CUDA: max allocated/reserved during the timed calls; CPU: peak resident
size): on the CPU, later rows carry heap retained from earlier rows, so compare memory across rows
only on CUDA.

    python benchmarks/sweep.py --preset cpu-bench                    # the README's CPU figures
    python benchmarks/sweep.py --preset 5b --device cuda --dtype bfloat16 \\
        --recipes none int8wo fp8dq-row --compile off on --kernels torch auto

Writes benchmarks/results/sweep-<device>-<date>-<commit>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from _util import RESULTS, git_commit, results_path  # benchmarks/ is sys.path[0]
from cogvx.engine.models.config import TransformerConfig
from cogvx.engine.models.presets import PRESETS
from cogvx.engine.loading import load_transformer, read_config
from cogvx.engine.models.transformer import build_transformer
from cogvx.engine.models.positions import latent_frames, make_positions
from cogvx.engine.models.tokenizer import MAX_LENGTH
from cogvx.engine.runtime.profiling import PeakMemory, transformer_flops

def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.double(), x.double()
    noise = (ref - x).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """This device's measured dense matmul rate at n x n x n (the ceiling the step is compared with)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times[1:]) / 1e9


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(cfg: TransformerConfig, frames: int, height: int, width: int, videos: int, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    f_lat, _ = latent_frames(cfg, frames)
    lat = torch.randn(2 * videos, f_lat, cfg.in_channels, height // 8, width // 8, generator=g)
    text = torch.randn(2 * videos, MAX_LENGTH, cfg.text_embed_dim, generator=g)
    t = torch.full((2 * videos,), 501, dtype=torch.long)
    pos = make_positions(cfg, f_lat, height // 8, width // 8).to(device)
    return lat.to(device, dtype), text.to(device, dtype), t.to(device), pos


def _time(fn, repeats: int, device) -> tuple[list[float], float, dict]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()  # warm-up: compiles when compiled
    _sync(device)
    first = time.perf_counter() - t0
    times = []
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
    return times, first, mem.result, out


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = PRESETS[args.preset] if args.preset else None
    dtype = getattr(torch, args.dtype) if args.dtype else (preset.dtype if preset else torch.float32)
    if args.model:
        cfg = read_config(TransformerConfig, Path(args.model) / "transformer" / "config.json")
    else:
        cfg = preset.transformer
    frames = args.frames or (preset.num_frames if preset else 49)
    height = args.height or (preset.height if preset else 480)
    width = args.width or (preset.width if preset else 720)

    def fresh():
        if args.model:
            return load_transformer(Path(args.model) / "transformer", device=device, dtype=dtype)
        torch.manual_seed(args.seed)
        return build_transformer(cfg, device=device, dtype=dtype)

    lat, text, t, pos = make_inputs(cfg, frames, height, width, args.videos, device, dtype)
    nv = pos.grid[0] * pos.grid[1] * pos.grid[2]
    flops = transformer_flops(cfg, lat.shape[0], text.shape[1], nv)
    rows, ref_out = [], None

    def record(impl, recipe, compiled, kernels, fn):
        nonlocal ref_out
        times, first, mem, out = _time(fn, args.repeats, device)
        out = out.float()
        if ref_out is None:
            ref_out = out
        med = statistics.median(times)
        row = dict(impl=impl, recipe=recipe, compile=compiled, kernels=kernels, median_s=med,
                   p20_s=_pct(times, 0.2), p80_s=_pct(times, 0.8), first_call_s=first,
                   compile_s=max(first - med, 0.0) if compiled != "off" else 0.0, memory=mem,
                   sqnr_db=sqnr_db(ref_out, out), gflops=flops / med / 1e9, times_s=times)
        rows.append(row)
        print(f"{impl:9} {recipe:10} compile={compiled:3} kernels={kernels:6} median {med * 1e3:9.1f} ms  "
              f"p20 {row['p20_s'] * 1e3:8.1f}  p80 {row['p80_s'] * 1e3:8.1f}  SQNR {row['sqnr_db']:6.1f} dB  "
              f"{row['gflops']:7.1f} GFLOP/s", flush=True)

    # cogvx rows: the first one (none, eager, first kernel choice) is the quality reference.
    for recipe in args.recipes:
        for kernels in args.kernels:
            for compiled in args.compile:
                torch._dynamo.reset()
                model = fresh()
                if args.fuse_qkv:
                    model.fuse_qkv()
                from cogvx.kernels import resolve_backend

                model.set_kernel_backend(resolve_backend(kernels, device), "sdpa")
                if recipe != "none":
                    from cogvx.quantize import quantize_

                    quantize_(model, recipe)
                fn = model if compiled == "off" else _compile(model, device)
                with torch.inference_mode():
                    record("cogvx", recipe, compiled, kernels, lambda: fn(lat, text, t, pos))
                del model, fn
                gc.collect()

    if args.diffusers:
        try:
            from diffusers import CogVideoXTransformer3DModel
        except ImportError:
            print("diffusers is not installed: no peer rows", file=sys.stderr)
        else:
            state = fresh().state_dict()
            rope = pos.rope
            for compiled in args.compile:
                torch._dynamo.reset()
                # Built on the device (not meta): its sin-cos table is a non-persistent buffer made in __init__.
                with torch.device(device):
                    ref = CogVideoXTransformer3DModel(**{k: v for k, v in cfg.to_dict().items() if k[0] != "_"})
                ref.load_state_dict(state)
                ref = ref.to(dtype).eval()
                fn = ref if compiled == "off" else _compile(ref, device)

                def step(fn=fn):
                    return fn(hidden_states=lat, encoder_hidden_states=text, timestep=t, image_rotary_emb=rope,
                              return_dict=False)[0]

                with torch.inference_mode():
                    record("diffusers", "none", compiled, "-", step)
                del ref, fn
                gc.collect()

    for r in rows:
        for peer in ("off", "on"):
            base = next((x for x in rows if x["impl"] == "diffusers" and x["compile"] == peer), None)
            r[f"ratio_to_diffusers_{'eager' if peer == 'off' else 'compiled'}"] = (
                r["median_s"] / base["median_s"] if base else None)
    meta = _meta(device, dtype, cfg, frames, height, width, args, lat, text, nv, flops)
    return dict(meta=meta, rows=rows)


def _compile(model, device):
    from cogvx.engine.runtime.compiling import compile_module as compile_transformer

    return compile_transformer(model, True, device)


def _meta(device, dtype, cfg, frames, height, width, args, lat, text, nv, flops) -> dict:
    import platform

    versions = {"torch": torch.__version__}
    for mod in ("diffusers", "torchao", "optimum.quanto", "bitsandbytes", "triton", "transformers"):
        try:
            versions[mod] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception:
            pass
    commit, dirty = git_commit()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    return dict(
        benchmark="denoising_step_sweep", device=str(device), device_name=name, dtype=str(dtype).split(".")[-1],
        threads=torch.get_num_threads(), fuse_qkv=args.fuse_qkv, preset=args.preset, model=args.model, num_layers=cfg.num_layers,
        inner_dim=cfg.inner_dim, frames=frames, height=height, width=width, cfg_batch=lat.shape[0],
        latent_shape=list(lat.shape), text_tokens=text.shape[1], video_tokens=nv, flops_per_step=flops,
        matmul_gflops=matmul_gflops(device, dtype), repeats=args.repeats, commit=commit, dirty=dirty,
        date=time.strftime("%Y-%m-%d"), versions=versions,
    )


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        f"Denoising step, {m['device_name']} ({m['threads']} threads), {m['dtype']}, preset {m['preset']}: "
        f"{m['num_layers']} layers, D={m['inner_dim']}, {m['frames']} frames at {m['width']}x{m['height']}, "
        f"CFG batch {m['cfg_batch']}, {m['text_tokens']}+{m['video_tokens']} tokens; commit {m['commit']}"
        f"{' (dirty)' if m['dirty'] else ''}, {m['date']}. Measured {m['matmul_gflops']:.0f} GFLOP/s dense matmul.",
        "",
        "| impl | recipe | compile | kernels | median ms | p20 ms | p80 ms | x diffusers eager | x diffusers compiled "
        "| GFLOP/s | SQNR dB | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ratio = lambda v: f"{v:.2f}" if v else "-"  # noqa: E731
        peak = max(r["memory"].values()) / 2**20 if r["memory"] else float("nan")
        lines.append(
            f"| {r['impl']} | {r['recipe']} | {r['compile']} | {r['kernels']} | {r['median_s'] * 1e3:.1f} | "
            f"{r['p20_s'] * 1e3:.1f} | {r['p80_s'] * 1e3:.1f} | {ratio(r['ratio_to_diffusers_eager'])} | "
            f"{ratio(r['ratio_to_diffusers_compiled'])} | {r['gflops']:.1f} | {r['sqnr_db']:.1f} | {peak:.0f} |")
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path) -> None:
    """A horizontal bar chart of the median step times (drawn with PIL: no plotting dependency)."""
    from PIL import Image, ImageDraw

    rows = result["rows"]
    w, bar_h, left = 900, 26, 330
    img = Image.new("RGB", (w, 60 + bar_h * len(rows)), "white")
    d = ImageDraw.Draw(img)
    m = result["meta"]
    d.text((10, 10), f"median step time, {m['device_name']}, {m['dtype']}, {m['preset']} (commit {m['commit']})",
           fill="black")
    top = max(r["median_s"] for r in rows)
    for i, r in enumerate(rows):
        y = 40 + i * bar_h
        label = f"{r['impl']} {r['recipe']} compile={r['compile']} kernels={r['kernels']}"
        d.text((10, y + 6), label, fill="black")
        length = int((w - left - 90) * r["median_s"] / top)
        d.rectangle([left, y + 4, left + length, y + bar_h - 4], fill="#c44" if r["impl"] == "diffusers" else "#36c")
        d.text((left + length + 6, y + 6), f"{r['median_s'] * 1e3:.0f} ms", fill="black")
    img.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="real-shape model with random weights")
    p.add_argument("--model", default=None, help="a checkpoint directory instead of a preset")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--videos", type=int, default=1)
    p.add_argument("--recipes", nargs="+", default=["none"])
    p.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--kernels", nargs="+", default=["auto"], choices=["auto", "triton", "torch"])
    p.add_argument("--fuse-qkv", action="store_true", help="cogvx rows with q/k/v fused into one GEMM")
    p.add_argument("--no-diffusers", dest="diffusers", action="store_false")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS), help="directory for the json/md/png files")
    args = p.parse_args(argv)
    if (args.preset is None) == (args.model is None):
        p.error("give exactly one of --preset or --model")
    result = run(args)
    m = result["meta"]
    stem = results_path("sweep", m["device_name"], m["commit"], suffix="", out=Path(args.out))
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{stem}.md").write_text(markdown(result))
    chart(result, Path(f"{stem}.png"))
    print(markdown(result))
    print(f"wrote {stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
