"""cogvx.quantize.metrics against independent references: the textbook formulas in float64 numpy, and
SSIM computed window by window with explicit loops (Wang et al. 2004, Gaussian 11x11, sigma 1.5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cogvx.quantize.metrics import psnr, sqnr, ssim


def _ssim_loops(a: np.ndarray, b: np.ndarray, data_range=1.0, win=11, sigma=1.5) -> float:
    """Mean SSIM of [H, W, C] images, one valid window at a time."""
    ax = np.arange(win) - (win - 1) / 2
    g = np.exp(-(ax ** 2) / (2 * sigma ** 2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for c in range(a.shape[2]):
        for i in range(a.shape[0] - win + 1):
            for j in range(a.shape[1] - win + 1):
                x, y = a[i:i + win, j:j + win, c], b[i:i + win, j:j + win, c]
                mx, my = (w * x).sum(), (w * y).sum()
                vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
                cov = (w * (x - mx) * (y - my)).sum()
                vals.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    a = rng.random((2, 16, 19, 3))
    b = np.clip(a + 0.05 * rng.standard_normal(a.shape), 0, 1)
    return a, b


def test_sqnr_and_psnr_are_the_formulas(images):
    a, b = images
    assert sqnr(a, b) == pytest.approx(10 * math.log10((a ** 2).sum() / ((a - b) ** 2).sum()), rel=1e-12)
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / ((a - b) ** 2).mean()), rel=1e-12)
    assert psnr(a * 255, b * 255, data_range=255) == pytest.approx(psnr(a, b), rel=1e-9)
    assert sqnr(a, a) == math.inf and psnr(torch.tensor(a), torch.tensor(a)) == math.inf


def test_ssim_matches_window_by_window_reference(images):
    a, b = images
    expected = np.mean([_ssim_loops(a[k], b[k]) for k in range(a.shape[0])])
    assert ssim(a, b) == pytest.approx(expected, abs=1e-10)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, 1 - a) < 0.1 < ssim(a, b) < 1


def test_ssim_small_images_use_a_smaller_window():
    rng = np.random.default_rng(1)
    a = rng.random((6, 8, 1))
    b = a * 0.9
    assert ssim(a, b) == pytest.approx(_ssim_loops(a, b, win=5), abs=1e-10)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        sqnr(np.zeros(3), np.zeros(4))
