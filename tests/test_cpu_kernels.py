"""The C kernels for x86-64 CPUs (cogvx.kernels.cpu_kernels), every variant this CPU runs (cpu_isa.VARIANTS;
a lower one forced with isa= or $COGVX_CPU_ISA): the int8 attention (recipe int8dq-cpu-int8attn) against
float64 attention and a float64 model of the variant's documented numerics; the fused GELU + int8
quantization (every int8dq-cpu recipe) against float64; both in the transformer compiled with no graph
break; and what happens on a machine that cannot run them. (Accuracy floors and the save/reload round
trip of the recipes live in test_quantize_accuracy.py with every other recipe.)"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from cogvx.engine.cli.recipes import recipes_table
from cogvx.engine.models.presets import PRESETS
from cogvx.engine.models.transformer import build_transformer
from cogvx.engine.quantizing import apply_runtime_settings, quantize_transformer
from cogvx.engine.runtime.compiling import compile_module, dynamo_counts
from cogvx.kernels import cpu_isa, cpu_kernels, gelu_quant_rows, int8_attention, cpu_kernels_unavailable
from cogvx.kernels.qk_norm_rope import qk_norm_rope_reference
from cogvx.quantize.metrics import sqnr
from cogvx.quantize.settings import Runtime
from helpers import attention_float64
from tiny_transformer import tiny_quantized_transformer

WHY = cpu_kernels_unavailable()
needs_kernel = pytest.mark.skipif(bool(WHY), reason=f"int8 CPU attention cannot run here: {WHY}")
needs_gelu = pytest.mark.skipif(bool(cpu_kernels_unavailable(kernel="gelu_quant")),
                                reason=f"GELU + quantization kernel cannot run here: "
                                       f"{cpu_kernels_unavailable(kernel='gelu_quant')}")


def _variants(kernel: str):
    """Every variant holding ``kernel``; those this CPU cannot execute skip, saying what it lacks."""
    out = []
    for name, (need, _, kernels) in cpu_isa.VARIANTS.items():
        if kernel in kernels:
            why = "" if name in cpu_isa.runnable() else cpu_isa.library(name)[1]
            out.append(pytest.param(name, id=name, marks=pytest.mark.skipif(bool(why), reason=f"{name}: {why}")))
    return out


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.float().bfloat16().double()


def _documented_numerics(q, k, v, isa):
    """cpu_kernels.c's numerics in float64: k minus its mean over tokens, q and k int8 per token
    (round half to even of x * 127 / amax), exact integer scores, exact softmax, v rounded to bf16 for
    the product and p too in the avx512_bf16 and amx variants (the others keep it fp32; amx takes p
    against 2^ceil(row maximum in base 2) and by its cubic 2^x, which is modelled too), the row sum of the unrounded p."""
    q, k, v = q.double(), k.double(), v.double()
    k = k - k.mean(dim=-2, keepdim=True)

    def quant(x):
        amax = x.abs().amax(-1, keepdim=True)
        inv = torch.where(amax > 0, 127 / amax, 0.0).float()
        return torch.round((x.float() * inv).double()), amax / 127

    q8, sq = quant(q)
    k8, sk = quant(k)
    s = (q8 @ k8.transpose(-1, -2)) * sq * sk.transpose(-1, -2) / q.shape[-1] ** 0.5
    if isa == "amx":  # p against the power of two at or above the row maximum, by the kernel's cubic
        s2 = s / math.log(2)
        y = s2 - torch.ceil(s2.amax(-1, keepdim=True))
        f = y - torch.floor(y)
        p = (((0.07706306 * f + 0.22764935) * f + 0.69511581) * f + 1) * torch.exp2(torch.floor(y))
    else:
        p = torch.exp(s - s.amax(-1, keepdim=True))
    return ((_bf16(p) if isa in ("avx512_bf16", "amx") else p) @ _bf16(v)) / p.sum(-1, keepdim=True)


def _qkv(b, h, s, d, seed, layout="bhsd"):
    g = torch.Generator().manual_seed(seed)
    if layout == "bshd":  # the transformer's layout: heads interleaved, [B, S, H, D] transposed
        q, k, v = (torch.randn(b, s, h, d, generator=g).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (torch.randn(b, h, s, d, generator=g) for _ in range(3))
    # keys with a common offset and uneven scale, as post-LayerNorm keys with a bias: the smoothing matters
    return q, 2 * k + 0.7, v


CASES = [(1, 1, 1, 64), (1, 2, 7, 64), (2, 3, 65, 64), (1, 2, 130, 32), (2, 2, 97, 16), (1, 4, 1000, 64)]


@pytest.mark.parametrize("isa", _variants("attention"))
@pytest.mark.parametrize("b, h, s, d", CASES, ids=[f"{b}x{h}x{s}x{d}" for b, h, s, d in CASES])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_matches_float64_and_its_documented_numerics(b, h, s, d, layout, isa):
    """Against float64 attention: the int8 q k^T costs what SageAttention's does (measured 36-43 dB on
    these inputs; bf16 SDPA: 45-47 dB). Against the float64 model of the variant's own numerics: only
    the 2^x polynomial (1e-4) and fp32 sums remain (measured > 70 dB)."""
    q, k, v = _qkv(b, h, s, d, seed=s * d + b, layout=layout)
    out = int8_attention(q, k, v, isa=isa)
    assert out.shape == (b, h, s, d) and out.dtype == torch.float32
    assert sqnr(attention_float64(q, k, v).float(), out) > (33.0 if s > 1 else 50.0)  # one key: the bf16 v itself
    # amx's model holds its cubic too: only fp32 rounding remains (measured 75-142 dB)
    assert sqnr(_documented_numerics(q, k, v, isa).float(), out) > (70.0 if isa == "amx" else 60.0)


@pytest.mark.parametrize("isa", _variants("attention"))
def test_a_row_maximum_growing_block_after_block(isa):
    """Keys whose scale grows with their position: every block of 64 raises the rows' maxima, by more
    than 2^8 past the first block's (amx's lazy rescaling runs, checked on the model's scores)."""
    q, k, v = _qkv(1, 2, 400, 64, seed=11)
    grow = 1 + torch.arange(400).div(64, rounding_mode="floor").double().mul(1.5)
    k = (k.double() * grow[:, None]).float()
    s2 = (q.double() @ (k.double() - k.double().mean(-2, keepdim=True)).transpose(-1, -2)) / 8 / math.log(2)
    first = torch.ceil(s2[..., :64].amax(-1))
    assert (s2[..., 64:].amax(-1) - first > 8).float().mean() > 0.9
    out = int8_attention(q, k, v, isa=isa)
    assert sqnr(attention_float64(q, k, v).float(), out) > 27.0  # peaked rows: int8 costs more (29.5 dB)
    assert sqnr(_documented_numerics(q, k, v, isa).float(), out) > (70.0 if isa == "amx" else 60.0)


@pytest.mark.parametrize("isa", _variants("attention"))
@pytest.mark.parametrize("affine, with_rope", [(True, True), (False, True), (True, False)],
                         ids=["affine-rope", "rope", "affine"])
def test_norm_and_rope_in_the_kernel_equal_them_done_before_it(isa, affine, with_rope):
    """q, k, v as strided views of the fused projection [B, S, 3, H, Dh]; the kernel's per-head LayerNorm
    and RoPE (on the video rows with a table row; the last 10 rows are past the table) against
    qk_norm_rope_reference followed by the kernel, and against float64 attention of the normalized q, k."""
    b, s, h, d, n_text, n_video = 2, 150, 3, 64, 20, 120
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(b, s, 3, h, d, generator=g) * 3 + 1).unbind(2)
    norms = tuple(torch.randn(d, generator=g) * 0.3 + (1.0 if i % 2 == 0 else 0.0) if affine else None
                  for i in range(4))
    rope = None
    if with_rope:
        ang = torch.rand(n_video, d // 2, generator=g).mul(6.3).repeat_interleave(2, dim=-1)
        rope = (ang.cos(), ang.sin())
    cos, sin = rope if rope else (None, None)
    qr, kr = qk_norm_rope_reference(q, k, *norms, cos, sin, n_text, 1e-6)
    want = int8_attention(qr, kr, v.transpose(1, 2), isa=isa)
    got = int8_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), isa=isa, norms=norms, rope=rope,
                         n_text=n_text, eps=1e-6)
    assert sqnr(want, got) > 80.0  # measured 125-135 dB (fp32 LayerNorm sums in another order); n_text off by one: 6.5
    assert sqnr(attention_float64(qr, kr, v.transpose(1, 2)).float(), got) > 33.0


@pytest.mark.parametrize("isa", _variants("attention"))
def test_other_dtypes_and_zero_rows(isa):
    q, k, v = _qkv(2, 2, 70, 64, seed=3)
    out = int8_attention(q, k, v, isa=isa)
    low = int8_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), isa=isa)  # converted to fp32 on the way in
    assert low.dtype == torch.float32 and sqnr(out, low) > 35.0
    q[:, :, :5] = 0  # a row of zeros attends uniformly: the mean of v (in bf16)
    got = int8_attention(q, k, v, isa=isa)[:, :, :5]
    want = _bf16(v).mean(dim=2, keepdim=True).expand_as(got)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match=r"one shape \[B, H, S, Dh\] on the CPU, Dh one of 16, 32, 64; got \(1, 2, 8, 48\)"):
        int8_attention(*(torch.zeros(1, 2, 8, 48) for _ in range(3)))
    with pytest.raises(ValueError, match="got .* on meta"):
        int8_attention(*(torch.zeros(1, 2, 8, 64, device="meta") for _ in range(3)))
    assert cpu_kernels_unavailable(128) == "it takes head dimensions 16, 32, 64 (got 128)"
    assert cpu_kernels_unavailable(64) == cpu_kernels_unavailable()


def test_machines_that_cannot_run_it_say_why_and_keep_the_pytorch_path(monkeypatch, tmp_path):
    """A CPU without AVX2 (nor AVX-512 VNNI), or a compiler that fails: the reason; the recipe warns for
    each kernel it cannot run and keeps the PyTorch path (its int8 linears still apply); ``cogvx recipes``
    says so."""
    monkeypatch.setenv("COGVX_CACHE", str(tmp_path))
    monkeypatch.delenv(cpu_isa.ENV, raising=False)
    cpu_isa.library.cache_clear()
    try:
        monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: frozenset({"avx512f", "avx512bw"}))
        why, why_gelu = cpu_kernels_unavailable(), cpu_kernels_unavailable(kernel="gelu_quant")
        assert why == why_gelu and (why == "this CPU lacks avx2, fma" or why.startswith("needs x86-64 Linux"))
        model = build_transformer(PRESETS["tiny"].transformer, device="cpu")
        with pytest.warns(RuntimeWarning, match="GELU .* does not run here"):
            quantize_transformer(model, "int8dq-cpu")  # applies the recipe's settings: warns once
        with pytest.warns(RuntimeWarning) as got:
            apply_runtime_settings(model, Runtime(attention_kernel="int8-cpu", fused_gelu_quant=True))
        said = " | ".join(str(w.message) for w in got)
        assert "int8 CPU attention does not run here: " in said and "attention runs as SDPA" in said
        assert "GELU + int8 quantization kernel does not run here: " in said and "runs the same ops unfused" in said
        assert not any(b.attn1.int8_cpu or b.ff.fused_gelu_quant for b in model.transformer_blocks)
        row = next(r for r in recipes_table("cpu") if r["name"] == "int8dq-cpu-int8attn")
        assert row["runs_here"] and row["reason"].startswith("runs with SDPA attention: its int8 attention kernel "
                                                             "cannot run here (")
        assert "runs the GELU unfused: its GELU + quantization kernel cannot run here (" in row["reason"]
        if not why.startswith("needs"):
            cpu_isa.library.cache_clear()
            monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: frozenset(cpu_isa.VARIANTS["avx512_bf16"][0]))
            monkeypatch.setenv("CC", "false")
            assert cpu_kernels_unavailable().startswith("building cpu_kernels.c and cpu_gelu_quant.c with false failed")
    finally:
        cpu_isa.library.cache_clear()
    with pytest.raises(ValueError, match="attention_kernel 'int4' is not one of 'int8-cpu'"):
        Runtime(attention_kernel="int4")


@pytest.mark.skipif(len(cpu_isa.runnable()) < 2, reason=f"this CPU runs {cpu_isa.runnable()}: nothing lower to force")
def test_a_forced_lower_variant_is_what_runs_and_what_cogvx_recipes_says(monkeypatch):
    """COGVX_CPU_ISA caps the variant (the best at or below it that this CPU runs): the op, the model and
    ``cogvx recipes`` all take it; a name that is no variant is a clear error."""
    best, lowest = cpu_isa.runnable()[0], cpu_isa.runnable()[-1]
    assert cpu_kernels.variant() == best
    monkeypatch.setenv(cpu_isa.ENV, lowest)
    assert cpu_kernels.variant("gelu_quant") == lowest and cpu_kernels.variant("attention") == lowest
    row = next(r for r in recipes_table("cpu") if r["name"] == "int8dq-cpu-int8attn")
    assert row["reason"].startswith(f"int8 attention kernel: {lowest}; GELU + quantization kernel: {lowest}; runs")
    q, k, v = _qkv(1, 2, 77, 64, seed=5)
    forced = int8_attention(q, k, v)
    assert sqnr(_documented_numerics(q, k, v, lowest).float(), forced) > 60.0
    torch.testing.assert_close(forced, int8_attention(q, k, v, isa=lowest), rtol=0, atol=0)
    monkeypatch.setenv(cpu_isa.ENV, "avx512")
    with pytest.raises(ValueError, match="COGVX_CPU_ISA='avx512' is not a CPU kernel variant; choose one of "
                                         "amx, avx512_bf16, avx512_vnni, avx_vnni, avx2"):
        cpu_kernels_unavailable()


@needs_kernel
@pytest.mark.parametrize("fuse_qkv", [False, True], ids=["qkv", "fused-qkv"])
def test_recipe_attends_with_the_kernel_compiled_with_no_graph_break(fuse_qkv):
    """int8dq-cpu-int8attn on the tiny transformer: every block calls the attention op and the fused
    GELU + quantization op and none calls SDPA, eager and compiled (inductor with freezing, the engine's
    CPU compile) alike, with no graph break; the output stays within the int8 attention's error of the
    int8dq-cpu transformer (SDPA attention). With q/k/v fused the kernel reads the int8 GEMM's output and
    applies its rescale, bias, QK norm and RoPE itself: the same output as the unfused blocks, which run
    those as PyTorch ops before it."""
    cfg, model, args = tiny_quantized_transformer("int8dq-cpu", fuse_qkv=fuse_qkv)

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
    if fuse_qkv:
        _, unfused, _ = tiny_quantized_transformer("int8dq-cpu")
        apply_runtime_settings(unfused, Runtime(attention_kernel="int8-cpu"))
        with torch.inference_mode():
            assert sqnr(unfused(*args), eager) > 60.0


# ----------------------------------------------------------------------------------- GELU + quantize
def _gelu_quant_float64(acc, s, bias):
    y = acc.double() * s.double() + bias.double()
    g = 0.5 * y * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (y + 0.044715 * y**3)))
    amax = g.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    return torch.clamp(torch.round(g * (127 / amax)), -127, 127) + 128, amax / 127


@pytest.mark.parametrize("isa", _variants("gelu_quant"))
@pytest.mark.parametrize("m, n, dtype", [(1, 16, torch.float32), (37, 192, torch.bfloat16), (300, 7680, torch.bfloat16)])
def test_gelu_quant_matches_float64(m, n, dtype, isa):
    """Quantized levels equal float64's but where g * 127 / amax lies within fp32 rounding of a .5 (one
    level; measured 1e-6 of the elements at 300 x 7680); scales to fp32 rounding."""
    g = torch.Generator().manual_seed(n)
    acc, s, bias = (3 * torch.randn(m, n, generator=g)).to(dtype), torch.rand(m, 1, generator=g) + 0.5, torch.randn(n, generator=g)
    q, scale = gelu_quant_rows(acc, s, bias, isa=isa)
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


@needs_gelu
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
