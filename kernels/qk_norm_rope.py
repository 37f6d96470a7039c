"""Per-head QK LayerNorm + 3D RoPE + the attention layout change, in one pass over q and k
(the first half of diffusers ``CogVideoXAttnProcessor2_0``).

q, k [B, S, H, Dh] (any strides, e.g. views into a fused qkv projection) in; contiguous
[B, H, S, Dh] out. RoPE rows as in ``cogvx.kernels.rope``: the rows may be a shard of the joint
sequence starting at global row ``row_offset``; padding rows past the table are normalized, not
rotated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import DTYPES, HAS_TRITON, device_of, is_interpreted, jit, next_pow2, shard_rows, tl, warn_once
from .policy import use_triton
from .rope import rope_table_problem, rope_table_rows, rope_tile, rope_video_rows

if HAS_TRITON:
    import triton

__all__ = ["qk_norm_rope", "qk_norm_rope_launch", "qk_norm_rope_reference"]

_MAX_HEAD_DIM = 256  # one head row lives in registers


def qk_norm_rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor | None,
    q_bias: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    k_bias: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    n_text: int,
    eps: float = 1e-6,
    row_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head LayerNorm of q and k, then RoPE on the video rows, then the attention layout.

    q, k: [B, S, H, Dh] (may be strided views of a fused projection): rows [row_offset, row_offset + S)
    of the joint sequence. q_weight.. k_bias: [Dh] LayerNorm affine (None: no affine).
    cos, sin: [N_video, Dh] fp32 tables of the whole sequence's video rows (N_video = S - n_text when
    unsharded), or None for models without RoPE (then only the norm and the layout change happen).
    Returns q, k as contiguous [B, H, S, Dh] in the input dtype.
    """
    dh = q.shape[-1]
    q = F.layer_norm(q, (dh,), q_weight, q_bias, eps).transpose(1, 2)
    k = F.layer_norm(k, (dh,), k_weight, k_bias, eps).transpose(1, 2)
    if cos is not None:
        q = rope_video_rows(q, cos, sin, n_text, row_offset)
        k = rope_video_rows(k, cos, sin, n_text, row_offset)
    return q.contiguous(), k.contiguous()


@jit
def _norm_rope_store(
    in_ptr, s_s, s_d,  # one head of [B, S, H, Dh], already offset to (b, h); row/col strides
    w_ptr, b_ptr, s_w, s_b,  # [Dh] LayerNorm affine
    out_ptr,  # one head of the contiguous [B, H, S, Dh] output, already offset to (b, h)
    cos, sin,  # [BLOCK_S, BLOCK_D] fp32 (1 and 0 on text and padding rows)
    rows, cols, mask, Dh, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ROPE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    x = tl.load(in_ptr + rows[:, None] * s_s + cols[None, :] * s_d, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / Dh
    xc = tl.where(mask, x - mean[:, None], 0.0)
    h = xc * tl.rsqrt(tl.sum(xc * xc, axis=1) / Dh + eps)[:, None]
    if HAS_W:
        h = h * tl.load(w_ptr + cols * s_w, mask=cols < Dh, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        h = h + tl.load(b_ptr + cols * s_b, mask=cols < Dh, other=0.0).to(tl.float32)[None, :]
    if HAS_ROPE:
        h = rope_tile(h, cos, sin, BLOCK_S, BLOCK_D)
    tl.store(out_ptr + rows[:, None] * Dh + cols[None, :], h, mask=mask)


@jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr,  # [B, S, H, Dh], any strides (e.g. views into a fused qkv projection)
    qw_ptr, qb_ptr, kw_ptr, kb_ptr,  # [Dh] LayerNorm affine of q and of k (each optional)
    cos_ptr, sin_ptr,  # [n_video, Dh] RoPE tables of the whole sequence (read when HAS_ROPE)
    qo_ptr, ko_ptr,  # [B, H, S, Dh] contiguous outputs
    S, H, Dh, n_text, eps,  # n_text: text rows of this shard, in [0, S]
    table_start, n_video,  # table row of row n_text; table rows (rows past them are padding)
    sqb, sqs, sqh, sqd,
    skb, sks, skh, skd,
    s_qw, s_qb, s_kw, s_kb,
    s_cs, s_cd, s_ss, s_sd,
    HAS_QW: tl.constexpr, HAS_QB: tl.constexpr, HAS_KW: tl.constexpr, HAS_KB: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    HEADS_PER_PROG: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_S rows x HEADS_PER_PROG heads of one batch element, q and k; the RoPE
    # rows are loaded once and reused for every head.
    h0 = tl.program_id(0) * HEADS_PER_PROG
    rows = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    b = tl.program_id(2).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < S)[:, None] & (cols < Dh)[None, :]
    cos = tl.full([BLOCK_S, BLOCK_D], 1.0, tl.float32)
    sin = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    if HAS_ROPE:
        vrow = (rows - n_text)[:, None]
        vrow = tl.where(vrow >= 0, vrow + table_start, vrow)  # text rows stay negative
        cos, sin = rope_table_rows(cos_ptr, sin_ptr, s_cs, s_cd, s_ss, s_sd, vrow, cols, mask, n_video)
    rows64 = rows.to(tl.int64)
    for i in range(HEADS_PER_PROG):
        h = h0 + i
        s_lim = S * (h < H).to(tl.int32)  # no rows for padding heads (`mask & scalar` breaks the interpreter)
        hmask = (rows < s_lim)[:, None] & (cols < Dh)[None, :]
        out_off = ((b * H + h) * S) * Dh
        _norm_rope_store(q_ptr + b * sqb + h * sqh, sqs, sqd, qw_ptr, qb_ptr, s_qw, s_qb, qo_ptr + out_off,
                         cos, sin, rows64, cols, hmask, Dh, eps, HAS_QW, HAS_QB, HAS_ROPE, BLOCK_S, BLOCK_D)
        _norm_rope_store(k_ptr + b * skb + h * skh, sks, skd, kw_ptr, kb_ptr, s_kw, s_kb, ko_ptr + out_off,
                         cos, sin, rows64, cols, hmask, Dh, eps, HAS_KW, HAS_KB, HAS_ROPE, BLOCK_S, BLOCK_D)


def _stride0(t: torch.Tensor | None) -> int:
    return t.stride(0) if t is not None else 0


def launch_plan(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, t, table_start, eps, q_out, k_out, interpreted):
    """(grid, arguments, meta-parameters) of the kernel, as the launcher passes them (the AOT check
    compiles exactly this). t: text rows of q, in [0, S]; table_start: table row of row t."""
    B, S, H, Dh = q.shape
    block_d = next_pow2(Dh)
    if interpreted:
        heads, block_s, num_warps = H, min(next_pow2(S), max(1, 2**15 // block_d)), 1
    else:
        # One head per program, heads fastest in the grid: programs that run together share their
        # RoPE rows (L1/L2) and read neighbouring bytes of each [S, H, Dh] row.
        heads, block_s, num_warps = 1, max(1, 2048 // block_d), 8  # ~80 registers at Dh 64 (sm_90)
    has_rope = cos is not None and cos.shape[0] > 0  # no table rows: nothing to rotate
    cs = (cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1)) if has_rope else (0, 0, 0, 0)
    n_video = cos.shape[0] if has_rope else 0
    if not has_rope:
        cos = sin = None
    args = (
        q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, q_out, k_out,
        S, H, Dh, t, eps, table_start, n_video,
        *q.stride(), *k.stride(),
        _stride0(q_weight), _stride0(q_bias), _stride0(k_weight), _stride0(k_bias), *cs,
    )  # fmt: skip
    meta = dict(
        HAS_QW=q_weight is not None, HAS_QB=q_bias is not None,
        HAS_KW=k_weight is not None, HAS_KB=k_bias is not None, HAS_ROPE=has_rope,
        HEADS_PER_PROG=heads, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return (triton.cdiv(H, heads), triton.cdiv(S, block_s), B), args, meta


def qk_norm_rope_launch(
    q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, n_text, eps, q_out, k_out, row_offset=0
) -> None:
    """Run the kernel into caller-provided contiguous [B, H, S, Dh] outputs."""
    if q_out.numel() == 0:
        return
    t, start = shard_rows(n_text, q.shape[1], row_offset)
    grid, args, meta = launch_plan(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, t, start, eps, q_out, k_out,
                                   is_interpreted(_qk_norm_rope_kernel))  # fmt: skip
    with device_of(q):
        _qk_norm_rope_kernel[grid](*args, **meta)


@torch.library.custom_op("cogvx::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor | None,
    q_bias: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    k_bias: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    n_text: int,
    eps: float,
    row_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, S, H, Dh = q.shape
    q_out = torch.empty((B, H, S, Dh), dtype=q.dtype, device=q.device)
    k_out = torch.empty((B, H, S, Dh), dtype=k.dtype, device=k.device)
    qk_norm_rope_launch(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, n_text, eps, q_out, k_out, row_offset)
    return q_out, k_out


@_qk_norm_rope_op.register_fake
def _(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, n_text, eps, row_offset=0):
    B, S, H, Dh = q.shape
    return q.new_empty((B, H, S, Dh)), k.new_empty((B, H, S, Dh))


def _problem(q, k, norms, cos, sin) -> str | None:
    """Why the kernel cannot take these inputs, or None when it can."""
    tensors = [t for t in (q, k, *norms, cos, sin) if t is not None]
    if q.dim() != 4 or q.shape != k.shape:
        shapes = f"{list(q.shape)}, {list(k.shape)}"
        return f"qk_norm_rope triton kernel needs q, k of one shape [B, S, H, Dh] (got {shapes})"
    if any(t.dtype not in DTYPES for t in tensors):
        return "qk_norm_rope triton kernel supports float32/float16/bfloat16 only"
    if any(t.device != q.device for t in tensors):
        return "qk_norm_rope triton kernel needs all tensors on one device"
    dh = q.shape[-1]
    if dh > _MAX_HEAD_DIM:
        return f"qk_norm_rope triton kernel supports head dim <= {_MAX_HEAD_DIM} (got {dh})"
    if any(w is not None and tuple(w.shape) != (dh,) for w in norms):
        return f"qk_norm_rope triton kernel needs LayerNorm weight and bias of shape [{dh}]"
    return rope_table_problem(cos, sin, dh, "qk_norm_rope")


def qk_norm_rope(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, n_text, eps=1e-6, backend="torch", *,
                 row_offset=0):  # fmt: skip
    """Dispatch point used by the transformer; ``backend`` is "torch" (reference) or "triton".

    Same arguments and results as ``qk_norm_rope_reference``: q, k [B, S, H, Dh] (any strides) in,
    contiguous [B, H, S, Dh] out in the input dtypes; row_offset: global index of q's first row when
    q, k are a shard of the joint sequence (cos, sin stay the tables of the whole sequence). "triton"
    does norm, RoPE and the layout change of q and k in one launch; unsupported inputs fall back to
    the reference with a one-time warning.
    """
    args = (q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, n_text, eps, row_offset)
    if not use_triton(backend, q.device, _qk_norm_rope_kernel):
        return qk_norm_rope_reference(*args)
    reason = _problem(q, k, (q_weight, q_bias, k_weight, k_bias), cos, sin)
    if reason is not None:
        warn_once(reason + "; using the PyTorch reference")
        return qk_norm_rope_reference(*args)
    shard_rows(n_text, q.shape[1], row_offset)  # argument errors here, not inside the op
    return torch.ops.cogvx.qk_norm_rope(*args)
