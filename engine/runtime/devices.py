"""Devices and dtypes: the user's choice checked against this machine before any heavy work."""

from __future__ import annotations

import warnings

import torch

__all__ = ["default_device", "resolve_device", "resolve_dtype", "cpu_has_bf16"]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def default_device() -> str:
    """"cuda" when a CUDA device is available, else "cpu": what ``device=None`` means everywhere."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 matmul (AVX-512 BF16 or AMX); without it bf16 is emulated, slowly."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX") and \
        torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' (or a torch.device; None: cuda if available), checked against this machine."""
    if device is None:
        device = default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name; accepted: 'cpu', 'cuda', 'cuda:N'") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device {device!r} is not supported; accepted: 'cpu', 'cuda', 'cuda:N'")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} was requested but CUDA is not available on this machine "
            f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA); use device='cpu'"
        )
    index = dev.index or 0
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                         f"use 'cuda:0'..'cuda:{torch.cuda.device_count() - 1}'")
    return torch.device("cuda", index)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """float32, bfloat16 or float16 (or their short names), checked against the device."""
    if isinstance(dtype, str):
        if dtype.lower().removeprefix("torch.") in _DTYPES:
            dtype = dtype.lower().removeprefix("torch.")
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; accepted: float32, bfloat16, float16")
        dtype = _DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype} is not supported; accepted: torch.float32, torch.bfloat16, torch.float16")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{torch.cuda.get_device_name(device)} does not support bfloat16; use float16 or float32")
    if device.type == "cpu" and (dtype == torch.float16 or (dtype == torch.bfloat16 and not cpu_has_bf16())):
        warnings.warn(
            f"{dtype} matmuls are emulated on this CPU and very slow; use float32"
            f"{'' if dtype == torch.bfloat16 else ' or bfloat16 (fast on CPUs with AVX-512 BF16)'}", stacklevel=3,
        )
    return dtype
