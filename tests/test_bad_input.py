"""Bad input gets a clear error (what was wrong, what is accepted) before any heavy work."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cogvx.engine import Engine
from cogvx.engine.loading import load_transformer
from cogvx.engine.io import CheckpointError


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- checkpoint directory
def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Engine.load(tmp_path / "nope")


def test_not_a_diffusers_directory(tmp_path):
    with pytest.raises(CheckpointError, match="model_index.json"):
        Engine.load(tmp_path)


@pytest.mark.parametrize("remove, message", [
    ("transformer", "transformer/ directory is missing"),
    ("scheduler/scheduler_config.json", "scheduler/scheduler_config.json is missing"),
    ("text_encoder/config.json", "text_encoder/config.json is missing"),
    ("tokenizer/spiece.model", "spiece.model"),
    ("transformer/diffusion_pytorch_model.safetensors", "no \\*.safetensors weights"),
])
def test_incomplete_checkpoint_names_missing_file(ckpt_factory, tmp_path, remove, message):
    d = _copy(ckpt_factory("rope"), tmp_path / "ck")
    target = d / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises((CheckpointError, FileNotFoundError), match=message):
        Engine.load(d)


def test_missing_shard_is_named(ckpt_factory, tmp_path):
    d = _copy(ckpt_factory("rope", shard=True), tmp_path / "ck")
    shards = sorted((d / "transformer").glob("*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=shards[1].name):
        Engine.load(d)


def test_pickles_are_never_loaded(ckpt_factory, tmp_path):
    d = _copy(ckpt_factory("rope"), tmp_path / "ck")
    w = d / "transformer" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(w), d / "transformer" / "diffusion_pytorch_model.bin")
    w.unlink()
    with pytest.raises(CheckpointError, match="pickle files are never loaded"):
        load_transformer(d / "transformer")


def _edit_weights(d: Path, edit):
    w = d / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(w)
    edit(state)
    save_file(state, w)


def test_unexpected_key_is_named(ckpt_factory, tmp_path):
    d = _copy(ckpt_factory("rope"), tmp_path / "ck")
    _edit_weights(d, lambda s: s.__setitem__("transformer_blocks.0.attn1.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected weight.*transformer_blocks.0.attn1.extra.weight"):
        Engine.load(d)


def test_missing_key_is_named(ckpt_factory, tmp_path):
    d = _copy(ckpt_factory("rope"), tmp_path / "ck")
    _edit_weights(d, lambda s: s.pop("transformer_blocks.1.ff.net.2.bias"))
    with pytest.raises(CheckpointError, match="missing weight.*transformer_blocks.1.ff.net.2.bias"):
        Engine.load(d)


def test_shape_mismatch_is_named(ckpt_factory, tmp_path):
    d = _copy(ckpt_factory("rope"), tmp_path / "ck")
    _edit_weights(d, lambda s: s.__setitem__("proj_out.bias", torch.zeros(3)))
    with pytest.raises(CheckpointError, match="'proj_out.bias' has shape \\(3,\\)"):
        Engine.load(d)


def test_truncated_safetensors_is_a_clear_error(ckpt_factory, tmp_path):
    d = _copy(ckpt_factory("rope"), tmp_path / "ck")
    w = d / "transformer" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        Engine.load(d)


# ---------------------------------------------------------------- hub ids (offline cache only)
def test_hub_id_resolves_from_local_cache(ckpt_factory, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--org--tiny-cogvideox" / "snapshots" / "0123abcd"
    shutil.copytree(ckpt_factory("rope"), snap)
    (cache / "models--org--tiny-cogvideox" / "refs").mkdir(parents=True)
    (cache / "models--org--tiny-cogvideox" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    engine = Engine.load("org/tiny-cogvideox")
    assert engine.model_dir.resolve() == snap.resolve()


def test_uncached_hub_id_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache.*`hf download THUDM/CogVideoX-5b`"):
        Engine.load("THUDM/CogVideoX-5b")


# ---------------------------------------------------------------- device and dtype
def test_cuda_without_cuda_is_refused(ckpt_factory):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available.*device='cpu'"):
        Engine.load(ckpt_factory("rope"), device="cuda")


@pytest.mark.parametrize("device", ["mps", "tpu", "gpu0"])
def test_unknown_device(ckpt_factory, device):
    with pytest.raises(ValueError, match="accepted: 'cpu', 'cuda', 'cuda:N'"):
        Engine.load(ckpt_factory("rope"), device=device)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, "fp8", "double"])
def test_unsupported_dtype(ckpt_factory, dtype):
    with pytest.raises(ValueError, match="accepted: .*float32.*bfloat16.*float16"):
        Engine.load(ckpt_factory("rope"), dtype=dtype)


# ---------------------------------------------------------------- generate arguments
@pytest.fixture(scope="module")
def guarded_engine(ckpt_factory):
    """An engine whose text encoder and transformer fail loudly if called: every check below must
    fire before either runs."""
    engine = Engine.load(ckpt_factory("rope"))

    def boom(*a, **k):
        raise AssertionError("heavy work started before the input was checked")

    engine.transformer.forward = boom
    engine.text_encoder.forward = boom
    return engine


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(num_frames=48), ValueError, r"num_frames must be 4k\+1.*got 48.*try 49"),
    (dict(num_frames=0), ValueError, r"num_frames must be an integer from 1"),
    (dict(num_frames=9.0), ValueError, r"num_frames must be an integer \(got 9.0\)"),
    (dict(height=481), ValueError, r"height must be a positive multiple of 16 \(got 481\); try 480"),
    (dict(width=100), ValueError, r"width must be a positive multiple of 16 \(got 100\); try 96"),
    (dict(width=8), ValueError, r"width must be a positive multiple of 16"),
    (dict(prompt=3), TypeError, r"prompt must be a string or a non-empty list of strings \(got int\)"),
    (dict(prompt=["ok", None]), TypeError, r"prompt must be a string or a non-empty list of strings"),
    (dict(prompt=[]), TypeError, r"got an empty list"),
    (dict(prompt=None), ValueError, r"pass a prompt"),
    (dict(negative_prompt=["a", "b"]), ValueError, r"negative_prompt has 2 entries but prompt has 1"),
    (dict(guidance_scale=-1.0), ValueError, r"guidance_scale must be a number from 0 to 100"),
    (dict(guidance_scale=float("nan")), ValueError, r"guidance_scale must be a number"),
    (dict(guidance_scale=1e6), ValueError, r"guidance_scale must be a number from 0 to 100"),
    (dict(num_inference_steps=0), ValueError, r"num_inference_steps must be an integer from 1 to 1000"),
    (dict(num_inference_steps=1001), ValueError, r"num_inference_steps must be an integer from 1 to 1000"),
    (dict(num_inference_steps=2.5), ValueError, r"num_inference_steps must be an integer"),
    (dict(num_videos_per_prompt=0), ValueError, r"num_videos_per_prompt must be an integer from 1"),
    (dict(output_type="gif"), ValueError, r"output_type must be one of"),
    (dict(seed=1, generator=torch.Generator()), ValueError, r"either seed or generator"),
    (dict(seed=-3), ValueError, r"seed must be an integer from 0 to"),
    (dict(latents=torch.zeros(1, 2, 4, 4, 4)), ValueError, r"latents must have shape \(1, 3, 4, 6, 10\)"),
    (dict(callback_on_step_end=5), TypeError, r"callback_on_step_end must be callable"),
])
def test_generate_rejects_bad_arguments_before_work(guarded_engine, kwargs, exc, message):
    args = dict(prompt="a cat", num_frames=9, height=48, width=80, num_inference_steps=2)
    args.update(kwargs)
    with pytest.raises(exc, match=message):
        guarded_engine.generate(**args)


def test_prompt_embeds_shape_is_checked(guarded_engine):
    with pytest.raises(ValueError, match=r"prompt_embeds must be a float tensor \[batch, tokens <= 512, 20\]"):
        guarded_engine.generate(prompt_embeds=torch.zeros(1, 7, 19), num_frames=5, height=32, width=32)
    with pytest.raises(ValueError, match="pass either prompt or prompt_embeds"):
        guarded_engine.generate(prompt="x", prompt_embeds=torch.zeros(1, 7, 20))


def test_image_to_video_checkpoint_is_refused_by_text_to_video(ckpt_factory):
    engine = Engine.load(ckpt_factory("learned"))
    with pytest.raises(ValueError, match="image-to-video checkpoint"):
        engine.generate("a cat", num_frames=9, height=48, width=80)


def test_rope_grid_beyond_v15_range(ckpt_factory):
    engine = Engine.load(ckpt_factory("v15"))  # sample 16x20 latents: RoPE covers 8x10 tokens
    with pytest.raises(ValueError, match="exceeds the model's RoPE range"):
        engine.generate("a cat", num_frames=9, height=16 * 12, width=80, num_inference_steps=2)

