"""The C kernels for AVX-512 VNNI + BF16 CPUs (cogvx.kernels.cpu_kernels): the int8 attention (recipe
int8dq-cpu-int8attn) against float64 attention and a float64 model of its documented numerics; the fused
GELU + int8 quantization (every int8dq-cpu recipe) against float64; both in the transformer compiled with
no graph break; and what happens on a machine that cannot run them. (Accuracy floors and the save/reload
round trip of the recipes live in test_quantize_accuracy.py with every other recipe.)"""

from __future__ import annotations

import warnings

import pytest
import torch

from cogvx.engine.cli.recipes import recipes_table
from cogvx.engine.models.presets import PRESETS
from cogvx.engine.models.transformer import build_transformer
from cogvx.engine.quantizing import apply_runtime_settings, quantize_transformer
from cogvx.engine.runtime.compiling import compile_module, dynamo_counts
from cogvx.kernels import cpu_kernels, gelu_quant_rows, int8_attention, cpu_kernels_unavailable
from cogvx.quantize.metrics import sqnr
from cogvx.quantize.settings import Runtime
from helpers import attention_float64
from tiny_transformer import tiny_quantized_transformer

WHY = cpu_kernels_unavailable()
needs_kernel = pytest.mark.skipif(bool(WHY), reason=f"int8 CPU attention cannot run here: {WHY}")


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.float().bfloat16().double()


def _documented_numerics(q, k, v):
    """cpu_kernels.c's numerics in float64: k minus its mean over tokens, q and k int8 per token
    (round half to even of x * 127 / amax), exact integer scores, exact softmax, p and v rounded to bf16
    for the product, the row sum of the unrounded p."""
    q, k, v = q.double(), k.double(), v.double()
    k = k - k.mean(dim=-2, keepdim=True)

    def quant(x):
        amax = x.abs().amax(-1, keepdim=True)
        inv = torch.where(amax > 0, 127 / amax, 0.0).float()
        return torch.round((x.float() * inv).double()), amax / 127

    q8, sq = quant(q)
    k8, sk = quant(k)
    s = (q8 @ k8.transpose(-1, -2)) * sq * sk.transpose(-1, -2) / q.shape[-1] ** 0.5
    p = torch.exp(s - s.amax(-1, keepdim=True))
    return (_bf16(p) @ _bf16(v)) / p.sum(-1, keepdim=True)


def _qkv(b, h, s, d, seed, layout="bhsd"):
    g = torch.Generator().manual_seed(seed)
    if layout == "bshd":  # the transformer's layout: heads interleaved, [B, S, H, D] transposed
        q, k, v = (torch.randn(b, s, h, d, generator=g).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (torch.randn(b, h, s, d, generator=g) for _ in range(3))
    # keys with a common offset and uneven scale, as post-LayerNorm keys with a bias: the smoothing matters
    return q, 2 * k + 0.7, v


CASES = [(1, 1, 1, 64), (1, 2, 7, 64), (2, 3, 65, 64), (1, 2, 130, 32), (2, 2, 97, 16), (1, 4, 1000, 64)]


@needs_kernel
@pytest.mark.parametrize("b, h, s, d", CASES, ids=[f"{b}x{h}x{s}x{d}" for b, h, s, d in CASES])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_matches_float64_and_its_documented_numerics(b, h, s, d, layout):
    """Against float64 attention: the int8 q k^T costs what SageAttention's does (measured 36-43 dB on
    these inputs; bf16 SDPA: 45-47 dB). Against the float64 model of its own numerics: only the 2^x
    polynomial (1e-4) and fp32 sums remain (measured > 70 dB)."""
    q, k, v = _qkv(b, h, s, d, seed=s * d + b, layout=layout)
    out = int8_attention(q, k, v)
    assert out.shape == (b, h, s, d) and out.dtype == torch.float32
    assert sqnr(attention_float64(q, k, v).float(), out) > (33.0 if s > 1 else 50.0)  # one key: the bf16 v itself
    assert sqnr(_documented_numerics(q, k, v).float(), out) > 60.0


@needs_kernel
def test_other_dtypes_and_zero_rows():
    q, k, v = _qkv(2, 2, 70, 64, seed=3)
    out = int8_attention(q, k, v)
    low = int8_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())  # converted to fp32 on the way in
    assert low.dtype == torch.float32 and sqnr(out, low) > 35.0
    q[:, :, :5] = 0  # a row of zeros attends uniformly: the mean of v (in bf16)
    got = int8_attention(q, k, v)[:, :, :5]
    want = _bf16(v).mean(dim=2, keepdim=True).expand_as(got)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match=r"one shape \[B, H, S, Dh\] on the CPU, Dh one of 16, 32, 64; got \(1, 2, 8, 48\)"):
        int8_attention(*(torch.zeros(1, 2, 8, 48) for _ in range(3)))
    with pytest.raises(ValueError, match="got .* on meta"):
        int8_attention(*(torch.zeros(1, 2, 8, 64, device="meta") for _ in range(3)))
    assert cpu_kernels_unavailable(128) == "it takes head dimensions 16, 32, 64 (got 128)"
    assert cpu_kernels_unavailable(64) == cpu_kernels_unavailable()


def test_machines_that_cannot_run_it_say_why_and_keep_sdpa(monkeypatch, tmp_path):
    """A CPU without VNNI / BF16, or a compiler that fails: the reason, and the recipe warns and falls back
    to SDPA (its int8 linears still apply)."""
    monkeypatch.setenv("COGVX_CACHE", str(tmp_path))
    cpu_kernels._library.cache_clear()
    try:
        monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: {"avx512f", "avx512bw"})
        why = cpu_kernels_unavailable()
        assert why.startswith("this CPU lacks avx512vl, avx512dq, avx512_vnni, avx512_bf16") or \
            why.startswith("needs x86-64 Linux")
        model = build_transformer(PRESETS["tiny"].transformer, device="cpu")
        with pytest.warns(RuntimeWarning, match="int8 CPU attention does not run here: .*attention runs as SDPA"):
            apply_runtime_settings(model, Runtime(attention_kernel="int8-cpu"))
        assert not any(b.attn1.int8_cpu for b in model.transformer_blocks)
        quantize_transformer(model, "int8dq-cpu")  # the feed-forward keeps inductor's unfused GELU + quantization
        assert model.set_fused_gelu_quant(True) == 0
        row = next(r for r in recipes_table("cpu") if r["name"] == "int8dq-cpu-int8attn")
        assert row["runs_here"] and row["reason"].startswith("runs with SDPA attention: its int8 attention kernel "
                                                             "cannot run here (")
        if not why.startswith("needs"):
            cpu_kernels._library.cache_clear()
            monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: set(cpu_kernels._CPU_FLAGS))
            monkeypatch.setenv("CC", "false")
            assert cpu_kernels_unavailable().startswith("building cpu_kernels.c with false failed")
    finally:
        cpu_kernels._library.cache_clear()
    with pytest.raises(ValueError, match="attention_kernel 'int4' is not one of 'int8-cpu'"):
        Runtime(attention_kernel="int4")


@needs_kernel
def test_recipe_attends_with_the_kernel_compiled_with_no_graph_break():
    """int8dq-cpu-int8attn on the tiny transformer: every block calls the attention op and the fused
    GELU + quantization op and none calls SDPA, eager and compiled (inductor with freezing, the engine's
    CPU compile) alike, with no graph break; the output stays within the int8 attention's error of the
    int8dq-cpu transformer (SDPA attention)."""
    cfg, model, args = tiny_quantized_transformer("int8dq-cpu")

    def calls(fn):
        with torch.inference_mode():
            fn(*args)  # compiles (and runs the op while compiling)
            with torch.profiler.profile() as prof:
                out = fn(*args)
        keys = {e.key: e.count for e in prof.key_averages()}
        assert keys.get("cogvx::gelu_quant_cpu") == cfg.num_layers  # the fused feed-forward, every block
        return out, sum(n for key, n in keys.items() if "int8_attention_cpu" in key), \
            sum(n for key, n in keys.items() if "scaled_dot_product" in key)

    sdpa, _, _ = calls(model)
    apply_runtime_settings(model, Runtime(attention_kernel="int8-cpu"))
    eager, n_op, n_sdpa = calls(model)
    assert (n_op, n_sdpa) == (cfg.num_layers, 0)
    torch._dynamo.reset()
    before = dynamo_counts()
    compiled, n_op, n_sdpa = calls(compile_module(model, True, torch.device("cpu")))
    assert dynamo_counts()["graph_breaks"] == before["graph_breaks"], "graph break around the int8 attention"
    assert (n_op, n_sdpa) == (cfg.num_layers, 0)
    assert sqnr(eager, compiled) > 40.0
    assert sqnr(sdpa, eager) > 35.0


# ----------------------------------------------------------------------------------- GELU + quantize
def _gelu_quant_float64(acc, s, bias):
    y = acc.double() * s.double() + bias.double()
    g = 0.5 * y * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (y + 0.044715 * y**3)))
    amax = g.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    return torch.clamp(torch.round(g * (127 / amax)), -127, 127) + 128, amax / 127


@needs_kernel
@pytest.mark.parametrize("m, n, dtype", [(1, 16, torch.float32), (37, 192, torch.bfloat16), (300, 7680, torch.bfloat16)])
def test_gelu_quant_matches_float64(m, n, dtype):
    """Quantized levels equal float64's but where g * 127 / amax lies within fp32 rounding of a .5 (one
    level; measured 1e-6 of the elements at 300 x 7680); scales to fp32 rounding."""
    g = torch.Generator().manual_seed(n)
    acc, s, bias = (3 * torch.randn(m, n, generator=g)).to(dtype), torch.rand(m, 1, generator=g) + 0.5, torch.randn(n, generator=g)
    q, scale = gelu_quant_rows(acc, s, bias)
    q64, scale64 = _gelu_quant_float64(acc, s, bias)
    assert q.dtype == torch.uint8 and q.shape == (m, n) and scale.shape == (m, 1)
    diff = (q.double() - q64).abs()
    assert diff.max() <= 1 and (diff > 0).double().mean() < 1e-4
    torch.testing.assert_close(scale.double(), scale64, rtol=1e-6, atol=0)


def test_gelu_quant_shapes_the_kernel_does_not_take_use_the_reference():
    acc, s = torch.randn(5, 24), torch.rand(5, 1) + 0.5  # 24 columns: not a multiple of 16
    q, scale = gelu_quant_rows(acc, s, None)
    q64, scale64 = _gelu_quant_float64(acc, s, torch.zeros(24))
    assert (q.double() - q64).abs().max() <= 1
    torch.testing.assert_close(scale.double(), scale64, rtol=1e-6, atol=0)


@needs_kernel
def test_fused_feed_forward_equals_the_unfused_one():
    """int8dq-cpu's feed-forward with and without the fusion: the same int8 levels, so the same output
    up to the one-level flips of test_gelu_quant_matches_float64."""
    cfg, model, _ = tiny_quantized_transformer("int8dq-cpu")
    assert model.set_fused_gelu_quant(False) == 0
    ff, x = model.transformer_blocks[0].ff, torch.randn(2, 50, cfg.inner_dim)
    with torch.inference_mode():
        plain = ff(x)
        assert model.set_fused_gelu_quant(True) == cfg.num_layers
        fused = ff(x)
    assert sqnr(plain, fused) > 60.0


def test_other_devices_keep_the_pytorch_path_quietly():
    model = build_transformer(PRESETS["tiny"].transformer, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_runtime_settings(model, Runtime(attention_kernel="int8-cpu", fused_gelu_quant=True))
    assert not any(b.attn1.int8_cpu or b.ff.fused_gelu_quant for b in model.transformer_blocks)
