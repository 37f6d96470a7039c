"""torch.compile of the denoising step: settings, the persistent cache, and what dynamo counted."""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["COMPILE_MODES", "default_cache_dir", "use_cache_dir", "compile_transformer", "dynamo_counts"]

COMPILE_MODES = (False, True, "max-autotune")


def default_cache_dir() -> Path:
    """$COGVX_COMPILE_CACHE, else <cogvx cache>/inductor (the cogvx cache is $COGVX_CACHE,
    $XDG_CACHE_HOME/cogvx or ~/.cache/cogvx)."""
    if os.environ.get("COGVX_COMPILE_CACHE"):
        return Path(os.environ["COGVX_COMPILE_CACHE"])
    root = os.environ.get("COGVX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cogvx")
    return Path(root) / "inductor"


def use_cache_dir(path: str | os.PathLike | None) -> Path:
    """Point inductor's (and Triton's) on-disk caches at ``path`` so a second process re-uses the
    first one's compiled kernels. An explicit TORCHINDUCTOR_CACHE_DIR in the environment wins."""
    d = Path(path) if path is not None else default_cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    if path is not None or "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(d)
    os.environ.setdefault("TRITON_CACHE_DIR", str(Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) / "triton"))
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def compile_transformer(module: torch.nn.Module, mode, device: torch.device):
    """The transformer's forward compiled with fullgraph=True and static shapes (one graph per
    video shape; a graph break or a recompile inside a generate is a bug the tests look for)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of False, True, 'max-autotune' (got {mode!r})")
    if device.type == "cpu":
        import torch._inductor.config as inductor_config

        # Inference only: fold the weights into the graph so the CPU GEMMs use prepacked layouts.
        inductor_config.freezing = True
    return torch.compile(module, fullgraph=True, dynamic=False,
                         mode="max-autotune-no-cudagraphs" if mode == "max-autotune" else None)


def dynamo_counts() -> dict[str, int]:
    """Graph breaks, graphs compiled and recompilations so far in this process (dynamo's own counters)."""
    from torch._dynamo.utils import counters

    return {
        "graph_breaks": sum(counters["graph_break"].values()),
        "unique_graphs": counters["stats"]["unique_graphs"],
        "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else 0,
        "frames_ok": counters["frames"]["ok"],
    }
