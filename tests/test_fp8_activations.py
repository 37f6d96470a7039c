"""fp8dq-row's fused activation quantization: the adaptive LayerNorm's per-row fp8 output fed straight
into the q/k/v and feed-forward-up projections, against the unfused computation (each of those linears
quantizing its own input per row, torchao's numerics as ``quantize_rows_reference``, then the fp8
product in fp32). The PyTorch reference path and, through TRITON_INTERPRET=1, the Triton adaLN kernel
run here; the CUDA path (``torch._scaled_mm``) is measured only on a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchao.quantization import PerRow
from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

from cogvx.engine.models.positions import make_positions
from cogvx.engine.models.presets import PRESETS
from cogvx.engine.models.transformer import build_transformer
from cogvx.engine.quantizing import apply_runtime_settings
from cogvx.engine.runtime.compiling import dynamo_counts
from cogvx.kernels.adaln_fp8 import _adaln_fp8_kernel, quantize_rows_reference
from cogvx.quantize import RECIPES
from helpers import kernel_markers


class UnfusedFp8Linear(nn.Module):
    """What torchao's fp8dq-row linear computes, written out: its input quantized per row, fp8 x fp8 in fp32."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.q, self.s, self.bias = layer.weight.qdata, layer.weight.scale, layer.bias

    def forward(self, y):
        yq, ys = quantize_rows_reference(y)
        out = (yq.double() * ys.double()) @ (self.q.double() * self.s.double()).t() + self.bias.double()
        return out.to(y.dtype)


def _targets(model):
    for blk in model.transformer_blocks:
        a = blk.attn1
        yield from ([(a, "to_qkv")] if a.to_qkv is not None else [(a, "to_q"), (a, "to_k"), (a, "to_v")])
        yield blk.ff.net[0], "proj"


def _models(fuse_qkv: bool):
    """(fused: fp8 weights + set_fp8_activations, unfused: the same weights behind UnfusedFp8Linear)."""
    torch.manual_seed(0)
    model = build_transformer(PRESETS["tiny"].transformer, device="cpu")
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    if fuse_qkv:
        model.fuse_qkv()
    for owner, name in _targets(model):
        lin = getattr(owner, name)
        lin.weight = nn.Parameter(Float8Tensor.from_hp(lin.weight.detach(), granularity=PerRow()), requires_grad=False)
    unfused = copy.deepcopy(model)
    for owner, name in _targets(unfused):
        setattr(owner, name, UnfusedFp8Linear(getattr(owner, name)))
    model.set_fp8_activations(True)
    return model, unfused


def _inputs():
    cfg = PRESETS["tiny"].transformer
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 3, 4, 6, 10, generator=g), torch.randn(2, 64, 32, generator=g), torch.tensor([900, 300]),
            make_positions(cfg, 3, 6, 10))


_interp, _ = kernel_markers(_adaln_fp8_kernel)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=[pytest.mark.triton, _interp])])
@pytest.mark.parametrize("fuse_qkv", [True, False], ids=["fused-qkv", "q-k-v"])
def test_fused_activation_quantization_matches_unfused(backend, fuse_qkv):
    fused, unfused = _models(fuse_qkv)
    fused.set_kernel_backend(backend)
    args = _inputs()
    with torch.no_grad():
        got, ref = fused(*args), unfused(*args)
    # Same fp8 numbers on both sides; only the GEMM's summation order (fp32 against float64) differs.
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, f"fp8-fed transformer differs from the unfused fp8dq-row computation by {rel:.3g}"


def test_fp8_path_traces_as_one_graph():
    fused, _ = _models(fuse_qkv=True)
    torch._dynamo.reset()
    before = dynamo_counts()["graph_breaks"]
    with torch.no_grad():
        torch.compile(fused, fullgraph=True, backend="eager")(*_inputs())
    assert dynamo_counts()["graph_breaks"] == before


def test_recipe_turns_it_on_and_plain_weights_are_refused():
    fused, _ = _models(fuse_qkv=True)
    fused.set_fp8_activations(False)
    apply_runtime_settings(fused, RECIPES["fp8dq-row"].runtime)
    assert all(b.fp8_activations for b in fused.transformer_blocks)
    assert RECIPES["fp8dq-row"].runtime.fp8_activations is True
    assert not any(RECIPES[n].runtime.fp8_activations for n in RECIPES
                   if n not in ("fp8dq-row", "fp8dq-row-int8attn"))
    plain = build_transformer(PRESETS["tiny"].transformer, device="cpu")
    with pytest.raises(ValueError, match="has no per-row float8 weight"):
        plain.set_fp8_activations(True)
