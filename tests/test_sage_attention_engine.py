"""The 8-bit attention in the engine: the transformer's hook (``set_int8_gpu_attention``), the recipe
setting that turns it on (``attention_kernel="int8-cuda"``, recipe fp8dq-row-int8attn) and its row in
``cogvx recipes``. On the CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py)."""

import copy
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cogvx.engine.cli import main as cli_main  # noqa: E402
from cogvx.engine.models.config import TransformerConfig  # noqa: E402
from cogvx.engine.models.positions import make_positions  # noqa: E402
from cogvx.engine.models.transformer import build_transformer  # noqa: E402
from cogvx.engine.quantizing import apply_runtime_settings  # noqa: E402
from cogvx.kernels.sage_attention import _sage_attn_kernel  # noqa: E402
from cogvx.quantize import RECIPES, availability  # noqa: E402
from cogvx.quantize.metrics import sqnr  # noqa: E402
from cogvx.quantize.settings import Runtime, SettingsError  # noqa: E402

from helpers import kernel_markers  # noqa: E402

_interp, _ = kernel_markers(_sage_attn_kernel)
# Head dim 64 as in every real model (the kernel's dots need >= 32); 2 layers, RoPE, 16 text tokens.
CFG = TransformerConfig(num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=32,
                        text_embed_dim=32, num_layers=2, sample_width=10, sample_height=6, sample_frames=9,
                        max_text_seq_length=16, use_rotary_positional_embeddings=True)  # fmt: skip


def _model_and_input():
    torch.manual_seed(0)
    model = build_transformer(CFG, device="cpu").eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    for blk in model.transformer_blocks:  # a key LayerNorm bias as large as real ones: shifted keys
        blk.attn1.norm_k.bias.data.normal_(0, 2.0)
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 3, 4, 6, 10, generator=g), torch.randn(2, 16, 32, generator=g), torch.tensor([900, 300]),
            make_positions(CFG, 3, 6, 10))
    return model, args


def _f64(args):
    """The input for the float64 model (the RoPE tables stay fp32: the reference rotates in fp32)."""
    return [a.double() if a.is_floating_point() else a for a in args[:3]] + [args[3]]


@_interp
@torch.no_grad()
def test_int8_attention_transformer_against_float64():
    model, args = _model_and_input()
    ref64 = copy.deepcopy(model).double()
    ref = ref64(*_f64(args)).double()
    fp32 = model(*args)
    model.set_int8_gpu_attention(True)
    model.set_kernel_backend("triton", "flash")  # the per-shape attention choice does not undo the recipe's
    assert all(b.attn1.int8_gpu for b in model.transformer_blocks)
    out = model(*args)
    got, plain = sqnr(ref, out.double()), sqnr(ref, fp32.double())
    print(f"int8 attention {got:.1f} dB, fp32 SDPA {plain:.1f} dB against float64")
    # Measured 88.6 dB (fp32 SDPA: 130 dB): the attention's error is diluted by the residual stream.
    assert got > 70.0, f"8-bit attention transformer: {got:.1f} dB against float64"
    assert plain > got + 10, f"the int8 path did not run: {got:.1f} dB, fp32 SDPA {plain:.1f} dB"
    model.set_kernel_backend("torch")  # kernels="torch": the PyTorch reference of the same numerics
    model.set_int8_gpu_attention(True)
    assert sqnr(out.double(), model(*args).double()) > 60.0
    model.set_int8_gpu_attention(False)
    assert sqnr(ref, model(*args).double()) > got + 10


@_interp
@pytest.mark.slow
@torch.no_grad()
def test_int8_attention_transformer_compiles_fullgraph():
    model, args = _model_and_input()
    model.set_int8_gpu_attention(True)
    model.set_kernel_backend("triton")  # the Triton kernels (interpreted on the CPU) inside the graph
    eager = model(*args)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*args), eager)


def test_recipe_setting_turns_the_hook_on_and_bad_values_are_clear():
    model, _ = _model_and_input()
    apply_runtime_settings(model, Runtime(attention_kernel="int8-cuda"))
    assert all(b.attn1.int8_gpu and not b.attn1.int8_cpu for b in model.transformer_blocks)
    with pytest.raises(SettingsError, match="attention_kernel 'int8' is not one of 'int8-cpu', 'int8-cuda'"):
        Runtime(attention_kernel="int8")
    assert Runtime.from_dict(RECIPES["fp8dq-row-int8attn"].settings) == RECIPES["fp8dq-row-int8attn"].runtime


def test_recipe_row_is_gpu_only_and_says_it_is_not_yet_measured(capsys):
    r = RECIPES["fp8dq-row-int8attn"]
    assert r.runtime.attention_kernel == "int8-cuda" and r.runtime.fp8_activations and r.options.granularity == "PerRow"
    assert r.needs_cuda_capability == (8, 9)
    ok, why = availability(r, "cpu")
    assert not ok and "needs a CUDA GPU" in why and "GPU-only" in why and "not yet measured" in why
    assert cli_main(["recipes", "--device", "cpu"]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("fp8dq-row-int8attn"))
    assert " no " in row and "GPU-only" in row and "not yet measured" in row, row
