"""C kernels for x86-64 CPUs (cpu_kernels.c, cpu_gelu_quant.c; which build runs: cpu_isa.py): int8
attention, and the feed-forward's GELU fused with the per-row int8 quantization of the next GEMM's input.

``int8_attention(q, k, v)`` computes softmax(q k^T / sqrt(Dh)) v on CPU tensors for head dimension 64
(every CogVideoX model; 16 and 32 for small test models), as the op ``cogvx::int8_attention_cpu``
(opaque to torch.compile: no graph break), on CPUs with AVX-512 VNNI or AVX2. Numerics are those of
SageAttention: k smoothed by its mean over tokens, q and k int8 per token, fp32 online softmax, v
rounded to bf16 with fp32 sums; p rounded to bf16 too in the ``avx512_bf16`` variant (vdpbf16ps), kept
in fp32 with FMAs in the others (``avx512_vnni``; ``avx_vnni`` and ``avx2`` in 8 lanes, at about twice
the AVX-512 time). Against float64 attention
the bf16 variant measured 36-38 dB SQNR on unit-variance inputs with shifted keys (bf16 SDPA: 45-47 dB
without the shift; blocked bf16 attention: 40 dB with it; benchmarks/bench_cpu_kernels.py), 3.7-4.3x
faster than SDPA's fp32 flash kernel on an AMD EPYC; on a Sapphire Rapids-class Xeon (AMX), at the
cpu-bench shape, 0.64x SDPA fp32's time (avx512_vnni; avx512_bf16 0.77x), and with MKL, oneDNN and ATen
capped at AVX2 there (an AVX2-only CPU's view) avx_vnni 0.80x and avx2 0.94x. tests/test_cpu_kernels.py holds every variant the
machine runs to 33 dB against float64 and to 60 dB against a float64 model of its own numerics. Where
the CPU has AMX, the attention's two products run on its tiles, computed transposed so the softmax
needs no horizontal reduction (``amx``: 0.28x avx512_vnni's time there at 2 x 30 heads x 9676 tokens;
the softmax stays on AVX-512; p taken against a power of two, see cpu_attention_amx.c), as do the GEMMs
around it (oneDNN's). With ``norms=`` (and ``rope=``) the kernel also does the attention module's
per-head LayerNorm of q and k (and RoPE) as it reads them, so they take no pass over memory of their
own.

``gelu_quant_rows(acc, row_scale, bias)`` is int8dq-cpu's feed-forward middle in one pass over memory
(op ``cogvx::gelu_quant_cpu``): y = acc * row_scale + bias, g = GELU-tanh(y), then g quantized per row as
the next int8 linear takes it (u8 q + 128, fp32 scale); AVX-512F or AVX2 + FMA, the same numbers. Inductor
fuses the same ops into a loop that writes g in fp32 to memory and reads it back, with a vectorized tanh
of its own: 39 ms per cpu-bench layer on an AMD EPYC against the kernel's 3.7 ms.
``gelu_quant_rows_reference`` is the PyTorch form.

``unavailable(kernel=...)`` says why a kernel cannot run here (not x86-64 Linux, a CPU without the
instructions, no compiler, or a failed build): the model then keeps the PyTorch path (SDPA attention,
inductor's GELU + quantization loop) and the recipe warns. Every function takes ``isa=`` to run a given
variant (``cpu_isa.VARIANTS``; default: ``$COGVX_CPU_ISA``, else the best this CPU runs).
"""

from __future__ import annotations

import ctypes

import torch

from . import cpu_isa

__all__ = ["HEAD_DIMS", "gelu_quant_rows", "gelu_quant_rows_reference", "int8_attention", "unavailable", "variant"]

HEAD_DIMS = (16, 32, 64)  # 64: every CogVideoX model; 16 and 32: small test models
_QT, _KB = 32, 64  # query rows per tile and keys per block, as in cpu_kernels.c
_KERNELS = tuple(cpu_isa.KERNELS)


def variant(kernel: str = "attention", isa: str | None = None) -> str | None:
    """The build of ``kernel`` ("attention" or "gelu_quant") that runs here (a name of
    ``cpu_isa.VARIANTS``), or None where none does; ``isa`` caps it (default: $COGVX_CPU_ISA)."""
    return cpu_isa.select(isa, kernel)[0]


def _library(kernel: str, isa: str | None) -> tuple[ctypes.CDLL | None, str]:
    name, why = cpu_isa.select(isa, kernel)
    return cpu_isa.library(name) if name else (None, why)


def unavailable(head_dim: int | None = None, build: bool = True, kernel: str = "attention",
                isa: str | None = None) -> str:
    """Why ``kernel`` ("attention", for heads of ``head_dim``; or "gelu_quant") cannot run on this
    machine, or "" when it can. ``build``: build it (once per machine) and load it to be sure; False:
    only check the platform, the CPU's flags and the compiler. Not for compiled code: call it when
    setting a model up."""
    if kernel not in _KERNELS:
        raise ValueError(f"kernel {kernel!r} is not one of {', '.join(_KERNELS)}")
    if head_dim is not None and head_dim not in HEAD_DIMS:
        return f"it takes head dimensions {', '.join(map(str, HEAD_DIMS))} (got {head_dim})"
    return _library(kernel, isa)[1] if build else cpu_isa.missing(isa, kernel)


def _strides(t: torch.Tensor) -> ctypes.Array:
    return (ctypes.c_long * 3)(*t.stride()[:3])


class _Prep(ctypes.Structure):  # struct prep of cpu_attention.h
    _fields_ = [("bf16", ctypes.c_int), ("row_scale", ctypes.c_void_p), ("bias", ctypes.c_void_p * 3),
                ("norm", ctypes.c_int)] + [(n, ctypes.c_void_p) for n in ("qw", "qb", "kw", "kb", "cos", "sin")] + [
                ("eps", ctypes.c_float), ("n_text", ctypes.c_int), ("n_rope", ctypes.c_int)]


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().contiguous()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@torch.library.custom_op("cogvx::int8_attention_cpu", mutates_args=())
def _int8_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, isa: str,
                       row_scale: torch.Tensor | None, q_in_bias: torch.Tensor | None, k_in_bias: torch.Tensor | None,
                       v_in_bias: torch.Tensor | None, norm: bool, q_weight: torch.Tensor | None,
                       q_bias: torch.Tensor | None, k_weight: torch.Tensor | None, k_bias: torch.Tensor | None,
                       cos: torch.Tensor | None, sin: torch.Tensor | None, n_text: int, eps: float) -> torch.Tensor:
    dll, why = _library("attention", isa or None)
    if dll is None:
        raise RuntimeError(f"cogvx int8 CPU attention cannot run here: {why}")
    b, h, s, d = q.shape
    bf16 = all(t.dtype == torch.bfloat16 and t.stride(-1) == 1 for t in (q, k, v))  # read as they are
    if not bf16:
        q, k, v = (t if t.dtype == torch.float32 and t.stride(-1) == 1 else t.float().contiguous() for t in (q, k, v))
    rs, bq, bk, bv, qw, qb, kw, kb, cs, sn = (_f32(t) for t in (row_scale, q_in_bias, k_in_bias, v_in_bias, q_weight,
                                                                q_bias, k_weight, k_bias, cos, sin))
    prep = None
    if bf16 or norm or any(t is not None for t in (rs, bq, bk, bv)):
        n_rope = 0 if cs is None else min(cs.shape[0], max(s - n_text, 0))
        prep = _Prep(int(bf16), _ptr(rs), (ctypes.c_void_p * 3)(_ptr(bq), _ptr(bk), _ptr(bv)), int(norm),
                     *map(_ptr, (qw, qb, kw, kb, cs, sn)), eps, n_text, n_rope)
    sq, sk, heads = -(-s // _QT) * _QT, -(-s // _KB) * _KB, b * h
    out = torch.empty(b, s, h, d)  # the layout the output projection reads
    o = out.transpose(1, 2)
    q8 = torch.empty(heads, sq, d, dtype=torch.int8)
    qc, qcorr = torch.empty(heads, sq), torch.empty(heads, sq, dtype=torch.int32)
    kp, ksc = torch.empty(heads, sk, d, dtype=torch.uint8), torch.empty(heads, sk)
    vp = torch.empty(heads, sk, d, dtype=torch.int16)
    rc = dll.cogvx_int8_attention(d, b, h, s, q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(),
                                  _strides(v), o.data_ptr(), _strides(o), d ** -0.5, torch.get_num_threads(),
                                  q8.data_ptr(), qc.data_ptr(), qcorr.data_ptr(), kp.data_ptr(), ksc.data_ptr(),
                                  vp.data_ptr(), None if prep is None else ctypes.byref(prep))
    if rc == -2:
        raise RuntimeError(f"Linux refused this process the AMX tile state; set {cpu_isa.ENV}=avx512_vnni")
    return out


@_int8_attention_op.register_fake
def _(q, k, v, isa, row_scale, q_in_bias, k_in_bias, v_in_bias, norm, q_weight, q_bias, k_weight, k_bias, cos, sin,
      n_text, eps):
    b, h, s, d = q.shape
    return q.new_empty(b, s, h, d, dtype=torch.float32)


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, isa: str | None = None, *,
                   row_scale: torch.Tensor | None = None, in_bias: tuple | None = None,
                   norms: tuple | None = None, rope: tuple | None = None, n_text: int = 0,
                   eps: float = 1e-6) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v for q, k, v [B, H, S, Dh] on the CPU (fp32 or bf16 read as they are, other
    dtypes converted; any strides) -> [B, H, S, Dh] float32 (a transposed view of a [B, S, H, 64] tensor).
    ``isa``: the variant (default: the module's choice). Raises RuntimeError where ``unavailable()``.

    What the kernel applies to q, k, v as it reads them (no pass over memory of their own):
    ``row_scale`` [B, S] (any shape of B * S values, token-major) and ``in_bias`` = (q_bias, k_bias,
    v_bias) (each [H * Dh] or None): each row of q, k and v times its token's factor plus its bias (the
    int8 q/k/v projection's rescale, applied to its GEMM output); then ``norms`` = (q_weight, q_bias,
    k_weight, k_bias) (each [Dh] or None): q and k normalized per head (LayerNorm over Dh, ``eps``) and,
    with ``rope`` = (cos, sin) [N_video, Dh] fp32, rotated on the video rows [n_text, n_text + N_video), as
    ``qk_norm_rope_reference`` does."""
    if q.device.type != "cpu" or q.shape[-1] not in HEAD_DIMS or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"int8_attention takes q, k, v of one shape [B, H, S, Dh] on the CPU, Dh one of "
                         f"{', '.join(map(str, HEAD_DIMS))}; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)} on {q.device}")
    if norms is None and rope is not None:
        raise ValueError("int8_attention applies rope= only with norms= (the module's order: LayerNorm, then RoPE)")
    b, h, s, d = q.shape
    if row_scale is not None and row_scale.numel() != b * s:
        raise ValueError(f"row_scale holds one factor per token: {b * s} values for q {tuple(q.shape)}; "
                         f"got {tuple(row_scale.shape)}")
    if in_bias is not None and any(t is not None and t.numel() != h * d for t in in_bias):
        raise ValueError(f"in_bias holds (q, k, v) biases of H * Dh = {h * d} values each (or None); got "
                         f"{[None if t is None else tuple(t.shape) for t in in_bias]}")
    bq, bk, bv = in_bias if in_bias is not None else (None,) * 3
    qw, qb, kw, kb = norms if norms is not None else (None,) * 4
    cos, sin = rope if rope is not None else (None, None)
    return _int8_attention_op(q, k, v, isa or "", row_scale, bq, bk, bv, norms is not None, qw, qb, kw, kb, cos, sin,
                              n_text, float(eps)).transpose(1, 2)


# ------------------------------------------------------------------------------------- GELU + quantize
_EPS = 1e-12
GELU_MAX_N = 16384  # as in cpu_kernels.c


def gelu_quant_rows_reference(acc: torch.Tensor, row_scale: torch.Tensor, bias: torch.Tensor | None):
    """The PyTorch form: acc [M, N] (bf16 / fp32), row_scale [M, 1], bias [N] or None -> (u8 [M, N], fp32 [M, 1])."""
    y = acc.float() * row_scale
    if bias is not None:
        y = y + bias.float()
    g = torch.nn.functional.gelu(y, approximate="tanh")
    amax = g.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS)
    q = torch.clamp(torch.round(g * (127.0 / amax)), -127.0, 127.0) + 128.0
    return q.to(torch.uint8), amax / 127.0


@torch.library.custom_op("cogvx::gelu_quant_cpu", mutates_args=())
def _gelu_quant_op(acc: torch.Tensor, row_scale: torch.Tensor, bias: torch.Tensor | None,
                   isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    dll = _library("gelu_quant", isa or None)[0]
    if dll is None:  # callers check unavailable() when setting up; this keeps a stray call correct
        return gelu_quant_rows_reference(acc, row_scale, bias)
    m, n = acc.shape
    acc = acc.contiguous() if acc.dtype in (torch.bfloat16, torch.float32) else acc.float().contiguous()
    s = row_scale.float().contiguous()
    b = bias.float().contiguous() if bias is not None else None
    q, scale = torch.empty(m, n, dtype=torch.uint8), torch.empty(m, 1)
    dll.cogvx_gelu_quant(m, n, acc.data_ptr(), int(acc.dtype == torch.bfloat16), s.data_ptr(),
                         b.data_ptr() if b is not None else None, q.data_ptr(), scale.data_ptr(),
                         torch.get_num_threads())
    return q, scale


@_gelu_quant_op.register_fake
def _(acc, row_scale, bias, isa):
    return acc.new_empty(acc.shape, dtype=torch.uint8), acc.new_empty((acc.shape[0], 1), dtype=torch.float32)


def gelu_quant_rows(acc: torch.Tensor, row_scale: torch.Tensor, bias: torch.Tensor | None, isa: str | None = None):
    """GELU-tanh of ``acc * row_scale + bias``, quantized per row: acc [M, N] bf16 or fp32 (an int8 GEMM's
    output before its per-row rescale), row_scale [M, 1], bias [N] or None -> (q + 128 as u8 [M, N],
    fp32 scale [M, 1]), the input form of the next int8 linear. The C kernel on the CPU for N a multiple
    of 16 up to 16384 (the PyTorch reference inside the op where ``unavailable()``: check it first, as
    ``set_fused_gelu_quant`` does, so that compiled code fuses the reference instead); else the reference.
    ``isa``: the variant (default: the module's choice)."""
    if acc.device.type == "cpu" and acc.shape[-1] % 16 == 0 and acc.shape[-1] <= GELU_MAX_N:
        return _gelu_quant_op(acc, row_scale, bias, isa or "")
    return gelu_quant_rows_reference(acc, row_scale, bias)
