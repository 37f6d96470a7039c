"""cogvx's CogVideoX VAE against diffusers' AutoencoderKLCogVideoX (the independent reference), fp32.

Small random diffusers VAEs are saved with ``save_pretrained`` (one of them sharded) and loaded with
``load_vae``; every comparison is relative L2 against diffusers on the same weights and inputs.
"""

from __future__ import annotations

import contextlib

import dataclasses
import inspect
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLCogVideoX  # noqa: E402
from helpers import rel_l2, where_differs  # noqa: E402

from cogvx.engine.loading import load_vae  # noqa: E402
from cogvx.engine.models.config import VAEConfig  # noqa: E402
from cogvx.engine.models.vae import frame_batches, scale_latents, unscale_latents  # noqa: E402
from cogvx.engine.models.vae.layers import ConvCache  # noqa: E402
from cogvx.engine.io import CheckpointError  # noqa: E402

TOL = 1e-5
# Three small shapes: 4 blocks (real 8x / 4x compression), quant convs + other act/depth and a large norm_eps
# (diffusers fixes the eps of the decoder's spatial norms and norm_out at 1e-6: a mix-up must show), and 3 blocks
# (4x spatial, both downsampling blocks compress time).
CONFIGS = {
    "tiny": VAEConfig.tiny(),
    "quant": VAEConfig(block_out_channels=(8, 8, 16, 16), latent_channels=3, layers_per_block=2, norm_num_groups=2,
                       norm_eps=0.1, act_fn="swish", use_quant_conv=True, use_post_quant_conv=True,
                       sample_height=64, sample_width=64),
    "three": VAEConfig(block_out_channels=(4, 8, 12), down_block_types=("CogVideoXDownBlock3D",) * 3,
                       up_block_types=("CogVideoXUpBlock3D",) * 3, latent_channels=2, layers_per_block=1,
                       norm_num_groups=4, act_fn="mish", sample_height=32, sample_width=32),
}
# The compiled decode's VAE: 2 blocks (2x spatial and temporal) make inductor's C++ compile a third shorter
# than the 3-block one's; built here, not in CONFIGS, so the other tests' models and seeds stay as they were.
COMPILED = VAEConfig(block_out_channels=(4, 8), down_block_types=("CogVideoXDownBlock3D",) * 2,
                     up_block_types=("CogVideoXUpBlock3D",) * 2, latent_channels=2, layers_per_block=1,
                     norm_num_groups=4, act_fn="mish", sample_height=32, sample_width=32)


def _diffusers_kwargs(cfg: VAEConfig) -> dict:
    d = cfg.to_dict()
    d.pop("_class_name")
    return d


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights with unit-ish gain everywhere (diffusers zero-inits nothing here, but default init
    would leave the norms at exactly 1/0, hiding a swapped weight/bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    """name -> (diffusers model, our model, checkpoint dir)."""
    out = {}
    for seed, (name, cfg) in enumerate(CONFIGS.items()):
        ref = AutoencoderKLCogVideoX(**_diffusers_kwargs(cfg)).eval()
        _randomize(ref, seed)
        d = tmp_path_factory.mktemp(f"vae_{name}")
        ref.save_pretrained(d, safe_serialization=True, **({"max_shard_size": "20KB"} if name == "quant" else {}))
        out[name] = (ref, load_vae(d), d)
    return out


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs diffusers {tuple(ref.shape)}"
    err = rel_l2(ours, ref)
    assert err <= TOL, f"{what}: rel L2 {err:.3g} > {TOL}; largest differences {where_differs(ours, ref)}"


@contextlib.contextmanager
def _tiled(*models, **tiling):
    """Tiling on for both the reference and ours inside the block; off again afterwards (the models
    are shared by the module's tests)."""
    for m in models:
        m.enable_tiling(**tiling)
    try:
        yield
    finally:
        for m in models:
            m.disable_tiling()


def _count_calls(module: torch.nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


# ---------------------------------------------------------------- config and loading


def test_real_config_is_diffusers_default():
    defaults = {k: p.default for k, p in inspect.signature(AutoencoderKLCogVideoX.__init__).parameters.items()
                if k != "self"}
    ours = VAEConfig.real("2b").to_dict()
    for k, v in defaults.items():
        assert k in ours, f"VAEConfig lacks diffusers field {k}"
        assert ours[k] == (list(v) if isinstance(v, tuple) else v), k
    assert VAEConfig.real("5b").scaling_factor == 0.7 and VAEConfig.real("1.5").invert_scale_latents


@pytest.mark.parametrize("cfg", [VAEConfig.real(), VAEConfig.tiny(), *CONFIGS.values()], ids=lambda c: str(c.block_out_channels))
def test_parameter_names_and_shapes_equal_diffusers(cfg):
    from cogvx.engine.models.vae import CogVideoXVAE

    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in CogVideoXVAE(cfg).state_dict().items()}
        ref = {k: tuple(v.shape) for k, v in AutoencoderKLCogVideoX(**_diffusers_kwargs(cfg)).state_dict().items()}
    assert ours == ref


def test_config_from_dict_roundtrip(vaes):
    _, ours, d = vaes["quant"]
    raw = json.loads((d / "config.json").read_text())
    assert any(k.startswith("_") for k in raw)
    assert VAEConfig.from_dict({**raw, "some_future_key": 1}) == CONFIGS["quant"] == ours.config
    assert VAEConfig.from_dict(CONFIGS["quant"].to_dict()) == CONFIGS["quant"]
    assert len(list(d.glob("*.safetensors"))) > 1 and list(d.glob("*.index.json")), "quant VAE should be sharded"


def test_frame_batches_follow_diffusers():
    assert frame_batches(13, 2) == [slice(0, 3)] + [slice(i, i + 2) for i in range(3, 13, 2)]
    assert frame_batches(49, 8) == [slice(0, 9)] + [slice(i, i + 8) for i in range(9, 49, 8)]
    assert frame_batches(1, 2) == [slice(0, 3)]  # one short batch; slicing clamps


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize("name,frames", [("tiny", 1), ("tiny", 3), ("tiny", 4), ("quant", 5), ("three", 4)])
def test_decode_matches_diffusers(vaes, name, frames):
    ref, ours, _ = vaes[name]
    c = ours.config.latent_channels
    z = torch.randn(1, c, frames, 5, 7, generator=torch.Generator().manual_seed(frames))
    ours_calls, ref_calls = _count_calls(ours.decoder), _count_calls(ref.decoder)
    out = ours.decode(z)
    with torch.no_grad():
        expected = ref.decode(z).sample
    _close(out, expected, f"{name} decode, {frames} latent frames")
    # The frame-batched path (conv cache carried between batches) really ran, as often as diffusers'.
    assert len(ours_calls) == len(ref_calls) == len(frame_batches(frames, 2))
    if frames > 3:
        assert len(ours_calls) >= 2


def test_tiled_decode_matches_diffusers(vaes):
    ref, ours, _ = vaes["three"]  # 4x spatial: 16 px tiles = 4x4 latent, stride 3
    z = torch.randn(1, 2, 4, 7, 9, generator=torch.Generator().manual_seed(1))
    plain = ours.decode(z)
    # overlap 1/4: kept 12 px = stride 3 * 4, so the output keeps the plain size
    with _tiled(ref, ours, tile_sample_min_height=16, tile_sample_min_width=16, tile_overlap_factor_height=0.25,
                tile_overlap_factor_width=0.25), torch.no_grad():
        calls = _count_calls(ours.decoder)
        out = ours.decode(z)
        expected = ref.decode(z).sample
    _close(out, expected, "tiled decode")
    assert len(calls) == 9 * 2  # 3x3 tiles, 2 frame batches each (the conv cache is per tile)
    assert out.shape == plain.shape and rel_l2(out, plain) > 1e-3, "tiling did not change the result: was it used?"


def test_tiled_decode_default_overlap(vaes):
    """diffusers' default overlaps (1/6, 1/5) with a tile size they do not divide: the output is not 8h x 8w
    (a diffusers quirk that we keep, and warn about), and it must still match."""
    ref, ours, _ = vaes["tiny"]  # 24x32 px tiles = 3x4 latent, stride 2x3: 2x2 tiles, 36x40 px out
    z = torch.randn(1, 4, 2, 4, 5, generator=torch.Generator().manual_seed(2))
    with _tiled(ref, ours, tile_sample_min_height=24, tile_sample_min_width=32), torch.no_grad():
        out = ours.decode(z)
        expected = ref.decode(z).sample
    _close(out, expected, "tiled decode, default overlap")


def test_slicing_matches_diffusers(vaes):
    ref, ours, _ = vaes["three"]
    z = torch.randn(2, 2, 3, 5, 7, generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 3, 9, 16, 24, generator=torch.Generator().manual_seed(4))
    plain = ours.decode(z)
    ref.enable_slicing()
    ours.enable_slicing()
    try:
        calls = _count_calls(ours.decoder)
        out, moments = ours.decode(z), ours.encode(x).parameters
        with torch.no_grad():
            expected, ref_moments = ref.decode(z).sample, ref.encode(x).latent_dist.parameters
    finally:
        ref.disable_slicing()
        ours.disable_slicing()
    _close(out, expected, "sliced decode")
    _close(moments, ref_moments, "sliced encode")
    _close(out, plain, "sliced vs batched decode")
    assert len(calls) == 2


# ---------------------------------------------------------------- encode


@pytest.mark.parametrize("name,shape", [("tiny", (1, 3, 9, 40, 56)), ("quant", (1, 3, 17, 24, 40))])
def test_encode_matches_diffusers(vaes, name, shape):
    ref, ours, _ = vaes[name]
    x = torch.rand(shape, generator=torch.Generator().manual_seed(5)) * 2 - 1
    calls = _count_calls(ours.encoder)
    dist = ours.encode(x)
    with torch.no_grad():
        ref_dist = ref.encode(x).latent_dist
    _close(dist.mean, ref_dist.mean, f"{name} encode mean")
    _close(dist.logvar, ref_dist.logvar, f"{name} encode logvar")
    _close(dist.std, ref_dist.std, f"{name} encode std")
    _close(dist.sample(torch.Generator().manual_seed(7)), ref_dist.sample(torch.Generator().manual_seed(7)),
           f"{name} posterior sample")
    assert torch.equal(dist.mode(), dist.mean)
    assert len(calls) == len(frame_batches(shape[2], 8))


def test_tiled_encode_matches_diffusers(vaes):
    ref, ours, _ = vaes["tiny"]
    x = torch.rand(1, 3, 9, 40, 48, generator=torch.Generator().manual_seed(6)) * 2 - 1
    # 32 px tiles = 4 latent px; overlaps 1/2, 1/4 so the latent tiles blend 2 and 1 px
    with _tiled(ref, ours, tile_sample_min_height=32, tile_sample_min_width=32, tile_overlap_factor_height=0.5,
                tile_overlap_factor_width=0.25), torch.no_grad():
        calls = _count_calls(ours.encoder)
        dist = ours.encode(x)
        ref_dist = ref.encode(x).latent_dist
    _close(dist.mean, ref_dist.mean, "tiled encode mean")
    _close(dist.logvar, ref_dist.logvar, "tiled encode logvar")
    assert len(calls) == 3 * 2  # rows at 0, 16, 32 px; columns at 0, 24 px


# ---------------------------------------------------------------- latent scaling


def test_latent_scaling_follows_the_pipelines():
    z = torch.randn(2, 4, 3, 2, 2)
    for variant, sf in (("2b", 1.15258426), ("5b", 0.7)):
        cfg = VAEConfig.real(variant)
        assert torch.equal(scale_latents(z, cfg), z * sf)
        assert torch.equal(unscale_latents(z, cfg), z / sf)
    v15 = VAEConfig.real("1.5")  # image latents divided; decode input still divided
    assert torch.equal(scale_latents(z, v15), z / 0.7) and torch.equal(unscale_latents(z, v15), z / 0.7)


# ---------------------------------------------------------------- errors


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_vae(tmp_path / "nope")


def test_missing_config(vaes, tmp_path):
    _, _, d = vaes["tiny"]
    shutil.copy(d / "diffusion_pytorch_model.safetensors", tmp_path)
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_vae(tmp_path)


def test_wrong_latent_channels(vaes):
    _, ours, _ = vaes["tiny"]
    with pytest.raises(ValueError, match="expected 4 latent channels, got 3"):
        ours.decode(torch.randn(1, 3, 2, 5, 7))
    with pytest.raises(ValueError, match=r"permute\(0, 2, 1, 3, 4\)"):
        ours.decode(torch.randn(1, 2, 4, 5, 7))  # [B, F, C, h, w] by mistake


def test_missing_key(vaes, tmp_path):
    _, _, d = vaes["tiny"]
    state = load_file(str(d / "diffusion_pytorch_model.safetensors"))
    del state["decoder.norm_out.conv_b.conv.bias"]
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    shutil.copy(d / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match="missing weight.*decoder.norm_out.conv_b.conv.bias"):
        load_vae(tmp_path)


def test_wrong_shape_names_file_and_tensor(vaes, tmp_path):
    _, _, d = vaes["tiny"]
    shutil.copy(d / "diffusion_pytorch_model.safetensors", tmp_path)
    cfg = dataclasses.replace(CONFIGS["tiny"], latent_channels=6)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: tensor '.*' has shape"):
        load_vae(tmp_path)


def test_conv_cache_holds_only_temporal_convs(vaes):
    """The cache carries 2 frames per 3x3x3 conv and nothing for the 1x1x1 ones (diffusers clones the
    whole input of those too)."""
    _, ours, _ = vaes["tiny"]
    cache = ConvCache()
    with torch.no_grad():
        ours.decoder(torch.randn(1, 4, 2, 5, 7), cache)
    n3 = sum(1 for m in ours.decoder.modules() if getattr(m, "time_pad", 0) == 2)
    assert len(cache._tails) == n3 and all(t.shape[2] == 2 for t in cache._tails.values())


# ---------------------------------------------------------------- speed options keep the numbers


# The compiled case is inductor's C++ compile of two decoder graphs: about a minute on the 2-core machine.
@pytest.mark.parametrize("option", ["channels_last", pytest.param("compiled", marks=pytest.mark.slow)])
def test_decode_speed_options_match_diffusers(vaes, tmp_path, option):
    """channels_last_3d and the compiled frame-batch decoder compute the same decode (fresh model: the
    options change its state). The compiled case uses the 2-block VAE: inductor compiles two decoder
    graphs, and the fewer blocks the shorter their C++ compile (about 40 s against 57 s on one core)."""
    if option == "channels_last":
        ref, _, d = vaes["three"]
    else:
        ref = AutoencoderKLCogVideoX(**_diffusers_kwargs(COMPILED)).eval()
        _randomize(ref, len(CONFIGS))
        d = tmp_path / "vae_two"
        ref.save_pretrained(d, safe_serialization=True)
    ours = load_vae(d)
    if option == "channels_last":
        ours.set_channels_last()
        assert ours.decoder.conv_in.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    else:
        torch._dynamo.reset()
        ours.compile_decoder()
    keys = set(ours.state_dict())
    z = torch.randn(1, ours.config.latent_channels, 5, 5, 7, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ref.decode(z).sample
    _close(ours.decode(z), expected, f"{option} decode")
    _close(ours.decode(z), expected, f"{option} decode, second call")
    assert set(ours.state_dict()) == keys  # the compiled decoder is not registered as a submodule
