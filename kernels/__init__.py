"""cogvx.kernels: the fused kernels of the transformer, each beside its plain-PyTorch reference.

The model code imports only the names below; which file holds which op is this package's business:
adaln.py, adaln_fp8.py, qk_norm_rope.py, rope_flash_attention.py, sage_attention.py (one op each;
sage_quant.py: its int8 quantization kernel), cpu_kernels.py (the C kernels for x86-64 CPUs: int8
attention, GELU + int8 quantization; built on first use, the variant this CPU runs chosen by cpu_isa.py),
rope.py (the shared RoPE reference and table checks), policy.py (which implementation runs), aot.py
(compile every kernel for sm_80/89/90 and check registers, spills and shared memory, no GPU needed).

The names resolve on first use (PEP 562): ``cogvx recipes`` asks cpu_kernels whether this CPU runs
them without importing triton, which the Triton kernels' modules import.
"""

from __future__ import annotations

import importlib
import sys
import types

_PUBLIC = {
    "adaptive_layernorm": ("adaln", "adaptive_layernorm"),
    "adaptive_layernorm_fp8": ("adaln_fp8", "adaptive_layernorm_fp8"),
    "attention": ("rope_flash_attention", "attention"),
    "attention_for": ("policy", "attention_for"),
    "cpu_kernel_variant": ("cpu_kernels", "variant"),
    "cpu_kernels_unavailable": ("cpu_kernels", "unavailable"),
    "fp8_rowwise_linear": ("adaln_fp8", "fp8_rowwise_linear"),
    "gelu_quant_rows": ("cpu_kernels", "gelu_quant_rows"),
    "int8_attention": ("cpu_kernels", "int8_attention"),
    "qk_norm_rope": ("qk_norm_rope", "qk_norm_rope"),
    "resolve_backend": ("policy", "resolve_backend"),
    "rope_attention": ("rope_flash_attention", "rope_attention"),
    "sage_attention": ("sage_attention", "sage_attention"),
}
__all__ = list(_PUBLIC)


class _Package(types.ModuleType):
    """Two public names are also module names (qk_norm_rope, sage_attention): importing such a
    submodule directly (``from cogvx.kernels.qk_norm_rope import ...``) would make the import system
    set the package attribute to the module, and a later ``from cogvx.kernels import qk_norm_rope``
    would get the module, not the function. The public name always means the function."""

    def __setattr__(self, name, value):
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return  # the submodule stays reachable through sys.modules and importlib.import_module
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _PUBLIC:
        module, attr = _PUBLIC[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cogvx.kernels' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_PUBLIC])
