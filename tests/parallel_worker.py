"""One rank of a multi-process test: ``python -P tests/parallel_worker.py JOB.json`` with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set (``spawn_ranks`` sets them). Starts a gloo process group, runs the job's
cases in order in that one group (one spawn serves many checks), and writes per case and rank
``<name>.rank<r>.safetensors`` (latents, and frames where this rank has them) and ``<name>.rank<r>.json``
(the error message if the case raised, the profile's parallel section, dynamo's counters)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

if not torch.cuda.is_available():  # as tests/conftest.py: before cogvx.kernels defines its kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

from safetensors.torch import save_file  # noqa: E402

from cogvx.engine import Engine  # noqa: E402
from cogvx.engine.parallel import raise_together  # noqa: E402
from cogvx.engine.runtime.compiling import dynamo_counts  # noqa: E402

TESTS = Path(__file__).resolve().parent


def test_image(height: int, width: int) -> np.ndarray:
    """A deterministic uint8 image [H, W, 3] (the first frame of the image-to-video cases)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), (x + y) % 256],
                    axis=-1).astype(np.uint8)


def generate_kwargs(case: dict) -> dict:
    kw = dict(case["generate"])
    if case.get("image"):
        kw["image"] = test_image(*case["image"])
    return kw


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(world: int, job: dict, out: Path, timeout: float, env: dict | None = None) -> list[str]:
    """Run ``world`` worker processes on the job; returns their outputs. A process that is still running
    after ``timeout`` seconds (a hang) is killed and fails the test."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.json").write_text(json.dumps(dict(job, out=str(out))))
    port = _free_port()
    procs = []
    for rank in range(world):
        e = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port), OMP_NUM_THREADS="1", **(env or {}))
        procs.append(subprocess.Popen([sys.executable, "-P", str(TESTS / "parallel_worker.py"), str(out / "job.json")],
                                      env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline, logs = time.monotonic() + timeout, []
    for rank, p in enumerate(procs):
        try:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"rank {rank} of {world} still running after {timeout:.0f} s (a hang?)") from None
    for rank, (p, log) in enumerate(zip(procs, logs)):
        if p.returncode != 0:
            raise AssertionError(f"rank {rank} exited with {p.returncode}:\n{log[-4000:]}")
    return logs


def _run_case(case: dict, rank: int, out: Path) -> None:
    over = case.get("rank_overrides", {}).get(str(rank), {})
    record: dict = dict(error=None)
    t0 = time.perf_counter()
    tensors = {}
    try:
        if case.get("kind") == "raise_together":  # a check that failed on one rank only
            raise_together(ValueError("no such file on this node") if rank == 1 else None, "the test", torch.device("cpu"))
        load = dict(case["load"], **over.get("load", {}))
        backend = load.pop("compile_backend", None)  # compile after loading, with this torch.compile backend
        mode = load.pop("compile", False) if backend is not None else None
        engine = Engine.load(over.get("ckpt", case["ckpt"]), **load)
        if backend is not None:
            engine.compile(mode, load.get("compile_cache_dir"), backend=backend)
        if case.get("tiling"):
            th, tw = case["tiling"]
            engine.vae.enable_tiling(tile_sample_min_height=th, tile_sample_min_width=tw)
        kw = dict(generate_kwargs(case), **over.get("generate", {}))
        _maybe_freeze(case, rank, kw)
        before = dynamo_counts()
        result = engine.generate(**kw)
        record["first"] = dynamo_counts()
        if case.get("repeat"):  # same shape again: must not compile again
            with torch._dynamo.config.patch(error_on_recompile=True):
                result = engine.generate(**kw)
        record.update(before=before, after=dynamo_counts(), parallel=result.profile.parallel,
                      stages=result.profile.stages, seed=result.seed, rank=result.rank,
                      saved=[str(p) for p in result.save(out / f"{case['name']}.rank{rank}.mp4")]
                      if case.get("save") else None)
        par = engine.parallel
        if par is not None and not load.get("compile"):  # what Comm.replay would run, against what ran
            shape, steps = result.profile.shape, len(result.profile.steps)
            want = par.net.calls(shape["batch"] // par.mesh.cfg, shape["text_tokens"], shape["video_tokens"],
                                 engine.dtype) * steps
            record["calls_as_replayed"] = par.comm.calls == want
        tensors["latents"] = result.latents.float().contiguous()
        if result.frames is not None:
            tensors["frames"] = torch.as_tensor(np.ascontiguousarray(result.frames))
    except (ValueError, RuntimeError, TypeError) as e:
        record["error"] = f"{type(e).__name__}: {e}"
    record["seconds"] = time.perf_counter() - t0
    if tensors:
        save_file(tensors, str(out / f"{case['name']}.rank{rank}.safetensors"))
    (out / f"{case['name']}.rank{rank}.json").write_text(json.dumps(record, default=str))


def _freeze(*_):
    os.kill(os.getpid(), signal.SIGSTOP)  # a stalled rank: alive, holding its sockets, answering nothing


def _maybe_freeze(case: dict, rank: int, kw: dict) -> None:
    """``"freeze": {"rank": r, "at": "generate" | "step"}``: rank r stops itself (SIGSTOP) before its
    generate call, or at the end of its first denoising step (every rank passes a callback, as the ranks
    must agree on whether one is given)."""
    spec = case.get("freeze")
    if not spec:
        return
    me = spec["rank"] == rank
    if spec["at"] == "step":
        kw["callback_on_step_end"] = lambda engine, step, t, d: _freeze() if me and step == 0 else None
    elif me:
        (Path(case["out"]) / f"frozen.rank{rank}").write_text(str(time.time()))
        _freeze()


def main(job_path: str) -> None:
    torch.set_num_threads(1)
    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    (out / f"started.rank{rank}").write_text(str(time.perf_counter()))
    try:
        for case in job["cases"]:
            _run_case(dict(case, out=str(out)), rank, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
