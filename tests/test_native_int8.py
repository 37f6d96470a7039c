"""cogvx's own int8 dynamic-activation linear (recipe int8dq-cpu, backend "native"): against a float64
computation of its documented numerics, the oneDNN GEMM against the op's reference, compile with no
graph break, and clear errors. (Accuracy floors and the save/reload round trip of the recipe live in
test_quantize_accuracy.py with every other recipe.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cogvx.engine.models.attention import chunked_attention, query_block, use_chunked_attention
from cogvx.engine.models.presets import PRESETS
from cogvx.engine.models.transformer import build_transformer
from cogvx.engine.quantizing import apply_runtime_settings
from cogvx.engine.runtime.compiling import compile_module, dynamo_counts
from cogvx.quantize import RECIPES, availability, quantize_
from cogvx.quantize.backends import native
from cogvx.quantize.backends.native import Int8DynamicLinear, int8_linear_reference
from cogvx.quantize.metrics import sqnr
from cogvx.quantize.settings import Runtime
from helpers import attention_float64
from tiny_transformer import tiny_quantized_transformer

RECIPES_HERE = ["int8dq-cpu", "int8dq-cpu-bf16attn", "int8dq-cpu-int8attn"]


def _float64_reference(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    """The module docstring's numerics, written out in float64 (per-token / per-channel symmetric int8)."""
    x, w, b = x.double(), lin.weight.double(), lin.bias.double()
    sx = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    qx = torch.clamp(torch.round(x / sx), -127, 127)
    sw = w.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    qw = torch.clamp(torch.round(w / sw), -127, 127)
    return (qx @ qw.t()) * sw.t() * sx + b


@pytest.mark.parametrize("gemm_out, rtol", [("float32", 1e-5), ("bfloat16", 2**-8)])
@pytest.mark.parametrize("shape", [(3, 7, 96), (1, 33, 64)], ids=["3x7x96", "1x33x64"])
def test_linear_matches_float64_numerics(gemm_out, rtol, shape):
    torch.manual_seed(0)
    *lead, k = shape
    lin = nn.Linear(k, 80)
    x = torch.randn(*lead, k) * torch.linspace(0.1, 3, k)  # uneven channels, as real activations
    q = Int8DynamicLinear.from_linear(lin, gemm_out)
    with torch.no_grad():
        got, ref = q(x), _float64_reference(x, lin)
    assert got.shape == (*lead, 80) and got.dtype == torch.float32
    # A product that rounds to the other side of a .5 quantization step moves one int8 level: allow
    # a level of the largest activation times the largest weight on top of the output rounding.
    err = (got.double() - ref).abs()
    bound = rtol * ref.abs() + 2 * (x.abs().amax() / 127) * lin.weight.abs().amax()
    assert (err <= bound).all(), f"max error {err.max():.3g} ({gemm_out})"


def test_onednn_gemm_equals_reference():
    """The oneDNN u8 x s8 kernel against the op's reference (sums below 2^24 stay exact in fp32)."""
    if not native._ONEDNN:
        pytest.skip("this torch build has no oneDNN qlinear")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (37, 96), generator=g, dtype=torch.uint8)
    w = torch.randint(-127, 128, (72, 96), generator=g, dtype=torch.int8)
    s = torch.rand(72, generator=g) * 1e-2 + 1e-3
    for bf16 in (False, True):
        got = torch.ops.cogvx.int8_linear(x, w, s, bf16)
        ref = int8_linear_reference(x, w, s, bf16)
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got.float(), ref.float(), rtol=1e-6 if not bf16 else 2**-8, atol=0)


def test_packed_weight_follows_in_place_changes():
    lin = nn.Linear(64, 32)
    q = Int8DynamicLinear.from_linear(lin, "float32")
    x = torch.randn(5, 64)
    with torch.no_grad():
        before = q(x)
        q.weight_int8.neg_()  # bumps the tensor's version: the prepacked copy must be rebuilt
        after = q(x)
    torch.testing.assert_close(after - q.bias, -(before - q.bias), rtol=1e-5, atol=1e-5)


def test_quantize_replaces_the_filtered_linears():
    torch.manual_seed(0)
    model = build_transformer(PRESETS["tiny"].transformer, device="cpu")
    names = quantize_(model, "int8dq-cpu")
    assert names and all(isinstance(model.get_submodule(n), Int8DynamicLinear) for n in names)
    assert isinstance(model.proj_out, nn.Linear) and not isinstance(model.proj_out, Int8DynamicLinear)


def test_attention_dtype_setting_reaches_every_block():
    model = build_transformer(PRESETS["tiny"].transformer, device="cpu")
    apply_runtime_settings(model, RECIPES["int8dq-cpu-bf16attn"].runtime)
    assert all(b.attn1.sdpa_dtype == torch.bfloat16 for b in model.transformer_blocks)
    with pytest.raises(ValueError, match="attention_dtype 'float16' is not one of 'bfloat16', 'float32'"):
        Runtime(attention_dtype="float16")


def test_bad_settings_and_stored_tensors_are_clear_errors():
    with pytest.raises(ValueError, match="gemm_out must be one of bfloat16, float32"):
        Int8DynamicLinear(8, 4, True, gemm_out="int8")
    layer = Int8DynamicLinear(8, 4, True, device="meta")
    with pytest.raises(ValueError, match=r"expected exactly weight_int8 and weight_scale \(got \['weight'\]\)"):
        native.load_layer(layer, {"weight": torch.zeros(4, 8)}, {}, "cpu")
    with pytest.raises(ValueError, match="weight_int8 must be int8 and weight_scale float32"):
        native.load_layer(layer, {"weight_int8": torch.zeros(4, 8), "weight_scale": torch.ones(4)}, {}, "cpu")


def test_recipes_listed_without_importing_the_backend():
    for name in RECIPES_HERE:
        ok, why = availability(name, "cpu", import_backend=False)
        assert ok and why, f"{name}: runs on the CPU with a note (got {ok}, {why!r})"


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES_HERE[:2])  # int8dq-cpu-int8attn: test_cpu_kernels.py compiles it
def test_compiled_transformer_has_no_graph_break_and_matches_eager(name):
    """inductor with freezing (the engine's CPU compile) over the quantized tiny transformer: one graph,
    the same output as eager up to the bf16 GEMM output rounding and fused-order float differences."""
    cfg, model, args = tiny_quantized_transformer(name, fuse_qkv=True)
    torch._dynamo.reset()
    before = dynamo_counts()
    with torch.inference_mode():
        eager = model(*args)
        compiled = compile_module(model, True, torch.device("cpu"))(*args)
    after = dynamo_counts()
    assert after["graph_breaks"] == before["graph_breaks"], "graph break in the compiled int8dq-cpu transformer"
    rel = ((compiled - eager).norm() / eager.norm()).item()
    assert rel < 2e-2, f"compiled differs from eager by {rel:.3g} (relative L2)"


# ------------------------------------------------------------------ int8dq-cpu-bf16attn's attention


@pytest.mark.parametrize("seq", [7, 130, 1000], ids=["7", "130", "1000"])
def test_chunked_attention_matches_float64(seq):
    """Blocks of query rows (the last one short) give the whole attention: exact in fp32, and at the
    bf16 rounding of scores and probabilities in bf16."""
    g = torch.Generator().manual_seed(seq)
    q, k, v = (torch.randn(2, 3, seq, 64, generator=g) for _ in range(3))
    ref = attention_float64(q, k, v)
    out = chunked_attention(q, k, v)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-6
    low = chunked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert low.dtype == torch.bfloat16
    assert sqnr(ref.float(), low.float()) > 40.0


def test_query_blocks_stay_few_and_aligned():
    for seq in (1, 128, 1216, 9676, 17776, 44880):
        rows = query_block(seq)
        assert rows >= 128 and rows % 64 == 0 and -(-seq // rows) <= 64, (seq, rows)


def test_compiled_bf16_attention_recipe_runs_blocked_gemms_not_sdpa():
    """Compiled on the CPU, int8dq-cpu-bf16attn attends with chunked_attention (no SDPA call); eager
    keeps SDPA; the two agree at the bf16 attention's precision."""
    cfg, model, args = tiny_quantized_transformer("int8dq-cpu-bf16attn")

    def sdpa_calls(fn):
        with torch.inference_mode(), torch.profiler.profile() as prof:
            out = fn(*args)
        return out, sum(e.count for e in prof.key_averages() if "scaled_dot_product" in e.key)

    torch._dynamo.reset()
    eager, n_eager = sdpa_calls(model)
    compiled, n_compiled = sdpa_calls(compile_module(model, True, torch.device("cpu"), backend="aot_eager"))
    assert n_eager >= cfg.num_layers and n_compiled == 0
    assert ((compiled - eager).norm() / eager.norm()).item() < 2e-2


def test_chunked_attention_only_where_its_blocks_stay_small():
    """The measured rule: cpu-bench's attention (2 x 30 heads, 1216 tokens, bf16) is chunked, cpu-long's
    (9676 tokens) and anything on another device keep SDPA."""
    short, long_ = torch.empty(2, 30, 1216, 64, dtype=torch.bfloat16), torch.empty(2, 30, 9676, 64, dtype=torch.bfloat16)
    assert use_chunked_attention(short) and not use_chunked_attention(long_)
    assert not use_chunked_attention(short.to("meta"))
