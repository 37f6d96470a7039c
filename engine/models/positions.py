"""Positional tables for the video tokens, computed once per resolution on the host side.

- 3D RoPE (CogVideoX-5b, 1.5): cos/sin tables [Nv, head_dim] in fp32; version 1.0 crops a
  "linspace" grid against the 30x45 base, version 1.5 uses "slice" positions.
- 3D sin-cos (CogVideoX-2b): an additive embedding [Nv, D].
The arithmetic follows diffusers' ``get_3d_rotary_pos_embed`` / ``get_3d_sincos_pos_embed``
operation for operation, since parity is measured to 1e-5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import TransformerConfig, latent_frame_count

__all__ = ["Positions", "latent_frames", "video_grid", "rope_tables", "sincos_embedding", "make_positions"]


@dataclass
class Positions:
    """What the transformer needs to place video tokens; built by :func:`make_positions`.

    rope: (cos, sin), each [Nv, head_dim] fp32, or None.
    pos_embedding: [Nv, D] additive video-token embedding (fp32), or None.
    """

    rope: tuple[torch.Tensor, torch.Tensor] | None
    pos_embedding: torch.Tensor | None
    grid: tuple[int, int, int]

    def to(self, device) -> "Positions":
        rope = None if self.rope is None else tuple(t.to(device) for t in self.rope)
        pe = None if self.pos_embedding is None else self.pos_embedding.to(device)
        return Positions(rope, pe, self.grid)


def latent_frames(cfg: TransformerConfig, num_frames: int, temporal_compression: int = 4) -> tuple[int, int]:
    """(latent frames the transformer denoises, how many of them are padding) for ``num_frames`` video
    frames: F_lat = (F - 1) / 4 + 1, padded up to a multiple of patch_size_t (CogVideoX 1.5), as the
    diffusers pipeline pads; the padding frames are dropped after denoising."""
    f_lat = latent_frame_count(num_frames, temporal_compression)
    extra = -f_lat % (cfg.patch_size_t or 1)
    return f_lat + extra, extra


def video_grid(cfg: TransformerConfig, latent_frames: int, latent_h: int, latent_w: int) -> tuple[int, int, int]:
    """Token grid (t, h, w) of a latent video [F_lat, C, latent_h, latent_w]."""
    p, pt = cfg.patch_size, cfg.patch_size_t or 1
    return (latent_frames + pt - 1) // pt, latent_h // p, latent_w // p


def _rope_1d(dim: int, pos: torch.Tensor, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(pos, freqs)
    return freqs.cos().repeat_interleave(2, dim=1), freqs.sin().repeat_interleave(2, dim=1)


def _crop_region(grid_h: int, grid_w: int, base_w: int, base_h: int):
    # Fit the grid inside the base grid keeping its aspect ratio, centred (diffusers'
    # get_resize_crop_region_for_grid).
    r = grid_h / grid_w
    if r > base_h / base_w:
        rh, rw = base_h, int(round(base_h / grid_h * grid_w))
    else:
        rw, rh = base_w, int(round(base_w / grid_w * grid_h))
    top, left = int(round((base_h - rh) / 2.0)), int(round((base_w - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def rope_tables(cfg: TransformerConfig, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [t*h*w, head_dim] fp32 on the CPU for a token grid (t, h, w)."""
    t, gh, gw = grid
    dim = cfg.attention_head_dim
    base_h, base_w = cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size
    if cfg.patch_size_t is None:
        (top, left), (bottom, right) = _crop_region(gh, gw, base_w, base_h)
        pos_h = torch.linspace(top, bottom * (gh - 1) / gh, gh, dtype=torch.float32)
        pos_w = torch.linspace(left, right * (gw - 1) / gw, gw, dtype=torch.float32)
        pos_t = torch.linspace(0, t * (t - 1) / t, t, dtype=torch.float32)
    else:
        if gh > base_h or gw > base_w:
            raise ValueError(
                f"token grid {gh}x{gw} exceeds the model's RoPE range {base_h}x{base_w}; "
                f"lower height/width to at most {base_h * cfg.patch_size * 8}x{base_w * cfg.patch_size * 8}"
            )
        pos_h = torch.arange(base_h, dtype=torch.float32)[:gh]
        pos_w = torch.arange(base_w, dtype=torch.float32)[:gw]
        pos_t = torch.arange(t, dtype=torch.float32)
    dt, dhw = dim // 4, dim // 8 * 3
    parts_cos, parts_sin = [], []
    for d, pos, shape in ((dt, pos_t, (t, 1, 1)), (dhw, pos_h, (1, gh, 1)), (dhw, pos_w, (1, 1, gw))):
        c, s = _rope_1d(d, pos)
        parts_cos.append(c.view(*shape, d).expand(t, gh, gw, d))
        parts_sin.append(s.view(*shape, d).expand(t, gh, gw, d))
    cos = torch.cat(parts_cos, dim=-1).reshape(t * gh * gw, -1)
    sin = torch.cat(parts_sin, dim=-1).reshape(t * gh * gw, -1)
    return cos.contiguous(), sin.contiguous()


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = torch.outer(pos.reshape(-1), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_embedding(cfg: TransformerConfig, grid: tuple[int, int, int]) -> torch.Tensor:
    """3D sin-cos video-token embedding [t*h*w, D] (float64, CPU) for a token grid (t, h, w)."""
    t, gh, gw = grid
    d = cfg.inner_dim
    d_spatial, d_temporal = 3 * d // 4, d // 4
    ys = torch.arange(gh, dtype=torch.float32) / cfg.spatial_interpolation_scale
    xs = torch.arange(gw, dtype=torch.float32) / cfg.spatial_interpolation_scale
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")  # [gh, gw] each: x varies along columns
    spatial = torch.cat([_sincos_1d(d_spatial // 2, gx), _sincos_1d(d_spatial // 2, gy)], dim=1)  # [gh*gw, 3D/4]
    ts = torch.arange(t, dtype=torch.float32) / cfg.temporal_interpolation_scale
    temporal = _sincos_1d(d_temporal, ts)  # [t, D/4]
    emb = torch.cat(
        [temporal[:, None, :].expand(t, gh * gw, d_temporal), spatial[None].expand(t, gh * gw, d_spatial)], dim=-1
    )
    return emb.reshape(t * gh * gw, d)


def make_positions(cfg: TransformerConfig, latent_frames: int, latent_h: int, latent_w: int) -> Positions:
    """Position tables for a latent video of ``latent_frames`` frames of ``latent_h x latent_w``.

    For checkpoints with learned positional embeddings the additive part lives in the model
    (``patch_embed.pos_embedding``); only RoPE is returned here.
    """
    grid = video_grid(cfg, latent_frames, latent_h, latent_w)
    if cfg.use_rotary_positional_embeddings:
        return Positions(rope_tables(cfg, grid), None, grid)
    return Positions(None, sincos_embedding(cfg, grid).float(), grid)
