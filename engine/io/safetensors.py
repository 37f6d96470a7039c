"""Safetensors weight files of one diffusers component directory, read and written strictly.

A component directory (``transformer/``, ``vae/``, ``text_encoder/``) holds either one
``*.safetensors`` file or shards listed by a ``*.safetensors.index.json``. Pickled
``.bin``/``.pt`` files are never read: a directory that only has those is an error. Shard names come
from the index and must be plain file names in the folder; a tensor stored in two shards is an error.
Headers are read (and the data length checked) before any tensor is, so a damaged, truncated or
mismatched file is named before memory is spent on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .atomic import apply_umask
from .checkpoint import CheckpointError, check_file_name, read_json

__all__ = [
    "TensorInfo", "weight_files", "read_headers", "read_metadata", "check_index", "read_tensors", "read_state_dict",
    "check_shapes", "load_into", "check_filled", "save_shards",
]

# safetensors dtype codes -> torch dtypes (what a header can say without reading data)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says of one tensor."""

    file: Path
    shape: tuple[int, ...]
    dtype: str  # the safetensors code: "F32", "BF16", "I8", ...

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.dtype)

    @property
    def is_floating(self) -> bool:
        return self.dtype.startswith(("F", "BF"))


def _unreadable(f: Path, e: Exception) -> CheckpointError:
    """The one error for a weight file that cannot be read, saying why as precisely as it can."""
    if f.is_symlink() and not f.exists():
        return CheckpointError(f"{f} is a broken symbolic link (or a link loop); fetch the file again")
    if f.is_dir():
        return CheckpointError(f"{f} is a directory, not a safetensors file")
    if f.exists() and not f.is_file():
        return CheckpointError(f"{f} is not a regular file (a FIFO, a device or a socket); a weight file must be a "
                               "plain safetensors file")
    return CheckpointError(f"cannot read {f}: {e}; the file is damaged or truncated: fetch or export it again")


def weight_files(component_dir: str | Path) -> list[Path]:
    """The safetensors files of a component directory, in shard order.

    Prefers an index JSON (sharded checkpoint); otherwise the single ``*.safetensors`` file.
    Raises CheckpointError naming what is missing or malformed.
    """
    d = Path(component_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint component directory {d} does not exist")
    _check_inside(d, d.parent, "component folder")
    indexes = sorted(d.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{d} holds several index files ({', '.join(i.name for i in indexes)}); keep one")
    if indexes:
        return [_check_inside(f, d, "weight file") for f in _index_shards(indexes[0])]
    files = sorted(p for p in d.glob("*.safetensors") if not p.name.startswith("."))
    if len(files) == 1:
        return [_check_inside(files[0], d, "weight file")]
    if len(files) > 1:
        raise CheckpointError(
            f"{d} holds several .safetensors files ({_few([f.name for f in files])}) but no "
            "*.safetensors.index.json saying how they belong together"
        )
    pickles = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = (
        f" (it holds {', '.join(pickles)}: pickle files are never loaded; convert them to safetensors)"
        if pickles
        else ""
    )
    raise CheckpointError(f"no *.safetensors weights in {d}{hint}")


def _is_hub_blob(target: Path) -> bool:
    """A Hugging Face cache blob (``models--org--name/blobs/<hash>``): where the cache's snapshot links point."""
    return target.parent.name == "blobs" and target.parent.parent.name.startswith("models--")


def _check_inside(p: Path, folder: Path, what: str) -> Path:
    """``p`` itself, when it is inside ``folder`` after following links, or a link to a Hugging Face cache
    blob; a link out of the checkpoint elsewhere is refused (a broken link is left to the reader's error)."""
    if not (p.is_symlink() or any(q.is_symlink() for q in p.parents if folder in q.parents or q == folder)):
        return p
    try:
        target = p.resolve()
    except (RuntimeError, OSError):  # a link loop: the reader says so
        return p
    if not (target.is_file() or target.is_dir()) or folder.resolve() in target.parents or _is_hub_blob(target):
        return p
    raise CheckpointError(f"the {what} {p} is a symbolic link to {target}, outside {folder}; a checkpoint is read "
                          "only from inside its own folders (and Hugging Face cache blobs): copy the file in, or "
                          "load the checkpoint the link points into")


def _index_shards(index_path: Path) -> list[Path]:
    what = "a safetensors index: a JSON object with a 'weight_map' of tensor name -> shard file name"
    index = read_json(index_path, what)
    wmap = index.get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
        raise CheckpointError(f"{index_path} has no 'weight_map' entries; expected {what}")
    for k in wmap:
        if not isinstance(k, str):
            raise CheckpointError(f"{index_path}: weight_map key {k!r} is not a tensor name")
    shards = sorted({check_file_name(s, index_path, "shard") for s in wmap.values()})
    bad = [s for s in shards if not s.endswith(".safetensors")]
    if bad:
        raise CheckpointError(f"{index_path} lists shard(s) {bad} that are not .safetensors files; "
                              "pickle weights are never read")
    d = index_path.parent
    missing = [s for s in shards if not (d / s).is_file()]
    if missing:
        raise CheckpointError(
            f"{index_path.name} lists shard(s) that are not in {d}: {', '.join(missing)}; "
            "the download is incomplete: fetch the missing files again"
        )
    return [d / s for s in shards]


def read_headers(files: list[Path]) -> dict[str, TensorInfo]:
    """{tensor name: TensorInfo} from the safetensors headers only. A damaged or truncated file, a
    tensor stored in two files, and a tensor whose bytes run past the end of its file are errors."""
    out: dict[str, TensorInfo] = {}
    for f in files:
        if not f.is_file():  # a FIFO would block open() forever, a device never end
            raise _unreadable(f, FileNotFoundError(f"{f} is not a file"))
        try:
            size = f.stat().st_size
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if n <= 0 or n > size - 8 or n > 100 * 2**20:
                    raise ValueError(f"header length {n} does not fit a {size}-byte file")
                header = json.loads(fh.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            end = 0
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                shape, dtype, (_, stop) = tuple(v["shape"]), v["dtype"], v["data_offsets"]
                if k in out:
                    raise CheckpointError(f"tensor {k!r} is stored twice: in {out[k].file.name} and in {f.name}; "
                                          "the checkpoint is inconsistent: fetch or export it again")
                out[k] = TensorInfo(f, tuple(int(s) for s in shape), str(dtype))
                end = max(end, int(stop))
        except CheckpointError:
            raise
        except Exception as e:  # OSError, JSON, missing keys: all mean the file cannot be used
            raise _unreadable(f, e) from e
        if 8 + n + end > size:
            raise CheckpointError(f"{f} is damaged or truncated: {size} bytes, its header describes "
                                  f"{8 + n + end}; fetch or export it again")
    return out


def read_metadata(files: list[Path]) -> dict[str, str]:
    """The ``__metadata__`` of the files' headers, merged (a later file's entry wins, as diffusers merges)."""
    out: dict[str, str] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                out.update(sf.metadata() or {})
        except Exception as e:
            raise _unreadable(f, e) from e
    return out


def check_index(component_dir: str | Path, headers: dict[str, TensorInfo]) -> None:
    """A sharded component's index must say where each tensor is: every stored tensor listed, in the
    shard that holds it, and every listed tensor stored (no-op for a single-file component)."""
    indexes = sorted(Path(component_dir).glob("*.safetensors.index.json"))
    if not indexes:
        return
    index = indexes[0]
    wmap = read_json(index, "a safetensors index")["weight_map"]
    for k, info in headers.items():
        if wmap.get(k) != info.file.name:
            where = f"places it in {wmap[k]!r}" if k in wmap else "does not list it"
            raise CheckpointError(f"{index}: tensor {k!r} is stored in {info.file.name} but the index {where}; "
                                  "the index and the shards do not belong together: fetch or export them again")
    missing = sorted(k for k in wmap if k not in headers)
    if missing:
        raise CheckpointError(f"{index} lists tensor(s) {_few(missing)} that no shard holds; the index and the "
                              "shards do not belong together: fetch or export them again")


def read_tensors(files: list[Path], device: str | torch.device = "cpu", keys: set[str] | None = None):
    """Yield (name, tensor) of every tensor (or those in ``keys``), memory-mapped where safetensors allows."""
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as sf:
                for k in sf.keys():
                    if keys is None or k in keys:
                        yield k, sf.get_tensor(k)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises several error types for a damaged file
            raise _unreadable(f, e) from e


def read_state_dict(component_dir: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a component directory, after the header checks of :func:`read_headers`."""
    files = weight_files(component_dir)
    check_index(component_dir, read_headers(files))
    return dict(read_tensors(files, device))


def check_shapes(expected: dict[str, tuple[int, ...]], headers: dict[str, TensorInfo], config_path: Path) -> None:
    """Name the file and tensor of a shape mismatch, from the headers only (before any weight is read)."""
    for k, info in headers.items():
        if k in expected and info.shape != tuple(expected[k]):
            raise CheckpointError(
                f"{info.file}: tensor {k!r} has shape {info.shape} but {config_path} gives {tuple(expected[k])}; "
                "the config and the weights come from different models"
            )


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

    ``where`` names the checkpoint in error messages. Floating tensors are cast to ``dtype``; a stored
    tensor whose kind (floating or integer) differs from the parameter's is an error. ``ignore`` lists
    checkpoint keys that are known and deliberately dropped.
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
        if t.is_floating_point() != ref.is_floating_point() or t.is_complex():
            raise CheckpointError(f"{where}: tensor {k!r} is stored as {t.dtype} but the model needs a "
                                  f"{'floating-point' if ref.is_floating_point() else str(ref.dtype)} tensor")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if device is not None:
            t = t.to(device)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):  # one pass, on the target device
            raise CheckpointError(f"{where}: tensor {k!r} holds NaN or inf values (after the cast to {t.dtype}); "
                                  "the checkpoint is damaged or was saved from a diverged run: fetch or export it "
                                  "again")
        out[k] = t
    module.load_state_dict(out, strict=True, assign=True)


def check_filled(module: nn.Module, where: str) -> None:
    """Every parameter and buffer holds data (none left on the meta device after loading)."""
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{where}: tensors {_few(left)} were not filled by the checkpoint")


def save_shards(tensors: dict[str, torch.Tensor], out_dir: Path, stem: str, max_shard_bytes: int,
                metadata: dict[str, str] | None = None) -> list[str]:
    """Write ``tensors`` as ``<stem>.safetensors`` or numbered shards of at most ``max_shard_bytes`` with
    an index (diffusers' names); returns the file names. ``metadata`` goes into every file's header."""
    seen: set[tuple[int, int]] = set()
    tensors = dict(tensors)
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
        save_file(shard, str(out_dir / name), metadata={**(metadata or {}), "format": "pt"})
        apply_umask(out_dir / name)  # save_file creates 0600 files
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        (out_dir / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    return names


def _few(keys: list[str], n: int = 6) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")
