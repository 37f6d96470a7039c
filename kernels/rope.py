"""3D RoPE as CogVideoX applies it: the shared PyTorch reference, the shared Triton tile helpers,
and the checks on the cos/sin tables.

RoPE acts on video rows only, in fp32, on interleaved pairs:
``(x0, x1) -> (x0*cos - x1*sin, x1*cos + x0*sin)``; cos and sin are [N_video, Dh] fp32 tables with
each frequency repeated twice. On the joint [text; video] sequence, row r (global index
``row_offset + r``) is text when ``row_offset + r < n_text`` and is left as is; a video row uses table
row ``row_offset + r - n_text``. Rows past the end of the table (the padding that makes equal
shards under sequence parallelism) are left unrotated and never read the table.
"""

from __future__ import annotations

import torch

from ._common import DTYPES, jit, shard_rows, tl

__all__ = ["apply_rope_reference", "rope_table_problem", "rope_video_rows"]


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, N, Dh] (any float dtype); cos, sin: [N, Dh] fp32. Returns x's dtype, math in fp32."""
    x32 = x.float()
    x0, x1 = x32.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-x1, x0], dim=-1).flatten(-2)
    return (x32 * cos + rotated * sin).to(x.dtype)


def rope_video_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_text: int, row_offset: int = 0):
    """RoPE on the video rows of ``x`` [B, H, S, Dh], rows being global rows ``row_offset + r``.

    cos, sin: the full tables [N_video, Dh] fp32. Text rows and padding rows (past the table) are
    returned unchanged. Returns x's dtype.
    """
    S = x.shape[2]
    t, start = shard_rows(n_text, S, row_offset)
    n = min(max(cos.shape[0] - start, 0), S - t)  # video rows of this shard that have a table row
    parts = [x[:, :, :t], apply_rope_reference(x[:, :, t : t + n], cos[start : start + n], sin[start : start + n])]
    if t + n < S:
        parts.append(x[:, :, t + n :])  # padding rows
    return torch.cat(parts, dim=2)


def rope_table_problem(cos, sin, dh: int, what: str, rows: int | None = None) -> str | None:
    """Why the cos/sin tables cannot go to a kernel, or None when they can (or are both None).

    rows: the table length the kernel needs, or None for any length (tables of the full sequence
    read by a shard at an offset).
    """
    if (cos is None) != (sin is None):
        return f"{what}: cos and sin must both be given or both be None (got one of them)"
    if cos is None:
        return None
    if dh % 2:
        return f"{what}: RoPE needs an even head dim (got {dh})"
    for name, t in (("cos", cos), ("sin", sin)):
        n = t.shape[0] if t.dim() == 2 else -1
        if t.dim() != 2 or t.shape[1] != dh or (rows is not None and n != rows):
            want = f"[{rows if rows is not None else 'N_video'}, {dh}]"
            return f"{what} triton kernel needs {name} of shape {want} (got {list(t.shape)})"
        if t.dtype not in DTYPES:
            return f"{what} triton kernel supports float32/float16/bfloat16 RoPE tables, not {t.dtype}"
    return None


@jit
def rope_tile(x, cos, sin, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """x, cos, sin: [ROWS, BLOCK_D] fp32 -> x rotated. Interleaved pairs: rot[2i] = -x[2i+1],
    rot[2i+1] = x[2i], formed in registers (a split, a join: lane shuffles)."""
    x_even, x_odd = tl.split(tl.reshape(x, [ROWS, BLOCK_D // 2, 2]))
    rot = tl.reshape(tl.join(-x_odd, x_even), [ROWS, BLOCK_D])
    return x * cos + rot * sin


@jit
def rope_pairs(x, x_partner, cos, sin, cols):
    """The same rotation from x and each element's pair partner x_partner[j] = x[j ^ 1], both
    [ROWS, BLOCK_D] fp32 (cols: the column indices): x*cos + x_partner*(-sin, +sin, ...), the same
    products and sums as ``rope_tile``. For kernels short of registers: no cross-lane shuffle."""
    sign = tl.where((cols % 2) == 0, -1.0, 1.0)[None, :]
    return x * cos + x_partner * (sin * sign)


@jit
def rope_table_rows(
    cos_ptr, sin_ptr, s_cs, s_cd, s_ss, s_sd,  # [N_video, Dh] RoPE tables
    vrow, cols, mask, n_video,  # vrow [ROWS, 1]: table row of each row (< 0 for text rows)
):  # fmt: skip
    """cos, sin [ROWS, BLOCK_D] fp32 for the rows: the table where 0 <= vrow < n_video, else the
    identity (cos 1, sin 0) for text and padding rows, which never read the table."""
    vmask = mask & (vrow >= 0) & (vrow < n_video)
    cos = tl.load(cos_ptr + vrow * s_cs + cols[None, :] * s_cd, mask=vmask, other=1.0).to(tl.float32)
    sin = tl.load(sin_ptr + vrow * s_ss + cols[None, :] * s_sd, mask=vmask, other=0.0).to(tl.float32)
    return cos, sin
