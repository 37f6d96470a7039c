"""adaLN with the fp8 per-row activation quantization fused into its output, against torchao's
quantization of the unfused output, and the fp8 row-wise linear against torchao's fp8 linear.

On CPU the kernel runs under TRITON_INTERPRET=1 (set by tests/conftest.py; the line below covers
running this file alone). The interpreter's float -> float8/bfloat16 conversions do not round like
the GPU: the kernel rounds explicitly where that matters (see cogvx.kernels.adaln_fp8), and the
bfloat16 residual it stores is truncated there, so CPU bfloat16 results are compared within the
tolerance rule while float32/float16 results must match bit for bit. The GPU tests (skipped here)
demand bit-exact agreement in every dtype.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import warnings  # noqa: E402

import pytest  # noqa: E402

from cogvx.kernels import adaptive_layernorm_fp8, fp8_rowwise_linear  # noqa: E402
from cogvx.kernels.adaln import adaln_reference, adaptive_layernorm  # noqa: E402
from cogvx.kernels.adaln_fp8 import (  # noqa: E402
    _adaln_fp8_kernel,
    quantize_rows_reference,
    scaled_mm_rowwise,
)

from helpers import LOWP_ATOL, assert_close_lowp, kernel_markers  # noqa: E402

pytestmark = pytest.mark.triton

FP8 = torch.float8_e4m3fn
_interp, _cuda = kernel_markers(_adaln_fp8_kernel)
_fp8_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs a GPU with sm_89+"
)
DEVICE_DTYPES = [
    pytest.param("cpu", dt, marks=_interp, id=f"cpu-{str(dt)[6:]}") for dt in (torch.float32, torch.float16,
                                                                              torch.bfloat16)
] + [pytest.param("cuda", dt, marks=[*_cuda, _fp8_gpu], id=f"cuda-{str(dt)[6:]}")
     for dt in (torch.float32, torch.float16, torch.bfloat16)]  # fmt: skip


def _torchao_rowwise(y, lb=None):
    """torchao's activation quantization for Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()):
    the QuantizeTensorToFloat8Kwargs the config builds, through the function its linear calls."""
    from torchao.quantization.granularity import PerRow
    from torchao.quantization.quantize_.common.quantize_tensor_kwargs import _choose_quant_func_and_quantize_tensor
    from torchao.quantization.quantize_.workflows import QuantizeTensorToFloat8Kwargs

    t = _choose_quant_func_and_quantize_tensor(y, QuantizeTensorToFloat8Kwargs(FP8, PerRow(), hp_value_lb=lb))
    return t.qdata, t.scale


def make_inputs(B, S, D, dtype, device, delta=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype)

    return dict(x=r(B, S, D, s=2.0) + 0.5, delta=r(B, S, D) if delta else None,
                gate=r(B, 2, D, s=0.5) if delta else None, weight=r(D, s=0.3) + 1, bias=r(D, s=0.3),
                shift=r(B, 2, D, s=0.5), scale=r(B, 2, D, s=0.5))  # fmt: skip


def _bits(t):
    return t.view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_quantization_is_torchaos(dtype):
    """Bit for bit torchao's per-row numbers on every nonzero row; an all-zero row gets zeros and a
    finite scale (torchao's default gives NaN there; its activation_value_lb=1e-12 gives ours, except
    in float16)."""
    y = adaln_reference(**make_inputs(2, 19, 136, dtype, "cpu"), n_text=5)[1]
    y[1, 3] = 0
    y[0, 4] *= 1e-3  # a small-magnitude row: the scale's rounding in y's dtype matters
    q, s = quantize_rows_reference(y)
    assert q.dtype == FP8 and s.dtype == torch.float32 and s.shape == (2, 19, 1)
    tq, ts = _torchao_rowwise(y)
    nonzero = torch.ones(2, 19, dtype=torch.bool)
    nonzero[1, 3] = False
    assert torch.equal(s[nonzero], ts[nonzero]), (s - ts).abs().max()
    assert torch.equal(_bits(q)[nonzero], _bits(tq)[nonzero])
    assert torch.isnan(tq[1, 3].float()).all(), "torchao's default no longer gives NaN on a zero row"
    lq, ls = _torchao_rowwise(y, lb=1e-12)
    # float16 cannot hold torchao's 1e-12 floor (it rounds to 0, and the zero row stays NaN there):
    # the floor is ours alone in float16.
    rows = nonzero if dtype == torch.float16 else torch.ones_like(nonzero)
    assert torch.equal(s[rows], ls[rows]) and torch.equal(_bits(q)[rows], _bits(lq)[rows])
    assert (q[1, 3].float() == 0).all() and 0 < s[1, 3].item() < 1e-13


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("B,S,D,n_text,delta", [(2, 37, 96, 7, True), (1, 13, 200, 0, False), (1, 9, 1920, 3, True)])
def test_kernel_matches_reference(device, dtype, B, S, D, n_text, delta):
    inp = make_inputs(B, S, D, dtype, device, delta)
    inp["x"][0, -1] = 0.5  # a constant row: LN gives 0, y = shift: still quantized like the rest
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent fallback
        x_new, q, s = adaptive_layernorm_fp8(**inp, n_text=n_text, backend="triton")
        x_k, y_k = adaptive_layernorm(**inp, n_text=n_text, backend="triton")
    assert q.dtype == FP8 and q.shape == (B, S, D) and s.shape == (B, S, 1) and s.dtype == torch.float32
    # The quantization of the unfused kernel's y (what a separate activation-quantization pass sees):
    # bit for bit, in every dtype, under the interpreter too.
    q_ref, s_ref = quantize_rows_reference(y_k)
    assert torch.equal(s, s_ref), f"scales differ by up to {(s - s_ref).abs().max().item():.3g}"
    differ = _bits(q) != _bits(q_ref)
    assert not differ.any(), f"{int(differ.sum())} fp8 codes differ, first at {differ.nonzero()[0].tolist()}"
    assert x_new is inp["x"] if not delta else torch.equal(x_new, x_k)
    # Against the float64 reference, dequantized: the tolerance rule with torch's own low-precision
    # pipeline (adaLN in dtype, then the quantization) as the yardstick.
    y64 = adaln_reference(**{k: (v.double() if v is not None else None) for k, v in inp.items()}, n_text=n_text)[1]
    q_lp, s_lp = quantize_rows_reference(adaln_reference(**inp, n_text=n_text)[1])
    assert_close_lowp(q.float() * s, y64, q_lp.float() * s_lp, LOWP_ATOL[dtype], "dequantized y")


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_row_offset_shards_match_the_unsharded_sequence(device, dtype):
    n_text, n_video, n_pad, D = 6, 20, 4, 64
    S = n_text + n_video
    inp = make_inputs(2, S + n_pad, D, dtype, device)
    full = dict(inp, x=inp["x"][:, :S], delta=inp["delta"][:, :S])
    _, q_full, s_full = adaptive_layernorm_fp8(**full, n_text=n_text, backend="triton")
    for off, rows in [(0, 9), (4, 9), (9, 9), (18, 12)]:  # into the video, from the text, all video, past it
        part = dict(inp, x=inp["x"][:, off : off + rows], delta=inp["delta"][:, off : off + rows])
        x_s, q_s, s_s = adaptive_layernorm_fp8(**part, n_text=n_text, row_offset=off, backend="triton")
        real = min(rows, S - off)
        assert torch.equal(s_s[:, :real], s_full[:, off : off + real]), f"shard at row {off}: scales"
        assert torch.equal(_bits(q_s[:, :real]), _bits(q_full[:, off : off + real])), f"shard at row {off}: y_fp8"
        ref = quantize_rows_reference(adaptive_layernorm(**part, n_text=n_text, row_offset=off, backend="triton")[1])
        assert torch.equal(s_s, ref[1]) and torch.equal(_bits(q_s), _bits(ref[0])), f"shard at row {off} (padding)"


@_interp
def test_fake_impls_match_real_outputs():
    inp = make_inputs(2, 7, 40, torch.float16, "cpu")
    result = torch.library.opcheck(torch.ops.cogvx.adaln_residual_fp8.default, tuple(inp.values()) + (3, 1e-5, 2))
    assert all(v == "SUCCESS" for v in result.values()), result
    args = tuple(v for k, v in inp.items() if k not in ("delta", "gate"))
    result = torch.library.opcheck(torch.ops.cogvx.adaln_fp8.default, args + (3, 1e-5, 0))
    assert all(v == "SUCCESS" for v in result.values()), result


@_interp
def test_compiles_to_one_op_without_graph_break():
    inp = make_inputs(1, 9, 32, torch.float32, "cpu")

    def f(x, delta, gate, weight, bias, shift, scale):
        return adaptive_layernorm_fp8(x, delta, gate, weight, bias, shift, scale, 4, backend="triton")

    explain = torch._dynamo.explain(f)(**inp)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    targets = [str(n.target) for n in explain.graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count("cogvx.adaln_residual_fp8") == 1, targets
    torch._dynamo.reset()


def _linear_case(dtype=torch.bfloat16, M=(2, 21), K=128, N=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(*M, K, generator=g) * 2).to(dtype)
    w = (torch.randn(N, K, generator=g) * 0.1).to(dtype)
    bias = (torch.randn(N, generator=g) * 0.1).to(dtype)
    y_q, y_s = quantize_rows_reference(y)
    w_q, w_s = quantize_rows_reference(w)  # torchao's PerRow weight quantization is the same rule
    return y, w, bias, y_q, y_s, w_q, w_s


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_fp8_rowwise_linear_reference(out_dtype):
    """The CPU path: the dequantized product in float64, rounded once to out_dtype, within fp32 accumulation."""
    _, _, bias, y_q, y_s, w_q, w_s = _linear_case()
    out = fp8_rowwise_linear(y_q, y_s, w_q, w_s, bias, out_dtype)
    exact = (y_q.double() * y_s.double()) @ (w_q.double() * w_s.double()).t() + bias.double()
    assert out.dtype == out_dtype and out.shape == (2, 21, 48)
    tol = 1e-5 * exact.abs().max().item() + (exact.abs() * 2**-8).max().item() * (out_dtype == torch.bfloat16)
    assert (out.double() - exact).abs().max().item() <= tol


def test_scaled_mm_call_matches_the_reference():
    """The exact torch._scaled_mm call the CUDA path makes (layouts, scale shapes, bias), run by
    torch's CPU _scaled_mm, agrees with the fp32 reference to the output's rounding."""
    _, _, bias, y_q, y_s, w_q, w_s = _linear_case()
    for out_dtype, b in [(torch.bfloat16, bias), (torch.float32, bias), (torch.bfloat16, None)]:
        ours = scaled_mm_rowwise(y_q.reshape(-1, 128), y_s.reshape(-1, 1), w_q, w_s, b, out_dtype)
        ref = fp8_rowwise_linear(y_q, y_s, w_q, w_s, b, out_dtype).reshape(-1, 48)
        ulp = 2**-7 if out_dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(ours.float(), ref.float(), rtol=ulp, atol=1e-4)


def test_matches_torchaos_fp8_linear():
    """adaLN -> fp8 quantization (ours) -> fp8_rowwise_linear against torchao's Float8Tensor PerRow
    linear on the unfused adaLN output (torchao quantizes the activation itself), on the CPU."""
    from torchao.float8.inference import Float8MMConfig
    from torchao.quantization.granularity import PerRow
    from torchao.quantization.quantize_.workflows import Float8Tensor, QuantizeTensorToFloat8Kwargs

    inp = make_inputs(1, 17, 128, torch.bfloat16, "cpu")
    _, y = adaln_reference(**inp, n_text=4)
    _, y_q, y_s = adaptive_layernorm_fp8(**inp, n_text=4, backend="torch")
    w = (torch.randn(64, 128, generator=torch.Generator().manual_seed(5)) * 0.1).to(torch.bfloat16)
    bias = torch.randn(64, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    w8 = Float8Tensor.from_hp(w, granularity=PerRow(), mm_config=Float8MMConfig(use_fast_accum=True),
                              act_quant_kwargs=QuantizeTensorToFloat8Kwargs(FP8, PerRow()))  # fmt: skip
    theirs = torch.nn.functional.linear(y, w8, bias)
    ours = fp8_rowwise_linear(y_q, y_s, w8.qdata, w8.scale, bias, torch.bfloat16)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2**-7, atol=1e-3)
    sqnr = 10 * torch.log10(y.float().matmul(w.float().t()).pow(2).mean() /
                            (ours.float() - bias.float() - y.float().matmul(w.float().t())).pow(2).mean())  # fmt: skip
    assert sqnr > 20, f"fp8 linear SQNR {sqnr:.1f} dB against the bf16 product"


def test_fp8_rowwise_linear_errors_say_what_is_accepted():
    _, _, bias, y_q, y_s, w_q, w_s = _linear_case()
    with pytest.raises(ValueError, match=r"weight_scale must be fp32 \[48, 1\]"):
        fp8_rowwise_linear(y_q, y_s, w_q, w_s.t(), bias, torch.bfloat16)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_rowwise_linear(y_q.float(), y_s, w_q, w_s, bias, torch.bfloat16)


@pytest.mark.gpu
@_fp8_gpu
def test_gpu_fp8_rowwise_linear_matches_reference():
    _, _, bias, y_q, y_s, w_q, w_s = (t.cuda() for t in _linear_case())
    out = fp8_rowwise_linear(y_q, y_s, w_q, w_s, bias, torch.bfloat16)
    ref = fp8_rowwise_linear(*(t.cpu() for t in (y_q, y_s, w_q, w_s, bias)), torch.bfloat16)
    torch.testing.assert_close(out.cpu().float(), ref.float(), rtol=2**-7, atol=1e-3)
