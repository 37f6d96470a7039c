"""Building blocks of the CogVideoX 3D causal VAE: causal convolutions with an explicit frame cache,
spatially conditioned norms, resnet blocks, samplers, and the encoder / decoder stacks. Parameter
names equal diffusers' ``AutoencoderKLCogVideoX`` (see ``model.py`` for what differs in the work done).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig

__all__ = ["ConvCache", "CausalConv3d", "Encoder3D", "Decoder3D", "safe_conv3d"]

# diffusers' get_activation names; the in-place forms are safe because every call site owns its input.
_ACTS = {
    "silu": lambda x: F.silu(x, inplace=True), "swish": lambda x: F.silu(x, inplace=True),
    "mish": lambda x: F.mish(x, inplace=True), "relu": lambda x: F.relu(x, inplace=True), "gelu": F.gelu,
}


class ConvCache:
    """The last ``k_t - 1`` (padded) input frames of each causal conv, carried between frame batches.

    One object per stream of batches (a whole video, or one spatial tile of it), created by the batch
    loop and passed explicitly through ``forward``. Each CausalConv3d takes its entry out (so the previous
    batch's frames are freed as soon as they are used) and puts back the tail of its current input. An
    empty cache means "first batch": the conv then pads with copies of the first frame. During the last
    batch (``keep = False``) nothing is put back, so the cache empties as the batch runs.
    """

    def __init__(self) -> None:
        self._tails: dict[nn.Module, torch.Tensor] = {}
        self.keep = True

    def take(self, conv: nn.Module) -> torch.Tensor | None:
        return self._tails.pop(conv, None)

    def put(self, conv: nn.Module, tail: torch.Tensor) -> None:
        if self.keep:
            self._tails[conv] = tail

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tails.values())


def safe_conv3d(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, split along time when ``x`` is over 2 GiB counted at 2 bytes per element (diffusers'
    CogVideoXSafeConv3d rule, for cuDNN's size limit). Chunks overlap by k_t - 1 frames: same result."""
    gib = x.numel() * 2 / 1024**3
    if gib <= 2:
        return conv(x)
    chunks = torch.chunk(x, int(gib / 2) + 1, dim=2)
    k = conv.kernel_size[0]
    outs = [conv(chunks[0])]
    for prev, cur in zip(chunks, chunks[1:]):
        outs.append(conv(torch.cat([prev[:, :, -(k - 1):], cur], dim=2) if k > 1 else cur))
    return torch.cat(outs, dim=2)


class CausalConv3d(nn.Module):
    """Conv3d (stride 1) padded causally in time and symmetrically (zeros) in space. x: [B, C, T, H, W]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.time_pad = kernel_size - 1
        p = (kernel_size - 1) // 2
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=(0, p, p))

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        if self.time_pad:
            prev = cache.take(self) if cache is not None else None
            head = prev if prev is not None else x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
            x = torch.cat([head, x], dim=2)
            del prev, head
            if cache is not None and cache.keep:  # clone: a view would keep the whole padded input alive
                cache.put(self, x[:, :, -self.time_pad:].clone())
        return safe_conv3d(self.conv, x)


def _modulate_(out: torch.Tensor, y: torch.Tensor, b: torch.Tensor) -> None:
    """out = out * up(y) + up(b) in place; up = nearest upsampling of [B, C, t, h, w] to out's size.
    For integer ratios that is a repeat along W and a broadcast over unflattened T and H axes: nothing
    full-size is materialized, and the innermost axis stays contiguous (fast broadcasting kernels)."""
    T, H, W = out.shape[2:]
    t, h, w = y.shape[2:]
    if T % t or H % h or W % w:  # never for CogVideoX shapes; kept for exactness
        out.mul_(F.interpolate(y, size=(T, H, W))).add_(F.interpolate(b, size=(T, H, W)))
        return
    if W != w:
        y, b = y.repeat_interleave(W // w, dim=4), b.repeat_interleave(W // w, dim=4)
    o = out.unflatten(3, (h, H // h)).unflatten(2, (t, T // t))  # [B, C, t, rt, h, rh, W]
    ix = (slice(None), slice(None), slice(None), None, slice(None), None)
    o.mul_(y[ix]).add_(b[ix])


class SpatialNorm3D(nn.Module):
    """GroupNorm(f) * conv_y(zq) + conv_b(zq), zq (the latent) upsampled nearest to f's size.
    f: [B, C, T, H, W]; zq: [B, C_lat, t, h, w]."""

    def __init__(self, f_channels: int, zq_channels: int, groups: int) -> None:
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, f_channels, eps=1e-6)  # eps fixed in diffusers, not norm_eps
        self.conv_y = CausalConv3d(zq_channels, f_channels, kernel_size=1)
        self.conv_b = CausalConv3d(zq_channels, f_channels, kernel_size=1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        y, b = self.conv_y(zq), self.conv_b(zq)
        out = self.norm_layer(f)
        T = f.shape[2]
        if T > 1 and T % 2 == 1:  # odd: the first (image) frame maps to latent frame 0 alone
            _modulate_(out[:, :, :1], y[:, :, :1], b[:, :, :1])
            _modulate_(out[:, :, 1:], y[:, :, 1:], b[:, :, 1:])
        else:
            _modulate_(out, y, b)
        return out


class ResnetBlock3D(nn.Module):
    """norm -> act -> causal conv, twice, plus a (1x1x1 conv) shortcut. Decoder blocks use SpatialNorm3D."""

    def __init__(self, cin: int, cout: int, cfg: VAEConfig, spatial_norm_dim: int | None = None) -> None:
        super().__init__()
        g = cfg.norm_num_groups
        if spatial_norm_dim is None:
            self.norm1 = nn.GroupNorm(g, cin, eps=cfg.norm_eps)
            self.norm2 = nn.GroupNorm(g, cout, eps=cfg.norm_eps)
        else:
            self.norm1 = SpatialNorm3D(cin, spatial_norm_dim, g)
            self.norm2 = SpatialNorm3D(cout, spatial_norm_dim, g)
        self.act = _ACTS[cfg.act_fn]
        self.conv1 = CausalConv3d(cin, cout)
        self.conv2 = CausalConv3d(cout, cout)
        self.conv_shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None, cache: ConvCache | None) -> torch.Tensor:
        h = self.norm1(x) if zq is None else self.norm1(x, zq)
        h = self.conv1(self.act(h), cache)
        h = self.norm2(h) if zq is None else self.norm2(h, zq)
        h = self.conv2(self.act(h), cache)  # dropout is 0 in every CogVideoX VAE: omitted
        return h.add_(x if self.conv_shortcut is None else safe_conv3d(self.conv_shortcut, x))


class Downsample3D(nn.Module):
    """Halve H, W (3x3 conv, stride 2, zero pad right/bottom); with ``compress_time`` first halve the frames
    by averaging pairs, an odd count keeping its first frame alone. Not causal across frame batches."""

    def __init__(self, channels: int, compress_time: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)
        self.compress_time = compress_time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compress_time and x.shape[2] > 1:
            odd = x.shape[2] % 2
            rest = x[:, :, odd:]
            pooled = (rest[:, :, 0::2] + rest[:, :, 1::2]) / 2  # = avg_pool1d(kernel 2, stride 2)
            x = torch.cat([x[:, :, :1], pooled], dim=2) if odd else pooled
        x = F.pad(x, (0, 1, 0, 1))
        return F.conv3d(x, self.conv.weight.unsqueeze(2), self.conv.bias, stride=(1, 2, 2))


class Upsample3D(nn.Module):
    """Double H, W (nearest) then 3x3 conv; with ``compress_time`` also double the frames (nearest), an odd
    count keeping its first frame single (3 -> 5 frames)."""

    def __init__(self, channels: int, compress_time: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.compress_time = compress_time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[2]
        if self.compress_time and T > 1:  # repeat frames at low resolution, before the spatial upsample
            idx = torch.arange(T, device=x.device).repeat_interleave(2)[T % 2:]
            x = x.index_select(2, idx)
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return F.conv3d(x, self.conv.weight.unsqueeze(2), self.conv.bias, padding=(0, 1, 1))


class DownBlock3D(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: VAEConfig, add_downsample: bool, compress_time: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(cin if i == 0 else cout, cout, cfg) for i in range(cfg.layers_per_block)
        )
        self.downsamplers = nn.ModuleList([Downsample3D(cout, compress_time)]) if add_downsample else None

    def forward(self, x: torch.Tensor, cache: ConvCache | None) -> torch.Tensor:
        for r in self.resnets:
            x = r(x, None, cache)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class MidBlock3D(nn.Module):
    def __init__(self, channels: int, cfg: VAEConfig, spatial_norm_dim: int | None = None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock3D(channels, channels, cfg, spatial_norm_dim) for _ in range(2))

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None, cache: ConvCache | None) -> torch.Tensor:
        for r in self.resnets:
            x = r(x, zq, cache)
        return x


class UpBlock3D(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: VAEConfig, add_upsample: bool, compress_time: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(cin if i == 0 else cout, cout, cfg, cfg.latent_channels)
            for i in range(cfg.layers_per_block + 1)
        )
        self.upsamplers = nn.ModuleList([Upsample3D(cout, compress_time)]) if add_upsample else None

    def forward(self, x: torch.Tensor, zq: torch.Tensor, cache: ConvCache | None) -> torch.Tensor:
        for r in self.resnets:
            x = r(x, zq, cache)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder3D(nn.Module):
    """Video [B, 3, T, H, W] -> moments [B, 2*C_lat, t, H/8, W/8] (mean, logvar on the channel axis)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0])
        self.down_blocks = nn.ModuleList(
            DownBlock3D(ch[max(i - 1, 0)], ch[i], cfg, add_downsample=i < n - 1, compress_time=i < cfg.temporal_levels)
            for i in range(n)
        )
        self.mid_block = MidBlock3D(ch[-1], cfg)
        self.norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[-1], eps=1e-6)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        h = self.conv_in(x, cache)
        for blk in self.down_blocks:
            h = blk(h, cache)
        h = self.mid_block(h, None, cache)
        h = F.silu(self.norm_out(h), inplace=True)  # always SiLU here, whatever act_fn says
        return self.conv_out(h, cache)


class Decoder3D(nn.Module):
    """Latents [B, C_lat, t, h, w] -> video [B, 3, T, 8h, 8w]; every norm is conditioned on the latents."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, n, zc = cfg.block_out_channels[::-1], len(cfg.block_out_channels), cfg.latent_channels
        self.conv_in = CausalConv3d(zc, ch[0])
        self.mid_block = MidBlock3D(ch[0], cfg, spatial_norm_dim=zc)
        self.up_blocks = nn.ModuleList(
            UpBlock3D(ch[max(i - 1, 0)], ch[i], cfg, add_upsample=i < n - 1, compress_time=i < cfg.temporal_levels)
            for i in range(n)
        )
        self.norm_out = SpatialNorm3D(ch[-1], zc, cfg.norm_num_groups)
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels)

    def forward(self, z: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        h = self.conv_in(z, cache)
        h = self.mid_block(h, z, cache)
        for blk in self.up_blocks:
            h = blk(h, z, cache)
        h = F.silu(self.norm_out(h, z), inplace=True)
        return self.conv_out(h, cache)
