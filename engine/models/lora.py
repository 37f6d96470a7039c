"""LoRA on the transformer's Linear layers: a low-rank side branch, or the product merged into the weight.

One layer carries at most one side branch, whatever the number of adapters: the active adapters'
down-projections are stacked on the rank axis and their up-projections (each already multiplied by its
scale) put side by side, so the branch is two thin GEMMs. A layer fused from several projections
(``attn1.to_qkv``) takes each part's adapter on its own rows of the output.

A convolution (the patch embedding ``patch_embed.proj`` that peft reaches with ``target_modules=["proj"]``)
takes a LoRA as peft gives it one: ``lora_A`` a convolution of the layer's kernel and stride into r channels,
``lora_B`` a 1x1 convolution; here both are kept flattened (down [r, C_in * kh * kw], up [C_out, r]), the
branch runs them as the two convolutions, and merging adds ``up @ down`` reshaped to the kernel.

The branch runs from a forward hook on the layer, so it works on any layer that computes
``y = layer(x)``: a plain ``nn.Linear``, a torchao-quantized one (subclass weight), an optimum-quanto
or bitsandbytes module. Its tensors are non-persistent buffers of a child module named ``lora``: they
follow ``.to(device)`` and stay out of ``state_dict`` (a saved checkpoint never holds them).

Tensors are replaced, never written in place: a compiled graph frozen on the CPU (inductor freezing)
keeps the values it was compiled with, and only a new tensor object makes it recompile.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LowRank", "LoraBranch", "LoraError", "Target", "attach_branch", "detach_branch", "branch_of",
           "stack_low_rank", "merge_into_weight", "is_plain_linear", "resolve_targets", "pairs_by_layer",
           "layer_features"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def layer_features(layer: nn.Module) -> tuple[int | None, int | None]:
    """(in, out) features of a layer a LoRA can target: a Linear's, or a convolution's flattened kernel
    (C_in * prod(kernel), C_out); (None, None) for anything else."""
    if isinstance(layer, _CONV):
        return layer.in_channels // layer.groups * int(torch.tensor(layer.kernel_size).prod()), layer.out_channels
    return getattr(layer, "in_features", None), getattr(layer, "out_features", None)

_QKV = {"to_q": 0, "to_k": 1, "to_v": 2}


class LoraError(ValueError):
    """A LoRA that does not fit the model, or an adapter operation that cannot be done."""


@dataclass(frozen=True)
class LowRank:
    """One adapter's pair on one layer: ``delta(x) = scale * (up @ (down @ x) + bias)``.

    down: [r, in_features] (peft's ``lora_A``); up: [out, r] (``lora_B``); bias: [out] or None
    (``lora_B.bias``); rows: the first output row of the layer this pair writes to (0 unless the layer
    is a fusion of several projections); scale: alpha / r times the adapter weight.
    """

    down: torch.Tensor
    up: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    rows: int = 0


@dataclass(frozen=True)
class Target:
    """Where one module's adapter goes: a layer, and the first output row it writes to."""

    layer: nn.Module
    rows: int
    name: str  # the layer's name in the model (``...attn1.to_qkv`` for a fused q/k/v part)


class LoraBranch(nn.Module):
    """``x [..., in] -> (x @ down.T) @ up.T + bias`` [..., out]: every active adapter of one layer at once."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self._handle = None
        self.conv = None  # the convolution this branch rides on (set by attach_branch), else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            return self._conv(x)
        y = torch.nn.functional.linear(torch.nn.functional.linear(x.to(self.down.dtype), self.down), self.up)
        return y if self.bias is None else y + self.bias

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        """peft's conv LoRA: lora_A with the layer's kernel, stride, padding and dilation, then a 1x1 lora_B."""
        c = self.conv
        conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[
            len(c.kernel_size)]
        r = self.down.shape[0]
        down = self.down.reshape(r, c.in_channels // c.groups, *c.kernel_size)
        y = conv(x.to(self.down.dtype), down, None, c.stride, c.padding, c.dilation)
        ones = (1,) * len(c.kernel_size)
        return conv(y, self.up.reshape(*self.up.shape, *ones), self.bias)

    def hook(self, module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
        return out + self(args[0]).to(out.dtype)


def branch_of(layer: nn.Module) -> LoraBranch | None:
    b = getattr(layer, "lora", None)
    return b if isinstance(b, LoraBranch) else None


def attach_branch(layer: nn.Module, branch: LoraBranch) -> None:
    """Give ``layer`` the side branch (replacing any it had)."""
    detach_branch(layer)
    if isinstance(layer, _CONV):
        if layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            raise LoraError(f"a LoRA on a {type(layer).__name__} needs groups=1 and zero padding (got groups="
                            f"{layer.groups}, padding={layer.padding!r}, padding_mode={layer.padding_mode!r})")
        branch.conv = layer
    layer.lora = branch
    branch._handle = layer.register_forward_hook(branch.hook)


def detach_branch(layer: nn.Module) -> None:
    b = branch_of(layer)
    if b is not None:
        b._handle.remove()
        del layer.lora


def stack_low_rank(pairs: list[LowRank], out_features: int, dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(down [R, in], up [out, R], bias [out] or None) of several pairs, R the sum of their ranks.

    Scales are folded into ``up`` (and ``bias``) in float32 before the cast to ``dtype``; a pair on
    rows k..k+n of a fused layer leaves the other rows of its ``up`` columns zero.
    """
    downs, ups = [], []
    bias = None
    for p in pairs:
        up = torch.zeros(out_features, p.up.shape[1], dtype=torch.float32, device=device)
        up[p.rows:p.rows + p.up.shape[0]] = p.up.to(device, torch.float32) * p.scale
        downs.append(p.down.to(device, torch.float32))
        ups.append(up)
        if p.bias is not None:
            if bias is None:
                bias = torch.zeros(out_features, dtype=torch.float32, device=device)
            bias[p.rows:p.rows + p.bias.shape[0]] += p.bias.to(device, torch.float32) * p.scale
    return (torch.cat(downs).to(dtype), torch.cat(ups, dim=1).to(dtype),
            None if bias is None else bias.to(dtype))


def is_plain_linear(layer: nn.Module) -> bool:
    """A full-precision ``nn.Linear`` (not a quantized module, not a tensor-subclass weight): the only
    kind of layer a LoRA can be merged into (a plain convolution too: its kernel takes ``up @ down``)."""
    if type(layer) is not nn.Linear and type(layer) not in _CONV:
        return False
    w = layer.weight
    return type(w) is nn.Parameter and type(w.data) is torch.Tensor


@torch.no_grad()
def merge_into_weight(layer: nn.Linear, pairs: list[LowRank], sign: float = 1.0) -> None:
    """weight += sign * sum(scale * up @ down) (and the bias likewise), computed in float32; the layer
    gets new Parameters (never an in-place write, see the module docstring)."""
    w = layer.weight
    delta = torch.zeros((w.shape[0], w[0].numel()), dtype=torch.float32, device=w.device)
    dbias = None
    for p in pairs:
        rows = slice(p.rows, p.rows + p.up.shape[0])
        delta[rows] += (p.up.to(w.device, torch.float32) @ p.down.to(w.device, torch.float32)) * p.scale
        if p.bias is not None:
            if dbias is None:
                dbias = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
            dbias[rows] += p.bias.to(w.device, torch.float32) * p.scale
    layer.weight = nn.Parameter((w.float() + sign * delta.reshape(w.shape)).to(w.dtype), requires_grad=False)
    if dbias is not None:
        if layer.bias is None:
            raise ValueError("this LoRA has a bias (lora_B.bias) but the layer has none: it cannot be merged")
        layer.bias = nn.Parameter((layer.bias.float() + sign * dbias).to(layer.bias.dtype), requires_grad=False)


def resolve_targets(model: nn.Module, modules: Mapping, where: str) -> dict[str, Target]:
    """{module name: Target} for a LoRA's modules ({name: object with ``down`` [r, in], ``up`` [out, r]}),
    every size checked. Separate q/k/v adapters go onto the fused ``to_qkv`` rows of a model whose
    attention projections were fused. ``where`` names the LoRA in errors."""
    out, missing = {}, []
    for mod, w in modules.items():
        try:
            layer, rows, name = model.get_submodule(mod), 0, mod
        except AttributeError:
            parent, _, leaf = mod.rpartition(".")
            fused = _submodule(model, f"{parent}.to_qkv") if leaf in _QKV else None
            if fused is None:
                missing.append(mod)
                continue
            layer, rows, name = fused, _QKV[leaf] * (fused.out_features // 3), f"{parent}.to_qkv"
        in_f, out_f = layer_features(layer)
        if in_f is None or out_f is None:
            raise LoraError(f"{where}: {mod} is a {type(layer).__name__}, not a Linear or convolution layer; only "
                            "those take a LoRA")
        span = out_f // 3 if name != mod else out_f
        if w.down.shape[1] != in_f or w.up.shape[0] != span:
            raise LoraError(f"{where}: {mod} is a [{span} x {in_f}] layer in this model but the LoRA holds "
                            f"lora_A {tuple(w.down.shape)} / lora_B {tuple(w.up.shape)}; the LoRA was trained "
                            "for another model (e.g. CogVideoX-2b vs 5b)")
        out[mod] = Target(layer, rows, name)
    if missing:
        raise LoraError(f"{where}: {len(missing)} module(s) of the LoRA are not in this transformer (e.g. "
                        f"{missing[0]!r}); the LoRA was trained for another model")
    return out


def pairs_by_layer(modules: Mapping, targets: dict[str, Target], weight: float) -> dict[nn.Module, list[LowRank]]:
    """{layer: [LowRank]} of one adapter at ``weight`` (modules: {name: object with down, up, bias, scale})."""
    out: dict[nn.Module, list[LowRank]] = {}
    for mod, w in modules.items():
        t = targets[mod]
        out.setdefault(t.layer, []).append(LowRank(w.down, w.up, w.bias, w.scale * weight, t.rows))
    return out


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
