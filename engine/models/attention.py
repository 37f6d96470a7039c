"""Self-attention over the joint [text; video] sequence (diffusers ``CogVideoXAttnProcessor2_0``):
q/k/v projections (optionally fused into one GEMM), per-head QK LayerNorm, RoPE on the video rows,
attention, output projection. The math after the projections is ``cogvx.kernels``' fusion boundary."""

from __future__ import annotations

import torch
from torch import nn

from cogvx.kernels import attention, int8_attention, qk_norm_rope, rope_attention, sage_attention

from .config import TransformerConfig
from .fp8_linear import fp8_linear

__all__ = ["Attention", "chunked_attention", "query_block", "use_chunked_attention", "CHUNK_BYTES"]

# Query rows per block of chunked_attention, and the most blocks one call unrolls into a compiled graph.
_BLOCK_ROWS, _MAX_BLOCKS = 128, 64
# The largest block of scores (bytes) for which chunked_attention beats SDPA: measured on the 2-core
# AVX-512 CPU (benchmarks/sweep.py, commit 5f3b111), blocks of 2 x 30 heads x 128 rows x 1216 keys in
# bf16 (19 MB) made the int8dq-cpu step 0.91x its time with SDPA; of 2 x 30 x 192 x 9676 (223 MB), 1.5x:
# inductor's softmax then streams each block from memory.
CHUNK_BYTES = 32 << 20


def use_chunked_attention(q: torch.Tensor) -> bool:
    """Whether a compiled CPU attention on q [B, H, S, Dh] (reduced precision) runs chunked_attention:
    when one block of its scores stays within CHUNK_BYTES (it then stays in cache), else SDPA."""
    b, h, s, _ = q.shape
    return q.device.type == "cpu" and b * h * query_block(s) * s * q.element_size() <= CHUNK_BYTES


def query_block(seq_len: int) -> int:
    """Query rows per block for a sequence of ``seq_len``: 128, or more (a multiple of 64) so that no
    more than 64 blocks are unrolled into the compiled graph."""
    rows = max(_BLOCK_ROWS, -(-seq_len // _MAX_BLOCKS))
    return -(-rows // 64) * 64


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v, one block of query rows at a time: q, k, v [B, H, S, Dh] -> [B, H, S, Dh]
    in q's dtype. The scores of a block are a [B, H, rows, S] matmul in q's dtype, the softmax runs in
    fp32 (under torch.compile one fused loop per block, read and written once) and its probabilities
    return to q's dtype for the second matmul. Compiled on the CPU in bf16 this runs the two matmuls as
    oneDNN bf16 GEMMs (AVX-512 BF16); compiled alone it measured 1.75x (S=1216, 2 x 30 heads) to 2.1x
    (S=9676) faster than SDPA's CPU flash kernel, which is no faster in bf16 than in fp32 without AMX.
    Inside the compiled transformer only short sequences keep that gain (see CHUNK_BYTES).
    Numerics: the scores are rounded to bf16 before the softmax (relative 2^-9): 45 dB SQNR against
    float64 attention on unit-variance inputs; the compiled int8dq-cpu-bf16attn generation is held to
    that recipe's PSNR floor (tests/test_quantize_accuracy.py)."""
    s, rows = q.shape[2], query_block(q.shape[2])
    q, kt, v, scale = q.contiguous(), k.transpose(-1, -2).contiguous(), v.contiguous(), q.shape[-1] ** -0.5
    out = []
    for i in range(0, s, rows):
        scores = q[:, :, i:i + rows] @ kt
        out.append(torch.softmax(scores.float() * scale, dim=-1).to(q.dtype) @ v)
    return torch.cat(out, dim=2)


class Attention(nn.Module):
    """Self-attention over the joint sequence: q/k/v (optionally fused), per-head QK LayerNorm,
    RoPE on video rows, SDPA (or the int8 CPU attention), output projection (diffusers ``CogVideoXAttnProcessor2_0``)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d, dh = cfg.inner_dim, cfg.attention_head_dim
        self.heads, self.head_dim = cfg.num_attention_heads, dh
        self.to_q = nn.Linear(d, d, bias=cfg.attention_bias)
        self.to_k = nn.Linear(d, d, bias=cfg.attention_bias)
        self.to_v = nn.Linear(d, d, bias=cfg.attention_bias)
        self.to_qkv: nn.Linear | None = None
        self.norm_q = nn.LayerNorm(dh, eps=1e-6)
        self.norm_k = nn.LayerNorm(dh, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(d, d, bias=True), nn.Dropout(cfg.dropout)])
        self.backend = "torch"  # QK-norm + RoPE kernel: "torch" (reference) or "triton"
        self.attention = "sdpa"  # "sdpa" after the QK kernel, or "flash": Triton attention that rotates its tiles
        # Attention in this dtype (a recipe's attention_dtype), else x's: SDPA, or chunked_attention when
        # compiled on the CPU.
        self.sdpa_dtype: torch.dtype | None = None
        # int8 q k^T + bf16 p v on the CPU (cogvx.kernels.int8_attention; a recipe's attention_kernel).
        self.int8_cpu = False
        # int8 q k^T + fp16 p v Triton attention (cogvx.kernels.sage_attention; a recipe's attention_kernel
        # "int8-cuda"). A flag, not a value of ``attention``: kernels="auto" rewrites that per shape, and
        # this choice changes the numerics, so only the recipe may make it.
        self.int8_gpu = False

    @torch.no_grad()
    def fuse_qkv(self, cat=torch.cat) -> None:
        """Replace to_q/to_k/to_v by one [3D, D] projection (one GEMM instead of three). ``cat`` joins the
        three weights along the output rows (quantized weights need their own, see ``cogvx.quantize``)."""
        if self.to_qkv is not None:
            return
        qs = (self.to_q, self.to_k, self.to_v)
        w = cat([m.weight for m in qs])
        fused = nn.Linear(w.shape[1], w.shape[0], bias=self.to_q.bias is not None, device="meta")
        fused.weight = nn.Parameter(w, requires_grad=False)
        if fused.bias is not None:
            fused.bias = nn.Parameter(torch.cat([m.bias for m in qs]), requires_grad=False)
        self.to_qkv = fused
        del self.to_q, self.to_k, self.to_v

    def forward(self, x: torch.Tensor, rope, n_text: int, exchange=None, x_scale: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x [B, S, D] -> [B, S, D]. With ``x_scale`` [B, S, 1], x is float8 e4m3 quantized per row and the
        q/k/v projections (fp8 row-wise weights) take it as is, producing ``out_dtype``.
        ``exchange(q, k, v, attend)`` (sequence parallelism): x holds a shard of the sequence; the exchange
        brings q, k, v [B, S, H, Dh] of the shard to the whole sequence for a subset of heads, calls
        ``attend`` on them and returns the shard's output [B, H, S, Dh]."""
        b, s, _ = x.shape
        shape = (b, s, self.heads, self.head_dim)

        def proj(layer):
            return layer(x) if x_scale is None else fp8_linear(layer, x, x_scale, out_dtype)

        if self.int8_cpu and exchange is None and x_scale is None and x.device.type == "cpu" \
                and hasattr(self.to_qkv, "gemm"):  # int8 q/k/v GEMM (gemm / finish, as int8dq-cpu's)
            return self.to_out[0](self._int8_cpu_from_gemm(x, rope, n_text).transpose(1, 2).reshape(b, s, -1))
        if self.to_qkv is not None:
            q, k, v = proj(self.to_qkv).view(b, s, 3, self.heads, self.head_dim).unbind(2)
        else:
            q, k, v = proj(self.to_q).view(shape), proj(self.to_k).view(shape), proj(self.to_v).view(shape)
        if exchange is None:
            o = self.attend(q, k, v, rope, n_text)
        else:
            o = exchange(q, k, v, lambda q_, k_, v_: self.attend(q_, k_, v_, rope, n_text))
        return self.to_out[0](o.transpose(1, 2).reshape(b, s, -1))

    def qk_norms(self) -> tuple:
        """The per-head LayerNorms' affine: (q weight, q bias, k weight, k bias)."""
        return self.norm_q.weight, self.norm_q.bias, self.norm_k.weight, self.norm_k.bias

    def _int8_cpu_from_gemm(self, x: torch.Tensor, rope, n_text: int) -> torch.Tensor:
        """The int8 CPU attention fed straight from the fused int8 q/k/v GEMM: the kernel applies the
        GEMM's per-token rescale and bias, the QK norm and RoPE as it reads the GEMM's output, so q, k, v
        take no elementwise pass over memory between the two. -> [B, H, S, Dh] in x's dtype."""
        b, s, _ = x.shape
        acc, row_scale = self.to_qkv.gemm(x.reshape(b * s, -1))  # [B * S, 3 * H * Dh] before its rescale
        q, k, v = (t.transpose(1, 2) for t in acc.view(b, s, 3, self.heads, self.head_dim).unbind(2))
        bias = None if self.to_qkv.bias is None else self.to_qkv.bias.view(3, -1).unbind(0)
        return int8_attention(q, k, v, row_scale=row_scale, in_bias=bias, norms=self.qk_norms(), rope=rope,
                              n_text=n_text, eps=self.norm_q.eps).to(x.dtype)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope, n_text: int) -> torch.Tensor:
        """QK-norm, RoPE on the video rows, attention: q, k, v [B, S, h, Dh] (any strides, any head
        count h) of the whole [text; video] sequence -> [B, h, S, Dh]."""
        cos, sin = rope if rope is not None else (None, None)
        norms = self.qk_norms()
        if self.int8_gpu:  # norm + RoPE kernel, then int8 quantization and attention (its own numerics)
            q, k = qk_norm_rope(q, k, *norms, cos, sin, n_text, self.norm_q.eps, backend=self.backend)
            return sage_attention(q, k, v.transpose(1, 2), backend=self.backend)  # "torch": the same numerics
        if self.attention == "flash":  # RoPE applied inside the attention kernel, on its Q/K tiles
            q, k = qk_norm_rope(q, k, *norms, None, None, n_text, self.norm_q.eps, backend=self.backend)
            return rope_attention(q, k, v.transpose(1, 2), cos, sin, n_text, backend="triton")
        if self.int8_cpu and q.device.type == "cpu":  # the kernel normalizes and rotates q, k as it reads them
            return int8_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), norms=norms,
                                  rope=rope, n_text=n_text, eps=self.norm_q.eps).to(q.dtype)
        q, k = qk_norm_rope(q, k, *norms, cos, sin, n_text, self.norm_q.eps, backend=self.backend)
        v, q_dtype = v.transpose(1, 2), q.dtype
        if self.sdpa_dtype is not None and self.sdpa_dtype != q_dtype:  # casts fuse into the ops around
            q, k, v = q.to(self.sdpa_dtype), k.to(self.sdpa_dtype), v.to(self.sdpa_dtype)
            if torch.compiler.is_compiling() and use_chunked_attention(q):
                # Compiled on the CPU, short reduced-precision attention runs as blocked GEMMs (chunked_attention).
                return chunked_attention(q, k, v).to(q_dtype)
        return attention(q, k, v, backend="torch").to(q_dtype)  # SDPA, [B, H, S, Dh]
