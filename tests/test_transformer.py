"""The project's transformer against diffusers' CogVideoXTransformer3DModel on the same weights (fp32)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed, get_3d_sincos_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

from cogvx.engine.models.config import TransformerConfig
from cogvx.engine.models.presets import PRESETS
from cogvx.engine.loading import load_transformer, read_config
from cogvx.engine.models.transformer import build_transformer
from cogvx.engine.models.positions import make_positions, rope_tables, sincos_embedding, video_grid
from helpers import TRANSFORMER_VARIANTS, randomize_, rel_l2, where_differs

TOL = 1e-5


def _diffusers_rope(ref, h_px, w_px, latent_frames):
    # The pipeline method only reads these attributes: call it on a stand-in, no pipeline needed.
    class _P:
        vae_scale_factor_spatial = 8
        transformer = ref

    return CogVideoXPipeline._prepare_rotary_positional_embeddings(_P, h_px, w_px, latent_frames, "cpu")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> (diffusers model, single-file dir, sharded dir)."""
    out = {}
    for i, (name, kw) in enumerate(TRANSFORMER_VARIANTS.items()):
        torch.manual_seed(i)
        ref = randomize_(CogVideoXTransformer3DModel(**kw).eval(), seed=100 + i, std=0.1)
        single = tmp_path_factory.mktemp(f"tr-{name}")
        sharded = tmp_path_factory.mktemp(f"tr-{name}-sharded")
        ref.save_pretrained(single, safe_serialization=True)
        ref.save_pretrained(sharded, safe_serialization=True, max_shard_size="30KB")
        out[name] = (ref, single, sharded)
    return out


# Odd, non-square latent sizes; several latent frames (even counts for patch_size_t=2).
SHAPES = {
    "sincos": [(3, 6, 10), (2, 10, 14)],
    "rope": [(3, 6, 10), (5, 10, 6), (1, 14, 22)],
    "learned": [(3, 6, 10)],  # learned positions only exist at the checkpoint's sample size
    "v15": [(4, 6, 10), (2, 14, 8)],
    "v15_ofs": [(4, 6, 10)],
    "control": [(3, 6, 10), (2, 10, 14)],
}


@pytest.mark.parametrize("variant", list(TRANSFORMER_VARIANTS))
@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("fuse_qkv", [False, True])
def test_transformer_matches_diffusers(saved, variant, layout, fuse_qkv):
    ref, single, sharded = saved[variant]
    kw = TRANSFORMER_VARIANTS[variant]
    ours = load_transformer(single if layout == "single" else sharded, fuse_qkv=fuse_qkv)
    assert not any(p.is_meta for p in ours.parameters())
    if fuse_qkv:
        assert ours.transformer_blocks[0].attn1.to_qkv is not None
    for f, h, w in SHAPES[variant]:
        g = torch.Generator().manual_seed(f * 100 + h)
        x = torch.randn(2, f, kw["in_channels"], h, w, generator=g)
        text = torch.randn(2, kw["max_text_seq_length"], kw["text_embed_dim"], generator=g)
        t = torch.tensor([999, 437])
        ofs = torch.full((1,), 2.0) if kw.get("ofs_embed_dim") else None
        rope = _diffusers_rope(ref, h * 8, w * 8, f) if kw.get("use_rotary_positional_embeddings") else None
        with torch.no_grad():
            expected = ref(x, text, t, ofs=ofs, image_rotary_emb=rope, return_dict=False)[0]
            got = ours(x, text, t, make_positions(ours.config, f, h, w), ofs=ofs)
        assert got.shape == expected.shape
        err = rel_l2(got, expected)
        assert err <= TOL, f"{variant} {f}x{h}x{w}: rel L2 {err:.2e}; largest at {where_differs(got, expected)}"


@pytest.mark.parametrize("grid", [(3, 3, 5), (13, 30, 45), (4, 7, 11), (2, 12, 20)])
def test_rope_tables_match_diffusers(grid):
    t, h, w = grid
    cfg = TransformerConfig(num_attention_heads=2, use_rotary_positional_embeddings=True)
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    crops = get_resize_crop_region_for_grid((h, w), 45, 30)
    cos_ref, sin_ref = get_3d_rotary_pos_embed(64, crops, (h, w), t)
    cos, sin = rope_tables(cfg, (t, h, w))
    torch.testing.assert_close(cos, cos_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, sin_ref, rtol=0, atol=1e-6)
    # 1.5: "slice" positions against the 150x150 base.
    cfg15 = TransformerConfig(num_attention_heads=2, use_rotary_positional_embeddings=True, patch_size_t=2,
                              sample_height=300, sample_width=300)
    cos_ref, sin_ref = get_3d_rotary_pos_embed(64, None, (h, w), t, grid_type="slice", max_size=(150, 150))
    cos, sin = rope_tables(cfg15, (t, h, w))
    torch.testing.assert_close(cos, cos_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, sin_ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("grid", [(13, 30, 45), (3, 5, 7)])
def test_sincos_matches_diffusers(grid):
    t, h, w = grid
    cfg = TransformerConfig(num_attention_heads=30)
    ref = get_3d_sincos_pos_embed(1920, (w, h), t, 1.875, 1.0).flatten(0, 1)
    torch.testing.assert_close(sincos_embedding(cfg, (t, h, w)), ref.double(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.startswith("cpu-") and n != "tiny"])
def test_presets_have_diffusers_parameter_layout(name):
    """A real preset builds the same parameter names and shapes as diffusers does from the same config
    (both on the meta device: no memory)."""
    cfg = PRESETS[name].transformer
    ours = build_transformer(cfg)
    with torch.device("meta"):
        ref = CogVideoXTransformer3DModel(**{k: v for k, v in cfg.to_dict().items() if not k.startswith("_")})
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes
    n = sum(p.numel() for p in ours.parameters())
    expected_billions = {"2b": 1.69, "5b": 5.57, "5b-i2v": 5.57, "1.5-5b": 5.57, "1.5-5b-i2v": 5.57}[name]
    assert abs(n / 1e9 - expected_billions) < 0.02, n


def test_config_round_trips_through_diffusers_json(tmp_path):
    kw = TRANSFORMER_VARIANTS["v15_ofs"]
    with torch.device("meta"):
        CogVideoXTransformer3DModel(**kw).save_config(tmp_path)
    cfg = read_config(TransformerConfig, tmp_path / "config.json")
    for k, v in kw.items():
        assert getattr(cfg, k) == v, k
    again = json.loads(json.dumps(cfg.to_dict()))
    assert TransformerConfig.from_dict(again) == cfg
    assert again["_class_name"] == "CogVideoXTransformer3DModel"


def test_video_grid_and_token_count():
    cfg = PRESETS["5b"].transformer
    assert video_grid(cfg, 13, 60, 90) == (13, 30, 45)  # 17,550 video tokens at 720x480, 49 frames
    cfg15 = PRESETS["1.5-5b"].transformer
    assert video_grid(cfg15, 22, 96, 170) == (11, 48, 85)


def test_learned_positions_reject_other_resolution(saved):
    ref, single, _ = saved["learned"]
    ours = load_transformer(single)
    kw = TRANSFORMER_VARIANTS["learned"]
    x = torch.zeros(1, 3, kw["in_channels"], 8, 12)
    with pytest.raises(ValueError, match="learned positional embeddings"):
        ours(x, torch.zeros(1, 7, 20), torch.tensor([1]), make_positions(ours.config, 3, 8, 12))


def test_learned_position_table_starts_as_diffusers_does():
    """A transformer built from a config alone (the diffusers drop-in's ``CogVideoXTransformer3DModel(**config)``)
    starts with diffusers' learned-position table, zeros for the text rows and the 3D sin-cos table for the
    video rows, not uninitialized memory that ``save_pretrained`` would write out."""
    cfg = TRANSFORMER_VARIANTS["learned"]
    theirs = CogVideoXTransformer3DModel(**cfg).patch_embed.pos_embedding
    ours = build_transformer(TransformerConfig.from_dict(cfg), device="cpu").patch_embed.pos_embedding
    assert ours.shape == theirs.shape and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-6)
