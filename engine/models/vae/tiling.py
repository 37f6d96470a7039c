"""Spatial tiling of the CogVideoX VAE, with diffusers' tile geometry and blending (same numbers).

A frame too large for one pass is cut into overlapping tiles. Each tile runs over all frames on its own
(frame-batched, with its own conv cache); then each tile is cross-faded with the tile above it and the
tile to its left over ``blend`` rows/columns, and cropped to ``keep`` rows/columns before the tiles are
concatenated. Blending happens in place and in diffusers' order (row by row, left to right), so a tile
is blended against neighbours that were themselves already blended: the result is order dependent, and
this module keeps the order.

Memory: diffusers keeps every tile's output until all tiles are done. Here a finished row is cropped
into the result at once, and only the bottom ``blend`` rows of its tiles are kept for the row below, so
one row of tile outputs is alive next to the result. The numbers do not change: blending row ``i`` only
reads the bottom strip of row ``i - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["TileSpec", "TileGrid", "decode_grid", "encode_grid", "tiled_map", "blend_v", "blend_h"]


@dataclass(frozen=True)
class TileSpec:
    """Tile size in video pixels and overlap fractions: diffusers' ``tile_sample_min_height/width`` and
    ``tile_overlap_factor_height/width`` (defaults: half the config's sample size, 1/6 and 1/5)."""

    sample_height: int
    sample_width: int
    overlap_height: float = 1 / 6
    overlap_width: float = 1 / 5

    def latent_size(self, spatial_scale: int) -> tuple[int, int]:
        """Tile size in latent pixels (diffusers' ``tile_latent_min_height/width``)."""
        return int(self.sample_height / spatial_scale), int(self.sample_width / spatial_scale)


@dataclass(frozen=True)
class TileGrid:
    """Where tiles start (``stride``), how big an input tile is (``tile``), how many output rows/columns
    are cross-faded with the neighbour (``blend``) and how many are kept (``keep``); all (height, width)."""

    tile: tuple[int, int]
    stride: tuple[int, int]
    blend: tuple[int, int]
    keep: tuple[int, int]


def decode_grid(spec: TileSpec, spatial_scale: int) -> TileGrid:
    """Latent tiles in, video tiles out (diffusers ``tiled_decode``)."""
    lh, lw = spec.latent_size(spatial_scale)
    bh, bw = int(spec.sample_height * spec.overlap_height), int(spec.sample_width * spec.overlap_width)
    return TileGrid(
        tile=(lh, lw),
        stride=(int(lh * (1 - spec.overlap_height)), int(lw * (1 - spec.overlap_width))),
        blend=(bh, bw),
        keep=(spec.sample_height - bh, spec.sample_width - bw),
    )


def encode_grid(spec: TileSpec, spatial_scale: int) -> TileGrid:
    """Video tiles in, latent tiles out (diffusers ``tiled_encode``)."""
    lh, lw = spec.latent_size(spatial_scale)
    bh, bw = int(lh * spec.overlap_height), int(lw * spec.overlap_width)
    return TileGrid(
        tile=(spec.sample_height, spec.sample_width),
        stride=(int(spec.sample_height * (1 - spec.overlap_height)), int(spec.sample_width * (1 - spec.overlap_width))),
        blend=(bh, bw),
        keep=(lh - bh, lw - bw),
    )


def tiled_map(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], grid: TileGrid) -> torch.Tensor:
    """``fn`` applied to overlapping spatial tiles of ``x`` [B, C, F, H, W], blended and stitched.

    ``fn`` maps a tile [B, C, F, th, tw] to [B, C', F', th', tw'] (the frame-batched encoder or decoder).
    Tiles start every ``grid.stride`` pixels up to the edge, as in diffusers, so edge tiles may be small.
    """
    if min(grid.stride) <= 0 or min(grid.tile) <= 0:
        raise ValueError(
            f"tile grid {grid} has a zero tile or stride: the tile is smaller than one latent pixel or the "
            "overlap factor is too close to 1; use larger tile_sample_min_height/width"
        )
    height, width = x.shape[-2:]
    (th, tw), (sh, sw), (bh, bw), (kh, kw) = grid.tile, grid.stride, grid.blend, grid.keep
    rows: list[torch.Tensor] = []
    above: list[torch.Tensor] | None = None
    for i in range(0, height, sh):
        row: list[torch.Tensor] = []
        for j_idx, j in enumerate(range(0, width, sw)):
            tile = fn(x[:, :, :, i : i + th, j : j + tw])
            if above is not None:
                blend_v(above[j_idx], tile, bh)
            if row:
                blend_h(row[-1], tile, bw)
            row.append(tile)
        rows.append(torch.cat([t[:, :, :, :kh, :kw] for t in row], dim=4))
        # The next row only reads the bottom `bh` rows of these tiles: keep copies of those strips and
        # let the full tiles go (blend_v clamps its extent to the strip height, which is the same extent).
        above = [t[:, :, :, t.shape[3] - min(bh, t.shape[3]):].clone() for t in row]
        del row
    return torch.cat(rows, dim=3)


def _ramp(extent: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (1 - y/e, y/e) for y in 0..e-1, computed in float64 and rounded once, like diffusers'
    Python-float scalars; kept at least float32 so half inputs see the same rounding as a scalar multiply."""
    r = torch.arange(extent, dtype=torch.float64) / extent
    wdt = torch.promote_types(like.dtype, torch.float32)
    return (1 - r).to(like.device, wdt), r.to(like.device, wdt)


def blend_v(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    """Cross-fade the bottom rows of ``a`` (tile above) into the top rows of ``b``, in place; returns ``b``.
    a, b: [B, C, F, h, w]."""
    e = min(a.shape[3], b.shape[3], extent)
    if e > 0:
        wa, wb = _ramp(e, b)
        wa, wb = wa[:, None], wb[:, None]
        b[:, :, :, :e] = (a[:, :, :, -e:] * wa).to(b.dtype) + (b[:, :, :, :e] * wb).to(b.dtype)
    return b


def blend_h(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    """Cross-fade the right columns of ``a`` (tile to the left) into the left columns of ``b``, in place."""
    e = min(a.shape[4], b.shape[4], extent)
    if e > 0:
        wa, wb = _ramp(e, b)
        b[:, :, :, :, :e] = (a[:, :, :, :, -e:] * wa).to(b.dtype) + (b[:, :, :, :, :e] * wb).to(b.dtype)
    return b
