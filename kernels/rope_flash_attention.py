"""Non-causal, unmasked attention over the joint [text; video] sequence, with RoPE applied to the
video rows of q and k inside a flash-attention forward kernel (the second half of diffusers
``CogVideoXAttnProcessor2_0``, after the QK LayerNorm).

The kernel rotates each Q tile once and each K tile as it streams past, in fp32, so q and k reach
it normalized but not rotated and the rotated copies never go to memory. Its tile configurations
are per GPU family (``flash_configs``, picked by the device's compute capability at launch):
registers and shared memory per block differ, and ``python -P -m cogvx.kernels.aot`` checks that
every configuration is spill-free and fits, for sm_80, sm_89 and sm_90.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from ._common import DTYPES, HAS_TRITON, device_of, is_interpreted, jit, shard_rows, tl, warn_once
from .policy import use_triton
from .rope import rope_pairs, rope_table_problem, rope_table_rows, rope_video_rows

if HAS_TRITON:
    import triton

__all__ = ["attention", "flash_configs", "gpu_family", "rope_attention", "rope_flash_attention_launch",
           "rope_flash_attention_reference"]  # fmt: skip

_HEAD_DIMS = (16, 32, 64, 128)  # tl.dot needs a power of two >= 16; 64 is what the models use


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
        _check_table_rows(cos, q.shape[2], n_text)
        q = rope_video_rows(q, cos, sin, n_text)
        k = rope_video_rows(k, cos, sin, n_text)
    return F.scaled_dot_product_attention(q, k, v)


def _check_table_rows(cos: torch.Tensor, S: int, n_text: int) -> None:
    """The whole sequence is here (no shards): one table row per video row, exactly."""
    n_video = S - shard_rows(n_text, S)[0]
    if cos.shape[0] != n_video:
        raise ValueError(f"rope_attention: cos and sin need one row per video row, [S - n_text, Dh] with "
                         f"S={S}, n_text={n_text}: {n_video} rows (got {list(cos.shape)}); build the tables "
                         "for this resolution")  # fmt: skip


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
        # Each element's pair partner is loaded again (a cache hit) rather than shuffled in
        # registers: with the shuffle (rope_tile) every 128-row tile spilled on sm_80/sm_89.
        partner = cols ^ 1
        if MASK_ROWS:
            xp = tl.load(ptr + rows[:, None] * s_s + partner[None, :] * s_d, mask=rmask, other=0.0)
        else:
            xp = tl.load(ptr + rows[:, None] * s_s + partner[None, :] * s_d)
        vrow = (rows - n_text)[:, None]
        cos, sin = rope_table_rows(cos_ptr, sin_ptr, s_cs, s_cd, s_ss, s_sd, vrow, cols, rmask, S - n_text)
        x = rope_pairs(x.to(tl.float32), xp.to(tl.float32), cos, sin, cols).to(x.dtype)
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


# (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner may pick, per GPU family, with RoPE (True)
# and without (False). Each is spill-free at head dim 64 in fp16 and bf16 and fits the family's shared
# memory per block (`python -P -m cogvx.kernels.aot` checks every one for sm_80, sm_89 and sm_90).
# 128-row tiles need 8 warps: with 4 they spill with RoPE on sm_80, sm_89 and sm_90 (and on sm_80/89
# even without); 128x128 with RoPE spills on sm_80 and sm_90 and overflows sm_89's shared memory.
_TILES = {
    # Hopper (and datacenter Blackwell): 227 KB shared memory per block.
    "sm90": {True: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)],
             False: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3)]},
    # A100 (sm_80), Orin (sm_87): 163 KB.
    "sm80": {True: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3)],
             False: [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)]},
    # Consumer Ampere (sm_86), Ada (sm_89), consumer Blackwell (sm_120): 99 KB, so fewer stages.
    "sm89": {True: [(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3)],
             False: [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)]},
    # Older GPUs (64 KB): the smallest tile only.
    "old": {True: [(64, 32, 4, 2)], False: [(64, 32, 4, 2)]},
}  # fmt: skip
_FP32_CONFIG = (64, 32, 4, 2)  # fp32 (ieee dots) is for checking, not speed: one small configuration


def gpu_family(capability: tuple[int, int]) -> str:
    """Which row of the tile table a GPU of this compute capability uses."""
    if capability[0] in (9, 10, 11):
        return "sm90"
    if capability in ((8, 0), (8, 7)):
        return "sm80"
    return "sm89" if capability[0] >= 8 else "old"


def flash_configs(capability: tuple[int, int], has_rope: bool) -> list:
    """The autotune configurations the launcher offers on a GPU of this compute capability."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in _TILES[gpu_family(capability)][has_rope]]  # fmt: skip


@lru_cache(maxsize=None)
def _tuned(capability: tuple[int, int], has_rope: bool):
    return triton.autotune(configs=flash_configs(capability, has_rope), key=["S", "HEAD_DIM", "DOT_PREC"])(
        _rope_flash_attn_kernel
    )


def launch_plan(q, k, v, cos, sin, n_text, out):
    """(arguments, meta-parameters without the tile configuration) of the kernel, as the launcher
    passes them (the AOT check compiles exactly this with each of ``flash_configs``)."""
    Dh = q.shape[-1]
    has_rope = cos is not None and cos.shape[0] > 0  # text-only input: nothing to rotate
    cs = (cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1)) if has_rope else (0, 0, 0, 0)
    if not has_rope:
        cos = sin = None
    args = (
        q, k, v, cos, sin, out, q.shape[2], q.shape[1], n_text, math.log2(math.e) / math.sqrt(Dh),
        *q.stride(), *k.stride(), *v.stride(), *cs,
    )  # fmt: skip
    # fp32 inputs: full-precision dots (tf32 would be a different answer); others: the default.
    meta = {"HAS_ROPE": has_rope, "DOT_PREC": "ieee" if q.dtype == torch.float32 else None, "HEAD_DIM": Dh}
    return args, meta


def rope_flash_attention_launch(q, k, v, cos, sin, n_text, out) -> None:
    """Run the flash-attention kernel into a caller-provided contiguous [B, H, S, Dh] output."""
    B, H, S, Dh = q.shape
    if out.numel() == 0:
        return
    args, meta = launch_plan(q, k, v, cos, sin, n_text, out)
    with device_of(q):
        if is_interpreted(_rope_flash_attn_kernel) or q.dtype == torch.float32:
            # Interpreter: autotuning would take minutes; fp32: see _FP32_CONFIG.
            bm, bn, w, s = _FP32_CONFIG
            _rope_flash_attn_kernel[(triton.cdiv(S, bm), B * H)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn,
                                                                   num_warps=w, num_stages=s)  # fmt: skip
        else:
            tuned = _tuned(torch.cuda.get_device_capability(q.device), meta["HAS_ROPE"])
            tuned[lambda m: (triton.cdiv(S, m["BLOCK_M"]), B * H)](*args, **meta)


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


def _problem(q, k, v, cos, sin, n_text) -> str | None:
    """Why the kernel cannot take these inputs, or None when it can."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        shapes = ", ".join(str(list(t.shape)) for t in (q, k, v))
        return f"rope_attention triton kernel needs q, k, v of one shape [B, H, S, Dh] (got {shapes})"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        dtypes = ", ".join(str(t.dtype) for t in (q, k, v))
        return f"rope_attention triton kernel needs q, k, v of one dtype, float32/float16/bfloat16 (got {dtypes})"
    if any(t is not None and t.device != q.device for t in (k, v, cos, sin)):
        return "rope_attention triton kernel needs all tensors on one device"
    if q.shape[-1] not in _HEAD_DIMS:
        return f"rope_attention triton kernel supports head dim in {_HEAD_DIMS} (got {q.shape[-1]})"
    if q.dtype == torch.bfloat16 and is_interpreted(_rope_flash_attn_kernel):
        return "rope_attention: tl.dot on bfloat16 is wrong under TRITON_INTERPRET=1"
    if q.shape[2] == 0:
        return "rope_attention triton kernel needs S >= 1"
    return rope_table_problem(cos, sin, q.shape[-1], "rope_attention", rows=q.shape[2] - n_text)


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
        n_text, _ = shard_rows(n_text, q.shape[2])
        if cos is not None and cos.dim() == 2:
            _check_table_rows(cos, q.shape[2], n_text)
    reason = _problem(q, k, v, cos, sin, n_text)
    if reason is not None:
        warn_once(reason + "; using the PyTorch reference")
        return rope_flash_attention_reference(q, k, v, cos, sin, n_text)
    return torch.ops.cogvx.rope_flash_attention(q, k, v, cos, sin, n_text)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """Non-causal attention, no mask. q, k, v: [B, H, S, Dh]; returns [B, H, S, Dh].

    "torch": SDPA; "triton": the Triton flash-attention kernel (``rope_attention`` without RoPE).
    """
    return rope_attention(q, k, v, None, None, 0, backend)
