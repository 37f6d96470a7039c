"""Helpers of the reliability and hostile-input tests: private checkpoint copies to break, JSON
edits, a record of the files Python opened, and engines that fail loudly if heavy work starts."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = "diffusion_pytorch_model.safetensors"

_OPENED: list[str] | None = None


def _audit(event: str, args) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed: this one records only inside `opened()`


@contextlib.contextmanager
def opened():
    """Collects the paths every Python-level open() saw inside the block (safetensors' own reads are
    in Rust; the tests pair this with an outside file that would load if it were read)."""
    global _OPENED
    seen: list[str] = []
    _OPENED = seen
    try:
        yield seen
    finally:
        _OPENED = None


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def boom(*a, **k):
    raise AssertionError("heavy work started before the input was checked")


def guard(engine):
    """The engine with its text encoder, transformer and VAE decoder made to fail if called."""
    engine.transformer.forward = boom
    engine.text_encoder.forward = boom
    if engine.vae is not None:
        engine.vae.decode = boom
    return engine


def guard_inputs(engine):
    """:func:`guard`, and the VAE encoder too: a bad image or video must fail before it is encoded."""
    guard(engine).vae.encoder.forward = boom
    return engine


def unguard(engine):
    for m in (engine.transformer, engine.text_encoder):
        m.__dict__.pop("forward", None)
    if engine.vae is not None:
        engine.vae.__dict__.pop("decode", None)
    return engine


def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a fresh user process: HOME, caches and temporaries under ``tmp``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COGVX_", "TORCHINDUCTOR_", "TRITON_CACHE"))}
    env.update(HOME=str(tmp / "home"), TMPDIR=str(tmp / "tmp"))
    env.pop("XDG_CACHE_HOME", None)
    (tmp / "home").mkdir(parents=True, exist_ok=True)
    (tmp / "tmp").mkdir(exist_ok=True)
    env.update(extra)
    return env


def small_call(**kw) -> dict:
    """The smallest generate call of the tiny models (1 frame, 16x16 pixels, 1 step)."""
    args = dict(prompt="a cat", num_frames=1, height=16, width=16, num_inference_steps=1, seed=0)
    args.update(kw)
    return args


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())
