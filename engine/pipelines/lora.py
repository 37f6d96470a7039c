"""The LoRA adapters of one engine: loading, weighting, merging into the weights and back.

Semantics follow diffusers' ``load_lora_weights`` / ``set_adapters`` / ``fuse_lora`` / ``unfuse_lora``:
an adapter's effect on a layer is ``weight * alpha / r * lora_B(lora_A(x))``; ``set_adapters`` picks the
active adapters and their weights; ``fuse_lora`` merges the active ones into the weights (no side
branch left: the step costs what the base model costs) and ``unfuse_lora`` takes them out again.

On a quantized layer (torchao, optimum-quanto, bitsandbytes) an adapter runs as a full-precision side
branch; merging into quantized weights is refused (it would quantize the sum a second time): to get a
merged, quantized model, load the checkpoint with the LoRA and the recipe together
(``Engine.load(..., lora=[...], recipe=...)``), which merges before quantizing.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..io.lora import LoraFile, read_lora
from ..models.lora import (
    LoraBranch,
    LoraError,
    LowRank,
    attach_branch,
    branch_of,
    detach_branch,
    is_plain_linear,
    layer_features,
    merge_into_weight,
    pairs_by_layer,
    resolve_targets,
    stack_low_rank,
)

__all__ = ["LoraAdapters", "LoraError", "parse_lora_spec"]


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:SCALE`` (the CLI's ``--lora``) -> (path, scale)."""
    path, sep, tail = spec.rpartition(":")
    if sep and path and not tail.startswith(("/", "\\")):
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


class LoraAdapters:
    """Adapters loaded into one transformer: {name: file}, the active ones with their weights, and
    those merged into the weights."""

    def __init__(self):
        self.files: dict[str, LoraFile] = {}
        self.active: dict[str, float] = {}  # name -> weight, applied as side branches
        self.fused: dict[str, tuple[float, float]] = {}  # name -> (weight, fuse scale) merged into the weights
        self.baked: list[str] = []  # merged before quantization at load time: cannot be taken out
        # bf16 / fp16 layers' weights (and biases) as they were before their first fuse, on the CPU:
        # (w + d) - d rounds twice in low precision (0.085 % off after one cycle), so unfuse restores these.
        self.originals: dict[nn.Module, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.call_scale = 1.0  # diffusers' attention_kwargs={"scale": s}: multiplies every side branch

    @property
    def names(self) -> list[str]:
        return list(self.files)

    # ------------------------------------------------------------------ loading
    def load(self, model: nn.Module, path, adapter_name: str | None = None, scale: float = 1.0,
             dtype: torch.dtype | None = None) -> str:
        """Read ``path``, check every module against ``model``, then activate it with weight ``scale``."""
        name = adapter_name if adapter_name is not None else f"default_{len(self.files) + len(self.baked)}"
        if not isinstance(name, str) or not name:
            raise LoraError(f"adapter_name must be a non-empty string (got {name!r})")
        if name in self.files or name in self.baked:
            raise LoraError(f"an adapter named {name!r} is already loaded; pass another adapter_name, or "
                            "delete_adapters([name]) first")
        scale = _weight(scale, "scale")
        lora = read_lora(path)
        resolve_targets(model, lora.modules, str(lora.path))  # every module checked before anything changes
        if lora.ignored:
            warnings.warn(f"{lora.path.name}: {len(lora.ignored)} key(s) of other components (e.g. "
                          f"{lora.ignored[0]!r}) are not loaded; CogVideoX LoRAs adapt the transformer only "
                          "(diffusers ignores them too)", UserWarning, stacklevel=3)
        self.files[name] = lora
        self.active[name] = scale
        self.apply(model, dtype)
        return name

    # ------------------------------------------------------------------ weights
    def set_adapters(self, model: nn.Module, names: str | Sequence[str], weights=None,
                     dtype: torch.dtype | None = None) -> None:
        names = [names] if isinstance(names, str) else list(names)
        repeated = sorted({n for n in names if names.count(n) > 1}, key=str)
        if repeated:
            raise LoraError(f"set_adapters got {', '.join(map(repr, repeated))} more than once; name each adapter once "
                            "(its weight is the one number given for it)")
        if weights is None:
            weights = [1.0] * len(names)
        elif not isinstance(weights, (list, tuple)) and np.ndim(weights) == 0:  # one number for every name
            weights = [weights] * len(names)
        weights = list(weights)
        if len(weights) != len(names):
            raise LoraError(f"set_adapters got {len(names)} adapter name(s) but {len(weights)} weight(s)")
        self._known(names)
        if self.fused:
            raise LoraError(f"adapters {sorted(self.fused)} are fused into the weights: call unfuse_lora() before "
                            "set_adapters")
        self.active = {n: _weight(w, f"weight of {n!r}") for n, w in zip(names, weights)}
        self.apply(model, dtype)

    def delete(self, model: nn.Module, names: str | Sequence[str], dtype: torch.dtype | None = None) -> None:
        names = [names] if isinstance(names, str) else list(names)
        self._known(names)
        fused = [n for n in names if n in self.fused]
        if fused:
            raise LoraError(f"adapters {fused} are fused into the weights: call unfuse_lora() first")
        for n in names:
            self.files.pop(n)
            self.active.pop(n, None)
        self.apply(model, dtype)

    # ------------------------------------------------------------------ fusing
    def fuse(self, model: nn.Module, scale: float = 1.0, adapter_names: Sequence[str] | None = None,
             dtype: torch.dtype | None = None) -> None:
        names = list(self.active) if adapter_names is None else list(adapter_names)
        self._known(names)
        names = [n for n in names if n in self.active]
        if not names:
            raise LoraError("no active adapter to fuse (load_lora first, or set_adapters to activate one)")
        scale = _weight(scale, "lora_scale")
        per_layer = self._pairs(model, {n: self.active[n] * scale for n in names})
        bad = [t for t in per_layer if not is_plain_linear(t)]
        if bad:
            raise LoraError(f"cannot fuse into {len(bad)} quantized layer(s) (e.g. {type(bad[0]).__name__}): merging "
                            "would quantize the weights a second time. The adapters keep running as full-precision "
                            "side branches; for a merged quantized model load with Engine.load(..., lora=[path], "
                            "recipe=...) (cogvx generate --lora PATH --recipe NAME), which merges before quantizing")
        for layer, pairs in per_layer.items():
            if layer.weight.dtype in (torch.bfloat16, torch.float16) and layer not in self.originals:
                bias = None if layer.bias is None else layer.bias.detach().to("cpu")
                self.originals[layer] = (layer.weight.detach().to("cpu"), bias)
            merge_into_weight(layer, pairs)
        for n in names:
            self.fused[n] = (self.active.pop(n), scale)
        self.apply(model, dtype)

    def unfuse(self, model: nn.Module, dtype: torch.dtype | None = None) -> None:
        if not self.fused:
            return
        per_layer = self._pairs(model, {n: w * s for n, (w, s) in self.fused.items()})
        for layer, pairs in per_layer.items():
            kept = self.originals.pop(layer, None)
            if kept is None:  # float32: subtracting the float32 product is exact to float32 rounding
                merge_into_weight(layer, pairs, sign=-1.0)
                continue
            dev = layer.weight.device  # new Parameters, as merge_into_weight makes (never written in place)
            layer.weight = nn.Parameter(kept[0].to(dev), requires_grad=False)
            if kept[1] is not None:
                layer.bias = nn.Parameter(kept[1].to(dev), requires_grad=False)
        for n, (w, _) in self.fused.items():
            self.active[n] = w
        self.fused.clear()
        self.apply(model, dtype)

    # ------------------------------------------------------------------ the side branches
    def apply(self, model: nn.Module, dtype: torch.dtype | None = None) -> None:
        """Give every adapted layer one side branch holding the active adapters (new tensors each time);
        remove it from layers no active adapter touches."""
        weights = {n: w * self.call_scale for n, w in self.active.items() if w != 0}
        per_layer = self._pairs(model, weights)
        for layer in [m for m in model.modules() if branch_of(m) is not None and m not in per_layer]:
            detach_branch(layer)
        for layer, pairs in per_layer.items():
            dev, dt = _device_dtype(layer, dtype)
            attach_branch(layer, LoraBranch(*stack_low_rank(pairs, layer_features(layer)[1], dt, dev)))

    def _pairs(self, model: nn.Module, weights: dict[str, float]) -> dict[nn.Module, list[LowRank]]:
        out: dict[nn.Module, list[LowRank]] = {}
        for name, w in weights.items():
            lora = self.files[name]
            for layer, pairs in pairs_by_layer(lora.modules, resolve_targets(model, lora.modules, str(lora.path)),
                                               w).items():
                out.setdefault(layer, []).extend(pairs)
        return out

    def _known(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self.files]
        if unknown:
            raise LoraError(f"unknown adapter(s) {unknown}; loaded: {self.names or 'none'}")


# ---------------------------------------------------------------------------------------- helpers
def _weight(value, what: str) -> float:
    # numpy scalars (np.float32(0.5), a 0-d array) are numbers too; bools are not
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise LoraError(f"{what} must be a finite number (got {value!r})")
    return float(value)


def _device_dtype(layer: nn.Module, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    w = getattr(layer, "weight", None)
    dev = w.device if isinstance(w, torch.Tensor) else next(layer.parameters()).device
    if dtype is None:
        dtype = w.dtype if isinstance(w, torch.Tensor) and w.is_floating_point() else torch.float32
    return dev, dtype
