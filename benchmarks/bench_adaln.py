"""Benchmark: fused adaptive LayerNorm (cogvx.kernels.adaln) at the real CogVideoX shapes.

Providers: ours (Triton kernel), torch (eager reference), compile (torch.compile of the reference).
Variants: "norm" (norm1: LN + modulation) and "residual+norm" (norm2: gated residual add, LN,
modulation). Memory-bound, so the figure of merit is GB/s (bytes read + written) against the
device's measured copy bandwidth.

    python benchmarks/bench_adaln.py [--dtype bfloat16] [--batch 2]

Needs a CUDA device; writes benchmarks/results/adaln-<device>-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time

import torch

from _util import REPO, copy_bandwidth_gbps, git_commit, write_results  # noqa: E402  (benchmarks/ is sys.path[0])
N_TEXT, N_VIDEO = 226, 17_550  # 720x480, 49 frames: 13 x 30 x 45 latent patches
MODELS = {"2b": 1920, "5b": 3072}  # model -> hidden size D


def make_inputs(B: int, D: int, dtype: torch.dtype, residual: bool) -> dict:
    S = N_TEXT + N_VIDEO
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*shape, s=1.0):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32).mul_(s).to(dtype)

    return {
        "x": r(B, S, D),
        "delta": r(B, S, D) if residual else None,
        "gate": r(B, 2, D, s=0.1) if residual else None,
        "weight": r(D, s=0.1) + 1,
        "bias": r(D, s=0.1),
        "shift": r(B, 2, D, s=0.1),
        "scale": r(B, 2, D, s=0.1),
    }


def bytes_moved(inp: dict) -> int:
    """Bytes a perfect fused kernel moves: every input read once, x_new (with delta) and y written once."""
    read = sum(t.numel() * t.element_size() for t in inp.values() if t is not None)
    x = inp["x"]
    written = x.numel() * x.element_size() * (2 if inp["delta"] is not None else 1)
    return read + written


def bench_case(model: str, D: int, variant: str, args, copy_gbps: float) -> list[dict]:
    """Time the three providers on one (model, variant); prints a table row per provider."""
    from cogvx.kernels.adaln import adaln_reference, adaptive_layernorm
    from triton.testing import do_bench

    inp = make_inputs(args.batch, D, getattr(torch, args.dtype), residual=variant != "norm")
    nbytes = bytes_moved(inp)

    def ref(x, delta, gate, weight, bias, shift, scale):
        return adaln_reference(x, delta, gate, weight, bias, shift, scale, N_TEXT)

    t0 = time.perf_counter()
    compiled = torch.compile(ref, fullgraph=True, dynamic=False)
    compiled(**inp)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    providers = {
        "ours": lambda: adaptive_layernorm(**inp, n_text=N_TEXT, backend="triton"),
        "torch": lambda: ref(**inp),
        "compile": lambda: compiled(**inp),
    }
    # Agreement check before timing: the kernel (fp32 math) against the reference run in fp32.
    ours = providers["ours"]()
    want = ref(**{k: v.float() if v is not None else None for k, v in inp.items()})
    max_err = max((a.float() - b).abs().max().item() for a, b in zip(ours, want))
    rows = []
    for name, fn in providers.items():
        ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
        gbps = nbytes / (ms * 1e-3) / 1e9
        print(f"{model:>5} {variant:>14} {name:>8} {ms:10.3f} {gbps:8.0f} {100 * gbps / copy_gbps:6.0f}%")
        rows.append({
            "model": model, "variant": variant, "provider": name, "median_ms": ms, "GBps": gbps,
            "bytes_moved": nbytes, "shape": {"B": args.batch, "S": N_TEXT + N_VIDEO, "D": D, "n_text": N_TEXT},
            "compile_s": compile_s if name == "compile" else None,
            "max_abs_err_vs_fp32_reference": max_err if name == "ours" else None,
        })  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batch", type=int, default=2, help="2 = classifier-free guidance (uncond + cond)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_adaln needs a CUDA device (none found); nothing was measured.")
        return 0
    import triton

    device = torch.cuda.get_device_name()
    copy_gbps = copy_bandwidth_gbps()
    commit, dirty = git_commit()
    print(f"adaln | {device} | {args.dtype} | B={args.batch} S={N_TEXT}+{N_VIDEO} | commit {commit}"
          f"{' (dirty)' if dirty else ''} | device copy bandwidth {copy_gbps:.0f} GB/s")
    print(f"{'model':>5} {'variant':>14} {'provider':>8} {'median ms':>10} {'GB/s':>8} {'% copy':>7}")
    rows = []
    for model, D in MODELS.items():
        for variant in ("norm", "residual+norm"):
            rows += bench_case(model, D, variant, args, copy_gbps)
    path = write_results("adaln", {
        "benchmark": "adaln", "device": device, "dtype": args.dtype, "commit": commit, "dirty": dirty,
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(), "copy_bandwidth_GBps": copy_gbps,
        "timing": "triton.testing.do_bench median, warmup 25 ms, rep 200 ms", "results": rows,
    })  # fmt: skip
    print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
