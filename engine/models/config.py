"""Model configurations whose field names are diffusers' ``config.json`` keys: the transformer and the
VAE. Every field is checked on construction (type and range), so a hand-edited or hostile config is a
clear error naming the file, the key and the value, never a raw TypeError from torch later.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import typing
from dataclasses import dataclass
from typing import Any

__all__ = ["ConfigError", "TransformerConfig", "VAEConfig", "known_fields", "latent_frame_count"]

log = logging.getLogger(__name__)

# Bounds that no CogVideoX model comes near but that stop a config from allocating without limit
# before its weights are even read (the loader also checks the config against the weight headers).
MAX_LAYERS = 512
MAX_DIM = 65536


class ConfigError(ValueError):
    """A config value has the wrong type or is out of range."""


def known_fields(cls, d: dict[str, Any], what: str) -> dict[str, Any]:
    """The entries of a diffusers config dict that are fields of dataclass ``cls``; ``_``-prefixed
    keys (``_class_name``, ``_diffusers_version``) are skipped and unknown keys logged at debug."""
    if not isinstance(d, dict):
        raise ConfigError(f"{what} config must be a JSON object (got {type(d).__name__})")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if k not in names and not str(k).startswith("_"))
    if unknown:
        log.debug("%s config: ignoring unknown keys %s", what, unknown)
    return {k: v for k, v in d.items() if k in names}


def _kind(hint) -> tuple[type, bool]:
    """(base type, None allowed) of a field annotation such as ``int | None``."""
    args = typing.get_args(hint)
    if args:
        base = [a for a in args if a is not type(None)]
        origin = typing.get_origin(hint)
        if origin is tuple:
            return tuple, False
        if len(base) == 1:
            b, _ = _kind(base[0])
            return b, type(None) in args
    return hint, False


def _check_value(where: str, key: str, value, hint) -> Any:
    """The value converted to the field's type (a whole float for an int, a list for a tuple), or a
    ConfigError naming where, key, value and what is accepted."""
    base, optional = _kind(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {key}=null is not allowed; expected {base.__name__}")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key}={_short(value)} must be true or false (a JSON boolean, not a string)")
    if base is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key}={_short(value)} must be an integer")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return value  # an int stays an int: diffusers computes shapes from some of these

        raise ConfigError(f"{where}: {key}={_short(value)} must be a finite number")
    if base is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: {key}={_short(value)} must be a string")
    if base is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key}={_short(value)} must be a list")
        item = _item_type(hint)
        return tuple(_check_value(where, f"{key}[{i}]", v, item) for i, v in enumerate(value)) if item else tuple(value)
    return value


def _short(value, n: int = 80) -> str:
    """repr of a config value, cut to ``n`` characters (a hostile file may hold a huge list)."""
    r = repr(value)
    return r if len(r) <= n else r[: n - 3] + "..."


def _item_type(hint):
    """The element type of a ``tuple[X, ...]`` annotation (also inside ``| None``), or None."""
    for h in (hint, *typing.get_args(hint)):
        if typing.get_origin(h) is tuple and typing.get_args(h):
            return typing.get_args(h)[0]
    return None


def _validate(obj, where: str, ranges: dict[str, tuple[float, float]]) -> None:
    """Type-check every field of a frozen dataclass in place, then the numeric ranges."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        object.__setattr__(obj, f.name, _check_value(where, f.name, getattr(obj, f.name), hints[f.name]))
    for key, (lo, hi) in ranges.items():
        v = getattr(obj, key)
        values = v if isinstance(v, tuple) else (v,)
        for x in values:
            if x is None:
                continue
            if not isinstance(x, (int, float)) or isinstance(x, bool):
                raise ConfigError(f"{where}: {key}={v!r} must hold numbers")
            if not lo <= x <= hi:
                raise ConfigError(f"{where}: {key}={v!r} is out of range; expected {lo:g} <= {key} <= {hi:g}")


def latent_frame_count(num_frames: int, temporal_compression: int = 4) -> int:
    """Latent frames of a video of ``num_frames`` = 4k + 1 frames: (F - 1) / 4 + 1 (49 -> 13)."""
    return (num_frames - 1) // temporal_compression + 1


_POS = (1, MAX_DIM)


@dataclass(frozen=True)
class TransformerConfig:
    """CogVideoX transformer hyper-parameters; field names and defaults are diffusers'
    ``CogVideoXTransformer3DModel`` config keys, so a checkpoint's ``transformer/config.json``
    maps onto it one to one."""

    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int | None = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = None
    text_embed_dim: int = 4096
    num_layers: int = 30
    dropout: float = 0.0
    attention_bias: bool = True
    sample_width: int = 90
    sample_height: int = 60
    sample_frames: int = 49
    patch_size: int = 2
    patch_size_t: int | None = None
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True

    def __post_init__(self, where: str = "transformer config") -> None:
        _validate(self, where, {
            "num_attention_heads": (1, 1024), "attention_head_dim": (1, 1024), "in_channels": _POS,
            "out_channels": _POS, "time_embed_dim": _POS, "ofs_embed_dim": _POS, "text_embed_dim": _POS,
            "num_layers": (1, MAX_LAYERS), "dropout": (0, 0.999), "sample_width": (1, 4096),
            "sample_height": (1, 4096), "sample_frames": (1, 4096), "patch_size": (1, 64), "patch_size_t": (1, 64),
            "temporal_compression_ratio": (1, 64), "max_text_seq_length": (1, 4096), "norm_eps": (1e-12, 1),
            "spatial_interpolation_scale": (1e-6, 1e6), "temporal_interpolation_scale": (1e-6, 1e6),
            "freq_shift": (-MAX_DIM, MAX_DIM),
        })
        if self.inner_dim > MAX_DIM:
            raise ConfigError(f"{where}: num_attention_heads * attention_head_dim = {self.inner_dim} exceeds {MAX_DIM}")
        if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
            raise ConfigError(
                f"{where}: use_learned_positional_embeddings=True requires use_rotary_positional_embeddings=True "
                "(no CogVideoX checkpoint has learned positions without RoPE)"
            )
        if self.activation_fn != "gelu-approximate" or self.timestep_activation_fn != "silu":
            raise ConfigError(
                f"{where}: unsupported activations (activation_fn={self.activation_fn!r}, "
                f"timestep_activation_fn={self.timestep_activation_fn!r}); CogVideoX uses 'gelu-approximate' and 'silu'"
            )
        if self.use_rotary_positional_embeddings and self.attention_head_dim % 8:
            raise ConfigError(f"{where}: attention_head_dim must be a multiple of 8 for 3D RoPE "
                              f"(got {self.attention_head_dim})")
        if not self.use_rotary_positional_embeddings and self.inner_dim % 16:
            raise ConfigError(f"{where}: inner dim must be a multiple of 16 for 3D sin-cos positions "
                              f"(got {self.inner_dim})")
        if self.ofs_embed_dim is not None and self.ofs_embed_dim != self.time_embed_dim:
            raise ConfigError(
                f"{where}: ofs_embed_dim ({self.ofs_embed_dim}) must equal time_embed_dim ({self.time_embed_dim}): "
                "the ofs embedding is added to the time embedding"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_channels_(self) -> int:
        return self.out_channels if self.out_channels is not None else self.in_channels

    @property
    def image_to_video(self) -> bool:
        """The model takes conditioning latents concatenated to the noise (I2V, Fun-Control): twice the
        output channels in."""
        return self.in_channels == 2 * self.out_channels_

    @property
    def sample_latent_frames(self) -> int:
        """Latent frames of the training sample size (13 for 49 frames)."""
        return latent_frame_count(self.sample_frames, self.temporal_compression_ratio)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "transformer config") -> "TransformerConfig":
        """Build from a diffusers config dict; ``_``-prefixed keys and unknown keys are ignored."""
        obj = cls.__new__(cls)
        kwargs = known_fields(cls, d, "transformer")
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for k, v in {**defaults, **kwargs}.items():
            object.__setattr__(obj, k, v)
        obj.__post_init__(where)
        return obj

    def to_dict(self) -> dict[str, Any]:
        d = {"_class_name": "CogVideoXTransformer3DModel"}
        d.update(dataclasses.asdict(self))
        return d


_DOWN, _UP = "CogVideoXDownBlock3D", "CogVideoXUpBlock3D"
VAE_ACTIVATIONS = ("silu", "swish", "mish", "relu", "gelu")


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

    def __post_init__(self, where: str = "VAE config") -> None:
        _validate(self, where, {
            "in_channels": (1, 64), "out_channels": (1, 64), "block_out_channels": (1, 8192),
            "latent_channels": (1, 1024), "layers_per_block": (1, 64), "norm_eps": (1e-12, 1),
            "norm_num_groups": (1, 8192), "temporal_compression_ratio": (1, 64), "sample_height": (1, 16384),
            "sample_width": (1, 16384), "scaling_factor": (1e-6, 1e6),
        })
        n = len(self.block_out_channels)
        if not 1 <= n <= 8:
            raise ConfigError(f"{where}: block_out_channels must have 1 to 8 entries (got {n})")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(
                f"{where}: {len(self.down_block_types)} down and {len(self.up_block_types)} up block types "
                f"for {n} block_out_channels; give one of each per entry of block_out_channels"
            )
        if set(self.down_block_types) != {_DOWN} or set(self.up_block_types) != {_UP}:
            raise ConfigError(f"{where}: block types must be {_DOWN!r} / {_UP!r} (got "
                              f"{self.down_block_types} / {self.up_block_types})")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(f"{where}: block_out_channels {bad} not divisible by norm_num_groups={self.norm_num_groups}")
        if self.act_fn not in VAE_ACTIVATIONS:
            raise ConfigError(f"{where}: act_fn {self.act_fn!r} unknown; choose one of {', '.join(VAE_ACTIVATIONS)}")
        if math.log2(self.temporal_compression_ratio) % 1:
            raise ConfigError(f"{where}: temporal_compression_ratio={self.temporal_compression_ratio!r} must be a "
                              "power of two")
        if (self.use_quant_conv or self.use_post_quant_conv) and self.latent_channels != self.out_channels:
            raise ConfigError(
                f"{where}: use_quant_conv/use_post_quant_conv need latent_channels == out_channels "
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
    def from_dict(cls, d: dict[str, Any], where: str = "VAE config") -> "VAEConfig":
        """From a diffusers ``config.json`` dict; ``_``-prefixed and unknown keys are ignored."""
        obj = cls.__new__(cls)
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for k, v in {**defaults, **known_fields(cls, d, "VAE")}.items():
            object.__setattr__(obj, k, v)
        obj.__post_init__(where)
        return obj

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
        """A 56k-parameter VAE with the real 8x spatial / 4x temporal compression, for tests. Its sample
        size makes tiling's tiles (48x40 px, the default overlaps) stride by whole latent pixels, as the
        real VAEs' do, so a tiled decode is exactly 8x the latent size."""
        return cls(block_out_channels=(4, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
                   sample_height=96, sample_width=80)
