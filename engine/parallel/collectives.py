"""The collectives of a parallel generate, through torch.distributed's functional collectives (traceable:
a compiled forward keeps them in its graph, no graph break), and the time they take.

Eager calls are timed where they happen (CUDA events, read after the loop, or the wall clock on the
CPU): the time includes waiting for the slowest rank, which is what a rank loses to the collective.
Inside a compiled graph nothing can be timed; :meth:`Comm.replay` times the same calls run on their
own (zeros of the same sizes) instead.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

__all__ = ["Comm", "Call", "agree_or_raise", "broadcast_int", "gather_floats", "raise_together", "bounded"]

# torch 2.13 renamed the all-gathers (the old names warn); older releases have only the old ones.
_gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class Call:
    """One collective of a forward: kind ("all_to_all" or "all_gather"), group name, element count sent,
    split sizes (elements; all_to_all only), dtype."""

    kind: str
    group: str
    numel: int
    out_sizes: tuple[int, ...] = ()
    in_sizes: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32


@contextlib.contextmanager
def bounded(what: str, timeout: float | None):
    """Turn a collective's timeout (gloo: "Timed out waiting ...ms"; NCCL's watchdog) into one clear error
    naming the wait, the bound and what to do."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if "timed out" not in text.lower() and "timeout" not in text.lower():
            raise
        rank = dist.get_rank() if dist.is_initialized() else "?"
        bound = f"{timeout:g} s, $COGVX_PARALLEL_TIMEOUT" if timeout is not None else "the process group's timeout"
        raise RuntimeError(f"{what}: rank {rank} waited longer than {bound} for the other ranks: one of them is "
                           "stalled (stopped, swapping, stuck on I/O) or gone. Stop every rank and start again; if a "
                           "rank is only slow, raise COGVX_PARALLEL_TIMEOUT") from e


class Comm:
    """Functional collectives plus the seconds, calls and bytes they cost this rank (eager calls only)."""

    def __init__(self, device: torch.device, timeout: float | None = None):
        self.device = device
        self.timeout = timeout
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.calls: list[Call] = []
        self.bytes = 0
        self._wall = 0.0
        self._events: list = []

    @property
    def seconds(self) -> float:
        """Seconds spent in the eager collectives since the last reset (syncs CUDA once)."""
        if self._events:
            torch.cuda.synchronize(self.device)
            self._wall += sum(a.elapsed_time(b) / 1e3 for a, b in self._events)
            self._events = []
        return self._wall

    def _run(self, call: Call, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        with bounded(f"a {call.kind} of the transformer forward", self.timeout):
            out = fn()
            if isinstance(out, fc.AsyncCollectiveTensor):
                out = out.wait()
        if self.cuda:
            end.record()
            self._events.append((start, end))
        else:
            self._wall += time.perf_counter() - t0
        self.calls.append(call)
        self.bytes += call.numel * call.dtype.itemsize
        return out

    def all_to_all(self, x: torch.Tensor, out_sizes: list[int], in_sizes: list[int], group: str) -> torch.Tensor:
        """1-D ``x`` cut into ``in_sizes`` pieces, piece j to rank j of ``group``; returns the pieces
        received from each rank (sizes ``out_sizes``), concatenated."""
        if torch.compiler.is_compiling():  # no timing inside a graph
            return fc.all_to_all_single(x, list(out_sizes), list(in_sizes), group)
        call = Call("all_to_all", group, x.numel(), tuple(out_sizes), tuple(in_sizes), x.dtype)
        return self._run(call, lambda: fc.all_to_all_single(x, list(out_sizes), list(in_sizes), group))

    def all_gather(self, x: torch.Tensor, group: str) -> torch.Tensor:
        """Every rank's ``x`` (same shape on each), concatenated along dim 0 in rank order."""
        if torch.compiler.is_compiling():
            return _gather(x.contiguous(), 0, group)
        call = Call("all_gather", group, x.numel(), dtype=x.dtype)
        return self._run(call, lambda: _gather(x.contiguous(), 0, group))

    def replay(self, calls: list[Call], repeats: int = 3) -> float:
        """Median seconds of ``calls`` run eagerly on zeros of their sizes (every rank must call this with
        the same list); what one forward's collectives cost when they cannot be timed in place."""
        saved = (self.calls, self.bytes, self._wall, self._events)
        times = []
        for _ in range(repeats):
            self.reset()
            for c in calls:
                x = torch.zeros(c.numel, dtype=c.dtype, device=self.device)
                if c.kind == "all_to_all":
                    self.all_to_all(x, list(c.out_sizes), list(c.in_sizes), c.group)
                else:
                    self.all_gather(x, c.group)
            times.append(self.seconds)
        self.calls, self.bytes, self._wall, self._events = saved
        return sorted(times)[len(times) // 2]


def _device_for(backend: str, device: torch.device) -> torch.device:
    return device if "nccl" in backend.lower() and device.type == "cuda" else torch.device("cpu")


def agree_or_raise(what: str, digests: dict[str, bytes], device: torch.device, group=None,
                   timeout: float | None = None) -> None:
    """All-gather each argument's digest; when ranks differ, raise on every rank naming the arguments
    that differ and the ranks that hold another value than rank 0. Call before any heavy work.
    ``group``: the process group (every rank; None: the default group), ``timeout`` its bound (for errors)."""
    names = sorted(digests)
    dev = _device_for(dist.get_backend(), device)
    mine = torch.tensor([list(digests[n]) for n in names], dtype=torch.uint8, device=dev)
    world = dist.get_world_size()
    every = torch.empty((world * mine.shape[0], mine.shape[1]), dtype=torch.uint8, device=dev)
    with bounded(what, timeout):
        _gather_into(every, mine, group=group)
    every = every.view(world, *mine.shape).cpu()
    bad = [(n, [r for r in range(1, world) if not torch.equal(every[r, i], every[0, i])])
           for i, n in enumerate(names)]
    bad = [(n, ranks) for n, ranks in bad if ranks]
    if bad:
        detail = "; ".join(f"{n} ({'ranks' if len(r) > 1 else 'rank'} {', '.join(map(str, r))} "
                           f"{'differ' if len(r) > 1 else 'differs'} from rank 0)" for n, r in bad)
        raise ValueError(f"the ranks of the process group disagree on the arguments of {what}: {detail}. Every rank "
                         "must pass the same arguments (same prompts, seed or generator state, sizes, inputs); "
                         "compute them once, or on rank 0 and broadcast them")


def raise_together(error: Exception | None, what: str, device: torch.device, limit: int = 1000, group=None,
                   timeout: float | None = None) -> None:
    """Raise on every rank when ``error`` is set on any: the failing ranks raise their own error, the
    others a ValueError quoting it (its first ``limit`` bytes travel in one all-gather of bytes)."""
    dev = _device_for(dist.get_backend(), device)
    msg = b"" if error is None else f"{type(error).__name__}: {error}".encode()[:limit]
    mine = torch.zeros(limit + 1, dtype=torch.uint8)
    mine[0] = error is not None
    mine[1 : 1 + len(msg)] = torch.frombuffer(bytearray(msg), dtype=torch.uint8) if msg else mine[1:1]
    every = torch.empty(dist.get_world_size() * (limit + 1), dtype=torch.uint8, device=dev)
    with bounded(what, timeout):
        _gather_into(every, mine.to(dev), group=group)
    rows = every.view(-1, limit + 1).cpu()
    if error is not None:
        raise error
    failed = [(r, bytes(row[1:].tolist()).rstrip(b"\0").decode(errors="replace")) for r, row in enumerate(rows)
              if row[0]]
    if failed:
        r, text = failed[0]
        raise ValueError(f"{what} failed on rank {r} of the process group, so it stops on every rank: {text}")


def broadcast_int(value: int, device: torch.device, group=None, timeout: float | None = None) -> int:
    """Rank 0's ``value`` on every rank (``group`` spans every rank, so its rank 0 is the global one)."""
    t = torch.tensor([value], dtype=torch.int64, device=_device_for(dist.get_backend(), device))
    with bounded("a broadcast from rank 0", timeout):
        dist.broadcast(t, src=0, group=group)
    return int(t.item())


def gather_floats(values: list[float], device: torch.device, group=None, timeout: float | None = None) -> list[list[float]]:
    """Every rank's ``values`` (the same length on each), in rank order."""
    dev = _device_for(dist.get_backend(), device)
    mine = torch.tensor(values, dtype=torch.float64, device=dev)
    every = torch.empty(dist.get_world_size() * len(values), dtype=torch.float64, device=dev)
    with bounded("the gather of every rank's timings", timeout):
        _gather_into(every, mine, group=group)
    return every.view(-1, len(values)).cpu().tolist()
