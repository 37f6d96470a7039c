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

import logging

import torch
from torch import nn

from ..config import VAEConfig
from ..noise import randn_like_diffusers
from .layers import ConvCache, Decoder3D, Encoder3D
from .tiling import TileSpec, decode_grid, encode_grid, tiled_map

__all__ = ["CogVideoXVAE", "LatentDistribution", "frame_batches", "scale_latents", "unscale_latents"]

log = logging.getLogger(__name__)


def frame_batches(num_frames: int, batch: int) -> list[slice]:
    """diffusers' frame split: ``num_frames // batch`` batches (at least 1), the first one also taking the
    remainder. 13 latents, batch 2 -> [0:3], [3:5], ..., [11:13]; 49 frames, batch 8 -> [0:9], [9:17], ..."""
    rem = num_frames % batch
    return [slice(batch * i + (rem if i else 0), batch * (i + 1) + rem) for i in range(max(num_frames // batch, 1))]


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
        return self.mean + self.std * randn_like_diffusers(self.mean.shape, generator, p.device, p.dtype)

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

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights: what ``encode`` and ``decode`` take and return."""
        return self.decoder.conv_out.conv.weight.dtype

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
    def decoder_input(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents [B, F_lat, C, h, w] (the denoising loop's layout and scale) -> what ``decode``
        takes: [B, C, F_lat, h, w], divided by scaling_factor, in the VAE's own dtype."""
        return unscale_latents(latents.permute(0, 2, 1, 3, 4), self.config).to(self.dtype)

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

    # -- speed options (same numbers; whether they pay depends on the device) --
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
