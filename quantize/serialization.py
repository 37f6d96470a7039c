"""Quantized checkpoints: the diffusers layout, with each quantized component folder holding
safetensors of plain tensors (each backend's own stored names) and ``quantization.json``:

    {"format_version": 1, "component": "transformer", "recipe": {name, backend, settings, filters},
     "backend": "torchao", "backend_version": "0.18.0", "torch_version": ..., "dtype": "float32",
     "fused_qkv": false, "files": [...], "layers": {qualified name: backend metadata}}

``layers`` records exactly which Linear layers were quantized, so a later change of a default
filter never changes how an old checkpoint loads. Unquantized components (vae, scheduler,
tokenizer, and a text encoder left in full precision) are linked or copied from the source
checkpoint unchanged.

Loading builds the component on the meta device, swaps each recorded layer for the backend's
quantized module, and assigns the stored tensors: full-precision weights of quantized layers are
never materialized. Writes go to a temporary sibling directory renamed into place at the end, so an
interrupted export leaves no half-written checkpoint.

Fused q/k/v (``Engine.load(fuse_qkv=True)``): the fused ``attn1.to_qkv`` layers are saved under
that name with ``"fused_qkv": true``; loading fuses the meta model first, so the checkpoint loads
fused whatever ``fuse_qkv`` says. An unfused quantized checkpoint cannot be fused at load time
(quantized weights are not concatenated): export it from a fused engine instead.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from cogvx.engine.weights import CheckpointError
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .backends import backend_version, get_backend
from .recipes import get_recipe

if TYPE_CHECKING:
    from cogvx.engine import Engine

__all__ = [
    "FORMAT_VERSION", "QUANT_FILE", "save_quantized", "export_quantized", "write_component", "read_quantization",
    "load_quantized_transformer", "load_quantized_text_encoder", "atomic_directory",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
QUANT_FILE = "quantization.json"
WEIGHTS_NAME = {"transformer": "diffusion_pytorch_model", "text_encoder": "model"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------- save
def save_quantized(engine: Engine, out_dir: str | os.PathLike, *, overwrite: bool = False,
                   max_shard_bytes: int = 10 * 2**30) -> Path:
    """Write ``engine`` as a diffusers-layout checkpoint; quantized components in quantized form.

    The source checkpoint (``engine.model_dir``) supplies model_index.json and the unquantized
    folders. ``out_dir`` must not exist (or ``overwrite=True``). Returns ``out_dir``.
    """
    if engine.model_dir is None:
        raise ValueError("this engine was not loaded from a checkpoint directory: nothing to copy the "
                         "scheduler, tokenizer and VAE from")
    if not engine.recipes:
        raise ValueError("this engine is not quantized: load it with recipe=... (see `cogvx recipes`) first")
    src, out = Path(engine.model_dir), Path(out_dir)
    _check_out(src, out)
    modules = {"transformer": engine.transformer, "text_encoder": engine.text_encoder}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        _copy_unquantized(src, tmp, skip=engine.recipes)
        for comp, name in engine.recipes.items():
            write_component(modules[comp], comp, name, tmp / comp, config_src=src / comp / "config.json",
                            max_shard_bytes=max_shard_bytes)
    return out


def export_quantized(model: str | os.PathLike, recipe, out_dir: str | os.PathLike, *, device="cpu",
                     dtype: torch.dtype = torch.float32, fuse_qkv: bool = False, overwrite: bool = False,
                     max_shard_bytes: int = 10 * 2**30) -> Path:
    """``cogvx quantize``: quantize the components ``recipe`` names (a name for the transformer, or
    {component: name}) of a full-precision checkpoint and write the result to ``out_dir``.

    Only the components being quantized are loaded (plus the text encoder when a recipe calibrates
    on prompts); the others are linked or copied unchanged.
    """
    from cogvx.engine.loader import (
        load_transformer,
        quantize_text_encoder,
        quantize_transformer,
        read_model_index,
        resolve_model_dir,
        text_encoder_dtype,
    )
    from cogvx.engine.text_encoder import PromptTokenizer, load_text_encoder
    from cogvx.engine.validation import resolve_device, resolve_dtype

    from .recipes import RecipeError, resolve_recipes

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    src, out = resolve_model_dir(model), Path(out_dir)
    read_model_index(src)
    recipes = resolve_recipes(recipe, dev)
    if not recipes:
        raise RecipeError("no recipe given: pass a recipe name (see `cogvx recipes`)")
    for comp in recipes:
        if read_quantization(src / comp) is not None:
            raise CheckpointError(f"{src / comp} is already quantized; quantize the full-precision checkpoint")
    _check_out(src, out)
    te_dtype = text_encoder_dtype(dt, dev)
    need_te = "text_encoder" in recipes or any(r.needs_calibration for r in recipes.values())
    with atomic_directory(out, overwrite=overwrite) as tmp:
        _copy_unquantized(src, tmp, skip=recipes)
        tokenizer = PromptTokenizer.from_dir(src / "tokenizer") if need_te else None
        te = load_text_encoder(src / "text_encoder", device=dev, dtype=te_dtype) if need_te else None
        if "text_encoder" in recipes:
            quantize_text_encoder(te, recipes["text_encoder"], tokenizer)
            write_component(te, "text_encoder", recipes["text_encoder"].name, tmp / "text_encoder",
                            config_src=src / "text_encoder" / "config.json", max_shard_bytes=max_shard_bytes)
        if "transformer" in recipes:
            tr = load_transformer(src / "transformer", device=dev, dtype=dt, fuse_qkv=fuse_qkv)
            quantize_transformer(tr, recipes["transformer"], tokenizer, te, dt)
            write_component(tr, "transformer", recipes["transformer"].name, tmp / "transformer",
                            config_src=src / "transformer" / "config.json", max_shard_bytes=max_shard_bytes)
    return out


def _check_out(src: Path, out: Path) -> None:
    if out.exists() and out.resolve() == src.resolve():
        raise ValueError(f"cannot export {src} onto itself; choose another output directory")


def _copy_unquantized(src: Path, dst: Path, skip) -> None:
    shutil.copy2(src / "model_index.json", dst / "model_index.json")
    for p in sorted(src.iterdir()):
        if p.is_dir() and not p.name.startswith(".") and p.name not in skip:
            shutil.copytree(p, dst / p.name, copy_function=_link_or_copy)


class atomic_directory:
    """``with atomic_directory(out) as tmp:`` write into ``tmp``; on success ``tmp`` becomes ``out``
    (one rename), on any error (or KeyboardInterrupt) ``tmp`` is removed and ``out`` is untouched."""

    def __init__(self, out: Path, overwrite: bool = False):
        self.out = Path(out)
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())) and not overwrite:
            raise FileExistsError(f"{self.out} already exists; choose a new directory or pass overwrite=True "
                                  "(--overwrite)")
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # same filesystem: no bytes copied (safetensors files are never written in place)
    except OSError:
        shutil.copy2(src, dst)


def write_component(module: nn.Module, component: str, recipe: str, out_dir: Path, *,
                    config_src: Path | None = None, max_shard_bytes: int = 10 * 2**30) -> dict[str, Any]:
    """Write one quantized component folder (config.json, safetensors, quantization.json)."""
    r = get_recipe(recipe)
    backend = get_backend(r.backend)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
    for name, t in _full_precision_tensors(module, layers):
        tensors[name] = t.detach()
        if dtype is None and t.is_floating_point():
            dtype = t.dtype

    if config_src is not None and config_src.is_file():
        shutil.copy2(config_src, out_dir / "config.json")
    elif component == "transformer":
        module.config.to_json(out_dir / "config.json")
    else:
        module.config.to_json_file(str(out_dir / "config.json"))
    files = _save_shards(tensors, out_dir, WEIGHTS_NAME[component], max_shard_bytes)
    info = {
        "format_version": FORMAT_VERSION,
        "format": "cogvx-quantized",
        "component": component,
        "recipe": r.to_dict(),
        "backend": r.backend,
        "backend_version": backend_version(r.backend),
        "torch_version": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "fused_qkv": any(n.endswith("attn1.to_qkv") for n, _ in module.named_modules()),
        "files": files,
        "layers": layer_meta,
    }
    (out_dir / QUANT_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return info


def _full_precision_tensors(module: nn.Module, layers: dict[str, nn.Module]):
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


def _save_shards(tensors: dict[str, torch.Tensor], out_dir: Path, stem: str, max_shard_bytes: int) -> list[str]:
    seen: set[tuple[int, int]] = set()
    for k, t in tensors.items():  # safetensors refuses tensors sharing storage
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (0, id(t))
        tensors[k] = t.contiguous() if key not in seen else t.clone()
        seen.add(key)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    if len(shards) == 1:
        names = [f"{stem}.safetensors"]
    else:
        names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        (out_dir / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    return names


# ----------------------------------------------------------------------------------------- load
def read_quantization(component_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The component's quantization.json, checked; None when the component is not quantized."""
    p = Path(component_dir) / QUANT_FILE
    if not p.is_file():
        return None
    try:
        info = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is not valid JSON: {e}") from e
    v = info.get("format_version") if isinstance(info, dict) else None
    if v != FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: quantization format_version {v!r} is not supported; this cogvx reads format_version "
            f"{FORMAT_VERSION}. Re-export the checkpoint with this cogvx (`cogvx quantize`) or upgrade cogvx"
        )
    for key in ("recipe", "backend", "dtype", "files", "layers"):
        if key not in info:
            raise CheckpointError(f"{p} has no {key!r} entry; the file is damaged: re-export the checkpoint")
    if info["dtype"] not in _DTYPES:
        raise CheckpointError(f"{p}: dtype {info['dtype']!r} is not one of {', '.join(_DTYPES)}")
    get_recipe(info["recipe"]["name"])  # an unknown recipe name is a RecipeError naming the known ones
    return info


def check_load_dtype(info: dict[str, Any], component_dir: Path, dtype: torch.dtype) -> None:
    if _DTYPES[info["dtype"]] != dtype:
        raise CheckpointError(
            f"{component_dir} was quantized in {info['dtype']} and its quantized weights keep that dtype's scales; "
            f"load it with dtype={info['dtype']} (got {str(dtype).removeprefix('torch.')}), or export again "
            "from an engine loaded in the dtype you need"
        )


def load_quantized_transformer(component_dir: str | os.PathLike, device: torch.device, dtype: torch.dtype,
                               fuse_qkv: bool = False, info: dict[str, Any] | None = None):
    """A quantized ``transformer/`` folder, built on the meta device and filled with the stored tensors."""
    from cogvx.engine.config import TransformerConfig
    from cogvx.engine.loader import build_transformer

    d = Path(component_dir)
    info = info or read_quantization(d)
    check_load_dtype(info, d, dtype)
    if fuse_qkv and not info.get("fused_qkv"):
        raise CheckpointError(
            f"{d} was quantized with separate q/k/v projections and quantized weights cannot be fused at load "
            "time; load it with fuse_qkv=False, or export from an engine loaded with fuse_qkv=True"
        )
    model = build_transformer(TransformerConfig.from_json(d / "config.json"))
    if info.get("fused_qkv"):
        model.fuse_qkv()  # on the meta device: only the module structure changes
    _fill(model, d, info, device, dtype)
    return model.eval().requires_grad_(False)


def load_quantized_text_encoder(component_dir: str | os.PathLike, device: torch.device, dtype: torch.dtype,
                                info: dict[str, Any] | None = None):
    """A quantized ``text_encoder/`` folder as a transformers ``T5EncoderModel``."""
    from transformers import T5Config, T5EncoderModel

    d = Path(component_dir)
    info = info or read_quantization(d)
    check_load_dtype(info, d, dtype)
    with torch.device("meta"):
        model = T5EncoderModel(T5Config.from_json_file(str(d / "config.json")))
    _fill(model, d, info, device, dtype, tie=lambda m: setattr(m.encoder.embed_tokens, "weight", m.shared.weight))
    return model.eval().requires_grad_(False)


def _fill(model: nn.Module, d: Path, info: dict[str, Any], device: torch.device, dtype: torch.dtype,
          tie=None) -> None:
    """Swap the recorded layers for the backend's quantized modules and assign every stored tensor."""
    backend = get_backend(info["backend"])
    options = info["recipe"].get("settings", {})
    qfile = d / QUANT_FILE
    files = [d / f for f in info["files"]]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: {qfile} lists it among the weight files; the checkpoint is "
                                  "incomplete: copy or export it again")
    headers = _read_headers(files)

    expected: dict[str, tuple[int, ...]] = {}
    layers: dict[str, nn.Module] = {}
    for fqn, meta in info["layers"].items():
        try:
            lin = model.get_submodule(fqn)
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear):
            raise CheckpointError(f"{qfile}: quantized layer {fqn!r} is not a Linear layer of the model in "
                                  f"{d / 'config.json'}; the config and the weights come from different models")
        expected.update({f"{fqn}.{k}": tuple(s) for k, s in backend.expected_shapes(lin, options, meta).items()})
        layers[fqn] = backend.empty_layer(lin, options, dtype)
    for fqn, q in layers.items():
        model.set_submodule(fqn, q)
    fp = dict(_full_precision_tensors(model, layers))
    expected.update({k: tuple(t.shape) for k, t in fp.items()})

    for key, shape in expected.items():
        if key not in headers:
            raise CheckpointError(f"{d}: tensor {key!r} is missing from {', '.join(f.name for f in files)}; "
                                  "the checkpoint is incomplete or damaged: export it again")
        f, got = headers[key]
        if got != shape:
            raise CheckpointError(f"{f}: tensor {key!r} has shape {got} but {d / 'config.json'} gives {shape}; "
                                  "the config and the weights come from different models")
    prefixes = tuple(f"{fqn}." for fqn in layers)
    unexpected = sorted(k for k in headers if k not in fp and not k.startswith(prefixes))
    if unexpected:
        raise CheckpointError(f"{d}: unexpected tensor(s) {unexpected[:6]} in {headers[unexpected[0]][0].name}; "
                              "the weights do not match the config")

    per_layer: dict[str, dict[str, torch.Tensor]] = {fqn: {} for fqn in layers}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as sf:
                for key in sf.keys():
                    t = sf.get_tensor(key)
                    if key in fp:
                        if t.is_floating_point() and t.dtype != dtype:
                            raise CheckpointError(f"{f}: tensor {key!r} is {t.dtype}, but {qfile} says the "
                                                  f"checkpoint is {info['dtype']}")
                        _assign(model, key, t)
                    else:
                        owner = next(fqn for fqn in layers if key.startswith(f"{fqn}."))
                        per_layer[owner][key[len(owner) + 1:]] = t
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises several error types for a damaged file
            raise CheckpointError(f"cannot read {f}: {e}; the file is damaged or truncated") from e
    for fqn, q in layers.items():
        try:
            backend.load_layer(q, per_layer.pop(fqn), info["layers"][fqn], device)
        except Exception as e:
            raise CheckpointError(f"{d}: cannot rebuild quantized layer {fqn!r} ({info['backend']}): {e}") from e
    if tie is not None:
        tie(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{d}: tensors {left[:6]} were not filled by the checkpoint")


def _read_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """{tensor name: (file, shape)} from the safetensors headers only; a damaged file is named."""
    out: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    out[k] = (f, tuple(sf.get_slice(k).get_shape()))
        except Exception as e:
            raise CheckpointError(f"cannot read {f}: {e}; the file is damaged or truncated") from e
        size = f.stat().st_size
        with open(f, "rb") as fh:  # safe_open reads the header only: check the data is all there
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise CheckpointError(f"{f} is truncated: {size} bytes, its header describes {8 + n + end}; "
                                  "copy or export it again")
    return out


def _assign(model: nn.Module, name: str, t: torch.Tensor) -> None:
    owner, leaf = name.rpartition(".")[::2]
    mod = model.get_submodule(owner) if owner else model
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[leaf] = t
