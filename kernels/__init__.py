"""cogvx.kernels: the fused kernels of the transformer, each beside its plain-PyTorch reference.

The model code imports only the names below; which file holds which op is this package's business.
"""

from ._common import resolve_backend
from .adaln import adaptive_layernorm
from .rope_attention import attention, qk_norm_rope, rope_attention
from .select import attention_for

__all__ = ["adaptive_layernorm", "attention", "attention_for", "qk_norm_rope", "resolve_backend", "rope_attention"]
