"""Residency: which component (text encoder, transformer, VAE) lives where, and when it moves.

One small object per engine. The pipelines ask it for a component for a stage (``session().stage(name)``
inside a generate, ``use(name)`` elsewhere); they never move modules themselves. Each component has one
placement:

    Resident      stays where it was loaded (the default: nothing moves, nothing is recorded)
    Moved         lives on the offload device (CPU) and moves whole to the execution device for its stage
                  (diffusers' ``enable_model_cpu_offload``); Parameter objects are kept, only their data
                  moves, so a compiled forward sees the same inputs again and does not recompile
    Streamed      its blocks go to the execution device a group at a time while it runs, the rest for the
                  whole stage (``group_offload.BlockStreamer``: diffusers' ``enable_group_offload``, and
                  sequential offload with groups of one block and no overlap)
    Materialized  on a CPU: its weights are read from the checkpoint when its stage starts and released
                  (to the meta device, then ``malloc_trim``) when it ends, so peak memory is about the
                  largest stage, not the sum; the module object (its config, hooks, LoRA side branches,
                  tiling switch) stays, only its checkpoint tensors come and go

Every move is recorded in ``events`` as (component, "in" | "out" | "kept"), so the schedule can be tested.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import threading
from collections import deque
from typing import Callable, Iterator

import torch
from torch import nn

from .profiling import Profile, stage

__all__ = ["Residency", "Resident", "Moved", "Streamed", "Materialized", "release_tensors", "transplant",
           "trim_memory", "is_released", "OFFLOAD_MODES", "COMPONENTS"]

OFFLOAD_MODES = ("model", "group", "sequential")
COMPONENTS = ("text_encoder", "transformer", "vae")


class Resident:
    """Stays where it is: bringing it in and out does nothing."""

    records = False

    def bring(self, module: nn.Module) -> None:
        pass

    def release(self, module: nn.Module) -> str | None:
        return None

    restore = settle = bring

    def describe(self) -> str:
        return "resident"


class Moved:
    """Whole-module offload: on ``offload`` between stages, on ``device`` during its stage."""

    records = True

    def __init__(self, device: torch.device, offload: torch.device):
        self.device, self.offload = torch.device(device), torch.device(offload)

    def bring(self, module: nn.Module) -> None:
        module.to(self.device)

    def release(self, module: nn.Module) -> str | None:
        module.to(self.offload)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return None

    restore, settle = bring, release

    def describe(self) -> str:
        return f"on {self.offload}, moved to {self.device} for its stage"


class Streamed:
    """Part of the module resident on ``device`` during its stage, the rest streamed by ``streamer`` (an
    object with ``attach(module)`` / ``detach(module)``, e.g. ``group_offload.BlockStreamer``)."""

    records = True

    def __init__(self, streamer):
        self.streamer = streamer

    def bring(self, module: nn.Module) -> None:
        self.streamer.attach(module)

    def release(self, module: nn.Module) -> str | None:
        self.streamer.detach(module)
        return None

    def restore(self, module: nn.Module) -> None:
        module.to(self.streamer.device)

    def settle(self, module: nn.Module) -> None:
        module.to("cpu")
        if self.streamer.device.type == "cuda":
            torch.cuda.empty_cache()

    def describe(self) -> str:
        return self.streamer.describe()


class Materialized:
    """Read from the checkpoint for its stage, released after.

    loader(skeleton) -> a freshly loaded module of the same structure (the engine's loader for that
    component, reading the checkpoint's safetensors); keep() -> a reason the weights must stay in memory
    now (e.g. a LoRA fused into them: the checkpoint no longer holds them), or None; after(module): run
    once the weights are back (the engine re-attaches LoRA side branches made while it was released).
    """

    records = True

    def __init__(self, loader: Callable[[nn.Module], nn.Module], keep: Callable[[], str | None] = lambda: None,
                 after: Callable[[nn.Module], None] = lambda m: None):
        self.loader, self.keep, self.after = loader, keep, after

    def bring(self, module: nn.Module) -> None:
        if not is_released(module):
            return  # still in memory (kept at the last release)
        # Read outside inference mode (generate runs in it): the weights come back as the same kind of
        # tensor they were at load, so a compiled graph's guards (dispatch keys) still hold and nothing
        # recompiles, and in-place ops on them (LoRA, prepacked caches) keep working.
        with torch.inference_mode(False):
            fresh = self.loader(module)
            transplant(module, fresh)
        release_tensors(fresh)  # should anything keep the fresh module alive, it holds no weights
        del fresh
        self.after(module)

    def release(self, module: nn.Module) -> str | None:
        why = self.keep() or _not_from_checkpoint(module)
        if why:
            return why
        release_tensors(module)
        trim_memory()
        return None

    restore = bring

    def settle(self, module: nn.Module) -> None:
        self.release(module)

    def describe(self) -> str:
        return "read from the checkpoint for its stage, released after"


class Residency:
    """Where each component lives and when it moves (see the module docstring).

    component: name -> the module now (read at each move, so a component the owner replaces is followed),
    or None when there is none; every name of ``COMPONENTS`` starts :class:`Resident`.
    ``mode``: None, "model", "group" or "sequential", as the engine was asked (for reports).
    """

    def __init__(self, component: Callable[[str], nn.Module | None]):
        self.component = component
        self.placements = {n: Resident() for n in COMPONENTS}
        self.mode: str | None = None
        self.events: deque[tuple[str, str]] = deque(maxlen=512)  # (component, "in" | "out" | "kept")
        self._count = {n: 0 for n in COMPONENTS}
        self._mutex = threading.RLock()  # a component comes in (or goes out) once, whichever thread asks

    def moves(self, name: str) -> bool:
        """Whether ``name`` ever moves (its placement is not :class:`Resident`)."""
        return self.placements[name].records and self.component(name) is not None

    def in_use(self) -> bool:
        return any(self._count.values())

    def place(self, name: str, placement) -> None:
        """Give ``name`` a new placement: the old one puts it back whole on its execution device, the new
        one puts it where it waits between stages. Not while a stage uses it."""
        if self._count[name]:
            raise RuntimeError(f"{name} is in use by a stage; change its placement between generate calls")
        # (the engine's lock, held by every generate and by enable_offload, keeps stages out meanwhile)
        module = self.component(name)
        if module is not None:
            self.placements[name].restore(module)
        self.placements[name] = placement
        if module is not None:
            placement.settle(module)

    def describe(self) -> dict[str, str]:
        return {n: p.describe() for n, p in self.placements.items() if self.component(n) is not None}

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[nn.Module | None]:
        """The component, on its execution device for the duration (nested uses share one move)."""
        self.enter(name)
        try:
            yield self.component(name)
        finally:
            self.leave(name)

    @contextlib.contextmanager
    def session(self, profile: Profile | None = None, device: torch.device | None = None) -> Iterator["Stages"]:
        """The stages of one generate: ``stages.stage(*names)`` makes exactly those components present
        (releasing the ones the previous stage held; None names are skipped); everything still held is
        released at the end. Stage changes that move something are timed as the "offload" stage of
        ``profile``."""
        s = Stages(self, (lambda: stage(profile, "offload", device)) if profile is not None else None)
        try:
            yield s
        finally:
            s.stage()

    def enter(self, name: str) -> None:
        """Bring ``name`` to its execution device unless a stage or a use already holds it."""
        module, placement = self.component(name), self.placements[name]
        if module is None:
            return
        with self._mutex:
            if self._count[name] == 0:
                placement.bring(module)
                if placement.records:
                    self.events.append((name, "in"))
            self._count[name] += 1

    def leave(self, name: str) -> None:
        """Let ``name`` go back where it waits, once nothing holds it any more."""
        module, placement = self.component(name), self.placements[name]
        if module is None:
            return
        with self._mutex:
            if self._count[name] == 0:
                return
            self._count[name] -= 1
            if self._count[name] == 0:
                kept = placement.release(module)
                if placement.records:
                    self.events.append((name, "kept" if kept else "out"))


class Stages:
    """The components one generate's current stage holds (see :meth:`Residency.session`)."""

    def __init__(self, residency: Residency, timer=None):
        self.residency, self.held, self.timer = residency, [], timer

    def stage(self, *names: str | None) -> None:
        names = tuple(n for n in names if n is not None)
        out = [n for n in self.held if n not in names]
        new = [n for n in names if n not in self.held]
        timed = self.timer is not None and any(self.residency.moves(n) for n in out + new)
        with self.timer() if timed else contextlib.nullcontext():
            for n in out:  # the previous stage's first: memory stays bounded by the largest stage
                self.held.remove(n)
                self.residency.leave(n)
            for n in new:
                self.residency.enter(n)
                self.held.append(n)


# ------------------------------------------------------------------------------------- tensor slots
def _slot(module: nn.Module, key: str) -> tuple[nn.Module, str]:
    prefix, _, leaf = key.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), leaf


def _put(owner: nn.Module, leaf: str, tensor: torch.Tensor, was_param: bool) -> None:
    if was_param and not isinstance(tensor, nn.Parameter):
        tensor = nn.Parameter(tensor, requires_grad=False)
    setattr(owner, leaf, tensor)  # nn.Module.__setattr__ replaces the registered parameter or buffer


def is_released(module: nn.Module) -> bool:
    """True when the module's checkpoint tensors are on the meta device (released)."""
    return any(t.is_meta for t in module.state_dict(keep_vars=True).values())


def release_tensors(module: nn.Module) -> None:
    """Replace every tensor of ``module.state_dict()`` (its checkpoint tensors) with a meta tensor of the
    same shape and dtype: the memory goes, the structure stays. Non-persistent buffers (LoRA side
    branches, fp8 copies) are kept."""
    for key, t in module.state_dict(keep_vars=True).items():
        if not t.is_meta:
            owner, leaf = _slot(module, key)
            _put(owner, leaf, torch.empty(t.shape, dtype=t.dtype, device="meta"), isinstance(t, nn.Parameter))


def transplant(module: nn.Module, fresh: nn.Module) -> None:
    """Move every checkpoint tensor of ``fresh`` (a freshly loaded module of the same structure) into
    ``module``, cast to the dtype ``module`` holds for it (e.g. a VAE moved to bf16 after loading); a
    tensor shared by two names in ``fresh`` (T5's tied embedding) stays shared."""
    src, dst = fresh.state_dict(keep_vars=True), module.state_dict(keep_vars=True)
    if set(src) != set(dst):
        missing, extra = sorted(set(dst) - set(src)), sorted(set(src) - set(dst))
        raise RuntimeError(f"the reloaded {type(module).__name__} does not match the one in use (missing "
                           f"{missing[:3]}, unexpected {extra[:3]}): its structure changed after loading")
    done: dict[int, torch.Tensor] = {}
    for key, t in src.items():
        want = dst[key].dtype
        if id(t) not in done:
            done[id(t)] = t if t.dtype == want or not t.is_floating_point() else \
                nn.Parameter(t.detach().to(want), requires_grad=False) if isinstance(t, nn.Parameter) else t.to(want)
        owner, leaf = _slot(module, key)
        _put(owner, leaf, done[id(t)], isinstance(dst[key], nn.Parameter))


def _not_from_checkpoint(module: nn.Module) -> str | None:
    """A reason the module's weights are no longer what its checkpoint holds (quantized after loading:
    a tensor subclass where a plain tensor was read), or None."""
    for name, t in module.state_dict(keep_vars=True).items():
        data = t.data if isinstance(t, nn.Parameter) else t
        if type(data) is not torch.Tensor and not t.is_meta:
            return f"{name} is a {type(data).__name__} (quantized after loading), which its checkpoint does not hold"
    return None


def trim_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's ``malloc_trim``), so the resident set actually drops
    after a component is released. Released tensors are freed by reference counting (nothing but the
    module held them); only the youngest generation is collected (a full ``gc.collect`` costs 0.5 s in
    a process that imported transformers and diffusers)."""
    gc.collect(0)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator keeps what it keeps
        pass
