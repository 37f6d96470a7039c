"""The speed / quality chart of bench_step_cache.py, drawn with PIL (no plotting dependency): PSNR of the
frames against the speedup of the denoising loop, and SQNR of the latents against the share of the
transformer's FLOPs the skipped blocks saved, one colour per mode, each point labelled by its threshold."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"first-block": "#36c", "teacache": "#c44", "none": "#000"}
W, H, PAD = 520, 380, 56


def _panel(d: ImageDraw.ImageDraw, x0: int, y0: int, points, xlabel: str, ylabel: str) -> None:
    """points: (x, y or inf, mode, label). Infinite y (identical to the uncached run) is drawn at the top."""
    finite = [p[1] for p in points if p[1] is not None and math.isfinite(p[1])]
    ymin, ymax = (min(finite), max(finite)) if finite else (0.0, 1.0)
    ymin, ymax = math.floor(ymin / 5) * 5, math.ceil(ymax / 5) * 5 + 5  # room above for "identical"
    xs = [p[0] for p in points]
    xmin, xmax = min(xs + [0.9]), max(xs + [1.1])
    left, top, right, bottom = x0 + PAD, y0 + 20, x0 + W - 16, y0 + H - PAD
    d.rectangle([left, top, right, bottom], outline="#888")

    def at(x, y):
        y = ymax if y is None or not math.isfinite(y) else y
        return (left + (x - xmin) / (xmax - xmin or 1) * (right - left),
                bottom - (y - ymin) / (ymax - ymin or 1) * (bottom - top))

    for i in range(6):
        yv = ymin + i * (ymax - ymin) / 5
        _, yy = at(xmin, yv)
        d.line([left - 4, yy, left, yy], fill="#888")
        d.text((x0 + 8, yy - 6), f"{yv:.0f}", fill="black")
        xv = xmin + i * (xmax - xmin) / 5
        xx, _ = at(xv, ymin)
        d.line([xx, bottom, xx, bottom + 4], fill="#888")
        d.text((xx - 12, bottom + 8), f"{xv:.2f}", fill="black")
    d.text((left + 4, top + 2), "top: identical to uncached", fill="#888")
    d.text((left + (right - left) // 2 - 60, bottom + 26), xlabel, fill="black")
    d.text((x0 + 8, top - 16), ylabel, fill="black")
    for mode in COLORS:
        pts = [p for p in points if p[2] == mode]  # in threshold order: the curve a threshold traces
        if len(pts) > 1:
            d.line([at(p[0], p[1]) for p in pts], fill=COLORS[mode], width=2)
        for p in pts:
            cx, cy = at(p[0], p[1])
            d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=COLORS[mode])
            d.text((cx + 6, cy - 12), p[3], fill=COLORS[mode])


def chart(result: dict, path: Path) -> None:
    m, rows = result["meta"], result["rows"]
    img = Image.new("RGB", (2 * W, H + 110), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), f"step cache, {m['steps']} steps: {m['preset'] or m['model']}, {m['device_name']}, {m['dtype']}, "
                    f"{m['frames']} frames {m['width']}x{m['height']}, compile {m['compile']}, commit {m['commit']}",
           fill="black")
    label = lambda r: "" if r["threshold"] is None else f"{r['threshold']:g} ({r['reused']})"  # noqa: E731
    have_frames = rows[0]["psnr_db"] is not None
    left = [(r["speedup"], r["psnr_db"] if have_frames else r["sqnr_db"], r["mode"], label(r)) for r in rows]
    right = [(r.get("flops_saved_fraction", 0.0), r["sqnr_db"], r["mode"], label(r)) for r in rows]
    _panel(d, 0, 30, left, "speedup of the denoising loop (x uncached)",
           "PSNR of frames, dB" if have_frames else "SQNR of latents, dB")
    _panel(d, W, 30, right, "share of transformer FLOPs saved", "SQNR of latents, dB")
    y = H + 40
    d.text((10, y), "blue: first-block, red: teacache; labels: threshold (steps reused)", fill="black")
    if m["random_weights"]:
        d.text((10, y + 18), "Random weights: a random model's residuals change far more from step to step than a "
                             "trained model's; this curve shows", fill="#a00")
        d.text((10, y + 34), "the machinery and its cost, not a trained model's trade-off. Measure yours: "
                             "bench_step_cache.py --model DIR", fill="#a00")
    img.save(path)
