"""What a generate call cost: wall time per stage, compile time apart from run time, peak memory,
and achieved FLOP/s of the denoising steps from an analytic FLOP count of the transformer."""

from __future__ import annotations

import json
import statistics
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..models.config import TransformerConfig

__all__ = ["Profile", "transformer_flops", "block_flops", "PeakMemory", "StepClock", "peak_rss", "stage", "tracer",
           "export_trace"]


def transformer_flops(cfg: TransformerConfig, batch: int, n_text: int, n_video: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of one transformer forward on [batch, n_text + n_video] tokens.

    Counts the GEMMs (patch/text embedding, q/k/v/out projections, feed-forward, output head) and
    attention's two matmuls; elementwise work (norms, RoPE, GELU) is left out, as FLOP/s figures
    conventionally do.
    """
    d = cfg.inner_dim
    p, pt = cfg.patch_size, cfg.patch_size_t or 1
    patch_in = cfg.in_channels * p * p * pt
    total = cfg.num_layers * block_flops(cfg, 1, n_text, n_video)
    total += 2 * n_video * patch_in * d + 2 * n_text * cfg.text_embed_dim * d  # embeddings
    total += 2 * n_video * d * (p * p * pt * cfg.out_channels_)  # proj_out
    total += 2 * cfg.time_embed_dim * 2 * d  # output-norm modulation
    total += 2 * (d * cfg.time_embed_dim + cfg.time_embed_dim**2)  # timestep MLP
    if cfg.ofs_embed_dim:
        total += 2 * 2 * cfg.ofs_embed_dim**2
    return batch * total


def block_flops(cfg: TransformerConfig, batch: int, n_text: int, n_video: int) -> int:
    """FLOPs (2 per MAC) of one transformer block on [batch, n_text + n_video] tokens: what a step cache
    saves for each block it skips."""
    d, s = cfg.inner_dim, n_text + n_video
    per_block = 2 * s * d * (3 * d) + 2 * s * d * d  # q, k, v, out
    per_block += 2 * 2 * s * s * d  # Q K^T and P V over all heads
    per_block += 2 * s * d * (4 * d) * 2  # feed-forward up and down
    per_block += 2 * 2 * (cfg.time_embed_dim * 6 * d)  # two modulation linears (per sample, tiny)
    return batch * per_block


class PeakMemory:
    """Peak memory over a region: CUDA allocated/reserved (reset at start), or on the CPU the peak
    resident set size (Linux VmHWM, reset through /proc/self/clear_refs; else the process maximum)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.result: dict[str, int] = {}

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.result = {
                "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated(self.device),
                "cuda_peak_reserved_bytes": torch.cuda.max_memory_reserved(self.device),
            }
        else:
            self.result = {"cpu_peak_rss_bytes": peak_rss()}
        return False


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (since the last reset of VmHWM, on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Profile:
    """Per-stage wall seconds of one generate call, and what the denoising achieved.

    stages: prepare, tokenize, text_encode, encode (VAE encoding of image/video conditioning), compile
    (first call of a compiled shape), denoise (the loop), vae_decode, save (added by
    ``GenerationResult.save``, which also adds its time to ``total_seconds``). steps: seconds per
    denoising step. With a step cache: ``step_cache`` (its settings, and per step the indicator it
    compared with the threshold), ``steps_computed`` / ``steps_reused`` (indices of the steps run) and
    ``flops_saved`` (the skipped blocks' FLOPs, by the count of :func:`block_flops`).
    """

    stages: dict[str, float] = field(default_factory=dict)
    steps: list[float] = field(default_factory=list)
    total_seconds: float = 0.0
    memory: dict[str, int] = field(default_factory=dict)
    flops_per_step: int = 0
    device: str = ""
    dtype: str = ""
    shape: dict[str, int] = field(default_factory=dict)
    # Under Engine.load(parallel=...): mode, world, rank, degrees, this rank's collective seconds in the
    # loop (and how they were timed), and every rank's stage times ("ranks").
    parallel: dict = field(default_factory=dict)
    step_cache: dict = field(default_factory=dict)
    steps_computed: list[int] = field(default_factory=list)
    steps_reused: list[int] = field(default_factory=list)
    flops_saved: int = 0

    @property
    def step_median(self) -> float:
        return statistics.median(self.steps) if self.steps else 0.0

    @property
    def tflops(self) -> float:
        """Achieved TFLOP/s of the denoising steps (median step; with reused steps, the FLOPs actually
        run over the time of all steps)."""
        if self.flops_saved and self.steps:
            return (self.flops_per_step * len(self.steps) - self.flops_saved) / sum(self.steps) / 1e12
        return self.flops_per_step / self.step_median / 1e12 if self.step_median else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(step_median_seconds=self.step_median, achieved_tflops=self.tflops)
        return d

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def table(self) -> str:
        """A short human-readable table (what ``cogvx generate --profile`` prints)."""
        rows = [(k, f"{v:9.3f} s") for k, v in self.stages.items()]
        if self.steps:
            rows.append(("step (median)", f"{self.step_median:9.3f} s  x {len(self.steps)}"))
            rows.append(("achieved", f"{self.tflops * 1e3:9.1f} GFLOP/s ({self.flops_per_step / 1e9:.1f} GFLOP/step)"))
        if self.step_cache:
            n = len(self.steps_computed) + len(self.steps_reused)
            full = self.flops_per_step * n
            rows.append(("step cache", f"{self.step_cache['mode']} {self.step_cache['threshold']:g}: "
                                       f"{len(self.steps_reused)} of {n} steps reused, {self.flops_saved / 1e9:.1f} "
                                       f"GFLOP saved ({100 * self.flops_saved / full if full else 0:.0f} %)"))
            rows.append(("reused steps", ", ".join(map(str, self.steps_reused)) or "none"))
        rows.append(("total", f"{self.total_seconds:9.3f} s"))
        for k, v in self.memory.items():
            rows.append((k.replace("_bytes", ""), f"{v / 2**30:9.3f} GiB"))
        if self.parallel:
            p = self.parallel
            rows.append(("collectives", f"{p['collective_seconds']:9.3f} s  ({p['collective_timing']}, "
                                        f"{p['collective_calls']} calls, {p['collective_bytes'] / 2**20:.1f} MiB)"))
            for r in p.get("ranks", []):
                parts = ", ".join(f"{k} {v:.3f}" for k, v in r["stages"].items())
                rows.append((f"rank {r['rank']}", f"{parts}; step {r['step_median_seconds']:.3f}, collectives "
                                                  f"{r['collective_seconds']:.3f} s"))
        width = max(len(r[0]) for r in rows)
        head = f"profile ({self.device}, {self.dtype}, {self.shape})"
        if self.parallel:
            head += f", parallel {self.parallel['mode']} on {self.parallel['world']} ranks (this is rank " \
                    f"{self.parallel['rank']})"
        return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows])


@contextmanager
def stage(profile: Profile, name: str, device: torch.device):
    """Time a stage (synchronizing CUDA at both ends so the time is the device's, not the launch's)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        profile.stages[name] = profile.stages.get(name, 0.0) + time.perf_counter() - t0


class StepClock:
    """Per-step wall times without a host sync inside the loop: CUDA events, read once at the end."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def _mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def start(self) -> None:
        self.marks = [self._mark()]

    def tick(self) -> None:
        self.marks.append(self._mark())

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def tracer(device: torch.device):
    """A torch.profiler context recording CPU (and CUDA) activity, for a Chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=acts, record_shapes=False)


def export_trace(trace, path: Path) -> None:
    """Write the Chrome trace; a failure (torch's exporter itself fails silently) is a warning: a finished
    generation is never lost to its trace file."""
    try:
        trace.export_chrome_trace(str(path))
        written = path.is_file() and path.stat().st_size > 0
    except OSError:
        written = False
    if not written:
        warnings.warn(f"could not write the profile trace to {path}; the result is returned without it",
                      RuntimeWarning, stacklevel=4)
