"""fp8 activations fed straight into fp8 row-wise linears: with the ``fp8dq-row`` recipe (torchao
``Float8Tensor`` weights, per-row scales) the adaptive LayerNorm's output leaves
``cogvx.kernels.adaptive_layernorm_fp8`` already quantized per row, and the q/k/v and feed-forward-up
projections take it as is (``fp8_rowwise_linear``), instead of each linear quantizing its input in a
separate pass. Same numbers as the unfused torchao path (its per-row activation quantization is what
the kernel computes); only the GEMM's summation order may differ."""

from __future__ import annotations

import torch
from torch import nn

from cogvx.kernels import fp8_rowwise_linear

__all__ = ["attach_fp8_weight", "fp8_linear", "has_fp8_weight"]

_FP8 = torch.float8_e4m3fn


def _row_wise_fp8(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(qdata [N, K] e4m3, scale [N, 1] fp32) of a torchao per-row Float8Tensor weight, else None."""
    w = getattr(layer, "weight", None)
    q, s = getattr(w, "qdata", None), getattr(w, "scale", None)
    if not (isinstance(q, torch.Tensor) and isinstance(s, torch.Tensor)) or q.dtype != _FP8 or q.dim() != 2:
        return None
    if tuple(s.shape) != (q.shape[0], 1) or s.dtype != torch.float32:
        return None
    return q, s


def has_fp8_weight(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) and _row_wise_fp8(layer) is not None


def attach_fp8_weight(layer: nn.Linear) -> None:
    """Expose the weight's fp8 data and row scales as plain (non-persistent) buffers, so a compiled
    graph reads them without unwrapping the tensor subclass; they alias the weight (no copy)."""
    got = _row_wise_fp8(layer)
    if got is None:
        raise ValueError(f"{type(layer).__name__} has no per-row float8 weight (a torchao Float8Tensor with PerRow "
                         "scales, what the fp8dq-row recipe makes): cannot feed it fp8 activations")
    layer.register_buffer("fp8_qdata", got[0], persistent=False)
    layer.register_buffer("fp8_scale", got[1], persistent=False)


def fp8_linear(layer: nn.Linear, y_fp8: torch.Tensor, y_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``layer`` applied to y = y_fp8 * y_scale ([..., K] e4m3, [..., 1] fp32) -> [..., N] in out_dtype."""
    return fp8_rowwise_linear(y_fp8, y_scale, layer.fp8_qdata, layer.fp8_scale, layer.bias, out_dtype)
