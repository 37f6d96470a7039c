"""``cogvx eval``: what a recipe costs on your checkpoint (PSNR / SSIM of frames, SQNR of latents against
an unquantized reference), a JSON report and a PNG contact sheet, and goldens to hold later runs to."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from dataclasses import asdict
from pathlib import Path

from cogvx.quantize import get_recipe

from ..io.atomic import atomic_file
from ..io.checkpoint import resolve_model_dir
from ..io.contact_sheet import contact_sheet
from ..loading import read_quantization
from ..pipelines.engine import Engine
from ..pipelines.evaluate import (
    DEFAULT_PROMPTS,
    EvalSettings,
    compare,
    not_goldens,
    read_goldens,
    read_prompts,
    run_videos,
    worst,
    write_goldens,
)
from ..pipelines.request import check_sampling, check_video_shape
from ..runtime.devices import default_device

__all__ = ["run"]

REFERENCES = {"fp32": "float32", "bf16": "bfloat16", "none": None}  # --reference -> dtype (see cli/__init__)


def _settings(args: argparse.Namespace, recorded: EvalSettings | None) -> EvalSettings:
    given = dict(prompts=read_prompts(args.prompts) if args.prompts else None, seeds=args.seeds,
                 num_frames=args.frames, height=args.height, width=args.width, num_inference_steps=args.steps,
                 guidance_scale=args.guidance)
    if recorded is not None:  # a comparison runs what the goldens ran: flags may only repeat it
        rec = asdict(recorded)
        diff = [k for k, v in given.items() if v is not None and v != rec[k]]
        if diff:
            raise ValueError(f"--compare {args.compare}: the goldens were recorded with "
                             + ", ".join(f"{k}={rec[k]!r}" for k in diff) + "; run with the same settings "
                             "(or leave those flags out to use the goldens')")
        return recorded
    s = EvalSettings(prompts=given["prompts"] or list(DEFAULT_PROMPTS), seeds=given["seeds"] or [0])
    for k in ("num_frames", "height", "width", "num_inference_steps", "guidance_scale"):
        if given[k] is not None:
            setattr(s, k, given[k])
    return s


def run(args: argparse.Namespace) -> int:
    recipe = None if args.recipe == "none" else args.recipe
    label = args.recipe if recipe is None or "=" in recipe else get_recipe(recipe).name
    model = resolve_model_dir(args.model)
    recorded, goldens_doc, goldens = None, None, None
    if args.compare:
        recorded, goldens_doc, goldens = read_goldens(args.compare)
    settings = _settings(args, recorded)
    check_video_shape(settings.num_frames or 1, settings.height, settings.width)
    check_sampling(settings.num_inference_steps, settings.guidance_scale)
    if args.reference == "none" and not args.compare and not args.record:
        raise ValueError("--reference none measures nothing: add --compare DIR (goldens) or --record DIR")
    if args.record and Path(args.record).expanduser().exists() and not args.overwrite:
        raise ValueError(f"--record {args.record} exists; choose a new folder or pass --overwrite")
    record = Path(args.record).expanduser() if args.record else None
    if record is not None and record.is_dir() and any(record.iterdir()) and not_goldens(record):
        raise ValueError(f"--record {record} is not a goldens folder ({not_goldens(record)}); --overwrite replaces only "
                         "goldens that `cogvx eval --record` wrote: choose a new folder")
    if args.reference != "none" and read_quantization(model / "transformer") is not None:
        raise ValueError(f"{model} is already quantized: it cannot be its own reference; pass the full-precision "
                         "checkpoint with --recipe, or --reference none with --compare")
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    device = args.device or default_device()
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")

    def progress(tag):
        return lambda r: print(f"  {tag}: {r.prompt[:50]!r} seed {r.seed} ({r.meta['seconds']:.1f} s)", file=sys.stderr)

    ref_runs = None
    if args.reference != "none":
        print(f"reference ({args.reference}) ...", file=sys.stderr)
        engine = Engine.load(model, device=device, dtype=REFERENCES[args.reference])
        ref_runs = run_videos(engine, settings, progress("reference"))
        del engine
        gc.collect()
    print(f"recipe {label} ({dtype}) ...", file=sys.stderr)
    engine = Engine.load(model, device=device, dtype=dtype, recipe=recipe)
    runs = run_videos(engine, settings, progress(label))
    del engine

    report = {"cogvx_eval": 1, "model": str(model), "recipe": label, "reference": args.reference, "device": device,
              "dtype": dtype, "settings": asdict(settings), "vs_reference": None, "vs_goldens": None}
    if ref_runs is not None:
        rows = compare(ref_runs, runs)
        report["vs_reference"] = {"videos": rows, "worst": worst(rows)}
    passed = True
    if goldens is not None:
        rows = compare(goldens, runs)
        floors = {"psnr_db": args.min_psnr, "ssim": args.min_ssim, "latent_sqnr_db": args.min_sqnr}
        failed = [dict(r, failed=[k for k, f in floors.items() if r[k] is not None and r[k] < f]) for r in rows]
        failed = [r for r in failed if r["failed"]]
        passed = not failed
        report["vs_goldens"] = {"dir": str(args.compare), "recorded_recipe": goldens_doc.get("recipe"),
                                "recorded_dtype": goldens_doc.get("dtype"), "floors": floors, "videos": rows,
                                "worst": worst(rows), "passed": passed, "failures": failed}
    pairs = ref_runs if ref_runs is not None else goldens
    names = (f"reference {args.reference}" if ref_runs is not None
             else f"golden {goldens_doc.get('recipe')}" if goldens_doc is not None else "", label)
    sheet_rows = [(f"{r.prompt[:60]!r} seed {r.seed}", [p.frames, r.frames] if pairs else [r.frames])
                  for r, p in zip(runs, pairs or [None] * len(runs))]
    report["contact_sheet"] = str(contact_sheet(sheet_rows, out / "contact_sheet.png",
                                                columns=names if pairs else (label,)))
    if args.record:
        report["recorded"] = str(write_goldens(args.record, runs, settings, {"recipe": label, "dtype": dtype,
                                                                             "device": device, "model": str(model)},
                                               overwrite=args.overwrite))
    with atomic_file(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    _print(report)
    print(f"wrote {out / 'report.json'} and {report['contact_sheet']}")
    if not passed:
        w = report["vs_goldens"]["failures"][0]
        print(f"FAILED: {len(report['vs_goldens']['failures'])} video(s) differ from the goldens in {args.compare} "
              f"(recorded with {goldens_doc.get('recipe')}); first: {w['prompt'][:40]!r} seed {w['seed']}: "
              + ", ".join(f"{k} {_fmt(w[k])} < {floors[k]:g}" for k in w["failed"]), file=sys.stderr)
        return 1
    return 0


def _fmt(v) -> str:
    return "identical" if v is None else f"{v:.6f}" if abs(v) < 2 else f"{v:.1f}"


def _print(report: dict) -> None:
    for key, title in (("vs_reference", f"against the {report['reference']} reference"), ("vs_goldens", "against the goldens")):
        part = report[key]
        if part is None:
            continue
        print(f"{report['recipe']} {title}:")
        print(f"  {'PSNR dB':>9} {'SSIM':>8} {'latent SQNR dB':>15}  video")
        for r in part["videos"]:
            print(f"  {_fmt(r['psnr_db']):>9} {_fmt(r['ssim']):>8} {_fmt(r['latent_sqnr_db']):>15}  "
                  f"{r['prompt'][:50]!r} seed {r['seed']}")
        if key == "vs_goldens":
            print(f"  {'passed' if part['passed'] else 'FAILED'} (floors: PSNR {part['floors']['psnr_db']:g} dB, SSIM "
                  f"{part['floors']['ssim']:g}, latent SQNR {part['floors']['latent_sqnr_db']:g} dB)")
