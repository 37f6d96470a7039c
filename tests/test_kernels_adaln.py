"""The fused adaptive-LayerNorm kernel against fp64 references and diffusers' CogVideoXLayerNormZero.

On CPU the kernels run under TRITON_INTERPRET=1, which must be set before cogvx.kernels defines
its @triton.jit functions (DESIGN §7): tests/conftest.py sets it; the line below covers running
this file alone.
"""

import copy
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import warnings  # noqa: E402

import pytest  # noqa: E402

from cogvx.kernels import _common  # noqa: E402
from cogvx.kernels.adaln import _adaln_kernel, adaln_launch, adaln_reference, adaptive_layernorm  # noqa: E402

from helpers import LOWP_ATOL, assert_close_lowp, device_dtype_params, kernel_markers  # noqa: E402

pytestmark = pytest.mark.triton

ATOL = LOWP_ATOL
_interp, _cuda = kernel_markers(_adaln_kernel)
DEVICE_DTYPES = device_dtype_params(_adaln_kernel)


def make_inputs(B, S, D, dtype, device, delta=True, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype)

    x = r(B, S, D, s=2.0) + 0.5  # nonzero mean: the centring matters
    return dict(
        x=x,
        delta=r(B, S, D) if delta else None,
        gate=r(B, 2, D, s=0.5) if delta else None,
        weight=r(D, s=0.3) + 1 if affine else None,
        bias=r(D, s=0.3) if affine else None,
        shift=r(B, 2, D, s=0.5),
        scale=r(B, 2, D, s=0.5),
    )


def _f64(inp):
    return {k: (v.double() if v is not None else None) for k, v in inp.items()}


# (B, S, D, n_text, delta, affine): prime row counts, video only, text only, odd D, the real widths
CASES = [
    (2, 37, 40, 5, True, True),
    (1, 13, 97, 0, True, False),
    (2, 11, 64, 11, False, True),
    (1, 29, 1920, 3, True, True),
    (1, 7, 3072, 2, False, False),
    (3, 1, 33, 1, True, True),
]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("B,S,D,n_text,delta,affine", CASES)
def test_kernel_matches_reference(device, dtype, B, S, D, n_text, delta, affine):
    inp = make_inputs(B, S, D, dtype, device, delta, affine)
    # Poisoned outputs: an element the kernel fails to write stays NaN and fails the check.
    x_out = torch.full((B, S, D), float("nan"), dtype=dtype, device=device) if delta else None
    y_out = torch.full((B, S, D), float("nan"), dtype=dtype, device=device)
    adaln_launch(**inp, n_text=n_text, eps=1e-5, x_out=x_out, y_out=y_out)
    x64, y64 = adaln_reference(**_f64(inp), n_text=n_text, eps=1e-5)
    x_lp, y_lp = adaln_reference(**inp, n_text=n_text, eps=1e-5)
    if delta:
        assert_close_lowp(x_out, x64, x_lp, ATOL[dtype], "x_new")
    assert_close_lowp(y_out, y64, y_lp, ATOL[dtype], "y")


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_dispatch_views_and_broadcast(device, dtype):
    """Strided x (a slice of a wider tensor), params broadcast over the batch: strides pass through."""
    B, S, D, n_text = 2, 23, 72, 6
    inp = make_inputs(B, S, D, dtype, device)
    wide = torch.randn(B, S, D + 8, dtype=dtype, device=device)
    wide[..., :D] = inp["x"]
    inp["x"] = wide[..., :D]
    for name in ("gate", "shift", "scale"):
        inp[name] = inp[name][:1].expand(B, 2, D)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent fallback
        x_new, y = adaptive_layernorm(**inp, n_text=n_text, backend="triton")
    x64, y64 = adaln_reference(**_f64(inp), n_text=n_text)
    x_lp, y_lp = adaln_reference(**inp, n_text=n_text)
    assert x_new.dtype == y.dtype == dtype and y.is_contiguous()
    assert_close_lowp(x_new, x64, x_lp, ATOL[dtype], "x_new")
    assert_close_lowp(y, y64, y_lp, ATOL[dtype], "y")


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("n_text,n_video", [(7, 30), (0, 13), (5, 0)])
def test_matches_diffusers_layernorm_zero(device, dtype, n_text, n_video):
    """A block's `h += gate*attn; e += enc_gate*attn_e; norm2(h, e, temb)` in diffusers vs one kernel."""
    from diffusers.models.normalization import CogVideoXLayerNormZero

    B, D, cond = 2, 96, 16
    torch.manual_seed(0)
    norm = CogVideoXLayerNormZero(cond, D, elementwise_affine=True, eps=1e-5, bias=True).eval().to(dtype)
    with torch.no_grad():
        norm.norm.weight.normal_(1.0, 0.2)
        norm.norm.bias.normal_(0.0, 0.2)
    # Every input is rounded to the test dtype first, so the fp64 run sees exactly what the kernel sees.
    temb = torch.randn(B, cond).to(dtype)
    h, e = (torch.randn(B, n_video, D) * 2).to(dtype), (torch.randn(B, n_text, D) * 2).to(dtype)
    attn_h, attn_e = torch.randn(B, n_video, D).to(dtype), torch.randn(B, n_text, D).to(dtype)
    gate, enc_gate = (torch.randn(B, 1, D) * 0.5).to(dtype), (torch.randn(B, 1, D) * 0.5).to(dtype)

    def diffusers_block(dt):
        m = copy.deepcopy(norm).to(dt)
        hh, ee = h.to(dt) + gate.to(dt) * attn_h.to(dt), e.to(dt) + enc_gate.to(dt) * attn_e.to(dt)
        with torch.no_grad():
            nh, ne, _, _ = m(hh, ee, temb.to(dt))
        return torch.cat([ee, hh], 1), torch.cat([ne, nh], 1)

    x64, y64 = diffusers_block(torch.float64)
    x_lp, y_lp = diffusers_block(dtype)  # diffusers at the test precision on CPU: the yardstick
    norm.to(device)
    with torch.no_grad():
        mod = norm.linear(norm.silu(temb.to(device)))
    shift, scale, _, enc_shift, enc_scale, _ = mod.chunk(6, dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x_new, y = adaptive_layernorm(
            torch.cat([e, h], 1).to(device),
            torch.cat([attn_e, attn_h], 1).to(device),
            torch.cat([enc_gate, gate], 1).to(device),
            norm.norm.weight,
            norm.norm.bias,
            torch.stack([enc_shift, shift], 1),
            torch.stack([enc_scale, scale], 1),
            n_text,
            eps=1e-5,
            backend="triton",
        )
    # The modulation comes from a low-precision Linear in both low-precision runs; 2x covers it.
    assert_close_lowp(x_new.cpu(), x64, x_lp, ATOL[dtype], "x_new")
    assert_close_lowp(y.cpu(), y64, y_lp, ATOL[dtype], "y")


@_interp
def test_unsupported_dtype_falls_back_with_one_warning():
    inp = _f64(make_inputs(1, 5, 16, torch.float32, "cpu"))
    _common._WARNED.clear()
    with pytest.warns(RuntimeWarning, match="float64.*PyTorch reference"):
        x_new, y = adaptive_layernorm(**inp, n_text=2, backend="triton")
    ref = adaln_reference(**inp, n_text=2)
    assert torch.equal(x_new, ref[0]) and torch.equal(y, ref[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        adaptive_layernorm(**inp, n_text=2, backend="triton")


def test_backend_errors_and_resolution():
    inp = make_inputs(1, 3, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        adaptive_layernorm(**inp, n_text=1, backend="cuda")
    assert _common.resolve_backend("torch", "cuda") == "torch"
    assert _common.resolve_backend("auto", "cpu") == "torch"
    assert _common.resolve_backend("triton", "cpu") == "triton"
    assert _common.resolve_backend("auto", torch.device("cuda", 0)) == ("triton" if _common.HAS_TRITON else "torch")
    with pytest.raises(ValueError, match="'auto', 'triton', 'torch'"):
        _common.resolve_backend("fast", "cpu")


def test_without_triton(monkeypatch):
    """No triton: "auto" resolves to torch, CUDA + "triton" is a clear error, CPU runs the references."""
    monkeypatch.setattr(_common, "HAS_TRITON", False)
    assert _common.resolve_backend("auto", "cuda") == "torch"
    with pytest.raises(RuntimeError, match="needs the triton package"):
        _common.resolve_backend("triton", "cuda")
    with pytest.raises(RuntimeError, match="needs the triton package"):
        _common.use_triton("triton", torch.device("cuda"), _adaln_kernel)
    assert not _common.use_triton("triton", torch.device("cpu"), _adaln_kernel)


def test_kernel_modules_import_without_triton():
    code = (
        "import sys, torch; sys.modules['triton'] = None\n"
        "from cogvx.kernels import adaln, rope_attention\n"
        "x, p = torch.randn(1, 4, 8), torch.randn(1, 2, 8)\n"
        "out = adaln.adaptive_layernorm(x, x, p, None, None, p, p, 2, backend='triton')\n"
        "ref = adaln.adaln_reference(x, x, p, None, None, p, p, 2)\n"
        "assert all(torch.equal(a, b) for a, b in zip(out, ref))\n"
        "q = torch.randn(1, 2, 4, 16)\n"
        "assert torch.equal(rope_attention.attention(q, q, q, backend='triton'), rope_attention.attention(q, q, q))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@_interp
def test_compiles_to_one_op_without_graph_break():
    B, S, D, n_text = 2, 9, 24, 4
    inp = make_inputs(B, S, D, torch.float32, "cpu")

    def block(x, delta, gate, weight, bias, shift, scale):
        x, y = adaptive_layernorm(x, delta, gate, weight, bias, shift, scale, n_text, backend="triton")
        _, y2 = adaptive_layernorm(y, None, None, None, None, shift, scale, n_text, backend="triton")
        return x, y2.sin()

    explain = torch._dynamo.explain(block)(**inp)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    targets = [str(n.target) for n in explain.graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count("cogvx.adaln_residual") == 1 and targets.count("cogvx.adaln") == 1, targets
    torch._dynamo.reset()
    eager = block(**inp)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(**inp)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@_interp
def test_fake_impls_match_real_outputs():
    """Shapes, dtypes and strides of the fake (meta) impls equal the real ones, also with mixed dtypes."""
    inp = make_inputs(2, 7, 40, torch.float16, "cpu")
    inp["shift"] = inp["shift"].float()  # y promotes to float32, like the reference
    for delta in (True, False):
        args = dict(inp) if delta else {k: v for k, v in inp.items() if k not in ("delta", "gate")}
        op = torch.ops.cogvx.adaln_residual if delta else torch.ops.cogvx.adaln
        result = torch.library.opcheck(op.default, tuple(args.values()) + (3, 1e-5))
        assert all(v == "SUCCESS" for v in result.values()), result
    ref = adaln_reference(**inp, n_text=3)
    ours = adaptive_layernorm(**inp, n_text=3, backend="triton")
    assert [t.dtype for t in ours] == [t.dtype for t in ref] == [torch.float16, torch.float32]
