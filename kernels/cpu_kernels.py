"""C kernels for AVX-512 CPUs with VNNI and BF16 (cpu_kernels.c): int8 attention, and the feed-forward's
GELU fused with the per-row int8 quantization of the next GEMM's input.

``int8_attention(q, k, v)`` computes softmax(q k^T / sqrt(Dh)) v on CPU tensors for head dimension 64
(every CogVideoX model; 16 and 32 for small test models), as the op ``cogvx::int8_attention_cpu``
(opaque to torch.compile: no graph break). Numerics are those of SageAttention: k smoothed by its mean
over tokens, q and k int8 per token, fp32 online softmax, p and v rounded to bf16 with fp32 sums.
Against float64 attention it measured 36-38 dB SQNR on unit-variance inputs with shifted keys (bf16
SDPA: 45-47 dB without the shift; blocked bf16 attention: 40 dB with it; benchmarks/bench_cpu_kernels.py),
3.7-4.3x faster than SDPA's fp32 flash kernel here. tests/test_cpu_kernels.py holds it to 33 dB
against float64 and to 60 dB against a float64 model of its own numerics.

``gelu_quant_rows(acc, row_scale, bias)`` is int8dq-cpu's feed-forward middle in one pass over memory
(op ``cogvx::gelu_quant_cpu``): y = acc * row_scale + bias, g = GELU-tanh(y), then g quantized per row as
the next int8 linear takes it (u8 q + 128, fp32 scale). Inductor fuses the same ops into a loop that
writes g in fp32 to memory and reads it back, with a vectorized tanh of its own: 39 ms per cpu-bench
layer here against the kernel's 3.7 ms (a sixth of the int8 step before). ``gelu_quant_rows_reference``
is the PyTorch form.

The C source is compiled once per machine with the system C compiler (``$CC``, else ``cc``) into
``$COGVX_CACHE`` (default ``~/.cache/cogvx``), keyed by the source's hash, and loaded with ctypes; it
runs on the OpenMP threads torch already uses. ``unavailable()`` says why it cannot run here (not
x86-64 Linux, a CPU without AVX-512 VNNI or BF16, no compiler, or a failed build): the model then
keeps the PyTorch path (SDPA attention, inductor's GELU + quantization loop).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["HEAD_DIMS", "gelu_quant_rows", "gelu_quant_rows_reference", "int8_attention", "unavailable"]

HEAD_DIMS = (16, 32, 64)  # 64: every CogVideoX model; 16 and 32: small test models
_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16")
_CFLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
           "-mavx512vnni", "-mavx512bf16", "-mfma")
_QT, _KB = 32, 64  # query rows per tile and keys per block, as in cpu_kernels.c


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _cache_dir() -> Path:
    return Path(os.environ.get("COGVX_CACHE") or Path.home() / ".cache" / "cogvx") / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _missing() -> str:
    """What this machine lacks to build and run the kernels ("" when nothing), without building them."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs x86-64 Linux (this is {platform.system()} {platform.machine()})"
    missing = [f for f in _CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    return "" if _compiler() else "no C compiler found (set CC, or install gcc)"


@lru_cache(maxsize=1)
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, "") or (None, why it cannot run here)."""
    why = _missing()
    if why:
        return None, why
    cc = _compiler()
    source = _SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join(_CFLAGS).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"cpu_kernels-{tag}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        build = subprocess.run([cc, *_CFLAGS, str(_SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if build.returncode:
            os.unlink(tmp)
            return None, f"building {_SOURCE.name} with {cc} failed: {build.stderr.strip()[-500:]}"
        os.replace(tmp, lib)  # atomic: concurrent builders leave one complete file
    dll = ctypes.CDLL(str(lib))
    fn = dll.cogvx_int8_attention
    ptr, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    fn.argtypes = [i32, i32, i32, i32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, f32, i32, ptr, ptr, ptr, ptr, ptr, ptr]
    fn.restype = i32
    fn = dll.cogvx_gelu_quant
    fn.argtypes = [i32, i32, ptr, i32, ptr, ptr, ptr, ptr, i32]
    fn.restype = i32
    return dll, ""


def unavailable(head_dim: int | None = None, build: bool = True) -> str:
    """Why the kernels cannot run on this machine (the attention: for heads of ``head_dim``), or "" when
    they can. ``build``: build them (once per machine) and load them to be sure; False: only check the
    platform, the CPU's flags and the compiler. Not for compiled code: call it when setting a model up."""
    if head_dim is not None and head_dim not in HEAD_DIMS:
        return f"it takes head dimensions {', '.join(map(str, HEAD_DIMS))} (got {head_dim})"
    return _library()[1] if build else _missing()


def _strides(t: torch.Tensor) -> ctypes.Array:
    return (ctypes.c_long * 3)(*t.stride()[:3])


@torch.library.custom_op("cogvx::int8_attention_cpu", mutates_args=())
def _int8_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    dll, why = _library()
    if dll is None:
        raise RuntimeError(f"cogvx int8 CPU attention cannot run here: {why}")
    b, h, s, d = q.shape
    q, k, v = (t if t.dtype == torch.float32 and t.stride(-1) == 1 else t.float().contiguous() for t in (q, k, v))
    sq, sk, heads = -(-s // _QT) * _QT, -(-s // _KB) * _KB, b * h
    out = torch.empty(b, s, h, d)  # the layout the output projection reads
    o = out.transpose(1, 2)
    q8 = torch.empty(heads, sq, d, dtype=torch.int8)
    qc, qcorr = torch.empty(heads, sq), torch.empty(heads, sq, dtype=torch.int32)
    kp, ksc = torch.empty(heads, sk, d, dtype=torch.uint8), torch.empty(heads, sk)
    vp = torch.empty(heads, sk, d, dtype=torch.int16)
    dll.cogvx_int8_attention(d, b, h, s, q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(),
                             _strides(v), o.data_ptr(), _strides(o), d ** -0.5, torch.get_num_threads(),
                             q8.data_ptr(), qc.data_ptr(), qcorr.data_ptr(), kp.data_ptr(), ksc.data_ptr(),
                             vp.data_ptr())
    return out


@_int8_attention_op.register_fake
def _(q, k, v):
    b, h, s, d = q.shape
    return q.new_empty(b, s, h, d, dtype=torch.float32)


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v for q, k, v [B, H, S, Dh] on the CPU (any dtype, any strides) -> [B, H, S, Dh]
    float32 (a transposed view of a [B, S, H, 64] tensor). Raises RuntimeError where ``unavailable()``."""
    if q.device.type != "cpu" or q.shape[-1] not in HEAD_DIMS or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"int8_attention takes q, k, v of one shape [B, H, S, Dh] on the CPU, Dh one of "
                         f"{', '.join(map(str, HEAD_DIMS))}; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)} on {q.device}")
    return _int8_attention_op(q, k, v).transpose(1, 2)


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
def _gelu_quant_op(acc: torch.Tensor, row_scale: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    dll = _library()[0]
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
def _(acc, row_scale, bias):
    return acc.new_empty(acc.shape, dtype=torch.uint8), acc.new_empty((acc.shape[0], 1), dtype=torch.float32)


def gelu_quant_rows(acc: torch.Tensor, row_scale: torch.Tensor, bias: torch.Tensor | None):
    """GELU-tanh of ``acc * row_scale + bias``, quantized per row: acc [M, N] bf16 or fp32 (an int8 GEMM's
    output before its per-row rescale), row_scale [M, 1], bias [N] or None -> (q + 128 as u8 [M, N],
    fp32 scale [M, 1]), the input form of the next int8 linear. The C kernel on the CPU for N a multiple
    of 16 up to 16384 (the PyTorch reference inside the op where ``unavailable()``: check it first, as
    ``set_fused_gelu_quant`` does, so that compiled code fuses the reference instead); else the reference."""
    if acc.device.type == "cpu" and acc.shape[-1] % 16 == 0 and acc.shape[-1] <= GELU_MAX_N:
        return _gelu_quant_op(acc, row_scale, bias)
    return gelu_quant_rows_reference(acc, row_scale, bias)
