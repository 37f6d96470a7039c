"""Checkpoint directories: resolve a local directory or a hub id already in the local Hugging Face
cache (nothing is ever downloaded), read ``model_index.json``, and read JSON files with errors that
name the file and what was expected."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["CheckpointError", "resolve_model_dir", "read_model_index", "read_json", "check_file_name"]


MAX_JSON_BYTES = 64 * 2**20


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, incomplete, malformed or does not match the model."""


def read_json(path: Path, what: str, expect: type = dict) -> Any:
    """A JSON file's content; CheckpointError naming the file for a missing, unreadable, malformed or
    wrongly-typed one (``what`` says what the file should be)."""
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{p} is a directory; expected {what}")
    if p.exists() and not p.is_file():  # a FIFO would block open() forever
        raise CheckpointError(f"{p} is not a regular file (a FIFO, a device or a socket); expected {what}")
    if not p.is_file():
        raise CheckpointError(f"{p} is missing or a broken link; expected {what}")
    if p.stat().st_size > MAX_JSON_BYTES:  # configs and indexes are kilobytes; parsing gigabytes costs minutes
        raise CheckpointError(f"{p} is {p.stat().st_size} bytes, more than any {what} ({MAX_JSON_BYTES} at most); "
                              "the file is not what its name says")
    try:
        value = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is not valid JSON ({e}); expected {what}") from e
    except OSError as e:
        raise CheckpointError(f"cannot read {p}: {e.strerror or e}; expected {what}") from e
    if not isinstance(value, expect):
        raise CheckpointError(f"{p} holds a JSON {type(value).__name__}; expected {what} (a JSON "
                              f"{'object' if expect is dict else expect.__name__})")
    return value


def check_file_name(name: Any, listed_in: Path, what: str = "file") -> str:
    """A file name listed inside a checkpoint (a shard of an index, a file of quantization.json) must be
    a plain name in the same folder: no directory part, no '..', not absolute. Nothing outside the
    component folder is ever opened through a listed name."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{listed_in}: {what} entry {name!r} is not a file name")
    if name in (".", "..") or "/" in name or "\\" in name or os.path.isabs(name) or "\0" in name:
        raise CheckpointError(f"{listed_in}: {what} {name!r} is not a plain file name in {listed_in.parent}; "
                              "files outside the component folder are never read")
    return name


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a hub id (``org/name``) found in the local Hugging Face cache.

    Nothing is downloaded: an id that is not cached is an error saying how to fetch it.
    """
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a checkpoint directory path or a hub id (got {type(model).__name__})")
    if "\0" in os.fspath(model):
        raise CheckpointError(f"checkpoint path {os.fspath(model)!r} holds a NUL character; pass a directory path")
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    s = str(model)
    if p.exists():
        raise CheckpointError(f"{p} is a file; pass the checkpoint directory (the one holding model_index.json)")
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        from huggingface_hub import constants, snapshot_download  # optional: only for hub ids

        try:
            return Path(snapshot_download(s, local_files_only=True))
        except Exception as e:
            raise CheckpointError(
                f"{s!r} is not a local directory and is not in the local Hugging Face cache "
                f"({constants.HF_HUB_CACHE}). cogvx never downloads at run time: fetch it first "
                f"(`hf download {s}`) or pass a checkpoint directory"
            ) from e
    raise CheckpointError(
        f"checkpoint directory {p} does not exist; pass a diffusers-layout directory "
        "(holding model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/) or a cached hub id"
    )


def read_model_index(model_dir: Path, components: dict[str, str | None], classes) -> dict:
    """model_index.json, after checking that each needed component directory and file exists.

    components: {folder: file it must hold (or None)}. classes: the pipeline classes accepted as its
    ``_class_name`` (``cogvx.engine.models.tasks.PIPELINE_CLASSES``).
    """
    index = read_json(model_dir / "model_index.json",
                      "model_index.json of a diffusers-layout checkpoint (a JSON object naming _class_name)")
    cls = index.get("_class_name")
    if not isinstance(cls, str) or cls not in classes:
        raise CheckpointError(
            f"{model_dir / 'model_index.json'}: _class_name {cls!r} is not a CogVideoX pipeline; accepted: "
            f"{', '.join(classes)}"
        )
    for name, needed in components.items():
        d = model_dir / name
        if not d.is_dir():
            raise CheckpointError(f"{model_dir} is incomplete: the {name}/ directory is missing")
        if needed and not (d / needed).exists():  # a directory or a FIFO there: read_json says so
            raise CheckpointError(f"{model_dir} is incomplete: {name}/{needed} is missing")
    return index
