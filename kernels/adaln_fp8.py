"""Adaptive LayerNorm whose modulated output leaves the kernel as float8 e4m3 with one fp32 scale per
row, ready for a row-wise scaled fp8 GEMM (``fp8_rowwise_linear``): the activation quantization
that an fp8 linear otherwise runs as a separate pass over y is fused into the adaLN epilogue.

Numerics match torchao's dynamic activation quantization for
``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``: ``Float8Tensor.from_hp`` on its
torch path, i.e. ``torchao.quantization.quant_primitives._choose_scale_float8`` (block [1, .., 1, D])
then ``_quantize_affine_float8``, applied to y as the unfused adaLN returns it (rounded to its dtype):

    amax  = max_j |y_j|                          (in y's dtype)
    scale = fp32(max(amax, 1e-12) / 448)          (division rounded to y's dtype, as torchao computes it)
    y_fp8 = e4m3fn(clamp(y / scale, -448, 448))   (fp32 division, round to nearest even)

The 1e-12 floor is torchao's ``activation_value_lb`` (default None); with it, an all-zero row (e.g.
a padding row) gets scale 1e-12/448 and zeros instead of 0/0 = NaN. Every row with max|y| >= 1e-12
gets torchao's default-config numbers bit for bit. A float16 scale that rounds to 0 is raised to
1e-12/448 too. (On sm_90 with the optional mslk package installed, torchao quantizes activations with
that package's own Triton kernel instead; those numbers are not the ones matched here.)
"""

from __future__ import annotations

import torch

from ._common import device_of, is_interpreted, jit, shard_rows, tl, warn_once
from .adaln import adaln_reference, adaln_tile, launch_plan, out_dtypes, unsupported
from .policy import use_triton

__all__ = ["adaln_fp8_launch", "adaln_fp8_reference", "adaptive_layernorm_fp8", "fp8_rowwise_linear",
           "quantize_rows_reference"]  # fmt: skip

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
AMAX_FLOOR = 1e-12
_TL_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def quantize_rows_reference(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y [..., D] (fp32/fp16/bf16) -> (y_fp8 [..., D] float8_e4m3fn, scale [..., 1] fp32), torchao's
    per-row numerics (module docstring); y ~= y_fp8.float() * scale."""
    amax = torch.clamp(y.abs().amax(dim=-1, keepdim=True), min=AMAX_FLOOR)
    scale = (amax / FP8_MAX).to(torch.float32).clamp(min=AMAX_FLOOR / FP8_MAX)
    return (y.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def adaln_fp8_reference(x, delta, gate, weight, bias, shift, scale, n_text, eps=1e-5, row_offset=0):
    """``adaln_reference`` then ``quantize_rows_reference`` on y: (x_new, y_fp8, y_scale)."""
    x_new, y = adaln_reference(x, delta, gate, weight, bias, shift, scale, n_text, eps, row_offset)
    return (x_new, *quantize_rows_reference(y))


@jit
def round_to_e4m3(v):
    """v: fp32 in [-448, 448] -> the nearest float8_e4m3fn value (ties to even), still fp32.

    The conversion to float8 that follows then only re-encodes an exact value. Rounding here rather
    than in the conversion gives one answer everywhere: the GPU's cvt rounds to nearest even too, but
    Triton 3.9's interpreter mis-rounds (ties away from zero, a lost carry that halves some values,
    flushed subnormals), and the CPU tests run there.
    """
    bits = v.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    # Normal range (|v| >= 2**-6): keep 3 of fp32's 23 mantissa bits, ties to even; a carry
    # correctly bumps the exponent.
    normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    a = mag.to(tl.float32, bitcast=True)
    # Subnormal range: multiples of 2**-9; adding 1.5 * 2**14 makes fp32 addition round there.
    r = tl.where(a < 0.015625, (a + 24576.0) - 24576.0, normal)
    return tl.where(bits < 0, -r, r)  # the sign bit, so -0.0 stays -0.0 as in torch


@jit
def _round_scale(s, Y_DTYPE: tl.constexpr):
    """s: fp32 [ROWS] -> rounded to Y_DTYPE to nearest even, returned as fp32 (torch computes the
    scale in y's dtype). bfloat16 by bit arithmetic: the GPU's conversion rounds to nearest even, but
    the interpreter's truncates, and this way both give torch's answer."""
    if Y_DTYPE == tl.bfloat16:
        bits = s.to(tl.int32, bitcast=True)  # s > 0 and finite
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000).to(tl.float32, bitcast=True)
    else:
        return s.to(Y_DTYPE).to(tl.float32)


@jit
def _adaln_fp8_kernel(
    x_ptr,  # [B, S, D] residual stream
    d_ptr,  # [B, S, D] branch output (read when HAS_DELTA)
    g_ptr,  # [B, 2, D] gate, set 0 = text rows, 1 = video rows (read when HAS_DELTA)
    w_ptr,  # [D] LayerNorm weight (read when HAS_WEIGHT)
    b_ptr,  # [D] LayerNorm bias (read when HAS_BIAS)
    sh_ptr,  # [B, 2, D] shift
    sc_ptr,  # [B, 2, D] scale
    xo_ptr,  # [B, S, D] new residual stream, contiguous (written when HAS_DELTA)
    q_ptr,  # [B, S, D] float8_e4m3fn modulated output, contiguous
    qs_ptr,  # [B, S, 1] fp32 per-row scales, contiguous
    S, D, n_text, eps,  # n_text: text rows of this shard, in [0, S]
    sxb, sxs, sxd,
    sdb, sds, sdd,
    sgb, sgs, sgd,
    swd, sbd,
    shb, shs, shd,
    scb, scs, scd,
    HAS_DELTA: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    Y_DTYPE: tl.constexpr,  # the dtype the unfused adaLN returns y in: y is rounded to it first
):
    y, mask, out_off = adaln_tile(
        x_ptr, d_ptr, g_ptr, w_ptr, b_ptr, sh_ptr, sc_ptr, xo_ptr, S, D, n_text, eps,
        sxb, sxs, sxd, sdb, sds, sdd, sgb, sgs, sgd, swd, sbd, shb, shs, shd, scb, scs, scd,
        HAS_DELTA, HAS_WEIGHT, HAS_BIAS, BLOCK_R, BLOCK_D,
    )  # fmt: skip
    y = tl.where(mask, y.to(Y_DTYPE).to(tl.float32), 0.0)
    # Exact divisions (div_rn): Triton's `/` on fp32 may be approximate, torch's is IEEE.
    amax = tl.maximum(tl.max(tl.abs(y), axis=1), 1e-12)
    row_scale = _round_scale(tl.math.div_rn(amax, 448.0), Y_DTYPE)
    row_scale = tl.maximum(row_scale, 1e-12 / 448.0)
    q = tl.math.div_rn(y, row_scale[:, None])
    q = round_to_e4m3(tl.minimum(tl.maximum(q, -448.0), 448.0))
    tl.store(q_ptr + out_off, q.to(q_ptr.dtype.element_ty), mask=mask)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    tl.store(qs_ptr + tl.program_id(1).to(tl.int64) * S + rows, row_scale, mask=rows < S)


def fp8_launch_plan(x, delta, gate, weight, bias, shift, scale, t, eps, x_out, q_out, s_out, interpreted):
    """(grid, arguments, meta-parameters) of the kernel, as the launcher passes them (the AOT check
    compiles exactly this). t: text rows of x, in [0, S]."""
    outputs = (x_out, q_out, s_out)
    grid, args, meta = launch_plan(x, delta, gate, weight, bias, shift, scale, t, eps, outputs, interpreted)
    y_dtype = out_dtypes(x, delta, gate, shift, scale)[1]
    return grid, args, dict(meta, Y_DTYPE=getattr(tl, _TL_DTYPES[y_dtype]))


def adaln_fp8_launch(x, delta, gate, weight, bias, shift, scale, n_text, eps, x_out, q_out, s_out,
                     row_offset=0) -> None:  # fmt: skip
    """Run the kernel into caller-provided contiguous outputs: x_out [B, S, D] (only when delta is
    given), q_out [B, S, D] float8_e4m3fn, s_out [B, S, 1] fp32."""
    if q_out.numel() == 0:
        return
    t, _ = shard_rows(n_text, x.shape[1], row_offset)
    grid, args, meta = fp8_launch_plan(x, delta, gate, weight, bias, shift, scale, t, eps, x_out, q_out, s_out,
                                       is_interpreted(_adaln_fp8_kernel))  # fmt: skip
    with device_of(x):
        _adaln_fp8_kernel[grid](*args, **meta)


def _fp8_outputs(x):
    return torch.empty(x.shape, dtype=FP8, device=x.device), torch.empty((*x.shape[:-1], 1), device=x.device)


@torch.library.custom_op("cogvx::adaln_residual_fp8", mutates_args=())
def _adaln_residual_fp8_op(
    x: torch.Tensor,
    delta: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
    n_text: int,
    eps: float,
    row_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x_out = torch.empty(x.shape, dtype=out_dtypes(x, delta, gate, shift, scale)[0], device=x.device)
    q_out, s_out = _fp8_outputs(x)
    adaln_fp8_launch(x, delta, gate, weight, bias, shift, scale, n_text, eps, x_out, q_out, s_out, row_offset)
    return x_out, q_out, s_out


@_adaln_residual_fp8_op.register_fake
def _(x, delta, gate, weight, bias, shift, scale, n_text, eps, row_offset=0):
    x_out = x.new_empty(x.shape, dtype=out_dtypes(x, delta, gate, shift, scale)[0])
    return x_out, x.new_empty(x.shape, dtype=FP8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.custom_op("cogvx::adaln_fp8", mutates_args=())
def _adaln_fp8_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
    n_text: int,
    eps: float,
    row_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    q_out, s_out = _fp8_outputs(x)
    adaln_fp8_launch(x, None, None, weight, bias, shift, scale, n_text, eps, None, q_out, s_out, row_offset)
    return q_out, s_out


@_adaln_fp8_op.register_fake
def _(x, weight, bias, shift, scale, n_text, eps, row_offset=0):
    return x.new_empty(x.shape, dtype=FP8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def adaptive_layernorm_fp8(x, delta, gate, weight, bias, shift, scale, n_text, eps=1e-5, row_offset=0,
                           backend="torch"):  # fmt: skip
    """``adaptive_layernorm`` with y quantized per row: returns (x_new, y_fp8, y_scale).

    Arguments as ``adaptive_layernorm``. x_new: [B, S, D] (x itself when delta is None); y_fp8:
    [B, S, D] float8_e4m3fn; y_scale: [B, S, 1] fp32, y ~= y_fp8 * y_scale (numerics: module
    docstring). "triton" runs one kernel on CUDA GPUs of compute capability 8.9+ (fp8 conversion
    needs Ada or Hopper) and on CPU under TRITON_INTERPRET=1; elsewhere, and for inputs the kernel
    does not support, the reference runs (with a one-time warning).
    """
    args = (x, delta, gate, weight, bias, shift, scale, n_text, eps, row_offset)
    if not use_triton(backend, x.device, _adaln_fp8_kernel):
        return adaln_fp8_reference(*args)
    if delta is not None and gate is None:
        raise ValueError("adaptive_layernorm_fp8: gate is required when delta is given (got gate=None)")
    reason = unsupported(x, delta, gate, weight, bias, shift, scale, "adaptive_layernorm_fp8")
    if reason is None and x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 9):
        cc = torch.cuda.get_device_capability(x.device)
        reason = f"adaptive_layernorm_fp8 triton kernel needs compute capability 8.9+ for fp8 (got {cc[0]}.{cc[1]})"
    if reason is not None:
        warn_once(reason + "; using the PyTorch reference")
        return adaln_fp8_reference(*args)
    shard_rows(n_text, x.shape[1], row_offset)  # argument errors here, not inside the op
    if delta is None:
        return (x, *torch.ops.cogvx.adaln_fp8(x, weight, bias, shift, scale, n_text, eps, row_offset))
    return torch.ops.cogvx.adaln_residual_fp8(*args)


def _check_linear(y_fp8, y_scale, weight_fp8, weight_scale, bias) -> None:
    K, N = y_fp8.shape[-1], weight_fp8.shape[0]
    problems = []
    if y_fp8.dtype != FP8 or weight_fp8.dtype != FP8:
        problems.append(f"y_fp8 and weight_fp8 must be float8_e4m3fn (got {y_fp8.dtype}, {weight_fp8.dtype})")
    if weight_fp8.dim() != 2 or weight_fp8.shape[1] != K:
        problems.append(f"weight_fp8 must be [N, K] = [N, {K}] like nn.Linear.weight (got {list(weight_fp8.shape)})")
    if tuple(y_scale.shape) != (*y_fp8.shape[:-1], 1) or y_scale.dtype != torch.float32:
        problems.append(f"y_scale must be fp32 {[*y_fp8.shape[:-1], 1]} (got {y_scale.dtype} {list(y_scale.shape)})")
    if tuple(weight_scale.shape) != (N, 1) or weight_scale.dtype != torch.float32:
        problems.append(f"weight_scale must be fp32 [{N}, 1] (got {weight_scale.dtype} {list(weight_scale.shape)})")
    if bias is not None and tuple(bias.shape) != (N,):
        problems.append(f"bias must be [{N}] (got {list(bias.shape)})")
    if problems:
        raise ValueError("fp8_rowwise_linear: " + "; ".join(problems) + " (torchao PerRow tensors give these: "
                         "Float8Tensor.qdata and .scale)")


def scaled_mm_rowwise(y2, ys2, weight_fp8, weight_scale, bias, out_dtype):
    """The torch._scaled_mm call: y2 [M, K] fp8 row-major, ys2 [M, 1]; weight [N, K] fp8, scale [N, 1]."""
    fp32_bias = out_dtype == torch.float32 and bias is not None  # _scaled_mm takes no bias with fp32 output
    out = torch._scaled_mm(
        y2.contiguous(), weight_fp8.t(), scale_a=ys2, scale_b=weight_scale.t(), out_dtype=out_dtype,
        bias=None if (bias is None or fp32_bias) else bias.to(out_dtype), use_fast_accum=True,
    )  # fmt: skip
    return out + bias.float() if fp32_bias else out


def fp8_rowwise_linear(y_fp8, y_scale, weight_fp8, weight_scale, bias, out_dtype):
    """``(y_fp8 * y_scale) @ (weight_fp8 * weight_scale).T + bias`` in ``out_dtype``.

    y_fp8 [..., K] float8_e4m3fn and y_scale [..., 1] fp32 (``adaptive_layernorm_fp8``); weight_fp8
    [N, K] float8_e4m3fn and weight_scale [N, 1] fp32 (torchao's PerRow weight); bias [N] or None.
    Returns [..., N]. On CUDA (compute capability 8.9+) one ``torch._scaled_mm`` with row-wise scales
    and fast accumulation, as torchao's PerRow linear runs it; elsewhere the reference: the same
    product in fp32 (fp8 x fp8 products are exact there; only the summation order differs).
    """
    _check_linear(y_fp8, y_scale, weight_fp8, weight_scale, bias)
    lead = y_fp8.shape[:-1]
    y2, ys2 = y_fp8.reshape(-1, y_fp8.shape[-1]), y_scale.reshape(-1, 1)
    if y_fp8.is_cuda:
        cc = torch.cuda.get_device_capability(y_fp8.device)
        if cc < (8, 9):
            raise ValueError(f"fp8_rowwise_linear needs compute capability 8.9+ for fp8 GEMMs (got {cc[0]}.{cc[1]}); "
                             "dequantize and use a bf16 linear on this GPU")
        out = scaled_mm_rowwise(y2, ys2, weight_fp8, weight_scale, bias, out_dtype)
    else:
        out = (y2.float() @ weight_fp8.float().t()) * ys2 * weight_scale.t()
        if bias is not None:
            out = out + bias.float()
        out = out.to(out_dtype)
    return out.reshape(*lead, weight_fp8.shape[0])
