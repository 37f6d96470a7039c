"""torchao's own safetensors format, for the torchao recipes: what ``torchao.prototype.safetensors`` and
the torchao quantizers of diffusers and transformers write and read.

On disk (one component folder):

- ``config.json`` gains ``"quantization_config": {"quant_method": "torchao", "quant_type": {"default":
  <torchao config_to_dict of the config>}, "modules_to_not_convert": [Linear layers left in full
  precision]}`` (diffusers' ``TorchAoConfig.to_dict()``);
- each safetensors file holds the flattened tensors (``<layer>._weight_qdata``, ``_weight_scale``, ...,
  and plain tensors under their names) and, in its ``__metadata__``, one JSON per state-dict entry
  (``{"_type": "Int8Tensor", "_data": {...}, "_tensor_data_names": [...]}`` or ``{"_type": "Tensor"}``)
  plus ``tensor_names``: torchao's ``flatten_tensor_state_dict``. Every shard carries the whole
  metadata (diffusers merges the shards' metadata with ``dict.update``).

The stored tensor names are the ones cogvx's own ``quantization.json`` format has always used for
torchao layers, so a cogvx export in this format is also a format_version 1 checkpoint. A model whose
q/k/v projections were fused is written with separate ``to_q`` / ``to_k`` / ``to_v`` (row slices of
the fused weight, exact for per-row scales), the layout diffusers' CogVideoX classes have.

This module sees dicts and modules only; reading and writing files is the engine's business.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn
from torchao.core.config import config_from_dict, config_to_dict
from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict, unflatten_tensor_state_dict
from torchao.prototype.safetensors.safetensors_utils import is_metadata_torchao
from torchao.utils import TorchAOBaseTensor

from .backends.torchao import config_for
from .format import component_info
from .recipes import RECIPES, Recipe, get_recipe

__all__ = ["QUANT_METHOD", "quantization_config", "recipe_for_config", "export_torchao", "info_from_torchao",
           "is_torchao_metadata", "cat_rows"]

QUANT_METHOD = "torchao"
_QKV = ("to_q", "to_k", "to_v")


def _signature(cfg_dict: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """(config class, granularity classes): what tells the recipes apart."""
    gran = cfg_dict.get("_data", {}).get("granularity")
    grans = gran if isinstance(gran, list) else [gran] if gran is not None else []
    return cfg_dict.get("_type"), tuple(sorted({g.get("_type") for g in grans if isinstance(g, dict)}))


def quantization_config(recipe: str | Recipe, unquantized: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json for a torchao recipe."""
    r = get_recipe(recipe)
    if r.backend != "torchao":
        raise ValueError(f"recipe {r.name!r} is not a torchao recipe")
    return {"quant_method": QUANT_METHOD, "quant_type": {"default": config_to_dict(config_for(r.options))},
            "modules_to_not_convert": sorted(unquantized)}


def recipe_for_config(qc: Any, where: str) -> Recipe:
    """The cogvx recipe a config.json ``quantization_config`` describes (torchao configs only)."""
    if not isinstance(qc, dict):
        raise ValueError(f"{where}: quantization_config must be a JSON object")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise ValueError(f"{where}: quantization_config.quant_method is {method!r}; cogvx reads torchao-quantized "
                         "checkpoints (quant_method 'torchao') and its own (quantization.json). Save the model "
                         "unquantized and quantize it with `cogvx quantize`")
    qt = qc.get("quant_type")
    if not isinstance(qt, dict) or set(qt) != {"default"} or not isinstance(qt["default"], dict):
        raise ValueError(f"{where}: quantization_config.quant_type must be {{'default': <torchao config>}} "
                         f"(one config for the whole model; got {json.dumps(qt)[:200]})")
    try:
        config_from_dict(qt["default"])  # a config this torchao cannot build is not one it can load
    except Exception as e:
        raise ValueError(f"{where}: torchao cannot read quant_type {qt['default'].get('_type')!r}: {e}") from e
    want = _signature(qt["default"])
    for r in RECIPES.values():
        if r.backend == "torchao" and _signature(config_to_dict(config_for(r.options))) == want:
            return r
    known = ", ".join(f"{r.name} ({_signature(config_to_dict(config_for(r.options)))[0]})"
                      for r in RECIPES.values() if r.backend == "torchao")
    raise ValueError(f"{where}: torchao config {want[0]} with granularity {list(want[1])} matches no cogvx recipe; "
                     f"cogvx loads: {known}")


def _state_for_export(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer (tied ones once), fused q/k/v split into its three parts."""
    state: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        state[name] = p.detach()
    for owner, mod in module.named_modules():
        for leaf, b in mod.named_buffers(recurse=False):
            if leaf not in mod._non_persistent_buffers_set:
                state[f"{owner}.{leaf}" if owner else leaf] = b
    for name in [n for n in state if n.endswith(".to_qkv.weight")]:
        parent = name[: -len(".to_qkv.weight")]
        w, b = state.pop(name), state.pop(f"{parent}.to_qkv.bias", None)
        rows = w.shape[0] // 3
        block = getattr(w, "block_size", [1])
        if isinstance(w, TorchAOBaseTensor) and list(block)[0] not in (1, rows):
            raise ValueError(f"{parent}.to_qkv is quantized with {block[0]}-row blocks: it cannot be split into q/k/v "
                             "exactly; export from an engine loaded without fuse_qkv")
        for i, part in enumerate(_QKV):
            state[f"{parent}.{part}.weight"] = w[i * rows:(i + 1) * rows]
            if b is not None:
                state[f"{parent}.{part}.bias"] = b[i * rows:(i + 1) * rows]
    return state


def export_torchao(module: nn.Module, component: str, recipe: str | Recipe
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any], dict[str, Any]]:
    """(tensors, safetensors metadata, quantization info without "files", config.json's
    quantization_config) of a torchao-quantized component, q/k/v split when fused."""
    r = get_recipe(recipe)
    state = _state_for_export(module)
    tensors, metadata = flatten_tensor_state_dict(state)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    layers = {n[: -len(".weight")]: json.loads(metadata[n]) for n, t in state.items()
              if n.endswith(".weight") and isinstance(t, TorchAOBaseTensor)}
    if not layers:
        raise ValueError(f"{component} has no torchao-quantized layers: it was not quantized with {r.name!r}")
    linears = {n for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    linears = {n for n in linears if not n.endswith(".to_qkv")} | {
        f"{n[: -len('.to_qkv')]}.{p}" for n in linears if n.endswith(".to_qkv") for p in _QKV}
    dtype = next((t.dtype for t in state.values() if not isinstance(t, TorchAOBaseTensor) and t.is_floating_point()),
                 None)
    info = component_info(component, r, dtype, False, layers)
    info["format"] = "torchao-safetensors"
    if any(n.endswith(".to_qkv") for n, _ in module.named_modules()):
        info["fuse_qkv"] = True  # stored apart for other tools; cogvx fuses them again at load
    return tensors, metadata, info, quantization_config(r, sorted(linears - set(layers)))


def is_torchao_metadata(metadata: dict[str, str]) -> bool:
    return is_metadata_torchao(metadata)


def info_from_torchao(qc: dict[str, Any], metadata: dict[str, str], component: str, dtype: str,
                      files: list[str], where: str) -> dict[str, Any]:
    """A format_version 1 quantization info for a torchao-format folder that has no quantization.json
    (saved by diffusers or transformers): the recipe from config.json, the layers from the metadata."""
    recipe = recipe_for_config(qc, where)
    if not is_metadata_torchao(metadata):
        raise ValueError(f"{where}: config.json says the weights are torchao-quantized but the safetensors "
                         "metadata is not torchao's (no 'tensor_names' with a JSON entry per tensor); the "
                         "checkpoint was saved without safetensors support or is damaged")
    layers = {}
    for name in json.loads(metadata["tensor_names"]):
        meta = json.loads(metadata[name])
        if meta.get("_type") != "Tensor":
            if not name.endswith(".weight"):
                raise ValueError(f"{where}: quantized tensor {name!r} is not a layer weight; cogvx loads quantized "
                                 "Linear weights only")
            layers[name[: -len(".weight")]] = meta
    return {"format_version": 1, "format": "torchao-safetensors", "component": component,
            "recipe": recipe.to_dict(), "backend": "torchao", "dtype": dtype, "fused_qkv": False,
            "files": list(files), "layers": layers}


def cat_rows(weights: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(weights)`` along the output rows, also for torchao weights (which do not implement it):
    their stored parts are joined (per-row data concatenated, per-tensor data required equal) and the
    subclass rebuilt. Used to fuse q/k/v of a checkpoint saved with them apart."""
    if not any(isinstance(w, TorchAOBaseTensor) for w in weights):
        return torch.cat(weights)
    flat = [flatten_tensor_state_dict({"L.weight": w}) for w in weights]
    metas = [json.loads(m["L.weight"]) for _, m in flat]
    strip = [{**m, "_data": {k: v for k, v in m["_data"].items() if k != "block_size"}} for m in metas]
    if any(m != strip[0] for m in strip) or any(m["_data"].get("block_size", [1])[0] != 1 for m in metas):
        raise ValueError("the q/k/v weights are not quantized alike with per-row scales; they cannot be fused")
    data = {}
    for key in flat[0][0]:
        parts = [f[0][key] for f in flat]
        if all(p.ndim and p.shape[0] == w.shape[0] for p, w in zip(parts, weights)):
            data[key] = torch.cat(parts)
        elif all(torch.equal(p, parts[0]) for p in parts):
            data[key] = parts[0]
        else:
            raise ValueError(f"the q/k/v weights have different {key.split('_')[-1]} values; they cannot be fused")
    out, _ = unflatten_tensor_state_dict(data, {"L.weight": json.dumps(metas[0]), "tensor_names": '["L.weight"]'})
    return out["L.weight"]
