"""The 8-bit attention (cogvx.kernels.sage_attention, sage_quant): against float64 attention (> 30 dB on
unit-variance inputs with shifted keys), against a float64 model of its own numerics (> 60 dB: same
smoothing, int8 codes and scales, exact integer scores, fp16-rounded p and v; the check that catches
packing and scale bugs), on odd lengths, head dims 64 and 32, and after the QK-norm + RoPE kernel on
the text/video split.

int8 ``tl.dot`` is exact under TRITON_INTERPRET=1 (checked below against integer matmul), so the CPU
runs test the kernels themselves; tests/conftest.py sets the variable, the line below covers running
this file alone.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cogvx.kernels import _common  # noqa: E402
from cogvx.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference  # noqa: E402
from cogvx.kernels.sage_attention import _sage_attn_kernel, sage_attention, sage_attention_reference  # noqa: E402
from cogvx.kernels.sage_quant import quantize_rows, quantize_rows_reference, smoothing_mean  # noqa: E402
from cogvx.quantize.metrics import sqnr  # noqa: E402

from helpers import attention_float64, kernel_markers  # noqa: E402

pytestmark = pytest.mark.triton
# The module (cogvx.kernels.sage_attention names the function: the package's public name).
sage_module = importlib.import_module("cogvx.kernels.sage_attention")

_interp, _cuda = kernel_markers(_sage_attn_kernel)
# bf16 is left out under the interpreter (its tl.dot is wrong there); the int8 and fp16 dots are right.
DEVICES = [pytest.param("cpu", torch.float16, marks=_interp, id="cpu-float16"),
           pytest.param("cpu", torch.float32, marks=_interp, id="cpu-float32"),
           pytest.param("cuda", torch.float16, marks=_cuda, id="cuda-float16"),
           pytest.param("cuda", torch.bfloat16, marks=_cuda, id="cuda-bfloat16")]  # fmt: skip
# Output rounding: a bf16 output is 8 bits, so the model comparison is held to what bf16 rounding leaves.
MODEL_FLOOR_DB = {torch.float16: 60.0, torch.float32: 60.0, torch.bfloat16: 44.0}


def _inputs(B, H, S, Dh, dtype, device, shift=4.0, seed=0):
    """Unit-variance q, k, v [B, H, S, Dh]; k shifted by one per-channel offset of ``shift`` sigma (what the
    key LayerNorm's bias does); q and v as strided views (transposes of [B, S, H, Dh])."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, S, H, Dh, generator=g).transpose(1, 2) for _ in range(3))
    k = k + shift * torch.randn(Dh, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


@_interp
def test_int8_dot_is_exact_under_the_interpreter():
    """What lets the CPU runs test the kernel: the interpreter's int8 tl.dot is integer-exact."""
    q, k, _ = _inputs(1, 1, 65, 64, torch.float32, "cpu")
    q8, _ = quantize_rows(q, None, 1.0)
    k8, _ = quantize_rows(k, smoothing_mean(k), 1.0)
    import triton  # here: the test is skipped without triton
    import triton.language as tl

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, o_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
        m, n, kk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
        a = tl.load(a_ptr + m[:, None] * K + kk[None, :])
        b = tl.load(b_ptr + n[:, None] * K + kk[None, :])
        tl.store(o_ptr + m[:, None] * N + n[None, :], tl.dot(a, tl.trans(b), out_dtype=tl.int32))

    a, b = q8[0, 0, :64].contiguous(), k8[0, 0, :32].contiguous()
    o = torch.empty(64, 32, dtype=torch.int32)
    dot_kernel[(1,)](a, b, o, 64, 32, 64)
    assert torch.equal(o, a.long().mm(b.long().T).int()) and int(o.abs().max()) > 2**14, int(o.abs().max())


@pytest.mark.parametrize("device,dtype", DEVICES)
@pytest.mark.parametrize("S,Dh,smooth", [(1, 64, True), (65, 64, True), (130, 32, False), (257, 64, True)])
def test_quantization_kernel_matches_reference(device, dtype, S, Dh, smooth):
    """Codes and scales equal the PyTorch arithmetic of the same spec, except where the scaled value is
    a tie (x * 127 / amax within 1e-4 of n + 1/2, which fp16 inputs hit): there the last bit of the
    product decides, and the kernel's compiler may round it otherwise (off by one)."""
    _, k, _ = _inputs(2, 3, S, Dh, dtype, device)
    k = torch.cat([k, torch.zeros_like(k[:, :, :1])], 2)  # an all-zero row: codes 0, a finite scale
    mean = smoothing_mean(k) if smooth else None
    codes, scales = quantize_rows(k, mean, 0.7)
    ref_codes, ref_scales = quantize_rows_reference(k, mean, 0.7)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32 and codes.shape == k.shape
    torch.testing.assert_close(scales, ref_scales, rtol=1e-6, atol=0)
    x = (k.float() - (mean if smooth else 0)).double()
    z = x * 127 / x.abs().amax(-1, keepdim=True).clamp_min(1e-20)
    diff = (codes.int() - ref_codes.int()).abs()
    ties = ((z.abs() % 1 - 0.5).abs() < 1e-4)
    assert int(diff.max()) <= 1 and bool(ties[diff > 0].all()), f"{int((diff > 0 & ~ties).sum())} codes differ"
    assert int(codes.abs().max()) == 127 and bool(torch.isfinite(scales).all())
    # and the codes do encode the input: dequantized, they are within half a step of it
    step = (scales.double() / 0.7)[..., None]
    assert bool(((codes.double() * step - x).abs() <= 0.5 * step * (1 + 1e-5) + 1e-30).all())


@pytest.mark.parametrize("device,dtype", DEVICES)
@pytest.mark.parametrize("S,Dh", [(1, 64), (65, 64), (130, 32), (257, 64)])
def test_kernel_matches_the_model_of_its_numerics_and_float64_attention(device, dtype, S, Dh):
    q, k, v = _inputs(1, 2, S, Dh, dtype, device)
    out = torch.full(v.shape, float("nan"), dtype=v.dtype, device=device)  # poisoned output
    sage_module.sage_attention_launch(q, k, v, out)
    assert out.dtype == dtype and bool(torch.isfinite(out).all()), "unwritten or non-finite output"
    got = out.double().cpu()
    model = sage_attention_reference(q, k, v, dtype=torch.float64).double().cpu()
    exact = attention_float64(q, k, v).cpu()
    floor = MODEL_FLOOR_DB[dtype]
    assert sqnr(model, got) > floor, f"against the model of its numerics: {sqnr(model, got):.1f} dB <= {floor}"
    assert sqnr(exact, got) > 30.0, f"against float64 attention: {sqnr(exact, got):.1f} dB <= 30"


def test_smoothing_is_what_keeps_shifted_keys_accurate():
    """The reference (the kernel's numerics on any machine), with and without the mean subtracted: at
    an 8-sigma key offset, per-token int8 keys without smoothing fall below the 30 dB bar; with it they
    stay above. This is what makes the shifted-keys tests above able to fail."""
    q, k, v = _inputs(1, 2, 129, 64, torch.float32, "cpu", shift=8.0)
    exact = attention_float64(q, k, v)
    with_mean = sqnr(exact, sage_attention_reference(q, k, v))
    real_mean = sage_module.smoothing_mean
    try:
        sage_module.smoothing_mean = lambda t: torch.zeros_like(real_mean(t))
        without = sqnr(exact, sage_attention_reference(q, k, v))
    finally:
        sage_module.smoothing_mean = real_mean
    assert with_mean > 35.0 and without < 30.0, (with_mean, without)


def _rope(n_video, dh, seed=1):
    g = torch.Generator().manual_seed(seed)
    theta = (torch.rand(n_video, dh // 2, generator=g) * 6.3).repeat_interleave(2, dim=-1)
    return theta.cos(), theta.sin()


@pytest.mark.parametrize("device,dtype", DEVICES)
@pytest.mark.parametrize("S,n_text", [(65, 7), (130, 0), (33, 33)])
def test_after_qk_norm_rope_on_the_text_video_split(device, dtype, S, n_text):
    """The engine's path: q, k, v as views of one fused projection, the QK-norm + RoPE kernel (RoPE on rows
    >= n_text only), then the 8-bit attention; against LayerNorm + RoPE + attention in float64. The key
    LayerNorm's bias is large (shifted keys after the norm, as in CogVideoX)."""
    B, H, Dh = 2, 2, 64
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, S, 3 * H * Dh, generator=g) * 2 + 0.3
    norms = [torch.randn(Dh, generator=g) * 0.2 + 1, torch.randn(Dh, generator=g) * 0.2,
             torch.randn(Dh, generator=g) * 0.2 + 1, torch.randn(Dh, generator=g) * 3.0]  # fmt: skip
    cos, sin = _rope(S - n_text, Dh)
    qkv, norms = qkv.to(device, dtype), [w.to(device, dtype) for w in norms]
    q, k, v = qkv.unflatten(-1, (3, H, Dh)).unbind(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent fallback
        qn, kn = qk_norm_rope(q, k, *norms, cos.to(device), sin.to(device), n_text, backend="triton")
        out = sage_attention(qn, kn, v.transpose(1, 2), backend="triton")
    f64 = [t.double().cpu() for t in (q, k, *norms)]
    q64, k64 = qk_norm_rope_reference(*f64, cos.double(), sin.double(), n_text)
    exact = F.scaled_dot_product_attention(q64, k64, v.double().cpu().transpose(1, 2))
    assert sqnr(exact, out.double().cpu()) > 30.0, f"{sqnr(exact, out.double().cpu()):.1f} dB"


@_interp
def test_unsupported_head_dim_falls_back_to_the_same_numerics_with_one_warning():
    _common._WARNED.clear()
    q, k, v = _inputs(1, 2, 9, 16, torch.float32, "cpu")
    with pytest.warns(RuntimeWarning, match="head dim"):
        out = sage_attention(q, k, v)
    assert torch.equal(out, sage_attention_reference(q, k, v, dtype=torch.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        sage_attention(q, k, v)


def test_bad_inputs_are_clear_errors():
    q, k, v = _inputs(1, 2, 9, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"one shape \[B, H, S, Dh\]"):
        sage_attention(q, k[:, :, :5], v)
    with pytest.raises(ValueError, match="floating-point"):
        sage_attention(q, k.to(torch.int8), v)
    with pytest.raises(ValueError, match="S >= 1"):
        sage_attention(q[:, :, :0], k[:, :, :0], v[:, :, :0])
    with pytest.raises(ValueError, match="backend must be"):
        sage_attention(q, k, v, backend="cuda")


@_interp
def test_compiles_as_one_op_without_graph_breaks():
    """Inside torch.compile(fullgraph=True) the launcher is one custom op (its fake gives the shape)."""
    q, k, v = _inputs(1, 2, 40, 64, torch.float16, "cpu")
    fn = torch.compile(lambda a, b, c: sage_attention(a, b, c) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(fn(q, k, v), sage_attention(q, k, v) * 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_longer_sequences_through_the_autotuned_configurations(dtype):
    """Real-model text length, many query/key blocks, every tile the autotuner may pick."""
    n_text, grid = 226, (4, 15, 15)
    S, H, Dh = n_text + grid[0] * grid[1] * grid[2], 4, 64
    q, k, v = _inputs(2, H, S, Dh, dtype, "cuda")
    out = sage_attention(q, k, v)
    model = sage_attention_reference(q, k, v, dtype=torch.float64).double().cpu()
    exact = attention_float64(q, k, v).cpu()
    got = out.double().cpu()
    assert sqnr(model, got) > MODEL_FLOOR_DB[dtype], f"{sqnr(model, got):.1f} dB against the model"
    assert sqnr(exact, got) > 30.0, f"{sqnr(exact, got):.1f} dB against float64"
    for cfg in sage_module.sage_configs(torch.cuda.get_device_capability()):  # each tile, not only the fastest
        o = torch.full_like(v, float("nan"))
        args, meta = sage_module.launch_plan(*sage_module.quantize_qk(q, k), v, o)
        bm = cfg.kwargs["BLOCK_M"]
        _sage_attn_kernel[(-(-S // bm), 2 * H)](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps,
                                                 num_stages=cfg.num_stages)  # fmt: skip
        assert sqnr(model, o.double().cpu()) > MODEL_FLOOR_DB[dtype], (cfg, sqnr(model, o.double().cpu()))
