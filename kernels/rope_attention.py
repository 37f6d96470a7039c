"""QK LayerNorm + 3D RoPE + attention over the joint [text; video] sequence
(diffusers ``CogVideoXAttnProcessor2_0``).

RoPE acts on video rows only (rows ``[n_text, S)``), in fp32, on interleaved pairs:
``(x0, x1) -> (x0*cos - x1*sin, x1*cos + x0*sin)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import HAS_TRITON, device_of, is_interpreted, jit, next_pow2, resolve_backend, tl, use_triton, warn_once

if HAS_TRITON:
    import triton

__all__ = [
    "apply_rope_reference",
    "qk_norm_rope_reference",
    "rope_flash_attention_reference",
    "qk_norm_rope",
    "rope_attention",
    "attention",
    "resolve_backend",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256  # qk_norm_rope: one head row lives in registers
_FLASH_HEAD_DIMS = (16, 32, 64, 128)  # tl.dot needs a power of two >= 16; 64 is what the models use


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, N, Dh] (any float dtype); cos, sin: [N, Dh] fp32. Returns x's dtype, math in fp32."""
    x32 = x.float()
    x0, x1 = x32.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-x1, x0], dim=-1).flatten(-2)
    return (x32 * cos + rotated * sin).to(x.dtype)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head LayerNorm of q and k, then RoPE on the video rows, then the attention layout.

    q, k: [B, S, H, Dh] (may be strided views of a fused projection).
    q_weight.. k_bias: [Dh] LayerNorm affine (None: no affine). cos, sin: [S - n_text, Dh] fp32, or None
    for models without RoPE (then only the norm and the layout change happen).
    Returns q, k as contiguous [B, H, S, Dh] in the input dtype.
    """
    dh = q.shape[-1]
    q = F.layer_norm(q, (dh,), q_weight, q_bias, eps).transpose(1, 2)
    k = F.layer_norm(k, (dh,), k_weight, k_bias, eps).transpose(1, 2)
    if cos is not None:
        q = torch.cat([q[:, :, :n_text], apply_rope_reference(q[:, :, n_text:], cos, sin)], dim=2)
        k = torch.cat([k[:, :, :n_text], apply_rope_reference(k[:, :, n_text:], cos, sin)], dim=2)
    return q.contiguous(), k.contiguous()



def rope_flash_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    n_text: int,
) -> torch.Tensor:
    """RoPE on the video rows of q and k (rows >= n_text use cos/sin[row - n_text]), then SDPA.

    q, k, v: [B, H, S, Dh] (q, k normalized, not yet rotated); cos, sin: [S - n_text, Dh] fp32 or None
    (no RoPE). Returns [B, H, S, Dh] in q's dtype.
    """
    if cos is not None:
        q = torch.cat([q[:, :, :n_text], apply_rope_reference(q[:, :, n_text:], cos, sin)], dim=2)
        k = torch.cat([k[:, :, :n_text], apply_rope_reference(k[:, :, n_text:], cos, sin)], dim=2)
    return F.scaled_dot_product_attention(q, k, v)


# ---------------------------------------------------------------------------------------------------
# Kernel 1: per-head LayerNorm + RoPE + [B, S, H, Dh] -> [B, H, S, Dh]


@jit
def _rope_tile(x, cos, sin, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """x, cos, sin: [ROWS, BLOCK_D] fp32. Interleaved pairs: rot[2i] = -x[2i+1], rot[2i+1] = x[2i]."""
    x_even, x_odd = tl.split(tl.reshape(x, [ROWS, BLOCK_D // 2, 2]))
    rot = tl.reshape(tl.join(-x_odd, x_even), [ROWS, BLOCK_D])
    return x * cos + rot * sin


@jit
def _norm_rope_store(
    in_ptr, s_s, s_d,  # one head of [B, S, H, Dh], already offset to (b, h); row/col strides
    w_ptr, b_ptr, s_w, s_b,  # [Dh] LayerNorm affine
    out_ptr,  # one head of the contiguous [B, H, S, Dh] output, already offset to (b, h)
    cos, sin,  # [BLOCK_S, BLOCK_D] fp32 (1 and 0 on text rows)
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
        h = _rope_tile(h, cos, sin, BLOCK_S, BLOCK_D)
    tl.store(out_ptr + rows[:, None] * Dh + cols[None, :], h, mask=mask)


@jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr,  # [B, S, H, Dh], any strides (e.g. views into a fused qkv projection)
    qw_ptr, qb_ptr, kw_ptr, kb_ptr,  # [Dh] LayerNorm affine of q and of k (each optional)
    cos_ptr, sin_ptr,  # [S - n_text, Dh] RoPE tables (read when HAS_ROPE)
    qo_ptr, ko_ptr,  # [B, H, S, Dh] contiguous outputs
    S, H, Dh, n_text, eps,
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
        vmask = mask & (vrow >= 0)  # text rows keep cos 1, sin 0: the identity, exactly
        cos = tl.load(cos_ptr + vrow * s_cs + cols[None, :] * s_cd, mask=vmask, other=1.0).to(tl.float32)
        sin = tl.load(sin_ptr + vrow * s_ss + cols[None, :] * s_sd, mask=vmask, other=0.0).to(tl.float32)
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


def qk_norm_rope_launch(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, n_text, eps, q_out, k_out) -> None:
    """Run the kernel into caller-provided contiguous [B, H, S, Dh] outputs. n_text in [0, S]."""
    B, S, H, Dh = q.shape
    if q_out.numel() == 0:
        return
    block_d = next_pow2(Dh)
    if is_interpreted(_qk_norm_rope_kernel):
        heads, block_s, num_warps = H, min(next_pow2(S), max(1, 2**15 // block_d)), 1
    else:
        # One head per program, heads fastest in the grid: programs that run together share their
        # RoPE rows (L1/L2) and read neighbouring bytes of each [S, H, Dh] row.
        heads, block_s, num_warps = 1, max(1, 2048 // block_d), 8  # ~80 registers at Dh 64 (sm_90)
    has_rope = cos is not None and cos.shape[0] > 0  # text-only input: nothing to rotate
    cs = (cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1)) if has_rope else (0, 0, 0, 0)
    if not has_rope:
        cos = sin = None
    grid = (triton.cdiv(H, heads), triton.cdiv(S, block_s), B)
    with device_of(q):
        _qk_norm_rope_kernel[grid](
            q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, q_out, k_out,
            S, H, Dh, n_text, eps,
            *q.stride(), *k.stride(),
            _stride0(q_weight), _stride0(q_bias), _stride0(k_weight), _stride0(k_bias), *cs,
            HAS_QW=q_weight is not None, HAS_QB=q_bias is not None,
            HAS_KW=k_weight is not None, HAS_KB=k_bias is not None, HAS_ROPE=has_rope,
            HEADS_PER_PROG=heads, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=num_warps,
        )  # fmt: skip


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
) -> tuple[torch.Tensor, torch.Tensor]:
    B, S, H, Dh = q.shape
    q_out = torch.empty((B, H, S, Dh), dtype=q.dtype, device=q.device)
    k_out = torch.empty((B, H, S, Dh), dtype=k.dtype, device=k.device)
    qk_norm_rope_launch(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, n_text, eps, q_out, k_out)
    return q_out, k_out


@_qk_norm_rope_op.register_fake
def _(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, n_text, eps):
    B, S, H, Dh = q.shape
    return q.new_empty((B, H, S, Dh)), k.new_empty((B, H, S, Dh))


# ---------------------------------------------------------------------------------------------------
# Kernel 2: flash-attention forward that rotates its own Q/K tiles


@jit
def _load_rope_tile(
    ptr, s_s, s_d,  # one head of [B, H, S, Dh], offset to (b, h)
    cos_ptr, sin_ptr, s_cs, s_cd, s_ss, s_sd,  # [S - n_text, Dh]
    rows, cols, S, n_text,
    HAS_ROPE: tl.constexpr, MASK_ROWS: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """Load rows of a q or k head and rotate the video rows in fp32; returns the input dtype."""
    rmask = (rows < S)[:, None]
    if MASK_ROWS:
        x = tl.load(ptr + rows[:, None] * s_s + cols[None, :] * s_d, mask=rmask, other=0.0)
    else:
        x = tl.load(ptr + rows[:, None] * s_s + cols[None, :] * s_d)
    if HAS_ROPE:
        vrow = (rows - n_text)[:, None]
        vmask = rmask & (vrow >= 0)
        cos = tl.load(cos_ptr + vrow * s_cs + cols[None, :] * s_cd, mask=vmask, other=1.0).to(tl.float32)
        sin = tl.load(sin_ptr + vrow * s_ss + cols[None, :] * s_sd, mask=vmask, other=0.0).to(tl.float32)
        x = _rope_tile(x.to(tl.float32), cos, sin, ROWS, HEAD_DIM).to(x.dtype)
    return x


@jit
def _attn_block(
    acc, l_i, m_i, q,  # running output [BLOCK_M, HEAD_DIM] fp32, row sum and max [BLOCK_M], q tile
    k_ptr, v_ptr, s_ks, s_kd, s_vs, s_vd,
    cos_ptr, sin_ptr, s_cs, s_cd, s_ss, s_sd,
    start_n, S, n_text, qk_scale,
    HAS_ROPE: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    cols = tl.arange(0, HEAD_DIM)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rope_tile(k_ptr, s_ks, s_kd, cos_ptr, sin_ptr, s_cs, s_cd, s_ss, s_sd, offs_n, cols, S, n_text,
                        HAS_ROPE, MASKED, BLOCK_N, HEAD_DIM)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # log2 domain
    if MASKED:
        qk = tl.where((offs_n < S)[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))  # finite: every block holds at least one key
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MASKED:
        v = tl.load(v_ptr + offs_n[:, None] * s_vs + cols[None, :] * s_vd, mask=(offs_n < S)[:, None], other=0.0)
    else:
        v = tl.load(v_ptr + offs_n[:, None] * s_vs + cols[None, :] * s_vd)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, l_i, m_new


@jit
def _rope_flash_attn_kernel(
    q_ptr, k_ptr, v_ptr,  # [B, H, S, HEAD_DIM], any strides; q, k normalized, not rotated
    cos_ptr, sin_ptr,  # [S - n_text, HEAD_DIM] RoPE tables (read when HAS_ROPE)
    o_ptr,  # [B, H, S, HEAD_DIM] contiguous output
    S, H, n_text, qk_scale,
    sqb, sqh, sqs, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    s_cs, s_cd, s_ss, s_sd,
    HAS_ROPE: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cols = tl.arange(0, HEAD_DIM)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_rope_tile(q_ptr + b * sqb + h * sqh, sqs, sqd, cos_ptr, sin_ptr, s_cs, s_cd, s_ss, s_sd,
                        offs_m, cols, S, n_text, HAS_ROPE, True, BLOCK_M, HEAD_DIM)
    k_ptr += b * skb + h * skh
    v_ptr += b * svb + h * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (S // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):  # full key blocks: no masks
        acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, k_ptr, v_ptr, sks, skd, svs, svd,
                                    cos_ptr, sin_ptr, s_cs, s_cd, s_ss, s_sd, start_n, S, n_text, qk_scale,
                                    HAS_ROPE, False, DOT_PREC, BLOCK_N, HEAD_DIM)
    if n_full < S:  # the tail block: keys past S get -inf
        acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, k_ptr, v_ptr, sks, skd, svs, svd,
                                    cos_ptr, sin_ptr, s_cs, s_cd, s_ss, s_sd, n_full, S, n_text, qk_scale,
                                    HAS_ROPE, True, DOT_PREC, BLOCK_N, HEAD_DIM)
    out = acc / l_i[:, None]
    o_off = (b * H + h) * S * HEAD_DIM
    tl.store(o_ptr + o_off + offs_m[:, None] * HEAD_DIM + cols[None, :], out, mask=(offs_m < S)[:, None])


if HAS_TRITON and not is_interpreted(_rope_flash_attn_kernel):
    _rope_flash_attn_tuned = triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            # With RoPE the K-tile rotation costs registers: on sm_90, 128x64 with 4 warps spills
            # (ptxas), 8 warps does not; 128x64/4 stays for the no-RoPE (2b) case.
            for bm, bn, w, s in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)]
        ],
        key=["S", "HEAD_DIM", "HAS_ROPE", "DOT_PREC"],
    )(_rope_flash_attn_kernel)
else:
    _rope_flash_attn_tuned = None


def rope_flash_attention_launch(q, k, v, cos, sin, n_text, out) -> None:
    """Run the flash-attention kernel into a caller-provided contiguous [B, H, S, Dh] output."""
    B, H, S, Dh = q.shape
    if out.numel() == 0:
        return
    has_rope = cos is not None and cos.shape[0] > 0  # text-only input: nothing to rotate
    cs = (cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1)) if has_rope else (0, 0, 0, 0)
    if not has_rope:
        cos = sin = None
    args = (
        q, k, v, cos, sin, out, S, H, n_text, math.log2(math.e) / math.sqrt(Dh),
        *q.stride(), *k.stride(), *v.stride(), *cs,
    )  # fmt: skip
    # fp32 inputs: full-precision dots (tf32 would be a different answer); others: the default.
    meta = {"HAS_ROPE": has_rope, "DOT_PREC": "ieee" if q.dtype == torch.float32 else None, "HEAD_DIM": Dh}
    with device_of(q):
        if _rope_flash_attn_tuned is None or q.dtype == torch.float32:
            # Interpreter: autotuning would take minutes. fp32 (ieee dots) is for checking, not speed:
            # one small configuration instead of compiling five slow-to-build ones.
            block_m, block_n = 64, 32
            grid = (triton.cdiv(S, block_m), B * H)
            _rope_flash_attn_kernel[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2)
        else:
            grid = lambda m: (triton.cdiv(S, m["BLOCK_M"]), B * H)  # noqa: E731
            _rope_flash_attn_tuned[grid](*args, **meta)


@torch.library.custom_op("cogvx::rope_flash_attention", mutates_args=())
def _rope_flash_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    n_text: int,
) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    rope_flash_attention_launch(q, k, v, cos, sin, n_text, out)
    return out


@_rope_flash_attention_op.register_fake
def _(q, k, v, cos, sin, n_text):
    return q.new_empty(q.shape)


# ---------------------------------------------------------------------------------------------------
# Dispatch


def _clamp_n_text(n_text: int, S: int) -> int:
    return min(max(n_text if n_text >= 0 else S + n_text, 0), S)  # Python slice semantics


def _rope_table_problem(cos, sin, n_video: int, dh: int, what: str) -> str | None:
    if (cos is None) != (sin is None):
        return f"{what}: cos and sin must both be given or both be None"
    if cos is None:
        return None
    if dh % 2:
        return f"{what}: RoPE needs an even head dim (got {dh})"
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (n_video, dh):
            want = [n_video, dh]
            return f"{what} triton kernel needs {name} of shape [S - n_text, Dh] = {want} (got {list(t.shape)})"
        if t.dtype not in _DTYPES:
            return f"{what} triton kernel supports float32/float16/bfloat16 RoPE tables, not {t.dtype}"
    return None


def _qk_problem(q, k, norms, cos, sin, n_text) -> str | None:
    """Why the qk_norm_rope kernel cannot take these inputs, or None when it can."""
    tensors = [t for t in (q, k, *norms, cos, sin) if t is not None]
    if q.dim() != 4 or q.shape != k.shape:
        shapes = f"{list(q.shape)}, {list(k.shape)}"
        return f"qk_norm_rope triton kernel needs q, k of one shape [B, S, H, Dh] (got {shapes})"
    if any(t.dtype not in _DTYPES for t in tensors):
        return "qk_norm_rope triton kernel supports float32/float16/bfloat16 only"
    if any(t.device != q.device for t in tensors):
        return "qk_norm_rope triton kernel needs all tensors on one device"
    dh = q.shape[-1]
    if dh > _MAX_HEAD_DIM:
        return f"qk_norm_rope triton kernel supports head dim <= {_MAX_HEAD_DIM} (got {dh})"
    if any(w is not None and tuple(w.shape) != (dh,) for w in norms):
        return f"qk_norm_rope triton kernel needs LayerNorm weight and bias of shape [{dh}]"
    return _rope_table_problem(cos, sin, q.shape[1] - n_text, dh, "qk_norm_rope")


def _attn_problem(q, k, v, cos, sin, n_text) -> str | None:
    """Why the flash-attention kernel cannot take these inputs, or None when it can."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        shapes = ", ".join(str(list(t.shape)) for t in (q, k, v))
        return f"rope_attention triton kernel needs q, k, v of one shape [B, H, S, Dh] (got {shapes})"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        dtypes = ", ".join(str(t.dtype) for t in (q, k, v))
        return f"rope_attention triton kernel needs q, k, v of one dtype, float32/float16/bfloat16 (got {dtypes})"
    if any(t is not None and t.device != q.device for t in (k, v, cos, sin)):
        return "rope_attention triton kernel needs all tensors on one device"
    if q.shape[-1] not in _FLASH_HEAD_DIMS:
        return f"rope_attention triton kernel supports head dim in {_FLASH_HEAD_DIMS} (got {q.shape[-1]})"
    if q.dtype == torch.bfloat16 and is_interpreted(_rope_flash_attn_kernel):
        return "rope_attention: tl.dot on bfloat16 is wrong under TRITON_INTERPRET=1"
    if q.shape[2] == 0:
        return "rope_attention triton kernel needs S >= 1"
    return _rope_table_problem(cos, sin, q.shape[2] - n_text, q.shape[-1], "rope_attention")


def qk_norm_rope(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, n_text, eps=1e-6, backend="torch"):
    """Dispatch point used by the transformer; ``backend`` is "torch" (reference) or "triton".

    Same arguments and results as ``qk_norm_rope_reference``: q, k [B, S, H, Dh] (any strides) in,
    contiguous [B, H, S, Dh] out in the input dtypes. "triton" does norm, RoPE and the layout change
    of q and k in one launch; unsupported inputs fall back to the reference with a one-time warning.
    """
    if not use_triton(backend, q.device, _qk_norm_rope_kernel):
        return qk_norm_rope_reference(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, n_text, eps)
    if q.dim() == 4:
        n_text = _clamp_n_text(n_text, q.shape[1])
    reason = _qk_problem(q, k, (q_weight, q_bias, k_weight, k_bias), cos, sin, n_text)
    if reason is not None:
        warn_once(reason + "; using the PyTorch reference")
        return qk_norm_rope_reference(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, n_text, eps)
    return torch.ops.cogvx.qk_norm_rope(q, k, q_weight, q_bias, k_weight, k_bias, cos, sin, n_text, eps)


def rope_attention(q, k, v, cos=None, sin=None, n_text=0, backend="torch"):
    """Non-causal, unmasked attention with RoPE on the video rows of q and k; [B, H, S, Dh] each.

    q, k: normalized, not rotated; cos, sin: [S - n_text, Dh] or None (no RoPE). Returns [B, H, S, Dh]
    in q's dtype. "torch": RoPE then SDPA (``rope_flash_attention_reference``). "triton": one
    flash-attention kernel that rotates its Q/K tiles; unsupported inputs (head dim not in
    {16, 32, 64, 128}, mixed dtypes, bf16 under the interpreter, ...) fall back with a one-time warning.
    """
    if not use_triton(backend, q.device, _rope_flash_attn_kernel):
        return rope_flash_attention_reference(q, k, v, cos, sin, n_text)
    if q.dim() == 4:
        n_text = _clamp_n_text(n_text, q.shape[2])
    reason = _attn_problem(q, k, v, cos, sin, n_text)
    if reason is not None:
        warn_once(reason + "; using the PyTorch reference")
        return rope_flash_attention_reference(q, k, v, cos, sin, n_text)
    return torch.ops.cogvx.rope_flash_attention(q, k, v, cos, sin, n_text)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """Non-causal attention, no mask. q, k, v: [B, H, S, Dh]; returns [B, H, S, Dh].

    "torch": SDPA; "triton": the Triton flash-attention kernel (``rope_attention`` without RoPE).
    """
    return rope_attention(q, k, v, None, None, 0, backend)
