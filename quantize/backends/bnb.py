"""bitsandbytes backend: ``Linear8bitLt`` (LLM.int8: int8 row-wise weights, activation columns above
``threshold`` computed in fp16) and ``Linear4bit`` (NF4, blockwise absmax scales, themselves
8-bit quantized when ``compress_statistics``).

Stored form: bitsandbytes' own state-dict names as plain tensors: int8 ``weight`` + ``SCB`` (row
scales); NF4 packed ``weight`` + ``weight.absmax``, ``weight.quant_map``, ``weight.nested_*`` and
``weight.quant_state.bitsandbytes__nf4`` (its small JSON packed in a uint8 tensor, as bitsandbytes
writes it).
"""

from __future__ import annotations

from typing import Any

import bitsandbytes as bnb
import torch
from bitsandbytes.nn import Int8Params, Linear4bit, Linear8bitLt, Params4bit
from torch import nn

from ..settings import BnbOptions


def empty_layer(linear: nn.Linear, options: BnbOptions, dtype: torch.dtype) -> nn.Module:
    bias = linear.bias is not None
    if options.kind == "int8":
        return Linear8bitLt(linear.in_features, linear.out_features, bias, has_fp16_weights=False,
                            threshold=float(options.threshold), device="meta")
    q = Linear4bit(linear.in_features, linear.out_features, bias, compute_dtype=dtype, quant_type="nf4",
                   compress_statistics=bool(options.compress_statistics), device="meta")
    if linear.out_features % 32 or linear.in_features % int(options.blocksize):
        # On AVX512-BF16 CPUs bitsandbytes repacks a 4-bit weight at its first eval forward, in blocks
        # of 32 output rows and whole scale blocks per row, and fails on any other shape: such layers
        # keep the generic 4-bit path.
        q.support_avx512bf16_for_cpu = False
    return q


def quantize(module: nn.Module, fqns: list[str], options: BnbOptions, calibrate=None) -> None:
    for fqn in fqns:
        lin = module.get_submodule(fqn)
        w = lin.weight.detach()
        q = empty_layer(lin, options, w.dtype)
        if options.kind == "int8":
            cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16).contiguous())
            q.weight = Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
        else:
            data, state = bnb.functional.quantize_4bit(
                w.contiguous(), blocksize=int(options.blocksize),
                compress_statistics=bool(options.compress_statistics), quant_type="nf4")
            q.weight = Params4bit(data, requires_grad=False, quant_state=state, blocksize=int(options.blocksize),
                                  compress_statistics=bool(options.compress_statistics), quant_type="nf4",
                                  module=q, bnb_quantized=True)
            q.quant_state = state
        q.bias = lin.bias
        q.train(lin.training)  # bitsandbytes computes differently in training mode
        module.set_submodule(fqn, q)


def is_quantized(layer: nn.Module) -> bool:
    return isinstance(layer, (Linear8bitLt, Linear4bit))


def export_layer(layer: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if isinstance(layer, Linear8bitLt):
        scb = layer.weight.SCB if getattr(layer.weight, "SCB", None) is not None else layer.state.SCB
        cb = layer.weight.data if layer.weight.dtype == torch.int8 else layer.state.CB
        return {"weight": cb.contiguous(), "SCB": scb.contiguous()}, {"kind": "int8"}
    data, state = layer.weight.data, layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # AVX512-BF16 CPUs repack on first forward
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        data, state = _convert_weight_packed_for_cpu_inverse(data, state)
    out = {"weight": data.contiguous()}
    out.update({f"weight.{k}": v.contiguous() for k, v in state.as_dict(packed=True).items()})
    return out, {"kind": "nf4"}


def expected_shapes(linear: nn.Linear, options: BnbOptions, meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    n, k = linear.out_features, linear.in_features
    if options.kind == "int8":
        return {"weight": (n, k), "SCB": (n,)}
    return {"weight": ((n * k + 1) // 2, 1)}


def load_layer(layer: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any], device) -> nn.Module:
    tensors = dict(tensors)
    if isinstance(layer, Linear8bitLt):
        cb, scb = tensors.pop("weight"), tensors.pop("SCB")
        layer.weight = Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    else:
        data = tensors.pop("weight")
        stats = {k[len("weight."):]: tensors.pop(k) for k in [k for k in tensors if k.startswith("weight.")]}
        layer.weight = Params4bit.from_prequantized(data, stats, requires_grad=False, device=device, module=layer)
    if tensors:
        raise ValueError(f"unexpected tensor(s) {sorted(tensors)}")
    return layer
