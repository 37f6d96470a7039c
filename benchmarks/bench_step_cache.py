"""Step caching: speed against quality over a range of thresholds, against the uncached run of the
same seed.

For each mode and threshold, one seeded generate of --steps steps (default 50, CFG): wall time of the
denoising loop, steps computed / reused, the FLOPs the skipped blocks would have cost, SQNR of the
denoised latents and PSNR of the decoded frames (VAE decode of both latents, frames in [0, 1]) against
the uncached generate. With --repeats R the uncached and the cached rows are timed alternately R times
in one process; each row reports its best and median time, and speedup = uncached best / row best
(the best is the least disturbed by other work on a shared machine). The FLOPs saved are exact.

Thresholds: given per mode (--first-block 0.05 0.1 ...; --teacache 0.1 0.2 0.3), or "auto": the
10/30/50/70/90 % quantiles (--quantiles) of the model's own step-to-step indicator (first-block: the change of block
0's residual between consecutive computed steps; teacache: the rescaled time-embedding change), so a
curve spans the model whatever its scale. Random-weight presets change far more from step to step than
a trained model does, so their auto thresholds sit near 1, not at the 0.05-0.3 used on real
checkpoints: their curve shows the machinery and its cost, not how a trained model's residuals
evolve. Measure the curve on a checkpoint with --model DIR.

    python benchmarks/bench_step_cache.py --demo --repeats 5
    python benchmarks/bench_step_cache.py --preset cpu-bench --first-block auto --teacache 0.2
    python benchmarks/bench_step_cache.py --model /path/to/CogVideoX-5b --device cuda --dtype bfloat16 \\
        --frames 49 --height 480 --width 720 --first-block 0.03 0.05 0.1 --teacache 0.1 0.2 0.3 --compile

Writes benchmarks/results/step-cache-<preset or model>-<device>-<date>-<commit>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from _util import RESULTS, git_commit, write_report  # benchmarks/ is sys.path[0]
from sweep import sqnr_db
from cogvx.engine import Engine, StepCache
from cogvx.engine.dev.tiny import ensure_tiny_checkpoint
from cogvx.engine.models.presets import PRESETS
from cogvx.engine.pipelines.cached_denoiser import teacache_indicator
from cogvx.engine.pipelines.step_cache import teacache_coefficients
from step_cache_chart import chart

PROMPT = "a red fox running through fresh snow, golden hour"


def psnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    """PSNR of frames in [0, 1] (peak 1)."""
    mse = (ref.double() - x.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def build(args) -> Engine:
    kw = dict(device=args.device, dtype=args.dtype, compile=args.compile)
    if args.model or args.demo:
        return Engine.load(args.model or ensure_tiny_checkpoint()[0], **kw)
    # The real-size T5 of a preset is 4.7B parameters: the preset runs on seeded prompt embeddings.
    return Engine.from_preset(args.preset, text_encoder=args.preset == "tiny", **kw)


def call_args(engine: Engine, args) -> dict:
    preset = PRESETS[args.preset] if args.preset else None
    kw = dict(num_frames=args.frames or (preset.num_frames if preset else 49),
              height=args.height or (preset.height if preset else 480),
              width=args.width or (preset.width if preset else 720),
              num_inference_steps=args.steps, guidance_scale=6.0, seed=args.seed, output_type="latent")
    if engine.text_encoder is not None:
        return dict(kw, prompt=PROMPT, negative_prompt="")
    g = torch.Generator().manual_seed(args.seed)
    shape = (1, 226, engine.config.text_embed_dim)
    pe, ne = (torch.randn(shape, generator=g).to(engine.device, engine.dtype) for _ in range(2))
    return dict(kw, prompt_embeds=pe, negative_prompt_embeds=ne)


def auto_thresholds(engine: Engine, kw: dict, mode: str, coefficients, quantiles) -> tuple[list[float], list[float]]:
    """(thresholds at the quantiles of the per-step indicator, the indicator)."""
    if mode == "first-block":
        # A threshold no change falls below: every step computed, every change read.
        probe = engine.generate(**kw, step_cache=StepCache(1e-30, warmup_steps=1, cooldown_steps=0))
        values = [v for v in probe.profile.step_cache["indicator"] if v is not None]
    else:
        schedule = engine.scheduler.schedule(kw["num_inference_steps"])
        coef = coefficients or teacache_coefficients(engine.config)[1]
        ofs = torch.full((1,), 2.0, device=engine.device, dtype=engine.dtype) if engine.config.ofs_embed_dim else None
        values = teacache_indicator(engine.transformer, schedule.timesteps(engine.device), ofs, engine.dtype, coef)[1:]
    positive = [v for v in values if v > 0]
    if len(positive) < len(values) / 2:
        return [], values  # an extrapolated polynomial below 0: every step that may be reused is
    return sorted({float(f"{np.quantile(positive, q):.3g}") for q in quantiles}), values


def frames_of(engine: Engine, latents: torch.Tensor) -> torch.Tensor:
    return ((engine.decode(latents).float() + 1) / 2).clamp(0, 1).cpu()


def run(args) -> dict:
    commit, dirty = git_commit()  # the code that runs: read before anything else can change the tree
    engine = build(args)
    kw = call_args(engine, args)
    rows_spec, indicators = [], {}
    for mode, given in (("first-block", args.first_block), ("teacache", args.teacache)):
        coef = tuple(args.teacache_coefficients) if mode == "teacache" and args.teacache_coefficients else None
        if not given:
            continue
        thresholds = sorted({float(t) for t in given if t != "auto"})
        if "auto" in given:
            auto, indicators[mode] = auto_thresholds(engine, kw, mode, coef, args.quantiles)
            thresholds = sorted(set(thresholds + auto)) or [0.1, 0.2, 0.3]
        rows_spec += [StepCache(t, mode=mode, warmup_steps=args.warmup, cooldown_steps=args.cooldown, coefficients=coef)
                      for t in thresholds]
    # A short warm-up per path (compiles each, when compiled; first-call costs out of the timed rows).
    for cache in [None] + list({c.mode: c for c in rows_spec}.values()):
        engine.generate(**{**kw, "num_inference_steps": 2}, step_cache=cache)
    times = {i: [] for i in range(-1, len(rows_spec))}
    results = {}
    for _ in range(args.repeats):
        for i, cache in [(-1, None)] + list(enumerate(rows_spec)):
            r = engine.generate(**kw, step_cache=cache)
            times[i].append(r.profile.stages["denoise"])
            results[i] = r
            print(f"{'uncached' if cache is None else f'{cache.mode} {cache.threshold:g}'}: "
                  f"{r.profile.stages['denoise']:.2f} s, {len(r.profile.steps_reused)} reused", flush=True)
    base = results[-1]
    base_latents = base.latents.cpu()
    base_frames = frames_of(engine, base.latents) if engine.vae is not None else None
    t_base = min(times[-1])
    rows = [dict(mode="none", threshold=None, denoise_s=t_base, denoise_median_s=statistics.median(times[-1]),
                 denoise_all_s=times[-1], speedup=1.0, reused=0,
                 computed=args.steps, reused_steps=[], flops_saved=0, sqnr_db=math.inf, psnr_db=math.inf)]
    for i, cache in enumerate(rows_spec):
        r = results[i]
        p = r.profile
        t = min(times[i])
        psnr = psnr_db(base_frames, frames_of(engine, r.latents)) if base_frames is not None else None
        rows.append(dict(mode=cache.mode, threshold=cache.threshold, denoise_s=t,
                         denoise_median_s=statistics.median(times[i]), denoise_all_s=times[i],
                         speedup=t_base / t, reused=len(p.steps_reused), computed=len(p.steps_computed),
                         reused_steps=p.steps_reused, flops_saved=p.flops_saved,
                         flops_saved_fraction=p.flops_saved / (p.flops_per_step * len(p.steps)),
                         sqnr_db=sqnr_db(base_latents, r.latents.cpu()), psnr_db=psnr,
                         coefficients=p.step_cache.get("coefficients")))
    dev = engine.device
    cfg = engine.config
    return dict(meta=dict(benchmark="step_cache", preset=args.preset or ("tiny demo" if args.demo else None),
                          model=args.model, device=str(dev),
                          device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else
                          f"cpu-{platform.machine()}", threads=torch.get_num_threads(),
                          dtype=str(engine.dtype).split(".")[-1], compile=args.compile, steps=args.steps,
                          warmup_steps=args.warmup, cooldown_steps=args.cooldown, repeats=args.repeats,
                          seed=args.seed, num_layers=cfg.num_layers, inner_dim=cfg.inner_dim, shape=base.profile.shape,
                          frames=kw["num_frames"], height=kw["height"], width=kw["width"],
                          flops_per_step=base.profile.flops_per_step, random_weights=args.model is None,  # a preset or the demo
                          commit=commit, dirty=dirty, torch=torch.__version__, indicators=indicators),
                rows=rows)


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        f"Step cache, {m['steps']} steps (warm-up {m['warmup_steps']}, cool-down {m['cooldown_steps']}), "
        f"{m['device_name']} ({m['threads']} threads), {m['dtype']}, {m['preset'] or m['model']}: {m['num_layers']} "
        f"layers, D={m['inner_dim']}, {m['frames']} frames at {m['width']}x{m['height']}, CFG batch "
        f"{m['shape']['batch']}, {m['shape']['text_tokens']}+{m['shape']['video_tokens']} tokens, compile "
        f"{m['compile']}; best of {m['repeats']} alternated runs; commit {m['commit']}{' (dirty)' if m['dirty'] else ''}.",
        "",
    ]
    if m["random_weights"]:
        lines += ["Random weights: these models change far more from step to step than a trained one, so the "
                  "thresholds here are not the ones to use on a real checkpoint, and the curve does not show how "
                  "a trained model's residuals evolve. Measure it on yours with `--model DIR`.", ""]
    lines += ["| mode | threshold | denoise s best (median) | speedup | reused / steps | FLOPs saved | SQNR latents dB "
              "| PSNR frames dB |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        th = "-" if r["threshold"] is None else f"{r['threshold']:g}"
        saved = f"{100 * r.get('flops_saved_fraction', 0):.0f} %"
        psnr = "-" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}"
        lines.append(f"| {r['mode']} | {th} | {r['denoise_s']:.2f} ({r['denoise_median_s']:.2f}) | {r['speedup']:.2f} | "
                     f"{r['reused']} / "
                     f"{r['reused'] + r['computed']} | {saved} | {r['sqnr_db']:.1f} | {psnr} |")
    return "\n".join(lines) + "\n"


def _finite(x):
    """JSON without Infinity: an infinite dB figure (identical to the uncached run) is written as null."""
    if isinstance(x, float) and math.isinf(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="random-weight model of a preset shape")
    p.add_argument("--model", default=None, help="a checkpoint directory instead of a preset")
    p.add_argument("--demo", action="store_true", help="the built-in tiny demo checkpoint of `cogvx generate` "
                   "(random weights; the tiny preset's blocks move its output by only 1e-4, too little to measure)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="compile (the regions of the cached rows)")
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--first-block", nargs="*", default=["auto"], metavar="T|auto",
                   help="first-block thresholds (default: auto); none given: leave the mode out")
    p.add_argument("--teacache", nargs="*", default=["0.1", "0.2", "0.3"], metavar="T|auto",
                   help="teacache thresholds (default: 0.1 0.2 0.3, TeaCache's published ones)")
    p.add_argument("--teacache-coefficients", nargs="+", type=float, default=None,
                   help="rescaling polynomial, highest power first (default: TeaCache's published fit for the model)")
    p.add_argument("--quantiles", nargs="+", type=float, default=[0.1, 0.3, 0.5, 0.7, 0.9],
                   help="auto thresholds: these quantiles of the model's per-step indicator")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--cooldown", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS), help="directory for the json/md/png files")
    args = p.parse_args(argv)
    if (args.preset is not None) + (args.model is not None) + args.demo != 1:
        p.error("give exactly one of --preset, --model or --demo")
    if args.demo:  # the demo model's own size (as `cogvx generate` without --model)
        args.frames, args.height, args.width = args.frames or 9, args.height or 96, args.width or 128
    result = _finite(run(args))
    name = f"step-cache-{args.preset or ('tiny-demo' if args.demo else Path(args.model).name)}"
    write_report(name, result, markdown, chart, out=Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
