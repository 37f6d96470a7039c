"""Files of the diffusers-compatible classes: the ``from_pretrained`` keywords (variants, per-component dtypes,
``device_map``) and ``save_pretrained`` in diffusers' layout (safetensors only), loadable by diffusers."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ..io.checkpoint import resolve_model_dir
from ..io.safetensors import save_shards

__all__ = ["check_from_pretrained_kwargs", "torch_dtype_of", "component_dir", "variant_view", "save_module",
           "dtype_for", "device_of_map", "LOADING_LOG", "DIFFUSERS_VERSION", "quantized_module"]

# diffusers' pipeline loader logs each component it loads here; scripts (and diffusers' tests) read it.
LOADING_LOG = logging.getLogger("diffusers.pipelines.pipeline_utils")
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release whose layout and semantics these classes follow
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
# from_pretrained keywords that change nothing here (the weights are local safetensors, loaded lazily)
_HARMLESS = {"local_files_only", "low_cpu_mem_usage", "use_safetensors", "cache_dir", "force_download",
             "revision", "token", "proxies", "output_loading_info"}


def check_from_pretrained_kwargs(kwargs: dict[str, Any], what: str) -> None:
    """Refuse what cogvx cannot honour instead of ignoring it."""
    if kwargs.get("use_safetensors") is False:
        raise ValueError(f"{what}: use_safetensors=False asks for pickle weights, which cogvx never loads")
    unknown = sorted(set(kwargs) - _HARMLESS)
    if unknown:
        raise TypeError(f"{what} got unsupported argument(s) {unknown}; cogvx takes torch_dtype, variant, device_map "
                        "and subfolder (quantize with torchao's quantize_ on the result, or with a cogvx recipe)")


def torch_dtype_of(torch_dtype, kwargs: dict[str, Any]):
    """diffusers renamed ``torch_dtype`` to ``dtype``: either is taken (not both)."""
    if "dtype" in kwargs:
        if torch_dtype is not None:
            raise TypeError("pass torch_dtype or dtype, not both")
        return kwargs.pop("dtype")
    return torch_dtype


def dtype_for(torch_dtype, component: str):
    """The dtype one component loads in: ``torch_dtype`` itself, or from a dict {component: dtype,
    "default": dtype} as diffusers takes it (float32 when neither names it)."""
    if isinstance(torch_dtype, dict):
        return torch_dtype.get(component, torch_dtype.get("default", torch.float32))
    return torch_dtype


def device_of_map(device_map) -> torch.device | None:
    """The one device a ``device_map`` puts every component on (None: leave them on the CPU). cogvx places
    whole components: a map that splits them over several devices is refused."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = {str(v) for v in device_map.values()}
        if len(devices) != 1:
            raise ValueError(f"device_map={device_map!r} splits the pipeline over {sorted(devices)}; cogvx keeps each "
                             "component whole on one device: pass one device, or use enable_model_cpu_offload()")
        device_map = devices.pop()
    if device_map in ("auto", "balanced"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    if isinstance(device_map, (str, torch.device)):
        return torch.device(device_map)
    raise TypeError(f"device_map must be a device, 'auto', 'balanced' or a dict of them (got {device_map!r})")


def component_dir(path, subfolder: str | None) -> Path:
    d = resolve_model_dir(path)
    return d / subfolder if subfolder else d


def _weights(d: Path, variant: str | None) -> list[Path]:
    """The safetensors files (and index) of ``variant`` in a component folder (None: the unvariant ones)."""
    out = []
    for p in sorted(d.glob("*.safetensors")) + sorted(d.glob("*.safetensors.index*.json")):
        parts = p.name.split(".")
        tag = next((x for x in parts[1:] if x not in ("safetensors", "index", "json")), None)
        tag = tag.split("-")[0] if tag else None  # "fp16-00001-of-00002"
        if tag == variant:
            out.append(p)
    return out


@contextlib.contextmanager
def variant_view(d: Path, variant: str | None):
    """A folder holding ``d``'s config and only the weights of ``variant`` under their plain names (links), so
    that cogvx's strict loader reads them; ``d`` itself when nothing needs choosing."""
    if not d.is_dir():
        yield d
        return
    mine, every = _weights(d, variant), list(d.glob("*.safetensors")) + list(d.glob("*.safetensors.index*.json"))
    if variant is not None and not mine:
        raise ValueError(f"You are trying to load the model files of the `variant={variant}`, but no such modeling "
                         f"files are available in {d} (it holds {sorted(p.name for p in every) or 'no weights'})")
    if len(mine) == len(every):
        yield d
        return
    with tempfile.TemporaryDirectory(prefix="cogvx-variant-") as tmp:
        for p in d.iterdir():
            if p not in every:
                os.symlink(p.resolve(), Path(tmp) / p.name)
        for p in mine:
            name = p.name.replace(f".{variant}", "") if variant else p.name
            if name.endswith(".json"):  # the index names its shards: point it at the plain names
                index = json.loads(p.read_text())
                index["weight_map"] = {k: v.replace(f".{variant}", "") for k, v in index["weight_map"].items()}
                (Path(tmp) / name).write_text(json.dumps(index))
            else:
                os.symlink(p.resolve(), Path(tmp) / name)
        yield Path(tmp)


def quantized_module(module: torch.nn.Module) -> bool:
    return any(type(t).__module__.split(".")[0] in ("torchao", "optimum", "bitsandbytes") or
               type(t) not in (torch.Tensor, torch.nn.Parameter) for t in module.state_dict().values())


def _plain_state(module) -> dict[str, torch.Tensor]:
    """The module's tensors under diffusers' keys (a fused q/k/v projection is saved as to_q/to_k/to_v)."""
    out = {}
    for k, t in module.state_dict().items():
        if ".attn1.to_qkv." in k:
            for name, part in zip(("to_q", "to_k", "to_v"), t.chunk(3)):
                out[k.replace("to_qkv", name)] = part
        else:
            out[k] = t
    return out


def save_module(module, out: Path, variant: str | None = None, safe_serialization: bool = True,
                max_shard_size: int | str | None = None, **kwargs) -> None:
    """A cogvx transformer or VAE as a diffusers component folder (``config.json`` + safetensors)."""
    if kwargs:
        raise TypeError(f"save_pretrained got unsupported argument(s) {sorted(kwargs)}")
    if quantized_module(module):
        raise ValueError("save_pretrained writes full-precision weights; this module is quantized: save the pipeline "
                         "with cogvx's Engine.save_quantized (cogvx's quantized layout, loadable by cogvx)")
    if not safe_serialization:
        warnings.warn("save_pretrained(safe_serialization=False): cogvx writes safetensors only (never pickles)",
                      UserWarning, stacklevel=3)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**module.config.to_dict(), "_diffusers_version": DIFFUSERS_VERSION}
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=list) + "\n")
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    limit = _bytes(max_shard_size) if max_shard_size is not None else 10 * 2**30
    save_shards(_plain_state(module), out, stem, limit)


def _bytes(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.upper().strip()
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u):
            return int(float(s[:-len(u)]) * units[u])
    return int(s)


def clear_dir_for_save(out: Path) -> None:
    """save_pretrained writes into ``out``; a file where the folder should be is an error, never removed."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"save_pretrained: {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)


def copy_tree_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file():
            shutil.copy2(p, dst / p.name)
