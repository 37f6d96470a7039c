"""Typed settings of a recipe: each backend's options as its own dataclass, and the engine's runtime knobs
(what the recipe switches on in the model besides its weights) as another.

A quantized checkpoint saves both as one flat ``settings`` object in its quantization.json (format 1);
:func:`options_from_dict` and :meth:`Runtime.from_dict` read it back, checking every key and value, so a
tampered or unknown setting is an error, not a silently ignored string.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["Runtime", "TorchaoOptions", "QuantoOptions", "BnbOptions", "NativeOptions", "OPTION_TYPES",
           "BackendOptions", "options_from_dict", "SettingsError", "TORCHAO_CONFIGS", "ATTENTION_KERNELS",
           "ATTENTION_DTYPES"]

TORCHAO_CONFIGS = ("Int8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig", "Float8WeightOnlyConfig",
                   "Float8DynamicActivationFloat8WeightConfig")
ATTENTION_KERNELS = ("int8-cpu", "int8-cuda")
ATTENTION_DTYPES = ("bfloat16", "float32")


class SettingsError(ValueError):
    """A recipe setting that is unknown or out of range."""


def _one_of(what: str, value, accepted) -> None:
    if value not in accepted:
        raise SettingsError(f"{what} {value!r} is not one of {', '.join(map(repr, accepted))}")


@dataclass(frozen=True)
class Runtime:
    """The engine's runtime knobs a recipe sets (applied after quantizing and after loading a quantized
    checkpoint, so both run alike).

    attention_kernel: None (SDPA), "int8-cpu" (int8 q k^T attention C kernel on AVX-512 VNNI CPUs) or
        "int8-cuda" (the 8-bit Triton attention, ``cogvx.kernels.sage_attention``).
    attention_dtype: None (the activations' dtype) or the dtype SDPA runs in.
    fused_gelu_quant: the feed-forward's GELU and int8 quantization as one CPU kernel.
    fp8_activations: the adaLN kernel's per-row fp8 output fed straight into the fp8 GEMMs (CUDA).
    """

    attention_kernel: str | None = None
    attention_dtype: str | None = None
    fused_gelu_quant: bool = False
    fp8_activations: bool = False

    def __post_init__(self) -> None:
        if self.attention_kernel is not None:
            _one_of("attention_kernel", self.attention_kernel, ATTENTION_KERNELS)
        if self.attention_dtype is not None:
            _one_of("attention_dtype", self.attention_dtype, ATTENTION_DTYPES)
        for f in ("fused_gelu_quant", "fp8_activations"):
            if not isinstance(getattr(self, f), bool):
                raise SettingsError(f"{f} must be true or false (got {getattr(self, f)!r})")

    @classmethod
    def from_dict(cls, settings: dict[str, Any]) -> "Runtime":
        """The runtime part of a saved flat ``settings`` object (the backend's keys are left to it)."""
        return cls(**{f.name: settings[f.name] for f in fields(cls) if f.name in settings})

    def to_dict(self) -> dict[str, Any]:
        """The knobs that differ from the defaults."""
        return {k: v for k, v in asdict(self).items() if v != getattr(Runtime, k)}


@dataclass(frozen=True)
class TorchaoOptions:
    """config: the torchao config class (``TORCHAO_CONFIGS``); granularity: "PerTensor" / "PerRow" (float8 dynamic)."""

    config: str
    granularity: str | None = None

    def __post_init__(self) -> None:
        _one_of("torchao config", self.config, TORCHAO_CONFIGS)
        if self.granularity is not None:
            _one_of("torchao granularity", self.granularity, ("PerTensor", "PerRow"))


@dataclass(frozen=True)
class QuantoOptions:
    """weights: "qint8" / "qfloat8"; activations: None or "qint8" (static scales, calibrated)."""

    weights: str
    activations: str | None = None

    def __post_init__(self) -> None:
        _one_of("quanto weights", self.weights, ("qint8", "qfloat8"))
        if self.activations is not None:
            _one_of("quanto activations", self.activations, ("qint8",))


@dataclass(frozen=True)
class BnbOptions:
    """kind: "int8" (LLM.int8, fp16 outlier columns above ``threshold``) or "nf4" (4-bit blocks of ``blocksize``)."""

    kind: str
    threshold: float = 6.0
    blocksize: int = 64
    compress_statistics: bool = True

    def __post_init__(self) -> None:
        _one_of("bitsandbytes kind", self.kind, ("int8", "nf4"))


@dataclass(frozen=True)
class NativeOptions:
    """gemm_out: the dtype the oneDNN int8 GEMM writes ("bfloat16" or "float32")."""

    gemm_out: str = "bfloat16"

    def __post_init__(self) -> None:
        _one_of("gemm_out", self.gemm_out, ("bfloat16", "float32"))


BackendOptions = TorchaoOptions | QuantoOptions | BnbOptions | NativeOptions
OPTION_TYPES: dict[str, type] = {"torchao": TorchaoOptions, "quanto": QuantoOptions, "bnb": BnbOptions,
                                 "native": NativeOptions}


def options_from_dict(backend: str, settings: dict[str, Any]) -> BackendOptions:
    """A backend's typed options from a saved flat ``settings`` object; keys that are neither the backend's
    nor a runtime knob are refused."""
    if backend not in OPTION_TYPES:
        raise SettingsError(f"backend {backend!r} is not one of {', '.join(OPTION_TYPES)}")
    cls = OPTION_TYPES[backend]
    own = {f.name for f in fields(cls)}
    unknown = set(settings) - own - {f.name for f in fields(Runtime)}
    if unknown:
        raise SettingsError(f"unknown {backend} setting(s) {sorted(unknown)}; accepted: {sorted(own)} and the "
                            f"runtime knobs {sorted(f.name for f in fields(Runtime))}")
    try:
        return cls(**{k: v for k, v in settings.items() if k in own})
    except TypeError as e:  # a required option missing
        raise SettingsError(f"{backend} settings {settings!r}: {e}") from None
