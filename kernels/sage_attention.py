"""8-bit attention for CUDA in the SageAttention manner: non-causal, unmasked attention with q k^T on
int8 tensor cores and p v in fp16 with fp32 accumulation.

q and k arrive normalized and rotated (the QK-norm + RoPE kernel's outputs). Then (``sage_quant.py``)
k is smoothed by its mean over the tokens, q and k are quantized to int8 per token, and the softmax
scale and log2(e) go into q's scales. The attention kernel computes exact int32 scores
``s = (q8 . k8) * q_scale * k_scale`` (log2 domain), an online softmax in fp32, and
``o += fp16(p) @ fp16(v)`` accumulated in fp32; the output is ``o / l`` in v's dtype.

``sage_attention_reference`` is the same numerics in plain PyTorch (float64 by default: the model the
kernel is tested against; float32 for the CPU path), block by block over the queries. The numerics
differ from bf16 attention, so the engine runs this only when a recipe asks for it
(``attention_kernel="int8-cuda"``).

QK-norm + RoPE stay in their own kernel (``qk_norm_rope``) rather than in the quantization pass: fusing
them would save one write and one read of q and k in bf16 per layer (about 0.9 GB at the 5b shape,
~0.2 ms at 4 TB/s) against an attention of 7.8 TFLOP (several ms): about 2 %, not yet worth a kernel.
"""

from __future__ import annotations

import math

import torch

from ._common import HAS_TRITON, device_of, is_interpreted, jit, tl, warn_once
from .policy import use_triton
from .sage_quant import quantize_rows, quantize_rows_reference, smoothing_mean

if HAS_TRITON:
    import triton

__all__ = ["attend_quantized_launch", "q_mult", "quantize_qk", "sage_attention", "sage_attention_launch",
           "sage_attention_reference", "sage_configs"]

HEAD_DIMS = (32, 64, 128)  # int8 tl.dot needs K >= 32; 64 is what the models use


def q_mult(head_dim: int) -> float:
    """What q's scales carry besides the quantization step: the softmax scale and log2(e)."""
    return math.log2(math.e) / math.sqrt(head_dim)


def sage_attention_reference(q, k, v, dtype: torch.dtype = torch.float64, block_rows: int = 1024):
    """The kernel's numerics in PyTorch: q, k, v [B, H, S, Dh] -> [B, H, S, Dh] in v's dtype.

    Smoothing mean and int8 codes and scales as ``sage_quant.quantize_rows_reference`` (fp32); exact
    integer scores; softmax in ``dtype`` (float64: the test model; float32 on the CPU path); p and v
    rounded to fp16 before their product, which runs in ``dtype``. One block of ``block_rows`` queries
    at a time, so the scores never exceed [B, H, block_rows, S].
    """
    q8, qs = quantize_rows_reference(q, None, q_mult(q.shape[-1]))
    k8, ks = quantize_rows_reference(k, smoothing_mean(k), 1.0)
    kt = k8.to(dtype).transpose(-1, -2)  # integer scores are exact in fp32 too: |q8 . k8| < 2**24
    ks = ks.to(dtype)[..., None, :]
    v16 = v.to(torch.float16).to(dtype)
    out = []
    for i in range(0, q.shape[2], block_rows):
        s = (q8[:, :, i : i + block_rows].to(dtype) @ kt) * qs[:, :, i : i + block_rows, None].to(dtype) * ks
        p = torch.exp2(s - s.amax(dim=-1, keepdim=True))
        out.append((p.to(torch.float16).to(dtype) @ v16) / p.sum(dim=-1, keepdim=True))
    return torch.cat(out, dim=2).to(v.dtype)


@jit
def _sage_block(
    acc, l_i, m_i, q, q_scale,  # running output [BLOCK_M, HEAD_DIM] fp32, row sum and max [BLOCK_M]; q tile
    k_ptr, ks_ptr, v_ptr, s_vs, s_vd,  # one head of k codes [S, HEAD_DIM] int8, k scales [S], v [S, HEAD_DIM]
    start_n, S,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    cols = tl.arange(0, HEAD_DIM)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        nmask = offs_n < S
        k = tl.load(k_ptr + offs_n[:, None] * HEAD_DIM + cols[None, :], mask=nmask[:, None], other=0)
        k_scale = tl.load(ks_ptr + offs_n, mask=nmask, other=0.0)
        v = tl.load(v_ptr + offs_n[:, None] * s_vs + cols[None, :] * s_vd, mask=nmask[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + offs_n[:, None] * HEAD_DIM + cols[None, :])
        k_scale = tl.load(ks_ptr + offs_n)
        v = tl.load(v_ptr + offs_n[:, None] * s_vs + cols[None, :] * s_vd)
    s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32) * q_scale[:, None] * k_scale[None, :]
    if MASKED:
        s = tl.where(nmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block holds at least one key
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(tl.float16), v.to(tl.float16), acc * alpha[:, None])
    return acc, l_i, m_new


@jit
def _sage_attn_kernel(
    q_ptr,  # [B, H, S, HEAD_DIM] int8 contiguous: q codes
    qs_ptr,  # [B, H, S] fp32: q scales x softmax scale x log2(e)
    k_ptr,  # [B, H, S, HEAD_DIM] int8 contiguous: codes of k - mean(k)
    ks_ptr,  # [B, H, S] fp32: k scales
    v_ptr,  # [B, H, S, HEAD_DIM] fp32/fp16/bf16, any strides
    o_ptr,  # [B, H, S, HEAD_DIM] contiguous output, v's dtype
    S, H,
    svb, svh, svs, svd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    cols = tl.arange(0, HEAD_DIM)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < S
    head = bh * S * HEAD_DIM  # offset of this head in the contiguous q, k codes and the output
    q = tl.load(q_ptr + head + offs_m[:, None] * HEAD_DIM + cols[None, :], mask=mmask[:, None], other=0)
    q_scale = tl.load(qs_ptr + bh * S + offs_m, mask=mmask, other=0.0)
    k_ptr += head
    ks_ptr += bh * S
    v_ptr += b * svb + h * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (S // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):  # full key blocks: no masks
        acc, l_i, m_i = _sage_block(acc, l_i, m_i, q, q_scale, k_ptr, ks_ptr, v_ptr, svs, svd, start_n, S,
                                    False, BLOCK_N, HEAD_DIM)  # fmt: skip
    if n_full < S:  # the tail block: keys past S get -inf
        acc, l_i, m_i = _sage_block(acc, l_i, m_i, q, q_scale, k_ptr, ks_ptr, v_ptr, svs, svd, n_full, S,
                                    True, BLOCK_N, HEAD_DIM)  # fmt: skip
    out = acc / l_i[:, None]
    tl.store(o_ptr + head + offs_m[:, None] * HEAD_DIM + cols[None, :], out, mask=mmask[:, None])


# (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner may pick, per GPU family (as
# rope_flash_attention.gpu_family names them). The int8 tiles are half the bytes of bf16 ones, so the
# families share a table except for the pipeline depth sm_89's 99 KB of shared memory allows;
# `python -P -m cogvx.kernels.aot` checks every one for sm_80, sm_89 and sm_90 (spills, shared memory).
_TILES = {
    "sm90": [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    "sm80": [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    "sm89": [(128, 64, 8, 2), (64, 64, 4, 3)],
}
_INTERPRETER_TILE = (64, 32)


def _family(capability: tuple[int, int]) -> str:
    if capability[0] in (9, 10, 11):
        return "sm90"
    return "sm80" if capability in ((8, 0), (8, 7)) else "sm89"


def sage_configs(capability: tuple[int, int]) -> list:
    """The autotune configurations the launcher offers on a GPU of this compute capability (>= 8.0)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in _TILES[_family(capability)]]  # fmt: skip


_TUNED: dict = {}


def _tuned(capability: tuple[int, int]):
    if capability not in _TUNED:
        _TUNED[capability] = triton.autotune(configs=sage_configs(capability), key=["S", "HEAD_DIM"])(_sage_attn_kernel)
    return _TUNED[capability]


def launch_plan(q8, qs, k8, ks, v, out):
    """(arguments, meta-parameters without the tile configuration) of the attention kernel, as the
    launcher passes them (the AOT check compiles exactly this with each of ``sage_configs``)."""
    return (q8, qs, k8, ks, v, out, q8.shape[2], q8.shape[1], *v.stride()), {"HEAD_DIM": q8.shape[-1]}


def quantize_qk(q: torch.Tensor, k: torch.Tensor):
    """q, k [B, H, S, Dh] -> (q codes, q scales, k codes, k scales): int8 [B, H, S, Dh] contiguous and fp32
    [B, H, S]; k smoothed by its token mean, the softmax scale and log2(e) in q's scales (two launches
    of the quantization kernel)."""
    q8, qs = quantize_rows(q, None, q_mult(q.shape[-1]))
    k8, ks = quantize_rows(k, smoothing_mean(k), 1.0)
    return q8, qs, k8, ks


def attend_quantized_launch(q8, qs, k8, ks, v, out) -> None:
    """The attention kernel on quantized q, k (``quantize_qk``) and v [B, H, S, Dh] (any strides), into
    ``out``, a contiguous [B, H, S, Dh] tensor of v's dtype."""
    B, H, S, Dh = q8.shape
    args, meta = launch_plan(q8, qs, k8, ks, v, out)
    with device_of(v):
        if is_interpreted(_sage_attn_kernel):  # autotuning under the interpreter would take minutes
            bm, bn = _INTERPRETER_TILE
            _sage_attn_kernel[(triton.cdiv(S, bm), B * H)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=1)
        else:
            tuned = _tuned(torch.cuda.get_device_capability(v.device))
            tuned[lambda m: (triton.cdiv(S, m["BLOCK_M"]), B * H)](*args, **meta)


def sage_attention_launch(q, k, v, out) -> None:
    """Quantize q and k and attend into ``out``, a contiguous [B, H, S, Dh] tensor of v's dtype."""
    if out.numel() == 0:
        return
    attend_quantized_launch(*quantize_qk(q, k), v, out)


@torch.library.custom_op("cogvx::sage_attention", mutates_args=())
def _sage_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    sage_attention_launch(q, k, v, out)
    return out


@_sage_attention_op.register_fake
def _(q, k, v):
    return v.new_empty(v.shape)


def _problem(q, k, v) -> str | None:
    """Why the kernel cannot take these inputs, or None when it can."""
    # Eager calls only: a compiled graph does not trace the device query (the engine's recipe needs sm_89).
    on_old_gpu = q.device.type == "cuda" and not torch.compiler.is_compiling() and \
        torch.cuda.get_device_capability(q.device) < (8, 0)  # fmt: skip
    if on_old_gpu:
        return "sage_attention needs int8 tensor cores: CUDA compute capability >= 8.0"
    if q.shape[-1] not in HEAD_DIMS:
        return f"sage_attention triton kernel supports head dim in {HEAD_DIMS} (got {q.shape[-1]})"
    return None


def _check(q, k, v) -> None:
    """Errors that no implementation can work around: raised before any work."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        shapes = ", ".join(str(list(t.shape)) for t in (q, k, v))
        raise ValueError(f"sage_attention needs q, k, v of one shape [B, H, S, Dh] (got {shapes})")
    if any(not t.is_floating_point() for t in (q, k, v)):
        dtypes = ", ".join(str(t.dtype) for t in (q, k, v))
        raise ValueError(f"sage_attention needs floating-point q, k, v (got {dtypes}); pass them unquantized")
    if k.device != q.device or v.device != q.device:
        raise ValueError("sage_attention needs q, k, v on one device")
    if q.shape[2] == 0:
        raise ValueError("sage_attention needs S >= 1 (got an empty sequence)")


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "triton") -> torch.Tensor:
    """8-bit attention (int8 q k^T, fp16 p v): q, k, v [B, H, S, Dh] (q, k normalized and rotated;
    any strides) -> [B, H, S, Dh] in v's dtype.

    "triton": the Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1); head dims outside
    {32, 64, 128} and GPUs before sm_80 fall back, with a one-time warning, to the reference. "torch"
    (or a CPU without the interpreter): ``sage_attention_reference`` in float32, the same numerics.
    """
    _check(q, k, v)
    if not use_triton(backend, q.device, _sage_attn_kernel):
        return sage_attention_reference(q, k, v, dtype=torch.float32)
    reason = _problem(q, k, v)
    if reason is not None:
        warn_once(reason + "; using the PyTorch reference of the same numerics")
        return sage_attention_reference(q, k, v, dtype=torch.float32)
    return torch.ops.cogvx.sage_attention(q, k, v)
