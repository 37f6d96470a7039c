"""Streaming a module's weights onto the GPU while it runs: by groups of blocks, the next group's copy
overlapped on a side CUDA stream from pinned memory (diffusers' ``enable_group_offload(...,
use_stream=True)``), or one block at a time with no overlap (sequential offload, the smallest footprint).

A *unit* is a list of consecutive blocks whose tensors (parameters and buffers, of every submodule) come
onto the GPU together. Between uses a unit's tensors live in pinned CPU memory (one copy, made once); on
the GPU they exist only while the unit runs, plus the one unit prefetched ahead. Parameter objects are
kept: only ``.data`` is swapped, so a module holding a reference to its weight keeps it. The parts of the
module outside every unit (the transformer's patch embedding, time embedding and head; T5's embedding and
final norm) stay on the GPU for the whole stage.

Units are whole blocks, not single layers (diffusers' sequential offload hooks every leaf module): a
block's forward reads some of its layers' weights without calling those layers (the adaptive LayerNorm
kernel takes ``norm.weight``, the QK-norm + RoPE kernel ``norm_q.weight``; the VAE's causal convolutions
call ``F.conv3d`` with ``conv.weight``), which a per-layer hook never sees.

Hooks swap tensors on the host side of the stream, so this does not combine with ``torch.compile`` of the
streamed module (the compiled graph would have to trace the copies); the engine refuses that pairing.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["BlockStreamer", "block_units"]


def block_units(blocks: nn.ModuleList, group_size: int) -> list[list[nn.Module]]:
    """Consecutive groups of ``group_size`` blocks."""
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1 (got {group_size})")
    return [list(blocks[i:i + group_size]) for i in range(0, len(blocks), group_size)]


def _tensors(owner: nn.Module):
    """(name, tensor, is_param) of the tensors ``owner`` holds itself (not its submodules')."""
    yield from ((n, p, True) for n, p in owner.named_parameters(recurse=False))
    yield from ((n, b, False) for n, b in owner.named_buffers(recurse=False) if b is not None)


def _direct(m: nn.Module):
    """(owner, name, tensor, is_param) of every tensor of a unit's module and its submodules."""
    for owner in m.modules():
        for name, t, is_param in _tensors(owner):
            yield owner, name, t, is_param


def _pinned(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu")
    try:
        return t.pin_memory()
    except (RuntimeError, NotImplementedError, TypeError):  # a tensor subclass without pinning: copied synchronously
        return t


class BlockStreamer:
    """Streams ``units(module)`` of a module onto ``device`` as the module runs.

    units: module -> list of units (``block_units`` over the transformer's or T5's blocks);
    use_stream: prefetch the next unit on a side CUDA stream while the current one computes (the units
    run in order, as blocks do; after the last, the first is fetched for the next step).
    """

    def __init__(self, units, device: torch.device, *, use_stream: bool = True):
        self.units_of, self.device, self.use_stream = units, torch.device(device), use_stream
        self.units: list[list[nn.Module]] = []
        self.slots: list[list[tuple]] = []  # per unit: (owner, name, is_param, pinned cpu tensor)
        self.on_gpu: dict[int, list[torch.Tensor]] = {}  # unit -> its GPU tensors while present
        self.ready: dict[int, torch.cuda.Event] = {}
        self.stream = None
        self.handles: list = []
        self.pinned: dict[tuple[int, str], torch.Tensor] = {}  # (id(owner), name) -> the one pinned copy

    def describe(self) -> str:
        how = "the next prefetched on a side CUDA stream" if self.use_stream else "one at a time"
        return f"streamed to {self.device} by groups of blocks ({len(self.units)} groups, {how})"

    # ------------------------------------------------------------------ stage boundaries
    def attach(self, module: nn.Module) -> None:
        """Put the parts outside the units on the device, the units' tensors in pinned CPU memory, and
        hook the units. Tensors added since the last stage (a LoRA side branch) are picked up here."""
        self.units = self.units_of(module)
        inside = {id(m) for unit in self.units for u in unit for m in u.modules()}
        for owner in module.modules():
            if id(owner) not in inside:
                for name, t, is_param in _tensors(owner):
                    _swap(owner, name, t, t.detach().to(self.device), is_param)
        self.slots = []
        for unit in self.units:
            slots = []
            for u in unit:
                for owner, name, t, is_param in _direct(u):
                    key = (id(owner), name)
                    cpu = self.pinned.get(key)
                    if cpu is None or not _same(t, cpu):
                        cpu = self.pinned[key] = _pinned(t)
                    _swap(owner, name, t, cpu, is_param)
                    slots.append((owner, name, is_param, cpu))
            self.slots.append(slots)
        if self.use_stream and self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device)
        for i, unit in enumerate(self.units):
            self.handles.append(unit[0].register_forward_pre_hook(self._pre_hook(i)))
            self.handles.append(unit[-1].register_forward_hook(self._post_hook(i)))

    def detach(self, module: nn.Module) -> None:
        """Unhook, drop every GPU copy, and put the whole module on the CPU (the units' pinned copies)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        for i in list(self.on_gpu):
            self._offload(i)
        self.ready.clear()
        inside = {id(owner) for slots in self.slots for owner, *_ in slots}
        for owner in module.modules():
            if id(owner) not in inside:
                for name, t, is_param in _tensors(owner):
                    _swap(owner, name, t, t.detach().to("cpu"), is_param)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ per unit
    def _onload(self, i: int, stream) -> None:
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        gpu = []
        with ctx:
            for owner, name, is_param, cpu in self.slots[i]:
                g = cpu.to(self.device, non_blocking=stream is not None)
                _swap(owner, name, getattr(owner, name), g, is_param)
                gpu.append(g)
            if stream is not None:
                ev = torch.cuda.Event()
                ev.record(stream)
                self.ready[i] = ev
        self.on_gpu[i] = gpu

    def _offload(self, i: int) -> None:
        for owner, name, is_param, cpu in self.slots[i]:
            _swap(owner, name, getattr(owner, name), cpu, is_param)
        self.on_gpu.pop(i, None)
        self.ready.pop(i, None)

    def _pre_hook(self, i: int):
        def hook(module, args):
            if i not in self.on_gpu:
                self._onload(i, None)
            elif i in self.ready:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(self.ready.pop(i))
                for g in self.on_gpu[i]:
                    g.record_stream(compute)  # made on the side stream, used here: freed only after this work
            n = len(self.units)
            nxt = (i + 1) % n
            if self.stream is not None and nxt != i and nxt not in self.on_gpu:
                self._onload(nxt, self.stream)  # the next unit's copy overlaps this unit's compute
            return None
        return hook

    def _post_hook(self, i: int):
        def hook(module, args, out):
            self._offload(i)
            return None
        return hook


def _swap(owner: nn.Module, name: str, current: torch.Tensor, new: torch.Tensor, is_param: bool) -> None:
    if is_param:
        try:
            current.data = new  # the Parameter object stays: only its data changes device
            return
        except RuntimeError:  # a quantized tensor subclass whose data cannot be swapped in place
            new = nn.Parameter(new, requires_grad=False)
    setattr(owner, name, new)


def _same(t: torch.Tensor, cpu: torch.Tensor) -> bool:
    """Whether ``t`` still holds the pinned copy ``cpu`` (so it need not be pinned again)."""
    if t is cpu:
        return True
    try:
        return t.device.type == "cpu" and t.data_ptr() == cpu.data_ptr()
    except RuntimeError:  # a wrapper tensor subclass has no storage of its own
        return False
