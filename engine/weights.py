"""Safetensors weight files of one diffusers component directory, loaded strictly.

A component directory (``transformer/``, ``vae/``, ``text_encoder/``) holds either one
``*.safetensors`` file or shards listed by a ``*.safetensors.index.json``. Pickled
``.bin``/``.pt`` files are never read: a directory that only has those is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

__all__ = ["CheckpointError", "weight_files", "read_state_dict", "load_into"]


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, incomplete or does not match the model."""


def weight_files(component_dir: str | Path) -> list[Path]:
    """The safetensors files of a component directory, in shard order.

    Prefers an index JSON (sharded checkpoint); otherwise the single ``*.safetensors`` file.
    Raises CheckpointError naming what is missing.
    """
    d = Path(component_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint component directory {d} does not exist")
    indexes = sorted(d.glob("*.safetensors.index.json"))
    if indexes:
        index = json.loads(indexes[0].read_text())
        shards = sorted(set(index.get("weight_map", {}).values()))
        if not shards:
            raise CheckpointError(f"{indexes[0]} has no 'weight_map' entries")
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            raise CheckpointError(
                f"{indexes[0].name} lists shard(s) that are not in {d}: {', '.join(missing)}; "
                "the download is incomplete: fetch the missing files again"
            )
        return [d / s for s in shards]
    files = sorted(d.glob("*.safetensors"))
    if len(files) == 1:
        return files
    if len(files) > 1:
        raise CheckpointError(
            f"{d} holds several .safetensors files ({', '.join(f.name for f in files)}) but no "
            "*.safetensors.index.json saying how they belong together"
        )
    pickles = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = (
        f" (it holds {', '.join(pickles)}: pickle files are never loaded; convert them to safetensors)"
        if pickles
        else ""
    )
    raise CheckpointError(f"no *.safetensors weights in {d}{hint}")


def read_state_dict(component_dir: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a component directory (memory-mapped where safetensors allows)."""
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(component_dir):
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as sf:
                for k in sf.keys():
                    state[k] = sf.get_tensor(k)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises several error types for a damaged file
            raise CheckpointError(f"cannot read {f}: {e}; the file is damaged or truncated") from e
    return state


def load_into(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    where: str,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    ignore: tuple[str, ...] = (),
) -> None:
    """Fill a meta-device module from ``state`` with ``assign=True``; every key consumed, every tensor filled.

    ``where`` names the checkpoint in error messages. Floating tensors are cast to ``dtype``;
    ``ignore`` lists checkpoint keys that are known and deliberately dropped. Non-persistent
    buffers must be materialized by the caller after this returns.
    """
    expected = dict(module.state_dict(keep_vars=True))
    unexpected = sorted(k for k in state if k not in expected and k not in ignore)
    missing = sorted(k for k in expected if k not in state)
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing weight(s) {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected weight(s) {_few(unexpected)}")
        raise CheckpointError(
            f"{where}: {'; '.join(parts)}. The checkpoint does not match the model config "
            "(wrong model variant, or a damaged/partial file)"
        )
    out = {}
    for k, ref in expected.items():
        t = state[k]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{where}: tensor {k!r} has shape {tuple(t.shape)} but the config gives {tuple(ref.shape)}"
            )
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if device is not None:
            t = t.to(device)
        out[k] = t
    module.load_state_dict(out, strict=True, assign=True)


def _few(keys: list[str], n: int = 6) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")
