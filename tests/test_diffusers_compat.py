"""The diffusers-compatible classes: the two model-card scripts of CogVideoX-5B (quick start, and
torchao-quantized components), reduced to a small checkpoint and the CPU, run with only the diffusers
import line changed and give diffusers' frames within 1e-4; diffusers' arguments are honoured, refused
or warned about, never silently dropped."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from diffusers import CogVideoXPipeline as DiffusersPipeline

import diffusers
from PIL import Image

import cogvx.engine
from cogvx.engine import (
    AutoencoderKLCogVideoX,
    CogVideoXDPMScheduler,
    CogVideoXImageToVideoPipeline,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    export_to_video,
)
from cogvx.engine.io.video import read_video
from cogvx.engine.models.transformer import CogVideoXTransformer

FRAME_TOL = 1e-4

QUICK_START = """
{IMPORT}
from diffusers.utils import export_to_video

pipe = CogVideoXPipeline.from_pretrained(path, torch_dtype=torch.float32)
pipe.enable_model_cpu_offload(device=offload_device)
pipe.vae.enable_tiling()
video = pipe(prompt=prompt, num_videos_per_prompt=1, num_inference_steps=2, num_frames=9, height=32, width=48,
             guidance_scale=6, generator=torch.Generator(device="cpu").manual_seed(42), output_type=output_type).frames[0]
export_to_video(video, out, fps=8)
"""

QUANTIZED = """
from transformers import T5EncoderModel
from torchao.quantization import quantize_, Int8WeightOnlyConfig
{IMPORT}
from diffusers.utils import export_to_video

text_encoder = T5EncoderModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=torch.float32)
quantize_(text_encoder, Int8WeightOnlyConfig())
transformer = CogVideoXTransformer3DModel.from_pretrained(path, subfolder="transformer", torch_dtype=torch.float32)
quantize_(transformer, Int8WeightOnlyConfig())
vae = AutoencoderKLCogVideoX.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
quantize_(vae, Int8WeightOnlyConfig())
pipe = CogVideoXPipeline.from_pretrained(path, text_encoder=text_encoder, transformer=transformer, vae=vae,
                                         torch_dtype=torch.float32)
pipe.enable_model_cpu_offload(device=offload_device)
pipe.vae.enable_tiling()
video = pipe(prompt=prompt, num_videos_per_prompt=1, num_inference_steps=2, num_frames=9, height=32, width=48,
             guidance_scale=6, generator=torch.Generator(device="cpu").manual_seed(42), output_type=output_type).frames[0]
export_to_video(video, out, fps=8)
"""
NAMES = "CogVideoXPipeline, CogVideoXTransformer3DModel, AutoencoderKLCogVideoX"


def _run(script: str, library: str, ckpt, tmp_path, output_type="np", offload_device="cpu"):
    """Run a script with its diffusers import pointed at ``library``; returns its namespace."""
    ns = dict(torch=torch, path=str(ckpt), prompt="a fox in fresh snow", output_type=output_type,
              offload_device=offload_device, out=str(tmp_path / f"{library}.mp4"))
    exec(script.replace("{IMPORT}", f"from {library} import {NAMES}"), ns)
    return ns


@pytest.mark.slow
@pytest.mark.parametrize("script", ["quick start", "quantized"])
def test_model_card_script_runs_with_only_the_import_changed(ckpt_factory, tmp_path, script):
    """The "cuda" offload of the card runs as device="cpu" here (diffusers cannot offload to a missing GPU):
    cogvx still goes through its staged offload path (each component moved for its stage)."""
    text = QUICK_START if script == "quick start" else QUANTIZED
    ckpt = ckpt_factory("rope")
    theirs = _run(text, "diffusers", ckpt, tmp_path)
    ours = _run(text, "cogvx.engine", ckpt, tmp_path)
    assert isinstance(ours["pipe"].transformer, CogVideoXTransformer)
    if script == "quantized":
        assert type(ours["transformer"].transformer_blocks[0].attn1.to_q.weight).__name__ == "Int8Tensor"
    got, expected = ours["video"], theirs["video"]
    assert got.shape == expected.shape and got.shape[0] == 9
    err = np.abs(got - expected).max()
    assert err <= FRAME_TOL, f"{script}: max |frame difference| {err:.3g}"
    assert read_video(tmp_path / "cogvx.engine.mp4").shape[0] == 9  # diffusers' export_to_video took our frames


def test_pil_frames_go_to_both_export_helpers(ckpt_factory, tmp_path):
    ns = _run(QUICK_START, "cogvx.engine", ckpt_factory("rope"), tmp_path, output_type="pil")
    video = ns["video"]
    assert isinstance(video, list) and len(video) == 9 and video[0].mode == "RGB"
    path = export_to_video(video, str(tmp_path / "ours.mp4"), fps=8)
    assert read_video(path).shape[:1] == (9,)


@pytest.fixture(scope="module")
def pair(ckpt_factory):
    ckpt = ckpt_factory("rope")
    theirs = DiffusersPipeline.from_pretrained(ckpt)
    theirs.set_progress_bar_config(disable=True)
    ours = CogVideoXPipeline.from_pretrained(ckpt)
    ours.set_progress_bar_config(disable=True)
    return ckpt, ours, theirs


COMMON = dict(prompt="a boat", num_frames=9, height=32, width=48, num_inference_steps=2)


def test_arguments_follow_diffusers(pair):
    _, ours, theirs = pair
    seen = {}

    def cb(pipe, i, t, kw):
        seen[i] = (pipe, int(t), kw["latents"].shape, pipe.num_timesteps, pipe.guidance_scale)
        return {"latents": kw["latents"] * 1.0}

    gen = dict(COMMON, eta=0.7, output_type="pt", return_dict=False, callback_on_step_end=cb,
               callback_on_step_end_tensor_inputs=["latents"])
    (got,) = ours(**gen, generator=torch.Generator().manual_seed(3))
    ours_seen = dict(seen)
    (expected,) = theirs(**gen, generator=torch.Generator().manual_seed(3))
    assert (got - expected).abs().max() <= FRAME_TOL
    assert ours_seen[1][0] is ours and ours_seen[1][3] == 2 and ours_seen[1][4] == 6
    assert [(v[1], v[2]) for v in ours_seen.values()] == [(v[1], v[2]) for v in seen.values()]  # same t, shapes
    lat = ours(**COMMON, output_type="latent", generator=torch.Generator().manual_seed(3)).frames
    assert lat.shape == theirs(**COMMON, output_type="latent", generator=torch.Generator().manual_seed(3)).frames.shape
    # the LoRA scale of attention_kwargs is honoured (with no LoRA loaded it changes nothing, as in diffusers)
    a = ours(**COMMON, output_type="np", attention_kwargs={"scale": 0.5}, generator=torch.Generator().manual_seed(3))
    b = theirs(**COMMON, output_type="np", attention_kwargs={"scale": 0.5}, generator=torch.Generator().manual_seed(3))
    assert np.abs(a.frames - b.frames).max() <= FRAME_TOL


@pytest.mark.parametrize("kwargs, message", [
    (dict(timesteps=[999, 500]), "custom timesteps"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), "has to be in"),
    (dict(attention_kwargs={"foo": 1}), "attention_kwargs"),
    (dict(prompt_embeds=torch.zeros(1, 226, 20)), "both `prompt` and `prompt_embeds`"),
    (dict(negative_prompt="", negative_prompt_embeds=torch.zeros(1, 226, 20)), "both `negative_prompt`"),
])
def test_what_cannot_be_honoured_is_refused(pair, kwargs, message):
    _, ours, _ = pair
    with pytest.raises(ValueError, match=message):
        ours(**COMMON, **kwargs)


def test_offload_without_a_gpu_is_said_once_and_runs_on_the_cpu(pair):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _, ours, _ = pair
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours.enable_model_cpu_offload()
        ours.enable_model_cpu_offload()
    said = [w for w in caught if "nothing to offload" in str(w.message)]
    assert len(said) <= 1 and ours.device.type == "cpu"
    assert ours(**COMMON, output_type="np", generator=torch.Generator().manual_seed(0)).frames.shape == (1, 9, 32, 48, 3)


def test_scheduler_swap_and_fused_projections_match_diffusers(pair):
    ckpt, _, theirs = pair
    from diffusers import CogVideoXDPMScheduler as TheirDPM

    ours = CogVideoXPipeline.from_pretrained(ckpt)
    ours.set_progress_bar_config(disable=True)
    ours.scheduler = CogVideoXDPMScheduler.from_config(ours.scheduler.config, timestep_spacing="trailing")
    ours.fuse_qkv_projections()
    ref = DiffusersPipeline(**{**theirs.components, "scheduler": TheirDPM.from_config(theirs.scheduler.config,
                                                                                      timestep_spacing="trailing")})
    ref.set_progress_bar_config(disable=True)
    got = ours(**COMMON, output_type="np", generator=torch.Generator().manual_seed(5)).frames
    expected = ref(**COMMON, output_type="np", generator=torch.Generator().manual_seed(5)).frames
    assert ours.transformer.transformer_blocks[0].attn1.to_qkv is not None
    assert np.abs(got - expected).max() <= FRAME_TOL


def test_wrong_class_or_component_is_a_clear_error(pair, ckpt_factory):
    ckpt, _, theirs = pair
    with pytest.raises(ValueError, match="CogVideoXPipeline"):
        CogVideoXImageToVideoPipeline.from_pretrained(ckpt)
    with pytest.raises(TypeError, match="transformer=: expected a module"):
        CogVideoXPipeline.from_pretrained(ckpt, transformer="nope")
    with pytest.raises(ValueError, match="pickle"):
        CogVideoXTransformer3DModel.from_pretrained(ckpt, subfolder="transformer", use_safetensors=False)
    with pytest.raises(TypeError, match="unsupported"):
        AutoencoderKLCogVideoX.from_pretrained(ckpt, subfolder="vae", device_map="balanced")
    with pytest.raises(ValueError, match="num_attention_heads"):
        CogVideoXTransformer3DModel(num_attention_heads=-1)


@pytest.mark.parametrize("cls", ["CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline",
                                 "CogVideoXFunControlPipeline"])
def test_image_video_and_control_pipelines_match_diffusers(ckpt_factory, tmp_path, cls):
    rng = np.random.default_rng(0)

    def frames(n, h, w):
        return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for _ in range(n)]

    if cls == "CogVideoXVideoToVideoPipeline":
        ckpt, args = ckpt_factory("rope"), dict(video=frames(9, 32, 48), height=32, width=48, strength=0.6,
                                                num_inference_steps=4)
    else:  # the "learned" variant takes conditioning channels; a Fun-Control index turns it into a control model
        ckpt = ckpt_factory("learned")
        args = dict(height=48, width=80, max_sequence_length=7, num_inference_steps=2)
        if cls == "CogVideoXFunControlPipeline":
            shutil.copytree(ckpt, tmp_path / "control")
            ckpt = tmp_path / "control"
            index = json.loads((ckpt / "model_index.json").read_text())
            (ckpt / "model_index.json").write_text(json.dumps({**index, "_class_name": cls}))
            args["control_video"] = frames(9, 48, 80)
        else:
            args.update(image=frames(1, 48, 80)[0], num_frames=9)
    pipes = [getattr(lib, cls).from_pretrained(ckpt) for lib in (diffusers, cogvx.engine)]
    out = []
    for p in pipes:
        p.set_progress_bar_config(disable=True)
        out.append(p(prompt="a fox", output_type="np", generator=torch.Generator().manual_seed(0), **args).frames)
    assert out[1].shape == out[0].shape and out[0].shape[1] == 9
    err = np.abs(out[1] - out[0]).max()
    assert err <= FRAME_TOL, f"{cls}: max |frame difference| {err:.3g}"
