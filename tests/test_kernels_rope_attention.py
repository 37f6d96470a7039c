"""QK-norm + RoPE + layout kernel and the RoPE flash-attention kernel, against fp64 references and
diffusers' Attention with CogVideoXAttnProcessor2_0 and get_3d_rotary_pos_embed tables.

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
import torch.nn.functional as F  # noqa: E402

from cogvx.kernels import _common  # noqa: E402
from cogvx.kernels.qk_norm_rope import (  # noqa: E402
    _qk_norm_rope_kernel,
    qk_norm_rope,
    qk_norm_rope_launch,
    qk_norm_rope_reference,
)
from cogvx.kernels.rope_flash_attention import (  # noqa: E402
    attention,
    rope_attention,
    rope_flash_attention_launch,
    rope_flash_attention_reference,
)

from helpers import LOWP_ATOL, assert_close_lowp, device_dtype_params, kernel_markers  # noqa: E402

pytestmark = pytest.mark.triton

ATOL = LOWP_ATOL
_interp, _cuda = kernel_markers(_qk_norm_rope_kernel)
DEVICE_DTYPES = device_dtype_params(_qk_norm_rope_kernel)


def rope_tables(table, n_video, dh, device="cpu"):
    """cos, sin [n_video, dh] fp32: diffusers' 3D tables for a (T, H, W) grid, random angles, or None."""
    if table is None:
        return None, None
    if table == "random":
        theta = torch.rand(n_video, dh // 2, generator=torch.Generator().manual_seed(1)) * 6.3
        theta = theta.repeat_interleave(2, dim=-1)
        return theta.cos().to(device), theta.sin().to(device)
    if table == "empty":
        assert n_video == 0
        return torch.zeros(0, dh, device=device), torch.zeros(0, dh, device=device)
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    t, h, w = table
    assert t * h * w == n_video, (table, n_video)
    cos, sin = get_3d_rotary_pos_embed(dh, ((0, 0), (h, w)), (h, w), t, use_real=True)
    return cos.float().to(device), sin.float().to(device)


def _f64(*ts):
    return [t.double() if t is not None else None for t in ts]


# (B, S, H, Dh, n_text, table, affine): prime S, video only, text only, odd head dims
QK_CASES = [
    (2, 37, 3, 64, 7, (2, 3, 5), True),
    (1, 13, 2, 64, 0, (1, 1, 13), False),
    (1, 11, 2, 64, 11, "empty", True),
    (1, 17, 2, 32, 4, (1, 1, 13), True),
    (2, 9, 3, 40, 2, "random", True),
    (1, 23, 2, 17, 5, None, True),
]


def _qkv_views(B, S, H, Dh, dtype, device, seed=0):
    """q, k, v as [B, S, H, Dh] views into one fused projection output (row stride 3*H*Dh)."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, S, 3 * H * Dh, generator=g) * 2 + 0.3).to(device=device, dtype=dtype)
    return qkv.unflatten(-1, (3, H, Dh)).unbind(2)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("B,S,H,Dh,n_text,table,affine", QK_CASES)
def test_qk_norm_rope_kernel_matches_reference(device, dtype, B, S, H, Dh, n_text, table, affine):
    q, k, _ = _qkv_views(B, S, H, Dh, dtype, device)
    g = torch.Generator().manual_seed(2)
    norms = [(torch.randn(Dh, generator=g) * 0.3 + (i % 2 == 0)).to(device=device, dtype=dtype) for i in range(4)]
    norms = norms if affine else [None] * 4
    cos, sin = rope_tables(table, S - n_text, Dh, device)
    q_out = torch.full((B, H, S, Dh), float("nan"), dtype=dtype, device=device)  # poisoned outputs
    k_out = torch.full_like(q_out, float("nan"))
    qk_norm_rope_launch(q, k, *norms, cos, sin, n_text, 1e-6, q_out, k_out)
    ref64 = qk_norm_rope_reference(*_f64(q, k, *norms, cos, sin), n_text)
    lowp = qk_norm_rope_reference(q, k, *norms, cos, sin, n_text)
    assert_close_lowp(q_out, ref64[0], lowp[0], ATOL[dtype], "q")
    assert_close_lowp(k_out, ref64[1], lowp[1], ATOL[dtype], "k")


# Sequence parallelism: N_TEXT text + N_VIDEO video rows, padded with N_PAD rows to equal shards, cut
# as (row_offset, rows): into the video, starting inside the text, all video, ending past the video.
N_TEXT, N_VIDEO, N_PAD = 5, 24, 6
SHARDS = [(0, 10), (3, 9), (10, 12), (22, 13)]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_qk_norm_rope_row_offset_shards_match_the_unsharded_sequence(device, dtype):
    """Each shard, with its row_offset and the FULL tables, reproduces its rows of the unsharded
    result bit for bit. Padding rows (past the table) are normalized and not rotated; the tables are
    views whose following rows are NaN, so a read past the table would poison the output."""
    B, H, Dh, S = 2, 3, 32, N_TEXT + N_VIDEO
    q, k, _ = _qkv_views(B, S + N_PAD, H, Dh, dtype, device)
    g = torch.Generator().manual_seed(3)
    norms = [(torch.randn(Dh, generator=g) * 0.3 + (i % 2 == 0)).to(device=device, dtype=dtype) for i in range(4)]
    cos, sin = rope_tables("random", N_VIDEO, Dh, device)
    guard = torch.full((N_VIDEO + 64, Dh), float("nan"), device=device)
    cos, sin = guard.clone().index_copy_(0, torch.arange(N_VIDEO, device=device), cos)[:N_VIDEO], \
        guard.clone().index_copy_(0, torch.arange(N_VIDEO, device=device), sin)[:N_VIDEO]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent fallback
        full = qk_norm_rope(q[:, :S], k[:, :S], *norms, cos, sin, N_TEXT, backend="triton")
    ref64 = qk_norm_rope_reference(*_f64(q[:, :S], k[:, :S], *norms, cos, sin), N_TEXT)
    lowp = qk_norm_rope_reference(q[:, :S], k[:, :S], *norms, cos, sin, N_TEXT)
    assert_close_lowp(full[0], ref64[0], lowp[0], ATOL[dtype], "unsharded q")
    for off, rows in SHARDS:
        qs, ks = q[:, off : off + rows], k[:, off : off + rows]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = qk_norm_rope(qs, ks, *norms, cos, sin, N_TEXT, backend="triton", row_offset=off)
        ref = qk_norm_rope_reference(qs, ks, *norms, cos, sin, N_TEXT, row_offset=off)
        real = min(rows, S - off)
        for name, ours, whole, r in zip("qk", out, full, ref):
            where = f"{name}, shard at row {off}"
            assert torch.equal(ours[:, :, :real], whole[:, :, off : off + real]), f"{where}: differs from unsharded"
            assert torch.equal(r[:, :, :real], lowp["qk".index(name)][:, :, off : off + real]), f"{where}: reference"
        if real < rows:  # padding rows: LayerNorm only, no rotation (and no NaN from past the table)
            pad = [t[:, real:] for t in (qs, ks)]
            pad64 = qk_norm_rope_reference(*_f64(*pad, *norms), None, None, 0)
            pad_lp = qk_norm_rope_reference(*pad, *norms, None, None, 0)
            for i, name in enumerate("qk"):
                assert_close_lowp(out[i][:, :, real:], pad64[i], pad_lp[i], ATOL[dtype], f"{name} padding rows")
                assert torch.equal(ref[i][:, :, real:], pad_lp[i]), f"{name}: reference padding rows"


# (B, S, H, Dh, n_text, table). The interpreter tiles are 64 queries x 32 keys: tails, exact
# multiples and several query blocks all occur.
FLASH_CASES = [
    (2, 37, 2, 64, 7, (2, 3, 5)),
    (1, 13, 1, 64, 0, (1, 1, 13)),
    (1, 11, 2, 64, 11, "empty"),
    (1, 97, 1, 64, 5, (1, 4, 23)),
    (1, 64, 1, 64, 4, (1, 6, 10)),
    (1, 19, 2, 32, 3, (1, 4, 4)),
    (1, 21, 2, 64, 0, None),
    (2, 26, 2, 64, 5, "random"),  # diffusers' tables start at angle 0: the first video row is the identity
]


def _attn_inputs(B, S, H, Dh, dtype, device):
    g = torch.Generator().manual_seed(0)
    # q, k as strided [B, H, S, Dh] views (transposes), scaled like LayerNorm outputs.
    q, k, v = (torch.randn(B, S, H, Dh, generator=g).to(device=device, dtype=dtype).transpose(1, 2) for _ in range(3))
    return q, k, v.contiguous()


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("B,S,H,Dh,n_text,table", FLASH_CASES)
def test_rope_flash_attention_matches_reference(device, dtype, B, S, H, Dh, n_text, table):
    q, k, v = _attn_inputs(B, S, H, Dh, dtype, device)
    cos, sin = rope_tables(table, S - n_text, Dh, device)
    out = torch.full((B, H, S, Dh), float("nan"), dtype=dtype, device=device)
    rope_flash_attention_launch(q, k, v, cos, sin, n_text, out)
    ref64 = rope_flash_attention_reference(*_f64(q, k, v, cos, sin), n_text)
    lowp = rope_flash_attention_reference(q, k, v, cos, sin, n_text)
    assert_close_lowp(out, ref64, lowp, ATOL[dtype], "attention")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H,n_text,grid", [(4, 226, (4, 15, 15)), (2, 0, (13, 2, 3))])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_longer_sequences(dtype, H, n_text, grid):
    """Real-model text length, many query/key blocks, the autotuned configurations."""
    B, Dh = 2, 64
    S = n_text + grid[0] * grid[1] * grid[2]
    q, k, v = _qkv_views(B, S, H, Dh, dtype, "cuda")
    cos, sin = rope_tables(grid, S - n_text, Dh, "cuda")
    norms = [torch.randn(Dh, device="cuda", dtype=dtype) * 0.3 + (i % 2 == 0) for i in range(4)]
    qn, kn = qk_norm_rope(q, k, *norms, cos, sin, n_text, backend="triton")
    ref64 = qk_norm_rope_reference(*_f64(q, k, *norms, cos, sin), n_text)
    lowp = qk_norm_rope_reference(q, k, *norms, cos, sin, n_text)
    assert_close_lowp(qn, ref64[0], lowp[0], ATOL[dtype], "q")
    qn, kn = qk_norm_rope(q, k, *norms, None, None, n_text, backend="triton")
    v = v.transpose(1, 2)
    out = rope_attention(qn, kn, v, cos, sin, n_text, backend="triton")
    ref64 = rope_flash_attention_reference(*_f64(qn, kn, v, cos, sin), n_text)
    lowp = rope_flash_attention_reference(qn, kn, v, cos, sin, n_text)
    assert_close_lowp(out, ref64, lowp, ATOL[dtype], "attention")


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("fused_rope", [False, True], ids=["norm-rope+sdpa", "norm+rope-flash"])
@pytest.mark.parametrize("n_text,grid", [(7, (2, 3, 5)), (0, (1, 3, 5))])
def test_matches_diffusers_cogvideox_attention(device, dtype, fused_rope, n_text, grid):
    """Our attention layer (fused qkv projection, then the kernels) vs diffusers on the same weights."""
    from diffusers.models.attention_processor import Attention, CogVideoXAttnProcessor2_0

    B, H, Dh = 2, 2, 64
    D, n_video = H * Dh, grid[0] * grid[1] * grid[2]
    torch.manual_seed(0)
    attn = Attention(
        query_dim=D, dim_head=Dh, heads=H, bias=True, out_bias=True, qk_norm="layer_norm", eps=1e-6,
        processor=CogVideoXAttnProcessor2_0(),
    ).eval()  # fmt: skip
    with torch.no_grad():
        for norm in (attn.norm_q, attn.norm_k):
            norm.weight.normal_(1.0, 0.2)
            norm.bias.normal_(0.0, 0.2)
    attn.to(dtype)  # weights and inputs rounded first: the fp64 run sees what the kernels see
    text, video = torch.randn(B, n_text, D).to(dtype), torch.randn(B, n_video, D).to(dtype)
    cos, sin = rope_tables(grid, n_video, Dh)

    def diffusers_attention(dt):
        m = copy.deepcopy(attn).to(dt)
        with torch.no_grad():
            h, e = m(video.to(dt), encoder_hidden_states=text.to(dt), image_rotary_emb=(cos.to(dt), sin.to(dt)))
        return torch.cat([e, h], 1)

    ref64, lowp = diffusers_attention(torch.float64), diffusers_attention(dtype)
    attn.to(device)
    cos, sin = cos.to(device), sin.to(device)
    x = torch.cat([text, video], 1).to(device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent fallback
        w = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
        b = torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias])
        q, k, v = F.linear(x, w, b).unflatten(-1, (3, H, Dh)).unbind(2)  # strided [B, S, H, Dh] views
        norms = (attn.norm_q.weight, attn.norm_q.bias, attn.norm_k.weight, attn.norm_k.bias)
        if fused_rope:
            q, k = qk_norm_rope(q, k, *norms, None, None, n_text, backend="triton")
            o = rope_attention(q, k, v.transpose(1, 2), cos, sin, n_text, backend="triton")
        else:
            q, k = qk_norm_rope(q, k, *norms, cos, sin, n_text, backend="triton")
            o = attention(q, k, v.transpose(1, 2), backend="torch")
        out = attn.to_out[0](o.transpose(1, 2).flatten(2))
    assert_close_lowp(out, ref64, lowp, ATOL[dtype], "attention layer")


@_interp
def test_unsupported_inputs_fall_back_with_one_warning():
    _common._WARNED.clear()
    q, k, v = _attn_inputs(1, 9, 2, 48, torch.float32, "cpu")
    cos, sin = rope_tables("random", 6, 48)
    with pytest.warns(RuntimeWarning, match="head dim"):
        out = rope_attention(q, k, v, cos, sin, 3, backend="triton")
    assert torch.equal(out, rope_flash_attention_reference(q, k, v, cos, sin, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        rope_attention(q, k, v, cos, sin, 3, backend="triton")

    q, k, v = _attn_inputs(1, 9, 2, 64, torch.bfloat16, "cpu")
    with pytest.warns(RuntimeWarning, match="bfloat16"):
        out = attention(q, k, v, backend="triton")
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))

    q, k, _ = _qkv_views(1, 9, 2, 16, torch.float64, "cpu")
    with pytest.warns(RuntimeWarning, match="float32/float16/bfloat16"):
        qo, ko = qk_norm_rope(q, k, None, None, None, None, None, None, 3, backend="triton")
    ref = qk_norm_rope_reference(q, k, None, None, None, None, None, None, 3)
    assert torch.equal(qo, ref[0]) and torch.equal(ko, ref[1])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=_interp)])
def test_rope_attention_table_of_the_wrong_length_is_an_error(backend):
    q, k, v = _attn_inputs(1, 12, 2, 64, torch.float32, "cpu")
    cos, sin = rope_tables("random", 8, 64)  # 12 - 3 = 9 video rows
    with pytest.raises(ValueError, match=r"one row per video row.*9 rows \(got \[8, 64\]\)"):
        rope_attention(q, k, v, cos, sin, 3, backend=backend)


def test_bad_backend_is_a_value_error():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="backend must be one of 'torch', 'triton'"):
        attention(q, q, q, backend="flash")


def _layer(n_text, H, Dh, backend="triton"):
    def layer(qkv, cos, sin):
        q, k, v = qkv.unflatten(-1, (3, H, Dh)).unbind(2)
        q, k = qk_norm_rope(q, k, None, None, None, None, None, None, n_text, backend=backend)
        return rope_attention(q, k, v.transpose(1, 2), cos, sin, n_text, backend=backend).sum(1)

    return layer


@_interp
def test_compiles_to_one_op_per_kernel_without_graph_break():
    B, S, H, Dh, n_text = 1, 11, 2, 64, 3
    layer = _layer(n_text, H, Dh)
    args = (torch.randn(B, S, 3 * H * Dh), *rope_tables("random", S - n_text, Dh))
    explain = torch._dynamo.explain(layer)(*args)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    targets = [str(n.target) for n in explain.graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count("cogvx.qk_norm_rope") == 1 and targets.count("cogvx.rope_flash_attention") == 1, targets
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(*args)
    torch.testing.assert_close(compiled, layer(*args), rtol=0, atol=0)
    # A fallback (head dim 48) also traces in one graph: the warning is skipped while compiling.
    torch._dynamo.reset()
    args48 = (torch.randn(B, S, 3 * H * 48), *rope_tables("random", S - n_text, 48))
    assert torch._dynamo.explain(_layer(n_text, H, 48))(*args48).graph_break_count == 0


@pytest.mark.parametrize(
    "device", [pytest.param("cpu", marks=[_interp, pytest.mark.slow]), pytest.param("cuda", marks=_cuda)]
)
def test_inductor_fullgraph_runs_the_ops(device):
    B, S, H, Dh, n_text = 1, 11, 2, 64, 3
    layer = _layer(n_text, H, Dh)
    args = (torch.randn(B, S, 3 * H * Dh, device=device), *rope_tables("random", S - n_text, Dh, device))
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)(*args)
    torch.testing.assert_close(compiled, layer(*args), rtol=1e-5, atol=1e-5)


@_interp
def test_fake_impls_match_real_outputs():
    q, k, v = _qkv_views(1, 9, 2, 64, torch.float16, "cpu")
    cos, sin = rope_tables("random", 6, 64)
    result = torch.library.opcheck(
        torch.ops.cogvx.qk_norm_rope.default, (q, k, None, None, None, None, cos, sin, 3, 1e-6)
    )
    assert all(r == "SUCCESS" for r in result.values()), result
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    result = torch.library.opcheck(torch.ops.cogvx.rope_flash_attention.default, (qt, kt, vt, cos, sin, 3))
    assert all(r == "SUCCESS" for r in result.values()), result
