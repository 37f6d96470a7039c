"""pytest-benchmark benchmarks of one denoising step and of VAE decode (not part of the test suite).

    python -P -m pytest benchmarks/test_bench_pipeline.py --benchmark-only
    COGVX_BENCH_PRESET=cpu-bench python -P -m pytest benchmarks/test_bench_pipeline.py --benchmark-only

The step runs the preset's transformer (random weights) on the CFG batch of one video at the preset's
shape, eager and compiled; the decode runs the real VAE architecture (random weights) frame-batched
and tiled. Each benchmark's extra_info records device, dtype, shapes and FLOPs.
"""

from __future__ import annotations

import os

import pytest
import torch

from cogvx.engine.models.presets import PRESETS
from cogvx.engine.models.transformer import build_transformer
from cogvx.engine.models.positions import latent_frames, make_positions
from cogvx.engine.runtime.defaults import default_dtype
from cogvx.engine.runtime.profiling import transformer_flops
from cogvx.engine.models.tokenizer import MAX_LENGTH

PRESET = os.environ.get("COGVX_BENCH_PRESET", "tiny")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_denoising_step(benchmark, compiled):
    p = PRESETS[PRESET]
    cfg, dtype = p.transformer, default_dtype(DEVICE, p.dtype)
    torch.manual_seed(0)
    model = build_transformer(cfg, device=DEVICE, dtype=dtype)
    (f_lat, _), h, w = latent_frames(cfg, p.num_frames), p.height // 8, p.width // 8
    lat = torch.randn(2, f_lat, cfg.in_channels, h, w, device=DEVICE, dtype=dtype)
    text = torch.randn(2, MAX_LENGTH, cfg.text_embed_dim, device=DEVICE, dtype=dtype)
    t = torch.tensor([501, 501], device=DEVICE)
    pos = make_positions(cfg, f_lat, h, w).to(DEVICE)
    fn = model
    if compiled:
        from cogvx.engine.runtime.compiling import compile_module as compile_transformer

        torch._dynamo.reset()
        fn = compile_transformer(model, True, DEVICE)

    def step():
        with torch.inference_mode():
            fn(lat, text, t, pos)
        _sync()

    step()  # warm-up (compiles)
    benchmark.extra_info.update(device=str(DEVICE), dtype=str(dtype), preset=PRESET, latent_shape=list(lat.shape),
                                flops=transformer_flops(cfg, 2, MAX_LENGTH, pos.grid[0] * pos.grid[1] * pos.grid[2]))
    benchmark.pedantic(step, rounds=3, iterations=1)


@pytest.mark.parametrize("tiled", [False, True], ids=["frame-batched", "tiled"])
def test_vae_decode(benchmark, tiled):
    from cogvx.engine.models.config import VAEConfig
    from cogvx.engine.models.vae import CogVideoXVAE

    dtype = default_dtype(DEVICE)
    p = PRESETS[PRESET]
    cfg = VAEConfig.real("5b") if PRESET != "tiny" else VAEConfig.tiny()
    torch.manual_seed(0)
    vae = CogVideoXVAE(cfg).to(DEVICE, dtype).eval()
    h, w = (p.height, p.width) if DEVICE.type == "cuda" or PRESET == "tiny" else (64, 96)
    if tiled:
        vae.enable_tiling(tile_sample_min_height=h // 2, tile_sample_min_width=w // 2,
                          tile_overlap_factor_height=1 / 4, tile_overlap_factor_width=1 / 4)
    z = torch.randn(1, cfg.latent_channels, (p.num_frames - 1) // 4 + 1, h // 8, w // 8, device=DEVICE, dtype=dtype)

    def decode():
        vae.decode(z)
        _sync()

    benchmark.extra_info.update(device=str(DEVICE), dtype=str(dtype), latent_shape=list(z.shape))
    benchmark.pedantic(decode, rounds=2, iterations=1)
