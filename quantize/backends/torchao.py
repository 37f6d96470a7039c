"""torchao backend: the weight becomes a torchao tensor subclass (Int8Tensor, Float8Tensor) inside the
unchanged ``nn.Linear``; ``F.linear`` dispatches to its quantized kernel.

Stored form: torchao's own flattening (``torchao.prototype.safetensors``): ``<layer>._weight_qdata``,
``_weight_scale`` (and ``_weight_zero_point`` for int8) as plain tensors; the subclass attributes
(block size, activation quantization, dtype) as JSON in the quantization file.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn
from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict, unflatten_tensor_state_dict
from torchao.quantization import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    PerRow,
    PerTensor,
    quantize_,
)
from torchao.utils import TorchAOBaseTensor

from ..settings import TorchaoOptions

_CONFIGS = {
    "Int8WeightOnlyConfig": Int8WeightOnlyConfig,
    "Int8DynamicActivationInt8WeightConfig": Int8DynamicActivationInt8WeightConfig,
    "Float8WeightOnlyConfig": Float8WeightOnlyConfig,
    "Float8DynamicActivationFloat8WeightConfig": Float8DynamicActivationFloat8WeightConfig,
}
_GRANULARITY = {"PerTensor": PerTensor, "PerRow": PerRow}
_KEY = "L.weight"  # torchao's flattening wants "<module>.<param>" names


def config_for(options: TorchaoOptions):
    """The torchao config object of a recipe's typed options."""
    cls = _CONFIGS[options.config]
    if options.granularity is not None:
        return cls(granularity=_GRANULARITY[options.granularity]())
    return cls()


def quantize(module: nn.Module, fqns: list[str], options: TorchaoOptions, calibrate=None) -> None:
    wanted = set(fqns)
    quantize_(module, config_for(options), filter_fn=lambda m, fqn: fqn in wanted)


def is_quantized(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) and isinstance(layer.weight, TorchAOBaseTensor)


def export_layer(layer: nn.Linear) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    data, meta = flatten_tensor_state_dict({_KEY: layer.weight.detach()})
    return {k[2:]: v.contiguous() for k, v in data.items()}, json.loads(meta[_KEY])


def empty_layer(linear: nn.Linear, options: TorchaoOptions, dtype: torch.dtype) -> nn.Module:
    return linear  # the subclass weight goes into a plain nn.Linear


def expected_shapes(linear: nn.Linear, options: TorchaoOptions, meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {"_weight_qdata": (linear.out_features, linear.in_features)}


def load_layer(layer: nn.Linear, tensors: dict[str, torch.Tensor], meta: dict[str, Any], device) -> nn.Module:
    data = {f"L.{k}": v for k, v in tensors.items()}
    weight, left = unflatten_tensor_state_dict(data, {_KEY: json.dumps(meta), "tensor_names": json.dumps([_KEY])})
    if _KEY not in weight or left:
        raise ValueError(f"stored tensors {sorted(tensors)} do not make a {meta.get('_type')} "
                         f"(needs {meta.get('_tensor_data_names')})")
    layer.weight = nn.Parameter(weight[_KEY], requires_grad=False)
    return layer
