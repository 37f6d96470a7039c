"""The CogVideoX 3D causal VAE (encoder + decoder), parameter names equal to diffusers'
``AutoencoderKLCogVideoX`` so a diffusers ``vae/`` folder loads with no conversion step.

Shapes: video [B, 3, F, H, W] in [-1, 1]; latents [B, C_lat, F_lat, H/8, W/8], F_lat = (F - 1)/4 + 1
for the real models (16 channels). Any float dtype; the weights and the input must agree.

Causality and frame batches. Every 3x3x3 convolution is causal in time: an output frame sees its own
input frame and the two before it; the first frame of a video is padded with copies of itself. Like
diffusers, decoding runs over latent frames in batches of 2 (encoding over 8 video frames), the first
batch taking the remainder (13 latents: 3, 2, 2, 2, 2, 2). The frames a conv needs from the previous
batch travel in a ``ConvCache`` that the batch loop creates and passes explicitly through ``forward``;
the modules hold no state between calls. The temporal down/up-samplers do not look across batches,
so the batch size changes the result: keep diffusers' sizes for parity (and the models were trained so).

Same function as diffusers, less work or memory:
  * SpatialNorm3D runs its two 1x1x1 convs at latent resolution and broadcasts the result (nearest
    upsampling commutes with a pointwise conv) instead of upsampling the latent to full size first;
    the modulation is done in place on the GroupNorm output.
  * kernel-1 convs keep no cache (diffusers clones their whole input every batch and never reads it).
  * temporal pooling/upsampling index the frame axis; the samplers' 2D convs run as 1x3x3 conv3d on the
    5-D tensor: no permute copies. SiLU and the residual add are in place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from .config import known_fields
from .vae_tiling import TileSpec, decode_grid, encode_grid, tiled_map
from .weights import CheckpointError, load_into, read_state_dict, weight_files

__all__ = [
    "VAEConfig", "ConvCache", "LatentDistribution", "CogVideoXVAE", "load_vae", "frame_batches",
    "scale_latents", "unscale_latents",
]

log = logging.getLogger(__name__)

_DOWN, _UP = "CogVideoXDownBlock3D", "CogVideoXUpBlock3D"
# diffusers' get_activation names; the in-place forms are safe because every call site owns its input.
_ACTS = {
    "silu": lambda x: F.silu(x, inplace=True), "swish": lambda x: F.silu(x, inplace=True),
    "mish": lambda x: F.mish(x, inplace=True), "relu": lambda x: F.relu(x, inplace=True), "gelu": F.gelu,
}


@dataclass(frozen=True)
class VAEConfig:
    """diffusers ``AutoencoderKLCogVideoX`` config keys and defaults (the defaults are CogVideoX-2b's VAE)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (_DOWN,) * 4
    up_block_types: tuple[str, ...] = (_UP,) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    act_fn: str = "silu"
    norm_eps: float = 1e-6
    norm_num_groups: int = 32
    temporal_compression_ratio: float = 4
    sample_height: int = 480
    sample_width: int = 720
    scaling_factor: float = 1.15258426
    shift_factor: float | None = None  # unused by every CogVideoX pipeline
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    invert_scale_latents: bool = False

    def __post_init__(self) -> None:
        for name in ("down_block_types", "up_block_types", "block_out_channels", "latents_mean", "latents_std"):
            v = getattr(self, name)
            if isinstance(v, list):  # JSON gives lists; a frozen config stays hashable
                object.__setattr__(self, name, tuple(v))
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"VAE config: {len(self.down_block_types)} down and {len(self.up_block_types)} up block types "
                f"for {n} block_out_channels; give one of each per entry of block_out_channels"
            )
        if set(self.down_block_types) != {_DOWN} or set(self.up_block_types) != {_UP}:
            raise ValueError(f"VAE config: block types must be {_DOWN!r} / {_UP!r} (got "
                             f"{self.down_block_types} / {self.up_block_types})")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"VAE config: block_out_channels {bad} not divisible by norm_num_groups={self.norm_num_groups}")
        if self.act_fn not in _ACTS:
            raise ValueError(f"VAE config: act_fn {self.act_fn!r} unknown; choose one of {', '.join(_ACTS)}")
        if (self.use_quant_conv or self.use_post_quant_conv) and self.latent_channels != self.out_channels:
            raise ValueError(
                "VAE config: use_quant_conv/use_post_quant_conv need latent_channels == out_channels "
                f"(got {self.latent_channels} and {self.out_channels}): diffusers sizes quant_conv by "
                "2*out_channels and post_quant_conv by out_channels"
            )

    @property
    def spatial_scale(self) -> int:
        """Pixels per latent pixel (8 for the real models)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def temporal_levels(self) -> int:
        """How many of the first blocks halve/double the frame axis (diffusers: int(log2(ratio)))."""
        return int(math.log2(self.temporal_compression_ratio))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VAEConfig":
        """From a diffusers ``config.json`` dict; ``_``-prefixed and unknown keys are ignored."""
        return cls(**known_fields(cls, d, "VAE"))

    def to_dict(self) -> dict[str, Any]:
        """A diffusers-loadable config dict (lists, with ``_class_name``)."""
        d: dict[str, Any] = {"_class_name": "AutoencoderKLCogVideoX"}
        for k, v in dataclasses.asdict(self).items():
            d[k] = list(v) if isinstance(v, tuple) else v
        return d

    @classmethod
    def real(cls, variant: str = "2b") -> "VAEConfig":
        """The released VAEs. They share one architecture and differ in latent scaling:
        "2b" (1.15258426), "5b" (0.7; also 5b-I2V), "1.5" (0.7, invert_scale_latents, 768x1360 samples)."""
        presets = {
            "2b": cls(),
            "5b": cls(scaling_factor=0.7),
            "1.5": cls(scaling_factor=0.7, invert_scale_latents=True, sample_height=768, sample_width=1360),
        }
        if variant not in presets:
            raise ValueError(f"unknown VAE variant {variant!r}; choose one of {', '.join(presets)}")
        return presets[variant]

    @classmethod
    def tiny(cls) -> "VAEConfig":
        """A 56k-parameter VAE with the real 8x spatial / 4x temporal compression, for tests."""
        return cls(block_out_channels=(4, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
                   sample_height=64, sample_width=64)


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


def frame_batches(num_frames: int, batch: int) -> list[slice]:
    """diffusers' frame split: ``num_frames // batch`` batches (at least 1), the first one also taking the
    remainder. 13 latents, batch 2 -> [0:3], [3:5], ..., [11:13]; 49 frames, batch 8 -> [0:9], [9:17], ..."""
    rem = num_frames % batch
    return [slice(batch * i + (rem if i else 0), batch * (i + 1) + rem) for i in range(max(num_frames // batch, 1))]


def _randn(shape, generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """torch.randn drawn as diffusers' ``randn_tensor`` draws it (CPU generator: draw on CPU, then move;
    a list of generators: one per batch element)."""
    gens = generator if isinstance(generator, list) else [generator]
    draw_on = gens[0].device if gens[0] is not None and gens[0].device.type == "cpu" else device
    if isinstance(generator, list) and len(generator) > 1:
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for batch size {shape[0]}; pass one per element")
        parts = [torch.randn((1, *shape[1:]), generator=g, device=draw_on, dtype=dtype) for g in generator]
        return torch.cat(parts).to(device)
    return torch.randn(tuple(shape), generator=gens[0], device=draw_on, dtype=dtype).to(device)


class LatentDistribution:
    """Diagonal Gaussian of the encoder (diffusers' DiagonalGaussianDistribution).
    moments: [B, 2*C_lat, F_lat, h, w]; mean/logvar/std: [B, C_lat, F_lat, h, w]; logvar clamped to [-30, 20]."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.parameters = moments
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """mean + std * noise, the noise drawn exactly as diffusers does (same generator -> same sample)."""
        p = self.parameters
        return self.mean + self.std * _randn(self.mean.shape, generator, p.device, p.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean


class CogVideoXVAE(nn.Module):
    """Encoder, decoder and the optional quant convs; ``encode``/``decode`` are frame-batched and causal,
    with optional spatial tiling (``enable_tiling``) and batch slicing (``enable_slicing``)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder3D(config)
        self.decoder = Decoder3D(config)
        c = config.out_channels  # sic: diffusers sizes both quant convs by out_channels
        self.quant_conv = nn.Conv3d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv3d(c, c, 1) if config.use_post_quant_conv else None
        # diffusers' batch sizes; others change the result (the models were trained with these).
        self.num_latent_frames_batch_size = 2
        self.num_sample_frames_batch_size = 8
        self.use_slicing = False
        self.use_tiling = False
        self.channels_last = False
        object.__setattr__(self, "_decoder_fn", None)  # the compiled decoder (compile_decoder); not a submodule
        self.tile_spec = TileSpec(config.sample_height // 2, config.sample_width // 2)

    # -- switches (diffusers names and semantics: None keeps the current value) --
    def enable_tiling(
        self,
        tile_sample_min_height: int | None = None,
        tile_sample_min_width: int | None = None,
        tile_overlap_factor_height: float | None = None,
        tile_overlap_factor_width: float | None = None,
    ) -> None:
        """Tile frames larger than the tile size (video pixels); neighbours overlap by the given fractions."""
        s = self.tile_spec
        self.tile_spec = TileSpec(
            tile_sample_min_height or s.sample_height, tile_sample_min_width or s.sample_width,
            tile_overlap_factor_height or s.overlap_height, tile_overlap_factor_width or s.overlap_width,
        )
        self.use_tiling = True
        scale = self.config.spatial_scale
        g = decode_grid(self.tile_spec, scale)
        if g.keep != (g.stride[0] * scale, g.stride[1] * scale):
            # diffusers' geometry, kept for parity: decoded tiles are cropped to `keep` px but start every
            # `stride * scale` px, so content shifts at the seams and the frame is not 8h x 8w.
            log.warning(
                "VAE tiling %s: decoded tiles keep %s px but start every %s px; the decoded frame will not be "
                "%dx the latent size (as in diffusers). Pick overlap factors with keep == stride * %d.",
                self.tile_spec, g.keep, (g.stride[0] * scale, g.stride[1] * scale), scale, scale,
            )

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Process batch elements one at a time (peak memory of batch size 1)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    # -- decode --
    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, C_lat, F_lat, h, w] (already divided by scaling_factor: see ``unscale_latents``) ->
        video [B, 3, F, 8h, 8w], about [-1, 1], in z's dtype. F = 4*F_lat - 3 when F_lat is odd."""
        self._check(z, self.config.latent_channels, "latent", "z")
        if self.use_slicing and z.shape[0] > 1:
            return torch.cat([self._decode(zs) for zs in z.split(1)])
        return self._decode(z)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        lh, lw = self.tile_spec.latent_size(self.config.spatial_scale)
        if self.use_tiling and (z.shape[-1] > lw or z.shape[-2] > lh):
            return tiled_map(z, self._decode_frames, decode_grid(self.tile_spec, self.config.spatial_scale))
        return self._decode_frames(z)

    def _decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        """Causal decode of one video or tile over latent-frame batches sharing one ConvCache."""
        cache, out = ConvCache(), []
        batches = frame_batches(z.shape[2], self.num_latent_frames_batch_size)
        for i, frames in enumerate(batches):
            cache.keep = i + 1 < len(batches)
            zi = z[:, :, frames]
            if self.channels_last:
                zi = zi.contiguous(memory_format=torch.channels_last_3d)
            if self.post_quant_conv is not None:
                zi = self.post_quant_conv(zi)
            decoder = self.decoder if self._decoder_fn is None else self._decoder_fn
            out.append(decoder(zi, cache).contiguous())
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)

    # -- speed options (same numbers; whether they pay depends on the device: see the issue notes) --
    def set_channels_last(self, enabled: bool = True) -> None:
        """Keep conv weights and decoder activations in channels_last_3d (NDHWC) memory format.
        Off by default: slower on the 2-core CPU (10.7 s vs 9.5 s, real VAE, 5 latent frames at 64x96);
        not yet measured on a GPU."""
        self.channels_last = enabled
        fmt = torch.channels_last_3d if enabled else torch.contiguous_format
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                m.weight.data = m.weight.data.contiguous(memory_format=fmt)

    def compile_decoder(self, enabled: bool = True, mode: str | None = None) -> None:
        """torch.compile the per-frame-batch decoder call (static shapes: one graph for the first batch,
        one for the cached batches that follow)."""
        fn = torch.compile(self.decoder, dynamic=False, mode=mode) if enabled else None
        object.__setattr__(self, "_decoder_fn", fn)  # not a submodule: keeps state_dict keys unchanged

    # -- encode --
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> LatentDistribution:
        """Video [B, 3, F, H, W] in [-1, 1] -> distribution over latents [B, C_lat, F_lat, H/8, W/8]
        (F = 8k + 1 frames give F_lat = 2k + 1). Multiply a sample by scaling_factor (``scale_latents``)
        to get diffusion latents."""
        self._check(x, self.config.in_channels, "video", "x")
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(xs) for xs in x.split(1)])
        else:
            moments = self._encode(x)
        return LatentDistribution(moments)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        s = self.tile_spec
        if self.use_tiling and (x.shape[-1] > s.sample_width or x.shape[-2] > s.sample_height):
            return tiled_map(x, self._encode_frames, encode_grid(s, self.config.spatial_scale))
        return self._encode_frames(x)

    def _encode_frames(self, x: torch.Tensor) -> torch.Tensor:
        cache, out = ConvCache(), []
        batches = frame_batches(x.shape[2], self.num_sample_frames_batch_size)
        for i, frames in enumerate(batches):
            cache.keep = i + 1 < len(batches)
            h = self.encoder(x[:, :, frames], cache)
            out.append(h if self.quant_conv is None else self.quant_conv(h))
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)

    def _check(self, t: torch.Tensor, channels: int, kind: str, name: str) -> None:
        if t.ndim != 5:
            raise ValueError(f"{name} must be 5-D [B, C, F, H, W] (got shape {tuple(t.shape)})")
        if t.shape[1] != channels:
            hint = (f"; it looks like [B, F, C, H, W]: pass {name}.permute(0, 2, 1, 3, 4)"
                    if t.shape[2] == channels else "")
            raise ValueError(f"expected {channels} {kind} channels, got {t.shape[1]} ({name} has shape "
                             f"{tuple(t.shape)}, layout [B, C, F, H, W]){hint}")
        w = self.decoder.conv_out.conv.weight
        if t.dtype != w.dtype or t.device != w.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device} but the VAE weights are {w.dtype} on {w.device}; "
                             f"move it with {name}.to(device, dtype)")


def load_vae(vae_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> CogVideoXVAE:
    """The VAE of a diffusers ``vae/`` folder (config.json + safetensors, single or sharded), in eval mode.
    Built on the meta device and filled with ``assign=True``; every key consumed, every parameter filled."""
    d = Path(vae_dir)
    if not d.is_dir():
        raise CheckpointError(f"VAE directory {d} does not exist; pass the vae/ folder of a diffusers-layout "
                              "CogVideoX checkpoint")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{d} has no config.json; a diffusers vae/ folder holds config.json and "
                              "diffusion_pytorch_model.safetensors")
    try:
        cfg = VAEConfig.from_dict(json.loads(cfg_path.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from e
    with torch.device("meta"):
        model = CogVideoXVAE(cfg)
    _check_shapes(model, weight_files(d), cfg_path)
    load_into(model, read_state_dict(d, device=device), where=f"VAE checkpoint {d}", dtype=dtype, device=device)
    return model.eval().requires_grad_(False)


def _check_shapes(model: nn.Module, files: list[Path], cfg_path: Path) -> None:
    """Name the file and tensor of a shape mismatch, reading only the safetensors headers."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                shapes = {k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}
        except Exception as e:  # safetensors raises several error types for a damaged file
            raise CheckpointError(f"cannot read {f}: {e}; the file is damaged or truncated") from e
        for k, shape in shapes.items():
            if k in expected and shape != expected[k]:
                raise CheckpointError(
                    f"{f}: tensor {k!r} has shape {shape} but {cfg_path} gives {expected[k]}; the config and "
                    "the weights come from different models"
                )


def scale_latents(z: torch.Tensor, config: VAEConfig) -> torch.Tensor:
    """VAE latents (``encode(x).sample()``) -> the diffusion model's latent space, as diffusers' image-
    and video-to-video pipelines do: ``z * scaling_factor`` (2b 1.15258426, 5b 0.7). CogVideoX1.5
    (``invert_scale_latents``) divides instead: its image latents were trained that way."""
    return z / config.scaling_factor if config.invert_scale_latents else z * config.scaling_factor


def unscale_latents(z: torch.Tensor, config: VAEConfig) -> torch.Tensor:
    """Diffusion latents -> ``decode`` input: ``z / scaling_factor`` for every version (diffusers'
    ``decode_latents``; invert_scale_latents only affects encoding, so this is not always the inverse
    of ``scale_latents``). shift_factor is unused by CogVideoX. The pipeline's latents are
    [B, F, C, h, w]: permute(0, 2, 1, 3, 4) before ``decode``."""
    return z / config.scaling_factor
