"""A PNG contact sheet: one row per video, a few frames each, the versions being compared side by side
(reference | test) in every cell, each row labelled."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .atomic import atomic_file

__all__ = ["contact_sheet", "pick_frames"]

_PAD, _LABEL = 4, 14


def pick_frames(num_frames: int, k: int = 4) -> list[int]:
    """k frame indices spread evenly from the first to the last (fewer for short videos)."""
    if num_frames <= k:
        return list(range(num_frames))
    return sorted({round(i * (num_frames - 1) / (k - 1)) for i in range(k)})


def _thumb(frame: np.ndarray, height: int) -> Image.Image:
    u8 = frame if frame.dtype == np.uint8 else (np.clip(frame, 0, 1) * 255).round().astype(np.uint8)
    im = Image.fromarray(u8)
    w = max(1, round(im.width * height / im.height))
    return im.resize((w, height), Image.BILINEAR)


def contact_sheet(rows: list[tuple[str, list[np.ndarray]]], path: str | os.PathLike, *, frames: int = 4,
                  height: int = 128, columns: tuple[str, ...] = ("reference", "test")) -> Path:
    """Write a PNG: each row ``(label, [video_a [F, H, W, 3], video_b, ...])`` shows ``frames`` frames, the
    versions side by side per frame (float in [0, 1] or uint8). ``columns`` names the versions."""
    if not rows:
        raise ValueError("contact_sheet needs at least one row")
    cells = []
    for label, videos in rows:
        idx = pick_frames(min(v.shape[0] for v in videos), frames)
        cells.append((label, [[_thumb(v[i], height) for v in videos] for i in idx], idx))
    cell_w = max(sum(t.width for t in c) + _PAD * (len(c) - 1) for _, r, _ in cells for c in r)
    n_cols = max(len(r) for _, r, _ in cells)
    width = _PAD + n_cols * (cell_w + 2 * _PAD)
    row_h = _LABEL + height + _LABEL + _PAD
    sheet = Image.new("RGB", (width, _LABEL + _PAD + len(cells) * row_h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((_PAD, 1), "per frame: " + " | ".join(columns), fill="black")
    y = _LABEL + _PAD
    for label, row, idx in cells:
        draw.text((_PAD, y), label, fill="black")
        x = _PAD
        for i, cell in zip(idx, row):
            cx = x
            for t in cell:
                sheet.paste(t, (cx, y + _LABEL))
                cx += t.width + _PAD
            draw.text((x, y + _LABEL + height + 1), f"frame {i}", fill="black")
            x += cell_w + 2 * _PAD
        y += row_h
    out = Path(path).expanduser()
    with atomic_file(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out
