"""The fused adaptive-LayerNorm kernel against fp64 references and diffusers' CogVideoXLayerNormZero.

On CPU the kernels run under TRITON_INTERPRET=1, which must be set before cogvx.kernels defines
its @triton.jit functions: tests/conftest.py sets it; the line below covers running this file alone.
"""

import copy
import os

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


# Sequence parallelism: a joint sequence of N_TEXT text + N_VIDEO video rows, padded with N_PAD rows
# to equal shards, cut as (row_offset, rows): from the start into the video, starting inside the
# text, all video, ending past the video (8 real rows + 5 padding rows).
N_TEXT, N_VIDEO, N_PAD = 7, 30, 5
SHARDS = [(0, 12), (4, 10), (12, 13), (29, 13)]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("delta", [True, False])
def test_row_offset_shards_match_the_unsharded_sequence(device, dtype, delta):
    """Each shard, run with its row_offset, reproduces its rows of the unsharded result bit for bit;
    padding rows get the video modulation (the rule stated in cogvx.kernels.adaln)."""
    B, D, S = 2, 48, N_TEXT + N_VIDEO
    inp = make_inputs(B, S + N_PAD, D, dtype, device, delta)
    full = dict(inp, x=inp["x"][:, :S], delta=inp["delta"][:, :S] if delta else None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent fallback
        x_full, y_full = adaptive_layernorm(**full, n_text=N_TEXT, backend="triton")
    y64, y_lp = adaln_reference(**_f64(full), n_text=N_TEXT)[1], adaln_reference(**full, n_text=N_TEXT)[1]
    assert_close_lowp(y_full, y64, y_lp, ATOL[dtype], "unsharded y")
    for off, rows in SHARDS:
        part = dict(inp, x=inp["x"][:, off : off + rows], delta=inp["delta"][:, off : off + rows] if delta else None)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            x_s, y_s = adaptive_layernorm(**part, n_text=N_TEXT, backend="triton", row_offset=off)
        real = min(rows, S - off)
        where = f"shard at row {off}"
        assert torch.equal(y_s[:, :real], y_full[:, off : off + real]), f"{where}: y differs from the unsharded run"
        assert torch.equal(x_s[:, :real], x_full[:, off : off + real]), f"{where}: x_new differs"
        ref_y = adaln_reference(**part, n_text=N_TEXT, row_offset=off)[1]  # the reference shards the same way
        assert torch.equal(ref_y[:, :real], adaln_reference(**full, n_text=N_TEXT)[1][:, off : off + real]), where
        if real < rows:  # padding rows: the video parameter set, as if n_text were 0 for them
            pad = {k: (v[:, off + real : off + rows] if k in ("x", "delta") and v is not None else v)
                   for k, v in inp.items()}  # fmt: skip
            pad64, pad_lp = adaln_reference(**_f64(pad), n_text=0), adaln_reference(**pad, n_text=0)
            assert_close_lowp(y_s[:, real:], pad64[1], pad_lp[1], ATOL[dtype], f"{where}: padding y")
            assert_close_lowp(x_s[:, real:], pad64[0], pad_lp[0], ATOL[dtype], f"{where}: padding x_new")


def test_row_offset_argument_errors():
    inp = make_inputs(1, 4, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="row_offset must be >= 0"):
        adaptive_layernorm(**inp, n_text=2, row_offset=-1)
    with pytest.raises(ValueError, match="n_text must be >= 0 with row_offset > 0"):
        adaptive_layernorm(**inp, n_text=-2, row_offset=3)


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
