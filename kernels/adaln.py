"""Adaptive LayerNorm over the joint [text; video] sequence (diffusers ``CogVideoXLayerNormZero``).

Fusion boundary: optional gated residual add, LayerNorm, per-segment modulation, in one pass.
Row r is a text row (text parameter set) when ``row_offset + r < n_text``, else a video row: the
rows may be a shard of the joint sequence whose first row is global row ``row_offset`` (sequence
parallelism); rows past the video (padding) are video rows too, which is harmless: nothing reads
their modulated output and their residual is the input's own arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import DTYPES, HAS_TRITON, device_of, is_interpreted, jit, next_pow2, shard_rows, tl, warn_once
from .policy import use_triton

if HAS_TRITON:
    import triton

__all__ = ["adaln_launch", "adaln_reference", "adaptive_layernorm"]

_MAX_D = 16384  # one row lives in registers; wider rows would spill


def adaln_reference(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    gate: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
    n_text: int,
    eps: float = 1e-5,
    row_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch reference.

    x:      [B, S, D] residual stream: rows [row_offset, row_offset + S) of the joint sequence.
    delta:  [B, S, D] branch output to add, or None (then ``gate`` is ignored and x is returned as is).
    gate:   [B, 2, D] per-segment gate, index 0 = text rows, 1 = video rows.
    weight, bias: [D] LayerNorm affine (or None).
    shift, scale: [B, 2, D] per-segment modulation, index 0 = text rows, 1 = video rows.
    n_text: text rows of the whole joint sequence; row_offset: global index of x's first row.
    Returns (x_new, y): x_new = x + gate * delta; y = LN(x_new) * (1 + scale) + shift, both [B, S, D]
    in x's dtype.
    """
    t, _ = shard_rows(n_text, x.shape[1], row_offset)
    if delta is not None:
        x = torch.cat(
            [x[:, :t] + gate[:, 0:1] * delta[:, :t], x[:, t:] + gate[:, 1:2] * delta[:, t:]],
            dim=1,
        )
    h = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    y = torch.cat(
        [
            h[:, :t] * (1 + scale[:, 0:1]) + shift[:, 0:1],
            h[:, t:] * (1 + scale[:, 1:2]) + shift[:, 1:2],
        ],
        dim=1,
    )
    return x, y


@jit
def adaln_tile(
    x_ptr, d_ptr, g_ptr, w_ptr, b_ptr, sh_ptr, sc_ptr, xo_ptr,  # as in _adaln_kernel
    S, D, n_text, eps,
    sxb, sxs, sxd, sdb, sds, sdd, sgb, sgs, sgd, swd, sbd, shb, shs, shd, scb, scs, scd,
    HAS_DELTA: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """The shared body: stores the new residual (when HAS_DELTA) and returns (y [BLOCK_R, BLOCK_D]
    fp32, its mask, its offsets in a contiguous [B, S, D] output) for this program's rows."""
    # One program: BLOCK_R consecutive rows of one batch element, each row whole in registers.
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < S)[:, None] & (cols < D)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    # Parameter set per row: 0 for text rows, 1 for video rows (the [B, 2, D] tables stay in L2).
    seg = (rows >= n_text).to(tl.int64)[:, None]

    x = tl.load(x_ptr + b * sxb + rows64 * sxs + cols[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)
    out_off = (b * S + rows64) * D + cols[None, :]
    if HAS_DELTA:
        d = tl.load(d_ptr + b * sdb + rows64 * sds + cols[None, :] * sdd, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + b * sgb + seg * sgs + cols[None, :] * sgd, mask=mask, other=0.0).to(tl.float32)
        x_new = (x + g * d).to(xo_ptr.dtype.element_ty)
        tl.store(xo_ptr + out_off, x_new, mask=mask)
        # Normalize the residual as stored, so y == LN(returned residual) exactly as the next op sees it.
        x = x_new.to(tl.float32)

    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    h = xc * tl.rsqrt(var + eps)[:, None]
    if HAS_WEIGHT:
        h = h * tl.load(w_ptr + cols * swd, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        h = h + tl.load(b_ptr + cols * sbd, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    shift = tl.load(sh_ptr + b * shb + seg * shs + cols[None, :] * shd, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(sc_ptr + b * scb + seg * scs + cols[None, :] * scd, mask=mask, other=0.0).to(tl.float32)
    return h * (1.0 + scale) + shift, mask, out_off


@jit
def _adaln_kernel(
    x_ptr,  # [B, S, D] residual stream, strides (sxb, sxs, sxd)
    d_ptr,  # [B, S, D] branch output (read when HAS_DELTA)
    g_ptr,  # [B, 2, D] gate, set 0 = text rows, 1 = video rows (read when HAS_DELTA)
    w_ptr,  # [D] LayerNorm weight (read when HAS_WEIGHT)
    b_ptr,  # [D] LayerNorm bias (read when HAS_BIAS)
    sh_ptr,  # [B, 2, D] shift
    sc_ptr,  # [B, 2, D] scale
    xo_ptr,  # [B, S, D] new residual stream, contiguous (written when HAS_DELTA)
    y_ptr,  # [B, S, D] modulated LayerNorm output, contiguous
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
):
    y, mask, out_off = adaln_tile(
        x_ptr, d_ptr, g_ptr, w_ptr, b_ptr, sh_ptr, sc_ptr, xo_ptr, S, D, n_text, eps,
        sxb, sxs, sxd, sdb, sds, sdd, sgb, sgs, sgd, swd, sbd, shb, shs, shd, scb, scs, scd,
        HAS_DELTA, HAS_WEIGHT, HAS_BIAS, BLOCK_R, BLOCK_D,
    )  # fmt: skip
    tl.store(y_ptr + out_off, y, mask=mask)


def _strides(t: torch.Tensor | None, ndim: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * ndim


def out_dtypes(x, delta, gate, shift, scale) -> tuple[torch.dtype, torch.dtype]:
    """The dtypes the reference returns (type promotion; LayerNorm keeps its input's dtype)."""
    x_dtype = x.dtype
    if delta is not None:
        x_dtype = torch.promote_types(torch.promote_types(x_dtype, gate.dtype), delta.dtype)
    return x_dtype, torch.promote_types(torch.promote_types(x_dtype, scale.dtype), shift.dtype)


def launch_plan(x, delta, gate, weight, bias, shift, scale, t, eps, outputs, interpreted):
    """(grid, arguments, meta-parameters) of an adaLN kernel for these inputs, as its launcher passes
    them (the AOT check compiles exactly this). t: text rows of x, in [0, S]; outputs: the kernel's
    output tensors, which follow sc_ptr in its signature (x_out, y_out for ``_adaln_kernel``)."""
    B, S, D = x.shape
    shift, scale = shift.expand(B, 2, D), scale.expand(B, 2, D)
    if delta is not None:
        delta, gate = delta.expand(B, S, D), gate.expand(B, 2, D)
    if weight is not None:
        weight = weight.expand(D)
    if bias is not None:
        bias = bias.expand(D)
    block_d = next_pow2(D)
    if interpreted:
        # The interpreter pays per program, not per element: few, large programs.
        block_r, num_warps = min(next_pow2(S), max(1, 2**16 // block_d)), 1
    else:
        block_r = max(1, min(64, 4096 // block_d))
        num_warps = max(1, min(16, block_r * block_d // 512))
    args = (
        x, delta, gate, weight, bias, shift, scale, *outputs, S, D, t, eps,
        *x.stride(), *_strides(delta, 3), *_strides(gate, 3), *_strides(weight, 1), *_strides(bias, 1),
        *shift.stride(), *scale.stride(),
    )  # fmt: skip
    meta = dict(HAS_DELTA=delta is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps)  # fmt: skip
    return (triton.cdiv(S, block_r), B), args, meta


def adaln_launch(x, delta, gate, weight, bias, shift, scale, n_text, eps, x_out, y_out, row_offset=0) -> None:
    """Run the kernel into caller-provided contiguous outputs (``x_out`` only when delta is given).

    Shapes as in ``adaln_reference``; gate/shift/scale may be any broadcastable view of [B, 2, D]
    (strides are passed through, broadcast dims get stride 0).
    """
    if y_out.numel() == 0:
        return
    t, _ = shard_rows(n_text, x.shape[1], row_offset)
    grid, args, meta = launch_plan(x, delta, gate, weight, bias, shift, scale, t, eps, (x_out, y_out),
                                   is_interpreted(_adaln_kernel))  # fmt: skip
    with device_of(x):
        _adaln_kernel[grid](*args, **meta)


@torch.library.custom_op("cogvx::adaln_residual", mutates_args=())
def _adaln_residual_op(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    x_dtype, y_dtype = out_dtypes(x, delta, gate, shift, scale)
    x_out = torch.empty(x.shape, dtype=x_dtype, device=x.device)
    y_out = torch.empty(x.shape, dtype=y_dtype, device=x.device)
    adaln_launch(x, delta, gate, weight, bias, shift, scale, n_text, eps, x_out, y_out, row_offset)
    return x_out, y_out


@_adaln_residual_op.register_fake
def _(x, delta, gate, weight, bias, shift, scale, n_text, eps, row_offset=0):
    x_dtype, y_dtype = out_dtypes(x, delta, gate, shift, scale)
    return x.new_empty(x.shape, dtype=x_dtype), x.new_empty(x.shape, dtype=y_dtype)


@torch.library.custom_op("cogvx::adaln", mutates_args=())
def _adaln_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
    n_text: int,
    eps: float,
    row_offset: int = 0,
) -> torch.Tensor:
    y_out = torch.empty(x.shape, dtype=out_dtypes(x, None, None, shift, scale)[1], device=x.device)
    adaln_launch(x, None, None, weight, bias, shift, scale, n_text, eps, None, y_out, row_offset)
    return y_out


@_adaln_op.register_fake
def _(x, weight, bias, shift, scale, n_text, eps, row_offset=0):
    return x.new_empty(x.shape, dtype=out_dtypes(x, None, None, shift, scale)[1])


def unsupported(x, delta, gate, weight, bias, shift, scale, what="adaptive_layernorm") -> str | None:
    """Why the adaLN kernels cannot take these inputs, or None when they can."""
    if x.dim() != 3:
        return f"{what} triton kernel needs x of shape [B, S, D] (got {tuple(x.shape)})"
    tensors = [t for t in (x, delta, gate, weight, bias, shift, scale) if t is not None]
    bad = sorted({str(t.dtype) for t in tensors if t.dtype not in DTYPES})
    if bad:
        return f"{what} triton kernel supports float32/float16/bfloat16, not {', '.join(bad)}"
    if any(t.device != x.device for t in tensors):
        return f"{what} triton kernel needs all tensors on one device"
    if x.shape[-1] > _MAX_D:
        return f"{what} triton kernel supports D <= {_MAX_D} (got {x.shape[-1]})"
    return None


def adaptive_layernorm(x, delta, gate, weight, bias, shift, scale, n_text, eps=1e-5, backend="torch", *,
                       row_offset=0):  # fmt: skip
    """Dispatch point used by the transformer; ``backend`` is "torch" (reference) or "triton".

    Same arguments and results as ``adaln_reference`` (row_offset: global index of x's first row
    when x is a shard of the joint sequence). "triton" runs one fused kernel on CUDA (and on CPU
    when the kernels were defined under TRITON_INTERPRET=1); inputs the kernel does not support fall
    back to the reference with a one-time warning. With delta None, x is returned as is.
    """
    if not use_triton(backend, x.device, _adaln_kernel):
        return adaln_reference(x, delta, gate, weight, bias, shift, scale, n_text, eps, row_offset)
    if delta is not None and gate is None:
        raise ValueError("adaptive_layernorm: gate is required when delta is given (got gate=None)")
    reason = unsupported(x, delta, gate, weight, bias, shift, scale)
    if reason is not None:
        warn_once(reason + "; using the PyTorch reference")
        return adaln_reference(x, delta, gate, weight, bias, shift, scale, n_text, eps, row_offset)
    shard_rows(n_text, x.shape[1], row_offset)  # argument errors here, not inside the op
    if delta is None:
        return x, torch.ops.cogvx.adaln(x, weight, bias, shift, scale, n_text, eps, row_offset)
    return torch.ops.cogvx.adaln_residual(x, delta, gate, weight, bias, shift, scale, n_text, eps, row_offset)
