"""Helpers shared by the benchmark scripts: the commit a figure belongs to, the device's copy
bandwidth, and where results go."""

from __future__ import annotations

import datetime
import json
import re
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def git_commit() -> tuple[str, bool]:
    """Short commit of the working tree and whether tracked files have uncommitted changes."""
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True).strip()
        dirty = bool(subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                             text=True).strip())
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy on CUDA: (read + write) bytes / median time, in GB/s."""
    from triton.testing import do_bench

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e9


def results_path(name: str, device_name: str, commit: str, suffix: str = ".json", out: Path | None = None) -> Path:
    """<out or benchmarks/results>/<name>-<device>-<yyyymmdd>-<commit><suffix>."""
    device = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-")
    date = datetime.date.today().strftime("%Y%m%d")
    d = Path(out) if out is not None else RESULTS
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{name}-{device}-{date}-{commit}{suffix}"


def write_results(name: str, payload: dict) -> Path:
    """Write payload (which names its "device" and "commit") as JSON; returns the path."""
    path = results_path(name, payload["device"], payload["commit"])
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
