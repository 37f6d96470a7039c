"""Which build of the CPU C kernels runs on this machine: one dispatch point for cpu_kernels.py.

The C sources (cpu_kernels.c: the int8 attention on AVX-512; cpu_attention_amx.c: on AMX tiles;
cpu_attention_avx2.c: on AVX2; cpu_attention.h: the driver they share; cpu_gelu_quant.c: GELU + int8
quantization, either width) are built once per variant with the system C compiler (``$CC``, else
``cc``) into ``$COGVX_CACHE`` (default ``~/.cache/cogvx``), keyed by the sources' and the flags' hash,
and loaded with ctypes. Variants, best
first (``VARIANTS``):

- ``amx``: AVX-512 BF16 + AMX int8 / bf16 (Sapphire Rapids and later Xeons): the attention computed
  transposed (one vector holds one key's scores for 16 query rows, so the softmax needs no horizontal
  reduction), k q^T on TDPBSSD tiles and v^T p^T on TDPBF16PS tiles with o^T resident in tiles, a lazy
  power-of-two running maximum (cpu_attention_amx.c); measured 0.28x avx512_vnni's time at 2 x 30 heads
  x 9676 tokens and 0.37x at 1216 tokens (1154 / 4097 ms and 27 / 72 ms), and 0.55x the time of its
  previous form (q k^T rows, per-row reductions) at 9676 tokens.
- ``avx512_bf16``: AVX-512 F/BW/VL/DQ + VNNI + BF16 (Sapphire Rapids and later Xeons, AMD Zen 4 / 5):
  the attention's p v as bf16 dot products (vdpbf16ps), the GELU + quantization in 16 lanes.
- ``avx512_vnni``: the same without BF16 (Ice Lake / Cascade Lake Xeons): p v as fp32 FMAs on the same
  bf16 v (p stays fp32), the GELU + quantization as above (its bf16 input is widened by a shift).
- ``avx_vnni``: AVX2 + FMA + AVX-VNNI without AVX-512 (Intel Alder Lake and later client cores, Sierra
  Forest Xeons): the attention in 8 lanes with the numerics of ``avx512_vnni``, q k^T through vpdpbusd on
  ymm; the GELU + quantization in 8 lanes, the same numbers.
- ``avx2``: AVX2 + FMA (AMD Zen 2 / 3 EPYCs, older Intel): as ``avx_vnni``, q k^T as vpmaddubsw + vpmaddwd.

The CPU's flags are read once; the first variant of ``preference()`` they allow runs unless
``COGVX_CPU_ISA`` names a later one (to measure or test it on a CPU that has more), or a caller passes
``isa=``. On a CPU with AMX (Sapphire Rapids and later) ``avx512_vnni`` comes right after amx: its FMAs
issue on two ports where vdpbf16ps has one, and its attention measured 0.81x the time of
``avx512_bf16``'s at the cpu-bench shape (2 x 30 heads x 1216 tokens, CPU time, 7 alternating rounds),
with p in fp32 (more exact) too. AMX (amx_int8 /
amx_bf16) runs the attention (``amx``); oneDNN already runs the int8 and bf16 GEMMs on AMX tiles there.
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

__all__ = ["ENV", "VARIANTS", "KERNELS", "cpu_flags", "library", "missing", "preference", "runnable", "select",
           "sources"]

ENV = "COGVX_CPU_ISA"
_HERE = Path(__file__).parent
_AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")
_AVX512_CFLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma")
_BOTH = ("attention", "gelu_quant")
# variant -> (CPU flags it needs, compiler flags, the kernels its build holds)
VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "amx": ((*_AVX512, "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"),
            (*_AVX512_CFLAGS, "-mavx512bf16", "-mamx-tile", "-mamx-int8", "-mamx-bf16"), _BOTH),
    "avx512_bf16": ((*_AVX512, "avx512_bf16"), (*_AVX512_CFLAGS, "-mavx512bf16"), _BOTH),
    "avx512_vnni": (_AVX512, _AVX512_CFLAGS, _BOTH),
    "avx_vnni": (("avx2", "fma", "avx_vnni"), ("-mavx2", "-mfma", "-mavxvnni"), _BOTH),
    "avx2": (("avx2", "fma"), ("-mavx2", "-mfma"), _BOTH),
}
KERNELS = _BOTH
_AVX512_ONLY = ("avx512_bf16", "avx512_vnni")


def sources(variant: str) -> list[Path]:
    """The C files of ``variant``'s build."""
    attention = {"amx": "cpu_attention_amx.c"}.get(variant, "cpu_kernels.c" if variant in _AVX512_ONLY
                                                    else "cpu_attention_avx2.c")
    return [_HERE / attention, _HERE / "cpu_gelu_quant.c"]
_BASE_CFLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The flags line of /proc/cpuinfo (empty where there is none), read once."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def _platform_missing() -> str:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs x86-64 Linux (this is {platform.system()} {platform.machine()})"
    return ""


def preference() -> list[str]:
    """Every variant, the one to run first: ``VARIANTS``' order, but avx512_vnni before avx512_bf16 on
    a CPU with AMX (see the module docstring; amx itself stays first)."""
    order = list(VARIANTS)
    if "amx_tile" in cpu_flags():
        order.remove("avx512_vnni")
        order.insert(1, "avx512_vnni")
    return order


def runnable() -> list[str]:
    """The variants this CPU can execute, in ``preference()`` order (empty off x86-64 Linux)."""
    if _platform_missing():
        return []
    flags = cpu_flags()
    return [v for v in preference() if all(f in flags for f in VARIANTS[v][0])]


def select(isa: str | None = None, kernel: str = "attention") -> tuple[str | None, str]:
    """(variant, "") for ``kernel`` ("attention" or "gelu_quant"): ``isa`` if given, else $COGVX_CPU_ISA
    if set, else the first of ``preference()`` this CPU runs; or (None, why not). A named variant caps
    the choice: it, or where this CPU cannot run it the first one after it in ``preference()``."""
    want = isa or os.environ.get(ENV) or None
    if want is not None and want not in VARIANTS:
        src = "isa" if isa else ENV
        raise ValueError(f"{src}={want!r} is not a CPU kernel variant; choose one of {', '.join(VARIANTS)}")
    why = _platform_missing()
    if why:
        return None, why
    order = preference()
    allowed = order[order.index(want):] if want else order
    flags = cpu_flags()
    for v in allowed:
        need, _, kernels = VARIANTS[v]
        if kernel in kernels and all(f in flags for f in need):
            return v, ""
    holding = [v for v in allowed if kernel in VARIANTS[v][2]]
    if not holding:
        have = ", ".join(v for v in order if kernel in VARIANTS[v][2])
        return None, f"{ENV}={want} has no {kernel} kernel (the variants with one: {have})"
    lacks = [f for f in VARIANTS[holding[-1]][0] if f not in flags]
    return None, f"this CPU lacks {', '.join(lacks)}"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def missing(isa: str | None = None, kernel: str = "attention") -> str:
    """Why ``kernel`` cannot run here ("" when it can), without building anything."""
    variant, why = select(isa, kernel)
    if variant is None:
        return why
    return "" if _compiler() else "no C compiler found (set CC, or install gcc)"


def _cache_dir() -> Path:
    return Path(os.environ.get("COGVX_CACHE") or Path.home() / ".cache" / "cogvx") / "kernels"


def _signatures(dll: ctypes.CDLL, kernels: tuple[str, ...]) -> None:
    ptr, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    if "attention" in kernels:  # every variant today; kept for a build without it
        fn = dll.cogvx_int8_attention
        fn.argtypes = [i32, i32, i32, i32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, f32, i32, ptr, ptr, ptr, ptr,
                       ptr, ptr, ptr]
        fn.restype = i32
    fn = dll.cogvx_gelu_quant
    fn.argtypes = [i32, i32, ptr, i32, ptr, ptr, ptr, ptr, i32]
    fn.restype = i32


@lru_cache(maxsize=None)
def library(variant: str) -> tuple[ctypes.CDLL | None, str]:
    """(the loaded build of ``variant``, "") or (None, why it cannot run here). Built once per machine."""
    need, cflags, kernels = VARIANTS[variant]
    why = _platform_missing() or (f"this CPU lacks {', '.join(f for f in need if f not in cpu_flags())}"
                                  if not all(f in cpu_flags() for f in need) else "")
    cc = _compiler()
    if why or not cc:
        return None, why or "no C compiler found (set CC, or install gcc)"
    files = sources(variant)
    flags = (*_BASE_CFLAGS, *cflags)
    hashed = sorted(_HERE.glob("cpu_*.[ch]"))  # every C file and header (the builds include the headers)
    tag = hashlib.sha256(b"".join(s.read_bytes() for s in hashed) + " ".join(flags).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"cpu_kernels-{variant}-{tag}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        build = subprocess.run([cc, *flags, *map(str, files), "-o", tmp, "-lm"], capture_output=True, text=True)
        if build.returncode:
            os.unlink(tmp)
            names = " and ".join(s.name for s in files)
            return None, f"building {names} with {cc} failed: {build.stderr.strip()[-500:]}"
        os.replace(tmp, lib)  # atomic: concurrent builders leave one complete file
    dll = ctypes.CDLL(str(lib))
    _signatures(dll, kernels)
    if variant == "amx" and not dll.cogvx_amx_ready():
        return None, f"Linux refused this process the AMX tile state (set {ENV}=avx512_vnni)"
    return dll, ""
