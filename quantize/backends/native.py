"""cogvx's own int8 backend: dynamic per-token int8 activations x per-channel int8 weights, with the
GEMM run by oneDNN's u8 x s8 kernel (AVX-512 VNNI) on the CPU.

Beside torchao's ``Int8DynamicActivationInt8WeightConfig`` (recipe int8dq, the same numerics), which
under torch.compile becomes ``_int_mm`` (oneDNN's s8 x s8 -> s32 GEMM API, an int32 result written
and read back; the oneDNN s8-source qlinear falls to a reference kernel, measured 46 s for a
256x1920x1920 product). Measured at the cpu-bench step (benchmarks/sweep.py, commit 9af09a3) both
GEMM paths take the same time (291 ms here, 296 ms in ``_int_mm``, about the VNNI peak), so this
backend is the one cogvx owns (no torchao version drift, bf16 GEMM output, a plain stored form), not
a faster one. Here the activation is shifted into u8 (q + 128, zero
point 128: the same numbers as symmetric int8), the weight is prepacked once into oneDNN's blocked
layout, and the GEMM writes bf16 (or fp32) with the weight scales applied in its epilogue. The
per-token quantization (amax, divide, round, shift) and the per-token rescale + bias are plain
PyTorch around one opaque op, so under torch.compile inductor fuses the quantization into whatever
elementwise op produced the input (the adaptive LayerNorm, GELU) and the rescale into what consumes
the output (the gated residual, the QK norm).

Numerics, per linear y = x W^T + b with x [M, K], W [N, K]:
    s_x[m]   = max(max_k |x[m, k]|, 1e-12) / 127            (fp32, one scale per token)
    q[m, k]  = clamp(round(x[m, k] * (127 / amax_m)), -127, 127)  (stored as u8 q + 128; amax_m = 127 s_x[m])
    s_w[n]   = max(max_k |W[n, k]|, 1e-12) / 127; W_q = clamp(round(W / s_w), -127, 127)
    acc      = (q @ W_q^T) * s_w                            (int32 accumulation; rounded to ``gemm_out``)
    y        = acc * s_x + b

Stored form: ``weight_int8`` [N, K] int8 and ``weight_scale`` [N] fp32 (plus the layer's bias in
full precision); the prepacked copy is rebuilt at the first call, never stored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..settings import NativeOptions

__all__ = ["Int8DynamicLinear", "int8_linear", "int8_linear_reference", "quantize_rows"]

_EPS = 1e-12
_GEMM_OUT = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# The oneDNN u8 x s8 qlinear (what PyTorch's own x86 int8 quantization lowers to).
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight tensor -> (its _version, packed weight)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (any float dtype) -> (q + 128 as uint8 [M, K], fp32 scale [M, 1]); x ~= (q - 128) * scale."""
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS)
    # A multiply by the reciprocal, not a divide: the divide dominates the fused quantization loop.
    q = torch.clamp(torch.round(x * (127.0 / amax)), -127.0, 127.0) + 128.0
    return q.to(torch.uint8), amax / 127.0


def int8_linear_reference(x_u8: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                          bf16_out: bool) -> torch.Tensor:
    """((x_u8 - 128) @ weight^T) * weight_scale in fp32 (exact integer products, fp32 sums), rounded to
    bf16 when ``bf16_out``. x_u8 [M, K] uint8, weight [N, K] int8, weight_scale [N] fp32 -> [M, N]."""
    acc = (x_u8.float() - 128.0) @ weight.float().t()
    out = acc * weight_scale.float()
    return out.to(torch.bfloat16) if bf16_out else out


def _version(weight: torch.Tensor) -> int:
    # A tensor made under torch.inference_mode() (an engine loaded inside it, as diffusers scripts do)
    # has no version counter: reading it raises. Such a weight is keyed by identity alone; cogvx never
    # writes a stored int8 weight in place (loading or a LoRA merge gives the layer a new tensor).
    return -1 if weight.is_inference() else weight._version


def _packed(weight: torch.Tensor):
    hit = _PACKED.get(weight)
    version = _version(weight)
    if hit is None or hit[0] != version:
        hit = (version, torch.ops.onednn.qlinear_prepack(weight, None))
        _PACKED[weight] = hit
    return hit[1]


@torch.library.custom_op("cogvx::int8_linear", mutates_args=())
def int8_linear(x_u8: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bf16_out: bool) -> torch.Tensor:
    """((x_u8 - 128) @ weight^T) * weight_scale -> [M, N] bf16 (``bf16_out``) or fp32.

    x_u8 [M, K] uint8 (int8 activations shifted by 128), weight [N, K] int8, weight_scale [N] fp32.
    CPU with oneDNN: the prepacked u8 x s8 VNNI GEMM; CUDA: ``torch._int_mm``; else the reference.
    """
    out_dtype = torch.bfloat16 if bf16_out else torch.float32
    if x_u8.device.type == "cpu" and _ONEDNN and x_u8.shape[0] > 0:
        return torch.ops.onednn.qlinear_pointwise.tensor(
            x_u8.contiguous(), torch.ones((), dtype=torch.float64), torch.full((), 128, dtype=torch.int64),
            _packed(weight), weight_scale, None, None, 1.0, 0, out_dtype, "none", [], "")
    if x_u8.is_cuda and x_u8.shape[0] > 16:
        acc = torch._int_mm((x_u8.to(torch.int16) - 128).to(torch.int8), weight.t())
        return (acc.float() * weight_scale).to(out_dtype)
    return int8_linear_reference(x_u8, weight, weight_scale, bf16_out)


@int8_linear.register_fake
def _(x_u8, weight, weight_scale, bf16_out):
    return x_u8.new_empty((x_u8.shape[0], weight.shape[0]), dtype=torch.bfloat16 if bf16_out else torch.float32)


class Int8DynamicLinear(nn.Module):
    """Drop-in for ``nn.Linear``: int8 weights, activations quantized per token at run time.

    x [..., K] (fp32 / bf16) -> [..., N] in x's dtype. ``gemm_out`` ("bfloat16" or "float32"): the
    dtype the GEMM writes before the per-token rescale (bf16 halves the largest memory write of the
    layer; its rounding, 2^-9 relative, sits far below the int8 activation error).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32,
                 device=None, gemm_out: str = "bfloat16"):
        super().__init__()
        if gemm_out not in _GEMM_OUT:
            raise ValueError(f"gemm_out must be one of {', '.join(_GEMM_OUT)} (got {gemm_out!r})")
        self.in_features, self.out_features, self.gemm_out = in_features, out_features, gemm_out
        self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, gemm_out: str = "bfloat16") -> Int8DynamicLinear:
        w = linear.weight.detach().float()
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, "meta", gemm_out)
        scale = w.abs().amax(dim=1).clamp_min(_EPS) / 127.0
        q.weight_int8 = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
        q.weight_scale = scale
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return q.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        acc, s = self.gemm(x.reshape(-1, self.in_features))
        return self.finish(acc, s, x.dtype).reshape(*lead, self.out_features)

    # The three steps of forward, for callers that fuse what comes between two such layers (the
    # feed-forward's GELU + quantization: cogvx.kernels.gelu_quant_rows).
    def gemm(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [M, K] -> (the GEMM's output [M, N] in ``gemm_out``, before the per-token scale and the bias;
        the per-token scale [M, 1])."""
        q, s = quantize_rows(x)
        return self.gemm_quantized(q), s

    def gemm_quantized(self, q: torch.Tensor) -> torch.Tensor:
        """q + 128 as uint8 [M, K] (``quantize_rows``' form) -> the GEMM's output [M, N] in ``gemm_out``."""
        return torch.ops.cogvx.int8_linear(q, self.weight_int8, self.weight_scale, self.gemm_out == "bfloat16")

    def finish(self, acc: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The per-token rescale and the bias: acc [M, N], s [M, 1] -> [M, N] in ``dtype``."""
        y = acc.float() * s
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, gemm_out={self.gemm_out}")


# ----------------------------------------------------------------------------- the Backend protocol
def quantize(module: nn.Module, fqns: list[str], options: NativeOptions, calibrate=None) -> None:
    for fqn in fqns:
        module.set_submodule(fqn, Int8DynamicLinear.from_linear(module.get_submodule(fqn),
                                                                options.gemm_out))


def is_quantized(layer: nn.Module) -> bool:
    return isinstance(layer, Int8DynamicLinear)


def export_layer(layer: Int8DynamicLinear) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return ({"weight_int8": layer.weight_int8.detach().contiguous(),
             "weight_scale": layer.weight_scale.detach().contiguous()}, {"gemm_out": layer.gemm_out})


def empty_layer(linear: nn.Linear, options: NativeOptions, dtype: torch.dtype) -> nn.Module:
    return Int8DynamicLinear(linear.in_features, linear.out_features, linear.bias is not None, dtype, "meta",
                             options.gemm_out)


def expected_shapes(linear: nn.Linear, options: NativeOptions, meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {"weight_int8": (linear.out_features, linear.in_features), "weight_scale": (linear.out_features,)}


def load_layer(layer: Int8DynamicLinear, tensors: dict[str, torch.Tensor], meta: dict[str, Any], device):
    if set(tensors) != {"weight_int8", "weight_scale"}:
        raise ValueError(f"expected exactly weight_int8 and weight_scale (got {sorted(tensors)})")
    w, s = tensors["weight_int8"], tensors["weight_scale"]
    if w.dtype != torch.int8 or s.dtype != torch.float32:
        raise ValueError(f"weight_int8 must be int8 and weight_scale float32 (got {w.dtype}, {s.dtype})")
    if meta.get("gemm_out", layer.gemm_out) not in _GEMM_OUT:
        raise ValueError(f"gemm_out {meta.get('gemm_out')!r} is not one of {', '.join(_GEMM_OUT)}")
    layer.gemm_out = meta.get("gemm_out", layer.gemm_out)
    layer.weight_int8, layer.weight_scale = w.to(device), s.to(device)
    return layer
