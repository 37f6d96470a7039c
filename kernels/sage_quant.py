"""Per-token int8 quantization of q or k for the 8-bit attention (``sage_attention.py``), with the
SageAttention smoothing of k: k minus its mean over the tokens of its head.

Subtracting one vector m from every key changes each query's scores by the same amount q.m, which
softmax ignores; it removes the offset the keys share (CogVideoX's key LayerNorm bias, rotated by RoPE
on the video rows), so the int8 grid spends its 255 steps on what varies between keys.

Numerics, per row r (one token of one head), in fp32: ``y = x - m`` (m = 0 for q), ``amax =
max(max|y|, 1e-20)``, ``code = trunc(y * (127 / amax) + copysign(0.5, y))`` (round half away from
zero; |code| <= 127), ``scale = amax / 127 * mult``, so ``x - m ~= code * scale / mult``. ``mult``
folds the softmax scale and log2(e) into q's scales, leaving the attention kernel one product per
score. ``quantize_rows_reference`` is the same arithmetic in PyTorch.
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, device_of, is_interpreted, jit, next_pow2, tl

if HAS_TRITON:
    import triton

__all__ = ["quantize_rows", "quantize_rows_reference", "smoothing_mean"]

_TINY = 1e-20  # an all-zero row quantizes to zeros with a finite scale


def smoothing_mean(k: torch.Tensor) -> torch.Tensor:
    """k [B, H, S, Dh] -> its mean over the tokens, [B, H, 1, Dh] fp32 (accumulated in fp32)."""
    return k.mean(dim=2, keepdim=True, dtype=torch.float32)


def quantize_rows_reference(x: torch.Tensor, mean: torch.Tensor | None, mult: float):
    """x [B, H, S, Dh] (any float dtype), mean [B, H, 1, Dh] fp32 or None -> (codes int8 [B, H, S, Dh],
    scales fp32 [B, H, S]); the kernel's arithmetic in fp32 (see the module docstring)."""
    y = x.float() - mean if mean is not None else x.float()
    amax = y.abs().amax(dim=-1).clamp_min(_TINY)
    z = y * (127.0 / amax)[..., None]
    codes = torch.trunc(z + torch.where(z >= 0, 0.5, -0.5)).to(torch.int8)
    return codes, amax / 127.0 * mult


@jit
def _sage_quant_kernel(
    x_ptr,  # [B, H, S, HEAD_DIM] fp32/fp16/bf16, any strides
    mean_ptr,  # [B * H, HEAD_DIM] fp32 contiguous: the smoothing mean (read when SMOOTH)
    codes_ptr,  # [B, H, S, HEAD_DIM] int8 contiguous output
    scale_ptr,  # [B, H, S] fp32 contiguous output
    S, H, mult,
    sxb, sxh, sxs, sxd,
    SMOOTH: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, HEAD_DIM)
    rmask = rows < S
    x = tl.load(x_ptr + b * sxb + h * sxh + rows[:, None] * sxs + cols[None, :] * sxd, mask=rmask[:, None],
                other=0.0).to(tl.float32)  # fmt: skip
    if SMOOTH:
        x = x - tl.load(mean_ptr + bh.to(tl.int64) * HEAD_DIM + cols)[None, :]
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-20)
    z = x * (127.0 / amax)[:, None]
    codes = (z + tl.where(z >= 0, 0.5, -0.5)).to(tl.int32).to(tl.int8)  # fp -> int truncates toward zero
    base = bh.to(tl.int64) * S
    tl.store(codes_ptr + (base + rows)[:, None] * HEAD_DIM + cols[None, :], codes, mask=rmask[:, None])
    tl.store(scale_ptr + base + rows, amax / 127.0 * mult, mask=rmask)


def launch_plan(x, mean, mult, codes, scales, interpreted):
    """(grid, arguments, meta-parameters) of the kernel, as the launcher passes them (the AOT check
    compiles exactly this). x [B, H, S, Dh]; mean [B, H, 1, Dh] fp32 contiguous or None."""
    B, H, S, Dh = x.shape
    # One row per thread's worth of registers on a GPU; the interpreter wants many rows per program.
    block_s = min(next_pow2(S), 2**15 // Dh) if interpreted else 64
    args = (x, mean, codes, scales, S, H, float(mult), *x.stride())
    meta = dict(SMOOTH=mean is not None, BLOCK_S=block_s, HEAD_DIM=Dh, num_warps=1 if interpreted else 4)
    return (triton.cdiv(S, block_s), B * H), args, meta


def quantize_rows(x: torch.Tensor, mean: torch.Tensor | None, mult: float):
    """The kernel: x [B, H, S, Dh] (Dh a power of two), mean [B, H, 1, Dh] fp32 or None ->
    (codes int8 [B, H, S, Dh] contiguous, scales fp32 [B, H, S]). Callers check the inputs
    (``sage_attention``); the reference is ``quantize_rows_reference``."""
    B, H, S, Dh = x.shape
    codes = torch.empty((B, H, S, Dh), dtype=torch.int8, device=x.device)
    scales = torch.empty((B, H, S), dtype=torch.float32, device=x.device)
    if codes.numel() == 0:
        return codes, scales
    mean = mean.contiguous() if mean is not None else None
    grid, args, meta = launch_plan(x, mean, mult, codes, scales, is_interpreted(_sage_quant_kernel))
    with device_of(x):
        _sage_quant_kernel[grid](*args, **meta)
    return codes, scales
