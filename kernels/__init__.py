"""cogvx.kernels: the fused kernels of the transformer, each beside its plain-PyTorch reference.

The model code imports only the names below; which file holds which op is this package's business:
adaln.py, adaln_fp8.py, qk_norm_rope.py, rope_flash_attention.py (one op each), cpu_kernels.py
(int8 attention for AVX-512 VNNI CPUs, a C kernel built on first use), rope.py (the shared
RoPE reference and table checks), policy.py (which implementation runs), aot.py (compile every
kernel for sm_80/89/90 and check registers, spills and shared memory, no GPU needed).
"""

from .adaln import adaptive_layernorm
from .adaln_fp8 import adaptive_layernorm_fp8, fp8_rowwise_linear
from .cpu_kernels import gelu_quant_rows, int8_attention
from .cpu_kernels import unavailable as cpu_kernels_unavailable
from .policy import attention_for, resolve_backend
from .qk_norm_rope import qk_norm_rope
from .rope_flash_attention import attention, rope_attention

__all__ = [
    "adaptive_layernorm",
    "adaptive_layernorm_fp8",
    "attention",
    "attention_for",
    "cpu_kernels_unavailable",
    "fp8_rowwise_linear",
    "gelu_quant_rows",
    "int8_attention",
    "qk_norm_rope",
    "resolve_backend",
    "rope_attention",
]
