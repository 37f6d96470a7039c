"""Helpers shared by the benchmark scripts: the commit a figure belongs to, the device's copy
bandwidth, the CPU's model name, where results go, the SQNR of an output against its reference, the process's peak
resident size, and the run-in-a-child-process harness (one process per measurement, so peaks do
not mix)."""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from cogvx.engine.runtime.profiling import peak_rss  # noqa: F401  (re-exported: the one peak-RSS helper)
from cogvx.quantize.metrics import sqnr as sqnr_db  # noqa: F401  (re-exported: the one SQNR helper)

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


def write_report(name: str, result: dict, markdown, chart, out: Path | None = None) -> Path:
    """A benchmark's JSON, markdown (``markdown(result)``) and chart (``chart(result, png)``) side by side,
    named from result["meta"]'s device and commit; prints the markdown and the paths. Returns the stem."""
    m = result["meta"]
    stem = results_path(name, m["device_name"], m["commit"], suffix="", out=out)
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{stem}.md").write_text(markdown(result))
    chart(result, Path(f"{stem}.png"))
    print(markdown(result))
    print(f"wrote {stem}.json, .md, .png")
    return stem


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("?" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        return "?"


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Reset the peak resident size (VmHWM) to the current one (Linux; a no-op elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


RESULT_PREFIX = "RESULT "


def child_result(payload) -> None:
    """In a child: print the payload as the last line the parent reads (``run_child``)."""
    print(RESULT_PREFIX + json.dumps(payload), flush=True)


def run_child(script: str | Path, *args: str, env: dict | None = None, cwd: Path | None = None,
              timeout: float | None = None) -> dict:
    """Run ``python script --child args...`` in a fresh process and return the JSON it printed with
    ``child_result``; a failed child (or one over ``timeout`` seconds) raises RuntimeError with the end of
    its stderr."""
    cmd = [sys.executable, str(Path(script).resolve()), "--child", *args]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"child {' '.join(args)} timed out after {timeout:.0f} s") from None
    line = next((x for x in reversed(p.stdout.splitlines()) if x.startswith(RESULT_PREFIX)), None)
    if p.returncode or line is None:
        raise RuntimeError(f"child {' '.join(args)} failed (exit {p.returncode}):\n{(p.stderr or p.stdout)[-4000:]}")
    return json.loads(line[len(RESULT_PREFIX):])
