"""Benchmark: QK-norm + RoPE + layout kernel and the RoPE flash attention (cogvx.kernels.qk_norm_rope,
cogvx.kernels.rope_flash_attention)
at the real CogVideoX shapes.

qk_norm_rope (memory-bound, GB/s): ours (Triton) vs torch (eager reference) vs compile (torch.compile
of the reference); q, k are views into one fused qkv projection output, as in the engine.
attention (compute-bound, TFLOP/s = 4*B*H*S*S*Dh / time): ours (Triton flash attention rotating its
own Q/K tiles) vs torch (eager RoPE + SDPA) vs compile (compiled RoPE + SDPA) vs sdpa (SDPA alone on
already-rotated q, k: what attention costs when qk_norm_rope has done the RoPE). 2b has no RoPE.

    python benchmarks/bench_rope_attention.py [--dtype bfloat16] [--batch 2]

Needs a CUDA device; writes benchmarks/results/rope_attention-<device>-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import json
import datetime
import platform
import sys
import time

import torch
import torch.nn.functional as F

from _util import REPO, copy_bandwidth_gbps, git_commit, write_results  # noqa: E402  (benchmarks/ is sys.path[0])
N_TEXT, N_VIDEO = 226, 17_550  # 720x480, 49 frames: 13 x 30 x 45 latent patches
HEAD_DIM = 64
MODELS = {"2b": (30, False), "5b": (48, True)}  # model -> (heads, has RoPE)


def rope_tables(n_video: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [n_video, 64] tables with the interleaved-pair structure (the values do not affect timing)."""
    g = torch.Generator(device="cuda").manual_seed(1)
    theta = torch.rand(n_video, HEAD_DIM // 2, generator=g, device="cuda").mul_(6.3).repeat_interleave(2, -1)
    return theta.cos(), theta.sin()


def compiled(fn):
    """torch.compile(fn) plus a callable that compiles it on given inputs and returns the seconds spent."""
    c = torch.compile(fn, fullgraph=True, dynamic=False)

    def warm(*args):
        t0 = time.perf_counter()
        c(*args)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    return c, warm


class Recorder:
    """Times a callable with do_bench (median), prints one table row, keeps a JSON row."""

    def __init__(self, copy_gbps: float):
        self.copy_gbps, self.rows = copy_gbps, []

    def __call__(self, model, kernel, provider, fn, shape, nbytes=None, flops=None, rep=200, **extra):
        from triton.testing import do_bench

        ms = do_bench(fn, warmup=25, rep=rep, return_mode="median")
        gbps = nbytes / (ms * 1e-3) / 1e9 if nbytes else None
        tflops = flops / (ms * 1e-3) / 1e12 if flops else None
        bw = f"{gbps:8.0f} {100 * gbps / self.copy_gbps:6.0f}%" if gbps else f"{'-':>8} {'-':>7}"
        tf = f"{tflops:8.1f}" if tflops else f"{'-':>8}"
        print(f"{model:>5} {kernel:>13} {provider:>8} {ms:10.3f} {bw} {tf}")
        self.rows.append({
            "model": model, "kernel": kernel, "provider": provider, "median_ms": ms, "GBps": gbps,
            "TFLOPs": tflops, "bytes_moved": nbytes, "flops": flops, "shape": shape, **extra,
        })  # fmt: skip


def bench_model(model: str, H: int, has_rope: bool, dtype: torch.dtype, B: int, record: Recorder) -> None:
    from cogvx.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference
    from cogvx.kernels.rope_flash_attention import rope_attention, rope_flash_attention_reference

    S, Dh, es = N_TEXT + N_VIDEO, HEAD_DIM, torch.finfo(dtype).bits // 8
    shape = {"B": B, "S": S, "n_text": N_TEXT, "H": H, "Dh": Dh, "rope": has_rope}
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(B, S, 3 * H * Dh, generator=g, device="cuda", dtype=dtype)
    q, k, v = qkv.view(B, S, 3, H, Dh).unbind(2)  # strided views, as the engine's fused projection
    norms = [torch.randn(Dh, generator=g, device="cuda", dtype=dtype) for _ in range(4)]
    cos, sin = rope_tables(N_VIDEO) if has_rope else (None, None)

    # --- qk_norm_rope: read q, k (+ LN affine, RoPE tables), write q, k as [B, H, S, Dh]
    nbytes = 4 * B * S * H * Dh * es + 4 * Dh * es + (2 * N_VIDEO * Dh * 4 if has_rope else 0)

    def qk_ref(q, k, cos, sin):
        return qk_norm_rope_reference(q, k, *norms, cos, sin, N_TEXT)

    qk_c, warm = compiled(qk_ref)
    compile_s = warm(q, k, cos, sin)
    record(model, "qk_norm_rope", "ours", lambda: qk_norm_rope(q, k, *norms, cos, sin, N_TEXT, backend="triton"),
           shape, nbytes)
    record(model, "qk_norm_rope", "torch", lambda: qk_ref(q, k, cos, sin), shape, nbytes)
    record(model, "qk_norm_rope", "compile", lambda: qk_c(q, k, cos, sin), shape, nbytes, compile_s=compile_s)

    # --- attention on normalized q, k: ours and the references rotate them, sdpa gets them rotated
    qn, kn = qk_norm_rope(q, k, *norms, None, None, N_TEXT, backend="triton")
    qr, kr = qk_norm_rope(q, k, *norms, cos, sin, N_TEXT, backend="triton")
    vt = v.transpose(1, 2)
    flops = 4 * B * H * S * S * Dh
    attn_c, warm = compiled(rope_flash_attention_reference)
    compile_s = warm(qn, kn, vt, cos, sin, N_TEXT)
    ours = rope_attention(qn, kn, vt, cos, sin, N_TEXT, backend="triton")  # also runs the autotuner
    want = rope_flash_attention_reference(qn.float(), kn.float(), vt.float(), cos, sin, N_TEXT)
    max_err = (ours.float() - want).abs().max().item()
    del ours, want
    record(model, "attention", "ours", lambda: rope_attention(qn, kn, vt, cos, sin, N_TEXT, backend="triton"),
           shape, flops=flops, rep=500, max_abs_err_vs_fp32_reference=max_err)
    if has_rope:  # without RoPE the eager reference is exactly SDPA, measured below
        record(model, "attention", "torch", lambda: rope_flash_attention_reference(qn, kn, vt, cos, sin, N_TEXT),
               shape, flops=flops, rep=500)
    record(model, "attention", "compile", lambda: attn_c(qn, kn, vt, cos, sin, N_TEXT), shape, flops=flops,
           rep=500, compile_s=compile_s)
    record(model, "attention", "sdpa", lambda: F.scaled_dot_product_attention(qr, kr, vt), shape, flops=flops,
           rep=500)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=2, help="2 = classifier-free guidance (uncond + cond)")
    parser.add_argument("--record", action="store_true",
                        help="write the faster attention path per shape to kernels/attention_choice.json, "
                             "which Engine.load(kernels='auto') reads")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_rope_attention needs a CUDA device (none found); nothing was measured.")
        return 0
    import triton

    device = torch.cuda.get_device_name()
    copy_gbps = copy_bandwidth_gbps()
    commit, dirty = git_commit()
    print(f"rope_attention | {device} | {args.dtype} | B={args.batch} S={N_TEXT}+{N_VIDEO} Dh={HEAD_DIM} | "
          f"commit {commit}{' (dirty)' if dirty else ''} | device copy bandwidth {copy_gbps:.0f} GB/s")
    print(f"{'model':>5} {'kernel':>13} {'provider':>8} {'median ms':>10} {'GB/s':>8} {'% copy':>7} {'TFLOP/s':>8}")
    record = Recorder(copy_gbps)
    for model, (H, has_rope) in MODELS.items():
        bench_model(model, H, has_rope, getattr(torch, args.dtype), args.batch, record)
        torch.cuda.empty_cache()
    path = write_results("rope_attention", {
        "benchmark": "rope_attention", "device": device, "dtype": args.dtype, "commit": commit, "dirty": dirty,
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(), "copy_bandwidth_GBps": copy_gbps,
        "timing": "triton.testing.do_bench median; warmup 25 ms, rep 200 ms (qk_norm_rope) / 500 ms (attention)",
        "results": record.rows,
    })  # fmt: skip
    print(f"wrote {path.relative_to(REPO)}")
    if args.record:
        record_choice(device, getattr(torch, args.dtype), record.rows)
    return 0


def record_choice(device: str, dtype: torch.dtype, rows: list[dict]) -> None:
    """Per model shape: the flash path (QK-norm without RoPE + fused attention) against SDPA after the
    fused QK-norm + RoPE kernel; the faster one goes to kernels/attention_choice.json."""
    from cogvx.kernels.policy import CHOICE_FILE, shape_key

    def ms(model, kernel, provider):
        return next((r["median_ms"] for r in rows if (r["model"], r["kernel"], r["provider"]) ==
                     (model, kernel, provider)), None)

    table = json.loads(CHOICE_FILE.read_text()) if CHOICE_FILE.exists() else {}
    for model, (heads, _) in MODELS.items():
        flash, sdpa, qk = ms(model, "attention", "ours"), ms(model, "attention", "sdpa"), ms(model, "qk_norm_rope", "ours")
        if None in (flash, sdpa, qk):
            continue
        # The QK kernel runs on both paths (with or without rotation: same bytes), so attention decides.
        table.setdefault(device, {})[shape_key(heads, N_TEXT + N_VIDEO, dtype)] = "flash" if flash < sdpa else "sdpa"
    CHOICE_FILE.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    print(f"recorded attention choice in {CHOICE_FILE}")


if __name__ == "__main__":
    sys.exit(main())
