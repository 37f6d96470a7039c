"""Model configurations: the transformer config (diffusers ``config.json`` field names) and the
built-in presets of the real CogVideoX models (DESIGN §5) plus a ``tiny`` one for tests.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["TransformerConfig", "ModelPreset", "PRESETS", "get_preset", "known_fields"]

log = logging.getLogger(__name__)


def known_fields(cls, d: dict[str, Any], what: str) -> dict[str, Any]:
    """The entries of a diffusers config dict that are fields of dataclass ``cls``; ``_``-prefixed
    keys (``_class_name``, ``_diffusers_version``) are skipped and unknown keys logged at debug."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if k not in names and not k.startswith("_"))
    if unknown:
        log.debug("%s config: ignoring unknown keys %s", what, unknown)
    return {k: v for k, v in d.items() if k in names}


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

    def __post_init__(self) -> None:
        if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
            raise ValueError(
                "use_learned_positional_embeddings=True requires use_rotary_positional_embeddings=True "
                "(no CogVideoX checkpoint has learned positions without RoPE)"
            )
        if self.activation_fn != "gelu-approximate" or self.timestep_activation_fn != "silu":
            raise ValueError(
                f"unsupported activations (activation_fn={self.activation_fn!r}, "
                f"timestep_activation_fn={self.timestep_activation_fn!r}); CogVideoX uses "
                "'gelu-approximate' and 'silu'"
            )
        if self.use_rotary_positional_embeddings and self.attention_head_dim % 8:
            raise ValueError(f"attention_head_dim must be a multiple of 8 for 3D RoPE (got {self.attention_head_dim})")
        if not self.use_rotary_positional_embeddings and self.inner_dim % 16:
            raise ValueError(f"inner dim must be a multiple of 16 for 3D sin-cos positions (got {self.inner_dim})")
        if self.ofs_embed_dim is not None and self.ofs_embed_dim != self.time_embed_dim:
            raise ValueError(
                f"ofs_embed_dim ({self.ofs_embed_dim}) must equal time_embed_dim ({self.time_embed_dim}): "
                "the ofs embedding is added to the time embedding"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_channels_(self) -> int:
        return self.out_channels if self.out_channels is not None else self.in_channels

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TransformerConfig":
        """Build from a diffusers config dict; ``_``-prefixed keys and unknown keys are ignored."""
        kwargs = known_fields(cls, d, "transformer")
        for k in ("sample_width", "sample_height", "sample_frames", "num_layers", "num_attention_heads"):
            if k in kwargs and not isinstance(kwargs[k], int):
                raise ValueError(f"transformer config: {k} must be an integer (got {kwargs[k]!r})")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "TransformerConfig":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"transformer config {p} does not exist")
        return cls.from_dict(json.loads(p.read_text()))

    def to_dict(self) -> dict[str, Any]:
        d = {"_class_name": "CogVideoXTransformer3DModel"}
        d.update(dataclasses.asdict(self))
        return d

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


@dataclass(frozen=True)
class ModelPreset:
    """A real model's shape and defaults: what a benchmark needs to build it with random weights."""

    name: str
    transformer: TransformerConfig
    dtype: torch.dtype
    height: int
    width: int
    num_frames: int
    scheduler: str = "CogVideoXDDIMScheduler"
    image_to_video: bool = False
    vae_scaling_factor: float = 0.7
    notes: str = field(default="", compare=False)


_V10 = dict(time_embed_dim=512, text_embed_dim=4096, max_text_seq_length=226)
_5B = dict(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True, **_V10)
_15 = dict(patch_size_t=2, patch_bias=False, sample_height=300, sample_width=300, sample_frames=81, **_5B)

PRESETS: dict[str, ModelPreset] = {
    "2b": ModelPreset(
        "2b", TransformerConfig(num_attention_heads=30, num_layers=30, **_V10), torch.float16, 480, 720, 49,
        vae_scaling_factor=1.15258426,
    ),
    "5b": ModelPreset("5b", TransformerConfig(**_5B), torch.bfloat16, 480, 720, 49),
    "5b-i2v": ModelPreset(
        "5b-i2v",
        TransformerConfig(in_channels=32, out_channels=16, use_learned_positional_embeddings=True, **_5B),
        torch.bfloat16, 480, 720, 49, image_to_video=True,
    ),
    "1.5-5b": ModelPreset("1.5-5b", TransformerConfig(**_15), torch.bfloat16, 768, 1360, 81,
                          scheduler="CogVideoXDPMScheduler"),
    "1.5-5b-i2v": ModelPreset(
        "1.5-5b-i2v",
        TransformerConfig(in_channels=32, out_channels=16, ofs_embed_dim=512, **_15),
        torch.bfloat16, 768, 1360, 81, scheduler="CogVideoXDPMScheduler", image_to_video=True,
    ),
    # The CPU benchmark shape: 2b block dimensions, 2 layers, 9 frames at 240x352, fp32.
    "cpu-bench": ModelPreset(
        "cpu-bench", TransformerConfig(num_attention_heads=30, num_layers=2, **_V10), torch.float32, 240, 352, 9,
        vae_scaling_factor=1.15258426,
    ),
    # Small enough for a 2-core CPU test; RoPE so the 5b code path is what the tests exercise.
    "tiny": ModelPreset(
        "tiny",
        TransformerConfig(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
            text_embed_dim=32, num_layers=2, sample_width=16, sample_height=12, sample_frames=9,
            max_text_seq_length=64, use_rotary_positional_embeddings=True,
        ),
        torch.float32, 96, 128, 9,
    ),
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}") from None
