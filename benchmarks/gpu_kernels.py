"""The kernel rows of benchmarks/gpu_check.py: each Triton kernel against what it replaces, at the
CogVideoX-2b and -5b shapes (batch 2 for CFG, 226 text + 17,550 video tokens, head dim 64).

    adaln         ours (Triton) vs torch (the PyTorch reference, eager)
    qk_norm_rope  ours vs torch
    attention     sdpa-flash / sdpa-cudnn / sdpa-efficient (SDPA's backends, on rotated q, k),
                  rope-flash (Triton, rotating its own tiles), int8 (the 8-bit attention, its
                  quantization included), int8 rows also give the SQNR against fp32 SDPA on 2 heads

First the device's ceilings (a copy's GB/s, bf16 and int8 matrix products' TFLOP/s at 8192^3).
GPU times: ``triton.testing.do_bench`` medians (ms, CUDA events, warm-up 25 ms, 100 ms of repeats).
On a CPU (``smoke=True``) the same rows run at a tiny stand-in shape with a wall-clock median of 3
calls, PyTorch paths only: it checks the plumbing, and its times mean nothing.
"""

from __future__ import annotations

import statistics
import time
import traceback

import torch
import torch.nn.functional as F

N_TEXT, N_VIDEO, HEAD_DIM, BATCH = 226, 17_550, 64, 2
MODELS = {"2b": (30, False), "5b": (48, True)}  # heads, RoPE
SMOKE_SHAPE = dict(n_text=5, n_video=35, batch=1, heads=2)


def _timer(cuda: bool):
    if cuda:
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def wall_ms(fn):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return wall_ms


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def cases(model: str, smoke: bool, device: str, dtype: torch.dtype):
    """(kernel, provider, callable, extra) rows of one model; inputs built once, on ``device``."""
    from cogvx.kernels.adaln import adaln_reference, adaptive_layernorm
    from cogvx.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference
    from cogvx.kernels.rope_flash_attention import rope_attention
    from cogvx.kernels.sage_attention import attend_quantized_launch, quantize_qk, sage_attention

    heads, rope = MODELS[model]
    n_text, n_video, B = (SMOKE_SHAPE["n_text"], SMOKE_SHAPE["n_video"], SMOKE_SHAPE["batch"]) if smoke else \
        (N_TEXT, N_VIDEO, BATCH)  # fmt: skip
    heads = SMOKE_SHAPE["heads"] if smoke else heads
    S, Dh, D = n_text + n_video, HEAD_DIM, heads * HEAD_DIM
    g = torch.Generator(device=device).manual_seed(0)

    def r(*shape, s=1.0):
        return torch.randn(*shape, generator=g, device=device).mul_(s).to(dtype)

    backend = "torch" if smoke else "triton"
    x, delta, gate = r(B, S, D), r(B, S, D), r(B, 2, D, s=0.1)
    w, b, shift, scale = r(D, s=0.1) + 1, r(D, s=0.1), r(B, 2, D, s=0.1), r(B, 2, D, s=0.1)
    ln = (x, delta, gate, w, b, shift, scale, n_text)
    yield "adaln", "ours", lambda: adaptive_layernorm(*ln, backend=backend), {}
    yield "adaln", "torch", lambda: adaln_reference(*ln), {}

    q, k, v = r(B, S, 3 * D).view(B, S, 3, heads, Dh).unbind(2)  # views of one fused projection
    norms = [r(Dh, s=0.2) + 1, r(Dh, s=0.2), r(Dh, s=0.2) + 1, r(Dh, s=2.0)]
    theta = torch.rand(n_video, Dh // 2, generator=g, device=device).mul_(6.3).repeat_interleave(2, -1)
    cos, sin = (theta.cos(), theta.sin()) if rope else (None, None)
    yield "qk_norm_rope", "ours", lambda: qk_norm_rope(q, k, *norms, cos, sin, n_text, backend=backend), {}
    yield "qk_norm_rope", "torch", lambda: qk_norm_rope_reference(q, k, *norms, cos, sin, n_text), {}

    qr, kr = qk_norm_rope_reference(q, k, *norms, cos, sin, n_text)  # rotated
    qn, kn = qk_norm_rope_reference(q, k, *norms, None, None, n_text)  # normalized only
    vt = v.transpose(1, 2)
    flops = {"flops": 4 * B * heads * S * S * Dh}
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION") if not smoke else ("MATH",):
        yield "attention", f"sdpa-{name.split('_')[0].lower()}", (lambda f=_sdpa(name): f(qr, kr, vt)), flops
    yield "attention", "rope-flash", lambda: rope_attention(qn, kn, vt, cos, sin, n_text, backend=backend), flops
    sub = (slice(0, 1), slice(0, 2))  # 1 x 2 heads: the fp32 reference stays small at the real length
    want = F.scaled_dot_product_attention(*(t[sub].float() for t in (qr, kr, vt)))
    got = sage_attention(qr[sub], kr[sub], vt[sub], backend=backend).float()
    sqnr = 10 * torch.log10(want.pow(2).sum() / (got - want).pow(2).sum()).item()
    yield "attention", "int8", lambda: sage_attention(qr, kr, vt, backend=backend), dict(flops, sqnr_db_vs_fp32=sqnr)
    if not smoke:  # its two parts: the quantization of q and k, the attention kernel on the codes
        codes, out = quantize_qk(qr, kr), torch.empty_like(vt, memory_format=torch.contiguous_format)
        yield "attention", "int8: quantize", lambda: quantize_qk(qr, kr), {}
        yield "attention", "int8: attend", lambda: attend_quantized_launch(*codes, vt, out), flops


def ceilings(device: str, smoke: bool):
    """(kernel, provider, callable, extra) rows of the device's two ceilings (METHOD.md): a device copy
    (bytes read + written) and large matrix products in bf16 and int8 (``torch._int_mm``)."""
    n = 256 if smoke else 8192
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, generator=g, device=device).to(torch.bfloat16)
    src = torch.randn(n * n * 8 // (64 if smoke else 1), generator=g, device=device)  # 2 GiB of fp32 on a GPU
    dst = torch.empty_like(src)
    a8, b8 = (torch.randint(-127, 128, (n, n), generator=g, device=device, dtype=torch.int8) for _ in range(2))
    yield "ceiling", "copy", lambda: dst.copy_(src), {"bytes": 2 * src.numel() * src.element_size()}
    yield "ceiling", "matmul-bf16", lambda: a @ b, {"flops": 2 * n**3}
    if not smoke:  # torch._int_mm is CUDA-only for these sizes on some builds
        yield "ceiling", "matmul-int8", lambda: torch._int_mm(a8, b8), {"flops": 2 * n**3}


def run(models, smoke: bool, deadline: float, on_row) -> None:
    """Time every row of ``models`` until ``deadline`` (time.monotonic()); ``on_row(row)`` after each
    row (rows that could not run carry "error", rows past the deadline "skipped")."""
    cuda = torch.cuda.is_available() and not smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    timer = _timer(cuda)
    for model in ["device", *models]:
        shape = SMOKE_SHAPE if smoke else dict(n_text=N_TEXT, n_video=N_VIDEO, batch=BATCH, heads=MODELS[model][0])
        base = dict(model=model, dtype=str(dtype).removeprefix("torch."), device=device, shape=shape)
        try:
            rows = ceilings(device, smoke) if model == "device" else cases(model, smoke, device, dtype)
            for kernel, provider, fn, extra in rows:
                row = dict(base, kernel=kernel, provider=provider, **extra)
                if time.monotonic() > deadline:
                    on_row(dict(row, skipped="time budget spent"))
                    continue
                try:
                    row["median_ms"] = timer(fn)
                    if "flops" in row:
                        row["TFLOPs"] = row["flops"] / (row["median_ms"] * 1e-3) / 1e12
                    if "bytes" in row:
                        row["GBps"] = row["bytes"] / (row["median_ms"] * 1e-3) / 1e9
                except Exception as e:  # e.g. a backend that does not take this shape: the row says why
                    row["error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
                on_row(row)
        except Exception as e:  # the inputs (out of memory, a failed import): one row for the model
            error = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-800:]}"
            on_row(dict(base, kernel="*", provider="*", error=error))
        if cuda:
            torch.cuda.empty_cache()


def markdown(rows: list[dict]) -> list[str]:
    """Table lines: every row, with its time against the first provider of its (model, kernel)."""
    lines = ["| model | kernel | provider | median ms | vs first | TFLOP/s | note |", "|---|---|---|---|---|---|---|"]
    first: dict = {}
    for r in rows:
        key = (r["model"], r["kernel"])
        ms = r.get("median_ms")
        if ms is not None:
            first.setdefault(key, ms)
        ratio = f"{ms / first[key]:.2f}x" if ms is not None and r["kernel"] != "ceiling" else "-"
        note = r.get("error") or r.get("skipped") or (f"SQNR {r['sqnr_db_vs_fp32']:.1f} dB vs fp32 SDPA"
                                                      if "sqnr_db_vs_fp32" in r else "")  # fmt: skip
        if r.get("GBps"):
            note = f"{r['GBps']:.0f} GB/s (read + written)"
        tf = f"{r['TFLOPs']:.0f}" if r.get("TFLOPs") else "-"
        lines.append(f"| {r['model']} | {r['kernel']} | {r['provider']} | {ms:.3f} | {ratio} | {tf} | "
                     f"{note.splitlines()[0] if note else ''} |" if ms is not None else
                     f"| {r['model']} | {r['kernel']} | {r['provider']} | - | - | - | {note.splitlines()[0]} |")
    return lines
