"""optimum-quanto backend: each selected ``nn.Linear`` becomes a quanto ``QLinear`` whose weight is a
``WeightQBytesTensor`` (int8 or float8 data + per-channel scales).

W8A8 (``activations="qint8"``) quantizes each QLinear's *input* with a static per-tensor scale
measured by quanto's ``Calibration`` over sample inputs (``calibrate(module)`` runs them); output
quantization is switched off so every layer hands float activations to the ops that follow
(norms, RoPE, attention), which quanto would otherwise dequantize op by op.

Stored form: quanto's own state-dict names (``weight._data``, ``weight._scale``, ``input_scale``,
``output_scale``) as plain tensors, and the qtypes as JSON: what ``optimum.quanto.requantize`` reads,
without its step that first allocates full-precision weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from optimum.quanto import Calibration, QLinear, WeightQBytesTensor, qtypes
from torch import nn

from ..settings import QuantoOptions

_ALIASES = {"qfloat8": "qfloat8_e4m3fn"}


def _qtype(name: str | None):
    return None if name is None else qtypes[_ALIASES.get(name, name)]


def empty_layer(linear: nn.Linear, options: QuantoOptions, dtype: torch.dtype) -> QLinear:
    q = QLinear(linear.in_features, linear.out_features, linear.bias is not None, dtype=dtype, device="meta",
                weights=_qtype(options.weights), activations=_qtype(options.activations),
                quantize_input=True)
    q.disable_output_quantization()
    return q


def quantize(module: nn.Module, fqns: list[str], options: QuantoOptions,
             calibrate: Callable[[nn.Module], None] | None = None) -> None:
    new = []
    for fqn in fqns:
        lin = module.get_submodule(fqn)
        q = empty_layer(lin, options, lin.weight.dtype).to_empty(device=lin.weight.device)
        q.input_scale = torch.ones_like(q.input_scale)
        q.output_scale = torch.ones_like(q.output_scale)
        q.weight = lin.weight  # float weight until freeze()
        q.bias = lin.bias
        q.train(lin.training)
        module.set_submodule(fqn, q)
        new.append(q)
    if options.activations is not None:
        if calibrate is None:
            raise ValueError("quanto W8A8 uses static activation scales: pass calibrate(module), a function "
                             "that runs sample inputs through the module")
        # streamline=False: output quantization is already off; quanto's streamlining would only re-decide it.
        with torch.no_grad(), Calibration(momentum=0.9, streamline=False):
            calibrate(module)
    for q in new:
        q.freeze()
        q.weight.requires_grad_(False)


def is_quantized(layer: nn.Module) -> bool:
    return isinstance(layer, QLinear) and layer.frozen


def export_layer(layer: QLinear) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    out: dict[str, torch.Tensor] = {}
    layer.weight.save_to_state_dict(out, "weight.", False)
    out["input_scale"] = layer.input_scale
    out["output_scale"] = layer.output_scale
    meta = {"weights": layer.weight_qtype.name,
            "activations": None if layer.activation_qtype is None else layer.activation_qtype.name}
    return {k: v.detach().contiguous() for k, v in out.items()}, meta


def expected_shapes(linear: nn.Linear, options: QuantoOptions, meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {"weight._data": (linear.out_features, linear.in_features), "weight._scale": (linear.out_features, 1),
            "input_scale": (), "output_scale": ()}


def load_layer(layer: QLinear, tensors: dict[str, torch.Tensor], meta: dict[str, Any], device) -> QLinear:
    tensors = dict(tensors)
    missing: list[str] = []
    w = WeightQBytesTensor.load_from_state_dict(
        tensors, "weight.", qtype=layer.weight_qtype, axis=0, size=layer.weight.size(), stride=layer.weight.stride(),
        activation_qtype=layer.activation_qtype, missing_keys=missing)
    if w is None:
        raise ValueError(f"missing tensor(s) {missing}")
    layer.weight = nn.Parameter(w.optimize(), requires_grad=False)
    layer.input_scale = tensors.pop("input_scale")
    layer.output_scale = tensors.pop("output_scale")
    if tensors:
        raise ValueError(f"unexpected tensor(s) {sorted(tensors)}")
    return layer
