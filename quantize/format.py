"""The quantized-component format, independent of the model and of files: which tensors a quantized
module stores, what its ``quantization.json`` says, and how a meta-built module is filled back.

    {"format_version": 1, "component": "transformer", "recipe": {name, backend, settings, filters},
     "backend": "torchao", "backend_version": "0.18.0", "torch_version": ..., "dtype": "float32",
     "fused_qkv": false, "files": [...], "layers": {qualified name: backend metadata}}

A torchao component is written in torchao's own safetensors format (``torchao_format``); when it comes
from a model with fused q/k/v it is stored apart ("fused_qkv": false) with ``"fuse_qkv": true``: fuse
again at load.

``layers`` records exactly which Linear layers were quantized, so a later change of a default
filter never changes how an old checkpoint loads. Stored tensors are plain tensors under each
backend's own names (``<layer>.<suffix>``); full-precision parameters keep their names. Reading and
writing the files (safetensors, the JSON file, directories) is the engine's business: this module
sees only dicts and modules.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .backends import backend_version, get_backend
from .recipes import Recipe, RecipeError, get_recipe
from .settings import Runtime, SettingsError, options_from_dict

__all__ = [
    "FORMAT_VERSION", "QUANT_FILE", "QuantizedFormatError", "DTYPES", "export_component", "component_info", "check_info",
    "prepare_quantized", "full_precision_tensors", "fill_quantized",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
QUANT_FILE = "quantization.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Stored tensors of quantized layers that hold scales or other real numbers: an integer dtype there
# would silently change every output.
_FLOAT_SUFFIXES = ("scale", "SCB", "nested_absmax", "quant_map")
# The stored quantized weight data of each backend (torchao, quanto, bitsandbytes): 8-bit elements.
_DATA_NAMES = ("_weight_qdata", "weight._data", "weight")


class QuantizedFormatError(ValueError):
    """A quantization.json or the tensors it describes do not make the quantized component."""


def export_component(module: nn.Module, component: str, recipe: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors to store, quantization info without "files") of a quantized component."""
    r = get_recipe(recipe)
    backend = get_backend(r.backend)
    layers = {fqn: m for fqn, m in module.named_modules() if backend.is_quantized(m)}
    if not layers:
        raise ValueError(f"{component} has no layers quantized by {r.backend}: it was not quantized with {r.name!r}")
    tensors: dict[str, torch.Tensor] = {}
    layer_meta: dict[str, Any] = {}
    for fqn, m in layers.items():
        t, meta = backend.export_layer(m)
        tensors.update({f"{fqn}.{k}": v for k, v in t.items()})
        layer_meta[fqn] = meta
    dtype = None
    for name, t in full_precision_tensors(module, layers):
        tensors[name] = t.detach()
        if dtype is None and t.is_floating_point():
            dtype = t.dtype
    fused = any(n.endswith("attn1.to_qkv") for n, _ in module.named_modules())
    return tensors, component_info(component, r, dtype, fused, layer_meta)


def component_info(component: str, recipe: str | Recipe, dtype: torch.dtype | None, fused_qkv: bool,
                   layers: dict[str, Any]) -> dict[str, Any]:
    """quantization.json's content (without "files")."""
    r = get_recipe(recipe)
    return {
        "format_version": FORMAT_VERSION,
        "format": "cogvx-quantized",
        "component": component,
        "recipe": r.to_dict(),
        "backend": r.backend,
        "backend_version": backend_version(r.backend),
        "torch_version": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "fused_qkv": fused_qkv,
        "layers": layers,
    }


def check_info(info: Any, where: str) -> dict[str, Any]:
    """A parsed quantization.json, checked for structure and types; ``where`` names the file in errors."""
    if not isinstance(info, dict):
        raise QuantizedFormatError(f"{where} must hold a JSON object (got {type(info).__name__})")
    v = info.get("format_version")
    if v != FORMAT_VERSION:
        raise QuantizedFormatError(
            f"{where}: quantization format_version {v!r} is not supported; this cogvx reads format_version "
            f"{FORMAT_VERSION}. Re-export the checkpoint with this cogvx (`cogvx quantize`) or upgrade cogvx"
        )
    for key, kind in (("recipe", dict), ("backend", str), ("dtype", str), ("files", list), ("layers", dict)):
        if key not in info:
            raise QuantizedFormatError(f"{where} has no {key!r} entry; the file is damaged: re-export the checkpoint")
        if not isinstance(info[key], kind):
            raise QuantizedFormatError(f"{where}: {key!r} must be a JSON {'object' if kind is dict else kind.__name__} "
                                       f"(got {type(info[key]).__name__}); the file is damaged: re-export the checkpoint")
    if info["dtype"] not in DTYPES:
        raise QuantizedFormatError(f"{where}: dtype {info['dtype']!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(info["recipe"].get("name"), str):
        raise QuantizedFormatError(f"{where}: recipe has no name")
    try:
        recipe = get_recipe(info["recipe"]["name"])
    except RecipeError as e:  # names the known recipes; say which file asked for it
        raise QuantizedFormatError(f"{where}: {e}") from e
    if info["backend"] != recipe.backend:
        raise QuantizedFormatError(f"{where}: backend {info['backend']!r} does not match recipe {recipe.name!r} "
                                   f"({recipe.backend})")
    settings = info["recipe"].get("settings", {})
    try:  # every saved setting is a known one with an accepted value
        if not isinstance(settings, dict):
            raise SettingsError(f"settings must be a JSON object (got {type(settings).__name__})")
        options_from_dict(recipe.backend, settings)
        Runtime.from_dict(settings)
    except SettingsError as e:
        raise QuantizedFormatError(f"{where}: recipe {recipe.name!r}: {e}") from e
    for key in ("fused_qkv", "fuse_qkv"):
        if not isinstance(info.get(key, False), bool):
            raise QuantizedFormatError(f"{where}: {key} must be true or false")
    if not all(isinstance(m, dict) for m in info["layers"].values()):
        raise QuantizedFormatError(f"{where}: every entry of 'layers' must be a JSON object")
    return info


def prepare_quantized(model: nn.Module, info: dict[str, Any], dtype: torch.dtype,
                      where: str) -> tuple[dict[str, nn.Module], dict[str, tuple[int, ...]]]:
    """Swap the recorded layers of a meta-built ``model`` for the backend's empty quantized modules.

    Returns ({fqn: quantized layer}, {stored tensor name: shape} of everything the files must hold).
    """
    backend = get_backend(info["backend"])
    options = options_from_dict(info["backend"], info["recipe"].get("settings", {}))
    expected: dict[str, tuple[int, ...]] = {}
    layers: dict[str, nn.Module] = {}
    for fqn, meta in info["layers"].items():
        try:
            lin = model.get_submodule(fqn)
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear):
            fused = "attn1.to_qkv" in fqn or ".attn1.to_q" in fqn
            hint = (" (the checkpoint and the model disagree on fused q/k/v projections: check 'fused_qkv')"
                    if fused else "; the config and the weights come from different models")
            raise QuantizedFormatError(f"{where}: quantized layer {fqn!r} is not a Linear layer of the model{hint}")
        expected.update({f"{fqn}.{k}": tuple(s) for k, s in backend.expected_shapes(lin, options, meta).items()})
        layers[fqn] = backend.empty_layer(lin, options, dtype)
    for fqn, q in layers.items():
        model.set_submodule(fqn, q)
    expected.update({k: tuple(t.shape) for k, t in full_precision_tensors(model, layers)})
    return layers, expected


def full_precision_tensors(module: nn.Module, layers: dict[str, nn.Module]):
    """(name, tensor) of every parameter and persistent buffer outside the quantized weights
    (a quantized layer's bias is full precision). Tied parameters appear once."""
    for name, p in module.named_parameters():
        owner, leaf = name.rpartition(".")[::2]
        if owner not in layers or leaf == "bias":
            yield name, p
    for name, b in module.named_buffers():
        owner, leaf = name.rpartition(".")[::2]
        mod = module.get_submodule(owner) if owner else module
        if owner not in layers and leaf not in mod._non_persistent_buffers_set:
            yield name, b


def fill_quantized(model: nn.Module, layers: dict[str, nn.Module], info: dict[str, Any],
                   tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype, device, where: str) -> None:
    """Assign every stored tensor: full-precision ones by name, quantized ones through the backend."""
    backend = get_backend(info["backend"])
    fp = {name for name, _ in full_precision_tensors(model, layers)}
    per_layer: dict[str, dict[str, torch.Tensor]] = {fqn: {} for fqn in layers}
    for key, t in tensors:
        if key in fp:
            if _target(model, key).is_floating_point() and not t.is_floating_point():
                raise QuantizedFormatError(f"{where}: tensor {key!r} is stored as {t.dtype} but the model needs a "
                                           "floating-point tensor; the checkpoint is damaged: export it again")
            if t.is_floating_point() and t.dtype != dtype:
                raise QuantizedFormatError(f"{where}: tensor {key!r} is {t.dtype}, but the quantization file says the "
                                           f"checkpoint is {info['dtype']}")
            _assign(model, key, t)
            continue
        owner = next((fqn for fqn in layers if key.startswith(f"{fqn}.")), None)
        if owner is None:
            raise QuantizedFormatError(f"{where}: unexpected tensor {key!r}")
        suffix = key[len(owner) + 1:]
        if suffix.split(".")[-1].endswith(_FLOAT_SUFFIXES) and not t.is_floating_point():
            raise QuantizedFormatError(f"{where}: tensor {key!r} holds scales but is stored as {t.dtype}; "
                                       "the checkpoint is damaged: export it again")
        if suffix in _DATA_NAMES and t.element_size() != 1:
            raise QuantizedFormatError(f"{where}: tensor {key!r} holds quantized weights but is stored as {t.dtype} "
                                       "(8-bit int8, uint8 or float8 expected); the checkpoint is damaged: export "
                                       "it again")
        per_layer[owner][suffix] = t
    for fqn, q in layers.items():
        try:
            backend.load_layer(q, per_layer.pop(fqn), info["layers"][fqn], device)
        except Exception as e:
            raise QuantizedFormatError(f"{where}: cannot rebuild quantized layer {fqn!r} ({info['backend']}): {e}") from e


def _target(model: nn.Module, name: str) -> torch.Tensor:
    owner, leaf = name.rpartition(".")[::2]
    mod = model.get_submodule(owner) if owner else model
    return mod._parameters[leaf] if leaf in mod._parameters else mod._buffers[leaf]


def _assign(model: nn.Module, name: str, t: torch.Tensor) -> None:
    owner, leaf = name.rpartition(".")[::2]
    mod = model.get_submodule(owner) if owner else model
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[leaf] = t
