"""Shared test helpers: small diffusers reference models saved as real checkpoints, and error metrics."""

from __future__ import annotations

import torch


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def where_differs(a: torch.Tensor, b: torch.Tensor, k: int = 5) -> str:
    """The k largest absolute differences with their indices, for assertion messages."""
    d = (a.double() - b.double()).abs().flatten()
    vals, idx = d.topk(min(k, d.numel()))
    coords = [tuple(int(i) for i in torch.unravel_index(j, a.shape)) for j in idx]
    return ", ".join(f"{c}: {v:.3g}" for c, v in zip(coords, vals.tolist()))


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Fill every parameter with seeded noise (diffusers zero-initializes some layers, which would
    hide bugs in the parts they feed); LayerNorm weights stay near 1."""
    g = torch.Generator().manual_seed(seed)
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    with torch.no_grad():
        for mod in module.modules():
            for name, p in mod.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std
                p.copy_(1.0 + noise if isinstance(mod, norms) and name == "weight" else noise)
    return module


# Small transformer variants covering every code path of the released models (2b, 5b, I2V, 1.5, Fun-Control).
TRANSFORMER_VARIANTS = {
    # 2b: 3D sin-cos positions, no RoPE
    "sincos": dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=24,
                   text_embed_dim=20, num_layers=2, sample_width=14, sample_height=10, sample_frames=9,
                   max_text_seq_length=7),
    # 5b: RoPE, linspace grid
    "rope": dict(num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=24,
                 text_embed_dim=20, num_layers=2, sample_width=14, sample_height=10, sample_frames=9,
                 max_text_seq_length=7, use_rotary_positional_embeddings=True),
    # 5b-I2V: RoPE + learned positions, 2x input channels
    "learned": dict(num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4, time_embed_dim=24,
                    text_embed_dim=20, num_layers=2, sample_width=10, sample_height=6, sample_frames=9,
                    max_text_seq_length=7, use_rotary_positional_embeddings=True,
                    use_learned_positional_embeddings=True),
    # 1.5: patch_size_t=2, linear patch embedding, slice RoPE
    "v15": dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=24,
                text_embed_dim=20, num_layers=2, sample_width=20, sample_height=16, sample_frames=9,
                max_text_seq_length=7, use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False),
    # Fun-Control (on 5b): RoPE, control latents concatenated, no learned positions
    "control": dict(num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4, time_embed_dim=24,
                    text_embed_dim=20, num_layers=2, sample_width=14, sample_height=10, sample_frames=9,
                    max_text_seq_length=7, use_rotary_positional_embeddings=True),
    # 1.5-I2V: + ofs embedding
    "v15_ofs": dict(num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4, time_embed_dim=24,
                    ofs_embed_dim=24, text_embed_dim=20, num_layers=2, sample_width=20, sample_height=16,
                    sample_frames=9, max_text_seq_length=7, use_rotary_positional_embeddings=True, patch_size_t=2,
                    patch_bias=False),
}


# The diffusers pipeline class of each variant's checkpoint (model_index.json _class_name).
PIPELINE_CLASS = {"learned": "CogVideoXImageToVideoPipeline", "v15_ofs": "CogVideoXImageToVideoPipeline",
                  "control": "CogVideoXFunControlPipeline"}


def kernel_markers(kernel):
    """(marks for CPU runs of ``kernel``: only when it was defined under TRITON_INTERPRET=1,
    marks for CUDA runs: the ``gpu`` marker and a skip without CUDA)."""
    import pytest

    from cogvx.kernels import _common

    interp = pytest.mark.skipif(
        not _common.is_interpreted(kernel),
        reason="cogvx.kernels was imported before TRITON_INTERPRET=1 was set (see tests/conftest.py)",
    )
    cuda = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
    return interp, cuda


def device_dtype_params(kernel) -> list:
    """(device, dtype) test parameters: CPU fp32/fp16 under the interpreter (bf16 ``tl.dot`` is wrong
    there), CUDA fp32/fp16/bf16."""
    import pytest

    interp, cuda = kernel_markers(kernel)
    return [
        pytest.param("cpu", dt, marks=interp, id=f"cpu-{str(dt)[6:]}") for dt in (torch.float32, torch.float16)
    ] + [
        pytest.param("cuda", dt, marks=cuda, id=f"cuda-{str(dt)[6:]}")
        for dt in (torch.float32, torch.float16, torch.bfloat16)
    ]


# Absolute tolerance per dtype for the low-precision rule below.
LOWP_ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close_lowp(ours, ref64, lowp, atol, what=""):
    """STYLE rule: max|ours - ref64| <= 2 * max|torch_lowp - ref64| + atol; says where it fails.

    ours: the kernel's output; ref64: the float64 reference; lowp: PyTorch's own result in the
    kernel's dtype (its error sets the yardstick). A non-finite element (an unwritten, poisoned
    output) fails with its index."""
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    ours, ref64, lowp = ours.cpu(), ref64.cpu(), lowp.cpu()
    if not bool(torch.isfinite(ours).all()):
        idx = (~torch.isfinite(ours)).nonzero()[0].tolist()
        raise AssertionError(f"{what}: non-finite output at {idx} (unwritten element?)")
    err = (ours.double() - ref64).abs()
    bound = 2 * (lowp.double() - ref64).abs().max().item() + atol
    worst = err.max().item()
    if worst > bound:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{what}: max error {worst:.3g} > bound {bound:.3g} at {list(idx)}: ours {ours[idx].item():.6g}, "
            f"ref64 {ref64[idx].item():.6g}, {int((err > bound).sum())} of {err.numel()} elements over"
        )


def attention_float64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v in float64: the reference of the reduced-precision attentions."""
    s = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(s, dim=-1) @ v.double()

