"""Which rank does what under a parallel mode, checked against the process group before any heavy work.

Ranks form a (CFG x Ulysses) grid: rank ``r`` runs CFG half ``r // U`` (0: the unconditional batch, 1:
the conditional one) and sequence shard ``r % U`` of its Ulysses group, the ``U`` consecutive ranks of
that half (consecutive ranks share a node first). ``"cfg"`` is 2 x 1, ``"ulysses"`` 1 x world,
``"cfg+ulysses"`` 2 x world/2.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["MODES", "Mesh", "check_mode", "make_mesh", "parallel_device", "init_from_env", "parallel_timeout",
           "TIMEOUT_ENV", "DEFAULT_TIMEOUT"]

MODES = ("cfg", "ulysses", "cfg+ulysses")
# How long a rank waits in one collective for the others before it fails (a rank that is stopped,
# swapping or stuck on I/O otherwise holds the rest forever). Generous by default: rank 0 decodes the
# video alone while the others wait for it at the next collective.
TIMEOUT_ENV = "COGVX_PARALLEL_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0

_HOW = ("launch one process per device with `torchrun --nproc-per-node N your_script.py` and call "
        "torch.distributed.init_process_group() (backend 'nccl' on CUDA, 'gloo' on the CPU) before Engine.load; "
        "`torchrun --nproc-per-node N -m cogvx.engine.cli generate --parallel MODE ...` does this itself")


@dataclass(frozen=True)
class Mesh:
    """This rank's place in a parallel generate.

    cfg: CFG degree (2: the two guidance halves run on different ranks; 1: each rank runs both).
    ulysses: sequence-parallel degree U (video tokens sharded over U ranks, heads split for attention).
    cfg_rank, seq_rank: this rank's half and shard. seq_group: the name of this rank's Ulysses process
    group (None when U == 1); world_group: the default group's name (the prediction all-gather).
    """

    mode: str
    world: int
    rank: int
    cfg: int
    ulysses: int
    cfg_rank: int
    seq_rank: int
    seq_group: str | None
    world_group: str
    backend: str
    device: torch.device
    group: object = None  # the process group of every cogvx collective (all ranks, ``timeout`` seconds)
    timeout: float = DEFAULT_TIMEOUT


def parallel_timeout() -> float:
    """Seconds a rank waits in a collective for the others: $COGVX_PARALLEL_TIMEOUT, else 1800."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None or text == "":
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds > 0 (got {text!r}); e.g. 600")
    return value


def check_mode(parallel) -> str | None:
    """None or one of MODES; anything else is a ValueError naming the accepted values."""
    if parallel is None or parallel in MODES:
        return parallel
    raise ValueError(f"parallel must be None, {', '.join(map(repr, MODES))} (got {parallel!r})")


def _degrees(mode: str, world: int) -> tuple[int, int]:
    """(CFG degree, Ulysses degree) of a mode on ``world`` processes; a ValueError when they do not fit."""
    if mode == "cfg":
        if world != 2:
            alt = f"; for {world} processes use parallel='cfg+ulysses' (2 x {world // 2})" if world % 2 == 0 else ""
            raise ValueError(f"parallel='cfg' runs the two halves of classifier-free guidance on 2 processes, but "
                             f"the process group has {world}{alt}; or launch 2 processes")
        return 2, 1
    if mode == "cfg+ulysses" and world % 2:
        raise ValueError(f"parallel='cfg+ulysses' needs an even world size (2 CFG halves x the Ulysses degree), "
                         f"but the process group has {world} processes; launch {world + 1 if world > 1 else 2} "
                         f"or {max(2, world - 1)}, or use parallel='ulysses'")
    return (2, world // 2) if mode == "cfg+ulysses" else (1, world)


def _check_backend(backend: str, device: torch.device) -> None:
    need = "nccl" if device.type == "cuda" else "gloo"
    if need not in backend.lower():
        raise ValueError(f"the process group uses the {backend!r} backend, but the engine runs on {device}: "
                         f"{device.type.upper()} tensors need '{need}' (init_process_group(backend='{need}'), or "
                         f"'cpu:gloo,cuda:nccl')")


def parallel_device(device, parallel) -> str | torch.device | None:
    """Under a parallel mode, 'cuda' without an index means this rank's GPU (LOCAL_RANK, as torchrun
    sets it, else the rank modulo the GPU count); anything else is left as given."""
    if parallel is None or not (dist.is_available() and dist.is_initialized()):
        return device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device) if isinstance(device, str) else device
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count()))
        return torch.device("cuda", local)
    return device


def make_mesh(parallel: str | None, device: torch.device) -> Mesh | None:
    """This rank's :class:`Mesh` (None without a parallel mode). Checks, on every rank alike and before
    anything is loaded: an initialized process group, a world size that fits the mode, a backend that
    serves the device. Creates the Ulysses groups (a collective call: every rank must get here)."""
    if check_mode(parallel) is None:
        return None
    if not dist.is_available():
        raise ValueError(f"parallel={parallel!r} needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise ValueError(f"parallel={parallel!r} needs an initialized torch.distributed process group, and none "
                         f"is: {_HOW}")
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg, uly = _degrees(parallel, world)
    _check_backend(dist.get_backend(), device)
    timeout = parallel_timeout()
    wait = datetime.timedelta(seconds=timeout)
    # A group of its own over every rank: the user's default group may wait 30 minutes or forever.
    everyone = dist.new_group(list(range(world)), timeout=wait)
    seq_group = None
    if uly > 1:
        for half in range(cfg):  # every rank creates every group, in the same order
            ranks = list(range(half * uly, (half + 1) * uly))
            group = dist.new_group(ranks, timeout=wait) if cfg > 1 else everyone
            if rank in ranks:
                seq_group = group.group_name
    return Mesh(mode=parallel, world=world, rank=rank, cfg=cfg, ulysses=uly, cfg_rank=rank // uly,
                seq_rank=rank % uly, seq_group=seq_group, world_group=everyone.group_name,
                backend=str(dist.get_backend()), device=device, group=everyone, timeout=timeout)


def init_from_env(device: str | None) -> bool:
    """Start the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...):
    NCCL for CUDA devices, gloo on the CPU. Returns False (and does nothing) outside torchrun."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return False
    if dist.is_initialized():
        return True
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=parallel_timeout()))
    return True
