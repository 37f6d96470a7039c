"""Quantized checkpoints on disk: the diffusers layout, each quantized component folder holding
safetensors of plain tensors and ``quantization.json`` (``cogvx.quantize.format``); the other
components come from the source checkpoint.

Writes go to a temporary sibling directory renamed into place at the end (``io.atomic``), so an
interrupted export leaves no half-written checkpoint and two exports to one new directory cannot both
succeed. An output that is the source, sits inside it or contains it is refused before anything is
written. From the source, small files (configs, tokenizer) are copied; unquantized ``*.safetensors``
weight files are hard-linked when the filesystem allows (safetensors files are never modified in
place: every writer writes a new file), and copied otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch

from cogvx.quantize import get_recipe, resolve_recipes
from cogvx.quantize.format import QUANT_FILE, export_component
from cogvx.quantize.torchao_format import export_torchao

from ..io.atomic import atomic_directory, umask_mode
from ..io.checkpoint import CheckpointError, read_model_index, resolve_model_dir
from ..io.lora import SAVED_LORA_DIR, write_saved_adapters
from ..io.safetensors import save_shards
from ..loading import load_text_encoder, load_tokenizer, load_transformer, read_quantization, required_components
from ..models.tasks import PIPELINE_CLASSES
from ..models.text_encoder import text_encoder_dtype
from ..quantizing import quantize_text_encoder, quantize_transformer
from ..runtime.devices import resolve_device, resolve_dtype

__all__ = ["save_quantized", "export_quantized", "write_component", "not_a_checkpoint"]

WEIGHTS_NAME = {"transformer": "diffusion_pytorch_model", "text_encoder": "model"}
DEFAULT_SHARD = 10 * 2**30


def save_quantized(engine, out_dir: str | os.PathLike, *, overwrite: bool = False,
                   max_shard_bytes: int = DEFAULT_SHARD) -> Path:
    """Write ``engine`` as a diffusers-layout checkpoint; quantized components in quantized form.

    The source checkpoint (``engine.model_dir``) supplies model_index.json and the unquantized
    folders. Active LoRA adapters (side branches) are saved beside, in ``lora/``, and attached again
    when the checkpoint loads; adapters fused into full-precision layers are in those layers' weights.
    ``out_dir`` must not exist, or be empty, or (``overwrite=True``) be a checkpoint this function wrote.
    Returns ``out_dir``.
    """
    if engine.model_dir is None:
        raise ValueError("this engine was not loaded from a checkpoint directory: nothing to copy the "
                         "scheduler, tokenizer and VAE from")
    if not engine.recipes:
        raise ValueError("this engine is not quantized: load it with recipe=... (see `cogvx recipes`) first")
    src, out = Path(engine.model_dir), Path(out_dir).expanduser()
    _check_shard(max_shard_bytes)
    _check_out(src, out, overwrite)
    modules = {"transformer": engine.transformer, "text_encoder": engine.text_encoder}
    # LoRAs loaded after quantization run as side branches (their full-precision sum with the quantized
    # weights cannot be quantized again without a second rounding): saved beside, attached again at load.
    adapters = [(n, engine.lora.files[n].path, w) for n, w in engine.lora.active.items()]
    with _writing(out), atomic_directory(out, overwrite=overwrite, replaceable=not_a_checkpoint) as tmp:
        _copy_unquantized(src, tmp, skip=set(engine.recipes) | {SAVED_LORA_DIR})
        for comp, name in engine.recipes.items():
            write_component(modules[comp], comp, name, tmp / comp, config_src=src / comp / "config.json",
                            max_shard_bytes=max_shard_bytes)
        if adapters:
            write_saved_adapters(tmp / SAVED_LORA_DIR, adapters)
    return out


def export_quantized(model: str | os.PathLike, recipe, out_dir: str | os.PathLike, *, device=None,
                     dtype: torch.dtype | str = torch.float32, fuse_qkv: bool = False, overwrite: bool = False,
                     max_shard_bytes: int = DEFAULT_SHARD) -> Path:
    """``cogvx quantize``: quantize the components ``recipe`` names (a name for the transformer, or
    {component: name}) of a full-precision checkpoint and write the result to ``out_dir``.

    Only the components being quantized are loaded (plus the text encoder when a recipe calibrates
    on prompts); the others are linked or copied unchanged.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    _check_shard(max_shard_bytes)
    src, out = resolve_model_dir(model), Path(out_dir).expanduser()
    read_model_index(src, required_components(), PIPELINE_CLASSES)
    recipes = resolve_recipes(recipe, dev)
    if not recipes:
        raise ValueError("no recipe given: pass a recipe name (see `cogvx recipes`)")
    for comp in recipes:
        if read_quantization(src / comp) is not None:
            raise CheckpointError(f"{src / comp} is already quantized; quantize the full-precision checkpoint")
    _check_out(src, out, overwrite)
    te_dtype = text_encoder_dtype(dt, dev)
    need_te = "text_encoder" in recipes or any(r.needs_calibration for r in recipes.values())
    with _writing(out), atomic_directory(out, overwrite=overwrite, replaceable=not_a_checkpoint) as tmp:
        _copy_unquantized(src, tmp, skip=recipes)
        te = load_text_encoder(src / "text_encoder", device=dev, dtype=te_dtype) if need_te else None
        tokenizer = load_tokenizer(src / "tokenizer", vocab_limit=te.config.vocab_size) if need_te else None
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


def write_component(module, component: str, recipe: str, out_dir: Path, *, config_src: Path | None = None,
                    max_shard_bytes: int = DEFAULT_SHARD) -> dict:
    """Write one quantized component folder (config.json, safetensors, quantization.json).

    torchao recipes are written in torchao's own safetensors format (config.json's
    ``quantization_config`` and torchao metadata in every safetensors header; fused q/k/v split), which
    diffusers' ``from_pretrained`` and torchao's safetensors helpers read; the other backends' tensors are
    plain safetensors described by quantization.json alone.
    """
    header, qc = None, None
    if get_recipe(recipe).backend == "torchao":
        tensors, header, info, qc = export_torchao(module, component, recipe)
    else:
        tensors, info = export_component(module, component, recipe)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True, mode=umask_mode())
    if config_src is not None and config_src.is_file():
        config = json.loads(config_src.read_text(encoding="utf-8"))
    else:
        config = module.config.to_dict()
    if qc is not None:
        config["quantization_config"] = qc
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    info["files"] = save_shards(tensors, out_dir, WEIGHTS_NAME[component], max_shard_bytes, metadata=header)
    (out_dir / QUANT_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return info


def not_a_checkpoint(out: Path) -> str | None:
    """None when ``out`` looks like a quantized checkpoint this module wrote (what ``overwrite`` may
    replace): a model_index.json, only the component folders it names (and ``lora/``), at least one
    with quantization.json. Otherwise the reason, naming what does not belong."""
    index, comps = out / "model_index.json", set()
    try:
        doc = json.loads(index.read_text(encoding="utf-8")) if index.is_file() else {}
        comps = {k for k in doc if not k.startswith("_")} if isinstance(doc, dict) else set()
    except (OSError, ValueError):
        pass
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()
                     if p.name != "model_index.json" and not ((p.name in comps or p.name == SAVED_LORA_DIR)
                                                              and p.is_dir() and not p.is_symlink()))
    if foreign:
        return (f"it holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, which "
                f"{'is' if len(foreign) == 1 else 'are'} no component of a checkpoint")
    if not comps:
        return "it has no readable model_index.json"
    if not any((out / c / QUANT_FILE).is_file() for c in comps):
        return f"no component folder holds {QUANT_FILE}: it is not a quantized checkpoint written by cogvx"
    return None


def _check_shard(max_shard_bytes) -> None:
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be a positive integer number of bytes (got {max_shard_bytes!r}); the "
                         f"default is {DEFAULT_SHARD} (10 GiB), diffusers writes 5 GiB shards")


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    """Refuse an output that is the source, sits inside it, or contains it (overwriting it would
    delete the source)."""
    s, o = src.resolve(), out.resolve()
    if o == s:
        raise ValueError(f"cannot export {src} onto itself; choose another output directory")
    if s in o.parents:
        raise ValueError(f"the output {out} is inside the source checkpoint {src}; choose a directory outside it")
    if o in s.parents:
        raise ValueError(f"the output {out} contains the source checkpoint {src}"
                         f"{' (overwrite=True would delete it)' if overwrite else ''}; choose another directory")


class _writing:
    """Turn a failed write (read-only target, full disk) into one clear OSError naming the output."""

    def __init__(self, out: Path):
        self.out = out

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and issubclass(exc_type, OSError) and not isinstance(exc, FileExistsError) \
                and exc.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EPERM, errno.EDQUOT, errno.EFBIG):
            raise OSError(exc.errno, f"cannot write the checkpoint to {self.out}: {exc.strerror}; nothing was "
                                     "left behind: free space or choose a writable directory") from exc
        return False


def _copy_unquantized(src: Path, dst: Path, skip) -> None:
    shutil.copyfile(src / "model_index.json", dst / "model_index.json")
    for p in sorted(src.iterdir()):
        if p.is_dir() and not p.name.startswith(".") and p.name not in skip:
            _copy_tree(p, dst / p.name)


def _copy_tree(src: Path, dst: Path) -> None:
    # Not shutil.copytree: it gathers failures into one shutil.Error and loses their errno, which
    # `_writing` needs to say "disk full" or "read-only" in one line.
    dst.mkdir(mode=umask_mode())
    for p in sorted(src.iterdir()):
        if p.is_dir():
            _copy_tree(p, dst / p.name)
        else:
            _link_weights_copy_rest(str(p), str(dst / p.name))


def _link_weights_copy_rest(src: str, dst: str) -> None:
    if src.endswith(".safetensors"):
        try:
            os.link(src, dst)  # immutable data: no bytes copied
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)
