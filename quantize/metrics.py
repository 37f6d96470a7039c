"""Accuracy metrics of a quantized (or otherwise changed) model against its reference: the one copy
the engine, the benchmarks and the tests use. Everything is computed in float64 on the CPU.

- ``sqnr(ref, x)``: signal-to-quantization-noise ratio in dB, ``10 log10(sum ref^2 / sum (ref - x)^2)``
  (torchao's accuracy measure; any shape).
- ``psnr(ref, x, data_range=1)``: peak signal-to-noise ratio in dB, ``10 log10(range^2 / mse)``.
- ``ssim(ref, x, data_range=1)``: mean structural similarity of frames [..., H, W, C] (Wang et al. 2004:
  11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, population statistics, valid windows only: what
  ``skimage.metrics.structural_similarity(gaussian_weights=True, use_sample_covariance=False)`` computes
  per channel, averaged over channels and frames).

Identical inputs give ``math.inf`` for SQNR and PSNR.
"""

from __future__ import annotations

import math

import torch

__all__ = ["sqnr", "psnr", "ssim"]


def _pair(ref, x) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.as_tensor(ref), torch.as_tensor(x)
    if a.shape != b.shape:
        raise ValueError(f"reference and test must have the same shape (got {tuple(a.shape)} and {tuple(b.shape)})")
    return a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)


def sqnr(ref, x) -> float:
    """dB; inf when equal."""
    a, b = _pair(ref, x)
    noise = (a - b).pow(2).sum().item()
    signal = a.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def psnr(ref, x, data_range: float = 1.0) -> float:
    """dB for values spanning ``data_range`` (1 for frames in [0, 1], 255 for uint8); inf when equal."""
    a, b = _pair(ref, x)
    mse = (a - b).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def ssim(ref, x, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of images or frames [..., H, W, C] (C channels last; [H, W] is one grey image).
    Images smaller than the window use the largest odd window that fits."""
    a, b = _pair(ref, x)
    if a.ndim < 2:
        raise ValueError(f"ssim needs images [..., H, W, C] (got shape {tuple(a.shape)})")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    h, w = a.shape[-3], a.shape[-2]
    win = min(window, h - (1 - h % 2), w - (1 - w % 2))
    if win < 1:
        raise ValueError(f"ssim needs images of at least 1x1 pixels (got {h}x{w})")
    # [N, 1, H, W]: every frame and channel on its own
    a = a.reshape(-1, h, w, a.shape[-1]).permute(0, 3, 1, 2).reshape(-1, 1, h, w)
    b = b.reshape(-1, h, w, b.shape[-1]).permute(0, 3, 1, 2).reshape(-1, 1, h, w)
    g = torch.exp(-((torch.arange(win, dtype=torch.float64) - (win - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :])[None, None]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, kernel)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean().item()
