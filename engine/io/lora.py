"""Reading a CogVideoX LoRA in the diffusers / peft format: safetensors only, every key checked before
any model is touched.

The format ``CogVideoXPipeline.save_lora_weights`` writes (and ``load_lora_weights`` reads):
``transformer.<module>.lora_A.weight`` [r, in] and ``transformer.<module>.lora_B.weight`` [out, r]
(optionally ``lora_B.bias`` [out]), and in the file's ``__metadata__`` a ``lora_adapter_metadata`` JSON
holding the peft ``LoraConfig`` with ``transformer.``-prefixed fields (``r``, ``lora_alpha``,
``rank_pattern``, ``alpha_pattern``, ``use_rslora``). A file without that metadata scales every module
by 1 (alpha = rank), as diffusers does. Also read: a per-module ``<module>.alpha`` scalar (the
"network alpha" convention of other trainers, scale alpha / r), and keys with no ``transformer.`` prefix
when no key has one (peft's own ``get_peft_model_state_dict`` output).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .checkpoint import CheckpointError

__all__ = ["LoraWeights", "LoraFile", "read_lora", "find_lora_file", "PICKLE_SUFFIXES", "LORA_FILE_NAME",
           "SAVED_LORA_DIR", "write_saved_adapters", "read_saved_adapters"]

LORA_FILE_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAVED_LORA_DIR = "lora"  # in a quantized checkpoint: the adapters that were side branches when it was saved
_SAVED_INDEX = "adapters.json"
_PREFIX = "transformer."
_OTHER_COMPONENTS = ("text_encoder.", "text_encoder_2.", "unet.", "vae.")
_KEY = re.compile(r"^(?P<module>.+)\.(?:(?P<part>lora_A|lora_B)\.(?P<leaf>weight|bias)|(?P<alpha>alpha))$")
# peft LoraConfig fields a CogVideoX LoRA can carry that change what the adapter computes and that
# cogvx does not implement: refused instead of silently ignored.
_UNSUPPORTED = {"use_dora": "DoRA (use_dora=true)", "fan_in_fan_out": "fan_in_fan_out=true"}


@dataclass(frozen=True)
class LoraWeights:
    """One module's adapter: down [r, in], up [out, r], bias [out] or None, and its scale
    (alpha / r, or alpha / sqrt(r) for rank-stabilized LoRA)."""

    down: torch.Tensor
    up: torch.Tensor
    bias: torch.Tensor | None
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoraFile:
    """A checked LoRA file: {module name in the transformer: LoraWeights}."""

    path: Path
    modules: dict[str, LoraWeights]
    ignored: list[str] = field(default_factory=list)  # keys of other components (text encoder, ...)


def find_lora_file(path: str | os.PathLike) -> Path:
    """The safetensors file of a LoRA given as a file or a directory (``pytorch_lora_weights.safetensors``,
    else the one ``*.safetensors`` file there). Pickle files are refused."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / LORA_FILE_NAME).is_file():
            return p / LORA_FILE_NAME
        files = sorted(f for f in p.glob("*.safetensors") if not f.name.startswith("."))
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            raise CheckpointError(f"{p} holds several .safetensors files ({', '.join(f.name for f in files)}); "
                                  "pass the LoRA file itself")
        pickles = sorted(f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
        hint = f" ({', '.join(pickles)}: pickle files are never loaded; convert them to safetensors)" if pickles else ""
        raise CheckpointError(f"no LoRA .safetensors file in {p}{hint}")
    if p.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"{p} is a pickle file: pickles are never loaded (they can run code). Convert the "
                              "LoRA to safetensors (safetensors.torch.save_file) or save it with diffusers' "
                              "save_lora_weights")
    if not p.is_file():
        raise CheckpointError(f"LoRA file {p} does not exist; pass a .safetensors file or the directory holding "
                              f"{LORA_FILE_NAME}")
    if p.suffix != ".safetensors":
        raise CheckpointError(f"{p} is not a .safetensors file; LoRAs are read from safetensors only")
    return p


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read and check a LoRA (file or directory). Raises CheckpointError naming the file and the key."""
    f = find_lora_file(path)
    try:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            metadata = sf.metadata() or {}
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}
    except Exception as e:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"cannot read LoRA {f}: {e}; the file is damaged or not safetensors") from e
    config = _config(metadata, f)
    ours, ignored = _strip_prefix(tensors, f)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in ours.items():
        m = _KEY.match(key)
        if m is None:
            raise CheckpointError(_bad_key(key, f))
        name = "alpha" if m["alpha"] else f"{m['part']}.{m['leaf']}"
        parts.setdefault(m["module"], {})[name] = t
    if not parts:
        raise CheckpointError(f"{f} holds no transformer LoRA weights (keys 'transformer.<module>.lora_A.weight'"
                              f"{'; it only has ' + ', '.join(sorted({k.split('.')[0] for k in ignored})) if ignored else ''})")
    return LoraFile(f, {mod: _module(mod, p, config, f) for mod, p in sorted(parts.items())}, ignored)


def _config(metadata: dict[str, str], f: Path) -> dict[str, Any]:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: lora_adapter_metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{f}: lora_adapter_metadata must be a JSON object")
    cfg = {k[len(_PREFIX):]: v for k, v in meta.items() if k.startswith(_PREFIX)}
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise CheckpointError(f"{f}: this LoRA uses {what}, which cogvx does not implement; only plain LoRA "
                                  "(lora_A / lora_B, optional lora_B bias) is supported")
    for key in ("r", "lora_alpha"):
        if key in cfg and (not isinstance(cfg[key], (int, float)) or isinstance(cfg[key], bool) or cfg[key] <= 0):
            raise CheckpointError(f"{f}: lora_adapter_metadata {key}={cfg[key]!r} must be a positive number")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise CheckpointError(f"{f}: lora_adapter_metadata {key} must be a JSON object")
    return cfg


def _strip_prefix(tensors: dict[str, torch.Tensor], f: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    ours = {k[len(_PREFIX):]: t for k, t in tensors.items() if k.startswith(_PREFIX)}
    ignored = sorted(k for k in tensors if k.startswith(_OTHER_COMPONENTS))
    if not ours and not ignored:  # no component prefix at all: peft's own key names
        return dict(tensors), []
    rest = sorted(k for k in tensors if not k.startswith(_PREFIX) and k not in ignored)
    if rest:
        raise CheckpointError(f"{f}: key {rest[0]!r} names no component; a CogVideoX LoRA's keys start with "
                              "'transformer.' (as diffusers' save_lora_weights writes them)")
    return ours, ignored


def _bad_key(key: str, f: Path) -> str:
    kinds = {"lora_magnitude_vector": "DoRA", "lokr_": "LoKr", "hada_": "LoHa", "lora_embedding": "embedding LoRA",
             ".lora.down": "the old attention-processor LoRA format", "lora_down": "the kohya format"}
    what = next((v for k, v in kinds.items() if k in key), None)
    hint = f" ({what}, which cogvx does not read)" if what else ""
    return (f"{f}: unexpected key {('transformer.' + key)!r}{hint}; a CogVideoX LoRA holds "
            "'transformer.<module>.lora_A.weight' / 'lora_B.weight' (and optionally 'lora_B.bias', '<module>.alpha')")


def _pattern_value(patterns: dict[str, Any], module: str, default):
    """peft's rule (``get_pattern_key``): a pattern applies when the module name ends with it after a dot."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _module(mod: str, p: dict[str, torch.Tensor], cfg: dict[str, Any], f: Path) -> LoraWeights:
    down, up, bias = p.get("lora_A.weight"), p.get("lora_B.weight"), p.get("lora_B.bias")
    where = f"{f}: module 'transformer.{mod}'"
    if down is None or up is None:
        raise CheckpointError(f"{where} has {'lora_B' if down is None else 'lora_A'} but no "
                              f"{'lora_A' if down is None else 'lora_B'} weight; the file is incomplete")
    if "lora_A.bias" in p:
        raise CheckpointError(f"{where} has a lora_A bias, which no LoRA format defines")
    if down.ndim > 2 and up.ndim == down.ndim and all(s == 1 for s in up.shape[2:]):
        # a convolution's LoRA (peft: lora_A [r, C_in, *kernel], lora_B a 1x1 [C_out, r, 1, ...]), kept flat
        down, up = down.flatten(1), up.flatten(1)
    if down.ndim != 2 or up.ndim != 2:
        raise CheckpointError(f"{where}: lora_A {tuple(down.shape)} / lora_B {tuple(up.shape)} are neither matrices "
                              "(a Linear's LoRA) nor a convolution's (lora_A [r, C_in, *kernel], lora_B [C_out, r, "
                              "1, ...])")
    if down.shape[0] != up.shape[1] or down.shape[0] == 0:
        raise CheckpointError(f"{where}: lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} disagree on the "
                              "rank (lora_A must be [r, in], lora_B [out, r])")
    if bias is not None and tuple(bias.shape) != (up.shape[0],):
        raise CheckpointError(f"{where}: lora_B.bias {tuple(bias.shape)} does not match lora_B's {up.shape[0]} rows")
    for name, t in (("lora_A", down), ("lora_B", up), ("lora_B.bias", bias)):
        if t is not None and (not t.is_floating_point() or not bool(torch.isfinite(t).all())):
            raise CheckpointError(f"{where}: {name} must hold finite floating-point values ({t.dtype})")
    r = int(down.shape[0])
    want_r = _pattern_value(cfg.get("rank_pattern") or {}, mod, cfg.get("r", r))
    if want_r != r:
        raise CheckpointError(f"{where}: its lora_A has rank {r} but the file's metadata says r={want_r}")
    if "alpha" in p:
        a = p["alpha"]
        if a.numel() != 1 or not bool(torch.isfinite(a).all()):
            raise CheckpointError(f"{where}: alpha must be one finite number (got shape {tuple(a.shape)})")
        alpha = float(a.item())
    else:
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, mod, cfg.get("lora_alpha", r))
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise CheckpointError(f"{where}: alpha {alpha!r} is not a number")
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return LoraWeights(down, up, bias, float(scale))


def write_saved_adapters(out_dir: Path, adapters: list[tuple[str, Path, float]]) -> None:
    """Copy LoRA files ((name, file, weight) each) into ``out_dir`` (a checkpoint's ``lora/`` folder) with
    an ``adapters.json`` listing them, so that loading the checkpoint attaches them again (as side
    branches at the same weights)."""
    out_dir.mkdir()
    rows = []
    for i, (name, src, weight) in enumerate(adapters):
        file = f"adapter_{i}.safetensors"
        shutil.copyfile(src, out_dir / file)
        rows.append({"name": name, "file": file, "weight": float(weight)})
    (out_dir / _SAVED_INDEX).write_text(json.dumps({"cogvx_saved_lora": 1, "adapters": rows}, indent=1) + "\n")


def read_saved_adapters(lora_dir: Path) -> list[tuple[Path, float]]:
    """(file, weight) of each adapter ``write_saved_adapters`` saved in ``lora_dir`` (none when the folder
    or its adapters.json is absent); a damaged list is a CheckpointError."""
    index = lora_dir / _SAVED_INDEX
    if not index.is_file():
        return []
    try:
        rows = json.loads(index.read_text(encoding="utf-8"))["adapters"]
        out = [(lora_dir / Path(r["file"]).name, float(r["weight"])) for r in rows]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is damaged ({type(e).__name__}: {e}); save the checkpoint again") from e
    for f, w in out:
        if not f.is_file() or not math.isfinite(w):
            raise CheckpointError(f"{index} lists {f.name} (weight {w}), which is missing or not finite; save the "
                                  "checkpoint again")
    return out
