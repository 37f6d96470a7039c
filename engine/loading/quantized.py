"""Quantized component folders: cogvx's quantization.json (and torchao-format folders saved by diffusers or
transformers), the weight files they list, and filling a meta-built model from them; the weight-header
checks every loader runs before reading a weight."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from cogvx.quantize.format import QUANT_FILE, QuantizedFormatError, check_info, fill_quantized, prepare_quantized
from cogvx.quantize.torchao_format import info_from_torchao

from ..io.checkpoint import CheckpointError, check_file_name, read_json
from ..io.safetensors import (
    TensorInfo,
    check_index,
    read_headers,
    read_metadata,
    read_tensors,
    weight_files,
)


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


# ----------------------------------------------------------------------------------------- components
def read_quantization(component_dir: Path) -> dict[str, Any] | None:
    """The component's quantization.json, checked; None when the component is not quantized. A folder
    saved quantized by diffusers or transformers (torchao, no quantization.json) gets the same record,
    built from config.json's quantization_config and the safetensors metadata."""
    p = Path(component_dir) / QUANT_FILE
    if not p.exists():
        return _torchao_info(Path(component_dir))
    info = read_json(p, "a cogvx quantization file (a JSON object)")
    try:
        info = check_info(info, str(p))
    except QuantizedFormatError as e:
        raise CheckpointError(str(e)) from e
    for name in info["files"]:
        check_file_name(name, p, "weight file")
    return info


def _torchao_info(d: Path) -> dict[str, Any] | None:
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        return None
    qc = read_json(cfg_path, "a component config.json (a JSON object)").get("quantization_config")
    if qc is None:
        return None
    files = weight_files(d)
    headers, metadata = read_headers(files), read_metadata(files)
    try:
        plain = [h.dtype for k, h in headers.items() if h.is_floating and k in metadata
                 and json.loads(metadata[k]).get("_type") == "Tensor"]
        dtype = _SAFETENSORS_DTYPES[plain[0]] if plain else "float32"
        info = info_from_torchao(qc, metadata, d.name, dtype, [f.name for f in files], str(cfg_path))
        return check_info(info, str(cfg_path))
    except (ValueError, KeyError) as e:
        raise CheckpointError(str(e)) from e


def _listed_files(d: Path, info: dict[str, Any]) -> list[Path]:
    """The weight files quantization.json lists (plain names, checked when it was read), all present."""
    files = [d / f for f in info["files"]]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: {d / QUANT_FILE} lists it among the weight files; the checkpoint "
                                  "is incomplete: copy or export it again")
    return files


def load_quantized(model: torch.nn.Module, d: Path, info: dict[str, Any], headers: dict[str, TensorInfo],
                    device, dtype: torch.dtype) -> None:
    """Fill a meta-built component from a quantized folder: the recorded layers become the backend's
    quantized modules, every stored tensor is checked against the headers, then assigned."""
    where = str(d / QUANT_FILE)
    try:
        layers, expected = prepare_quantized(model, info, dtype, where)
        for key, shape in expected.items():
            if key not in headers:
                raise CheckpointError(f"{d}: tensor {key!r} is missing from {', '.join(info['files'])}; "
                                      "the checkpoint is incomplete or damaged: export it again")
            if headers[key].shape != shape:
                raise CheckpointError(f"{headers[key].file}: tensor {key!r} has shape {headers[key].shape} but "
                                      f"{d / 'config.json'} gives {shape}; the config and the weights come from "
                                      "different models")
        prefixes = tuple(f"{fqn}." for fqn in layers)
        unexpected = sorted(k for k in headers if k not in expected and not k.startswith(prefixes))
        if unexpected:
            raise CheckpointError(f"{d}: unexpected tensor(s) {unexpected[:6]} in {headers[unexpected[0]].file.name}; "
                                  "the weights do not match the config")
        fill_quantized(model, layers, info, read_tensors(sorted({h.file for h in headers.values()}), device),
                       dtype, device, where)
    except QuantizedFormatError as e:
        raise CheckpointError(str(e)) from e


def checked_headers(d: Path, info: dict[str, Any] | None, prefix: str,
                    layers: int) -> tuple[list[Path], dict[str, TensorInfo]]:
    """A component folder's weight files and their headers (plain: the index checked; quantized: the files
    quantization.json lists), the config's layer count checked against the stored blocks."""
    files = _listed_files(d, info) if info else weight_files(d)
    headers = read_headers(files)
    if not info:
        check_index(d, headers)
    _check_layer_count(headers, prefix, layers, d / "config.json", "num_layers")
    return files, headers


def _check_layer_count(headers: dict[str, TensorInfo], prefix: str, n: int, config_path: Path, key: str) -> None:
    """The config's layer count against the blocks the weight files hold (before building anything)."""
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in headers if (m := pat.match(k))}
    stored = max(found) + 1 if found else 0
    if stored != n:
        raise CheckpointError(f"{config_path}: {key}={n} but the weight files hold {stored} blocks "
                              f"({prefix}.0 .. {prefix}.{stored - 1}); the config and the weights do not match")
