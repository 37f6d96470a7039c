"""torch.compile of the denoising step: settings, the persistent cache, and what dynamo counted."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..io.cache import cache_root

__all__ = ["COMPILE_MODES", "check_compile_mode", "default_cache_dir", "use_cache_dir", "compile_module",
           "dynamo_counts"]

COMPILE_MODES = (False, True, "max-autotune")



def check_compile_mode(mode) -> bool | str:
    if mode not in COMPILE_MODES or isinstance(mode, int) and not isinstance(mode, bool):
        raise ValueError(f"compile must be False, True or 'max-autotune' (got {mode!r})")
    return mode


def default_cache_dir() -> Path:
    """$COGVX_COMPILE_CACHE, else <cogvx cache>/inductor (the cogvx cache is $COGVX_CACHE,
    $XDG_CACHE_HOME/cogvx or ~/.cache/cogvx)."""
    if os.environ.get("COGVX_COMPILE_CACHE"):
        return Path(os.environ["COGVX_COMPILE_CACHE"]).expanduser()
    return cache_root() / "inductor"


# use_cache_dir's memory: the TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR values it last set (a later call may
# move them: that is not the user's choice), and under "user" the user's own setting it found, if any.
_set_by_us: dict[str, str] = {}


def _user_set_inductor_cache() -> str | None:
    """TORCHINDUCTOR_CACHE_DIR as the user set it, or None when unset or set by torch itself: importing
    torch._inductor sets it to torch's default (/tmp/torchinductor_<user>), which is not the user's choice."""
    value = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if value is not None and value == _set_by_us.get("TORCHINDUCTOR_CACHE_DIR"):
        return _set_by_us.get("user")  # what the user had set before we moved it, if anything
    if value is None:
        return None
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

    return None if value == torch_default() else value


def use_cache_dir(path: str | os.PathLike | None) -> Path:
    """Point inductor's (and Triton's) on-disk caches at ``path`` (default :func:`default_cache_dir`) so
    a second process re-uses the first one's compiled kernels. A TORCHINDUCTOR_CACHE_DIR the user set
    wins over the default (not over an explicit ``path``). Checked writable before anything is loaded."""
    user = _set_by_us["user"] = _user_set_inductor_cache()
    d = Path(path).expanduser() if path is not None else Path(user) if user else default_cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"compile cache {d} cannot be created ({e.strerror}); pass compile_cache_dir= "
                         "(--compile-cache-dir) or set COGVX_COMPILE_CACHE to a writable directory") from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise ValueError(f"compile cache {d} is not writable; pass compile_cache_dir= (--compile-cache-dir) or "
                         "set COGVX_COMPILE_CACHE to a writable directory")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _set_by_us["TORCHINDUCTOR_CACHE_DIR"] = str(d)
    if os.environ.get("TRITON_CACHE_DIR") in (None, _set_by_us.get("TRITON_CACHE_DIR")):
        os.environ["TRITON_CACHE_DIR"] = _set_by_us["TRITON_CACHE_DIR"] = str(d / "triton")
    return d


def compile_module(module, mode, device: torch.device, backend: str = "inductor"):
    """``module`` (an nn.Module, or a function such as a region of the forward) compiled with
    fullgraph=True and static shapes (one graph per video shape; a graph break or a recompile inside a
    generate is a bug the tests look for). ``backend``: inductor, or a debugging backend of
    torch.compile ("eager", "aot_eager": the same graphs, no code generation)."""
    check_compile_mode(mode)
    import torch._inductor.config as inductor_config

    # Inference on the CPU: fold the weights into the graph so the CPU GEMMs use prepacked layouts. The
    # switch is global and dynamo reads it too (it then guards on each weight's identity), so it is set for
    # every compile: off for CUDA and the debugging backends, whose graphs take the weights as inputs (an
    # offloaded component read back, or moved, runs the same graph).
    inductor_config.freezing = backend == "inductor" and device.type == "cpu"
    if backend != "inductor":
        return torch.compile(module, fullgraph=True, dynamic=False, backend=backend)
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
