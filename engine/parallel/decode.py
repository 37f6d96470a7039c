"""VAE decode with tiling on, the tiles spread over the ranks and gathered on rank 0, which blends them.

Tiles are independent until blending (each runs over all frames with its own conv cache), so the ranks
share them out, balanced by area (edge tiles are smaller); each round (one tile per rank) meets on rank 0
in one gather (tiles padded to the largest tile's size and cropped back there), and rank 0 stitches them
with the same geometry and blending as a single process (``tiled_map``), so the video is the same.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..models.vae import CogVideoXVAE
from ..models.vae.tiling import decode_grid, tiled_map
from .collectives import bounded, broadcast_int
from .groups import Mesh

__all__ = ["assign_tiles", "decode_tiles"]


def _tile_starts(height: int, width: int, stride: tuple[int, int]) -> list[tuple[int, int]]:
    return [(i, j) for i in range(0, height, stride[0]) for j in range(0, width, stride[1])]


def assign_tiles(areas: list[int], world: int) -> list[list[int]]:
    """Tile indices per rank, balanced by area (edge tiles are smaller): largest first, each to the rank
    with the least work so far (ties to the lower rank). Every rank computes the same assignment."""
    load, owned = [0] * world, [[] for _ in range(world)]
    for k in sorted(range(len(areas)), key=lambda k: (-areas[k], k)):
        r = min(range(world), key=lambda r: (load[r], r))
        owned[r].append(k)
        load[r] += areas[k]
    return owned


def decode_tiles(vae: CogVideoXVAE, z: torch.Tensor, mesh: Mesh) -> torch.Tensor | None:
    """z [B, C_lat, F_lat, h, w] (unscaled, as ``CogVideoXVAE.decode`` takes it) -> the video
    [B, 3, F, 8h, 8w] on rank 0, None on the other ranks. Every rank of the world group must call it.
    Latents no larger than one tile are decoded by rank 0 alone."""
    scale = vae.config.spatial_scale
    lh, lw = vae.tile_spec.latent_size(scale)
    if not (z.shape[-1] > lw or z.shape[-2] > lh):
        return vae.decode(z) if mesh.rank == 0 else None
    grid = decode_grid(vae.tile_spec, scale)
    (th, tw) = grid.tile
    starts = _tile_starts(z.shape[-2], z.shape[-1], grid.stride)
    world, rank = mesh.world, mesh.rank
    dev = mesh.device if "nccl" in mesh.backend.lower() else torch.device("cpu")
    sizes = [(min(th, z.shape[-2] - i), min(tw, z.shape[-1] - j)) for i, j in starts]
    owned = assign_tiles([h * w for h, w in sizes], world)
    tiles: list[torch.Tensor | None] = [None] * len(starts)
    frames = None
    for step in range(max(len(o) for o in owned)):
        k = owned[rank][step] if step < len(owned[rank]) else None
        out = None
        if k is not None:
            i, j = starts[k]
            out = vae.decode(z[..., i : i + th, j : j + tw])
        if frames is None:  # rank 0 always has a tile in the first round: its frame count sizes every block
            frames = broadcast_int(out.shape[2] if rank == 0 else 0, mesh.device, mesh.group, mesh.timeout)
        # Every rank sends a block of the largest tile's size (zeros when it has no tile this round).
        send = torch.zeros((z.shape[0], 3, frames, th * scale, tw * scale), dtype=z.dtype, device=dev)
        if out is not None:
            send[..., : out.shape[-2], : out.shape[-1]] = out.to(dev)
        got = [torch.empty_like(send) for _ in range(world)] if rank == 0 else None
        with bounded("the gather of the VAE tiles", mesh.timeout):
            dist.gather(send, got, dst=0, group=mesh.group)
        if rank == 0:
            for r, block in enumerate(got):
                if step < len(owned[r]):
                    kk = owned[r][step]
                    hh, ww = sizes[kk]
                    tiles[kk] = block[..., : hh * scale, : ww * scale].to(z.device)
    if rank != 0:
        return None
    pending = iter(tiles)
    return tiled_map(z, lambda _tile: next(pending), grid)

