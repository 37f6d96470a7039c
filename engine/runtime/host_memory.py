"""How the process's C allocator treats freed memory while an engine runs on the CPU.

glibc hands every freed block larger than its mmap threshold (32 MiB at most) back to the kernel, and
trims the top of its heap past 128 KiB. A denoising step allocates and frees the same large activations
every call (at cpu-long about 2.4 GB of them: 600 000 page faults, a fifth of the step's CPU time in
the kernel), so each step faults them in again. ``keep_freed_memory`` tells glibc to serve large
blocks from its heap and keep what is freed for the next step (``mallopt``: no mmap for large blocks,
a 2 GiB trim threshold): the step then takes no page faults after the first. The resident set no
longer shrinks by itself after a step; ``residency.trim_memory`` (``malloc_trim``) still hands freed
pages back where the engine releases a component.

It is process-wide, so the engine sets it once, at its first load on a CPU; ``COGVX_CPU_MALLOC=system``
keeps glibc's defaults. Not glibc (musl, macOS): nothing to do.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["ENV", "keep_freed_memory", "setting"]

ENV = "COGVX_CPU_MALLOC"
_CHOICES = ("keep", "system")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's malloc.h
_TRIM = (1 << 31) - 1  # bytes free at the top of the heap before glibc trims it (mallopt takes an int)
_done: list[str] = []


def keep_freed_memory() -> str:
    """Set glibc to keep freed memory for reuse (see the module docstring), once per process. Returns what
    holds now: "keep", "system" (``COGVX_CPU_MALLOC=system``) or why nothing could be set."""
    if _done:
        return _done[0]
    choice = os.environ.get(ENV, "keep")
    if choice not in _CHOICES:
        raise ValueError(f"{ENV}={choice!r} is not one of {', '.join(_CHOICES)} (keep: glibc keeps freed memory "
                         f"for the next step; system: glibc's defaults)")
    state = choice
    if choice == "keep":
        libc = None
        if platform.system() == "Linux":
            try:
                libc = ctypes.CDLL("libc.so.6")
                libc.gnu_get_libc_version  # glibc only
            except (OSError, AttributeError):
                libc = None
        if libc is None:
            state = "not glibc: the allocator keeps its own policy"
        elif not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM)):
            state = "glibc refused mallopt: its defaults hold"
    _done.append(state)
    return state


def setting() -> str:
    """What ``keep_freed_memory`` set in this process ("" before it ran)."""
    return _done[0] if _done else ""
