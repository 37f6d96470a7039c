"""Text to frames to mp4: Engine.generate against diffusers' CogVideoXPipeline end to end, video
writing and reading, the cogvx command line and its built-in demo model."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import CogVideoXPipeline

from cogvx.engine import Engine
from cogvx.engine.cli import main
from cogvx.engine.io.video import VideoWriteError, read_video as read_mp4

FRAME_TOL = 1e-4  # max abs error in [0, 1] units


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "tiny"
    assert main(["make-tiny", "--out", str(d)]) == 0
    return d


@pytest.fixture(scope="module")
def tiny_pair(tiny_dir):
    """Our engine and diffusers' own pipeline, both loaded from the make-tiny directory."""
    return Engine.load(tiny_dir), CogVideoXPipeline.from_pretrained(tiny_dir)


def test_make_tiny_writes_a_checkpoint_diffusers_loads(tiny_pair):
    engine, pipe = tiny_pair
    assert type(pipe.transformer).__name__ == "CogVideoXTransformer3DModel"
    ours = engine.transformer.state_dict()
    theirs = pipe.transformer.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("scheduler", ["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"])
def test_prompt_to_frames_matches_diffusers(tiny_dir, tiny_pair, scheduler):
    """Same prompt strings (tokenized by each side), same seed: frames within 1e-4 of diffusers'."""
    engine, pipe = tiny_pair
    engine = Engine.load(tiny_dir, scheduler=scheduler)
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

    cls = CogVideoXDDIMScheduler if scheduler.endswith("DDIMScheduler") else CogVideoXDPMScheduler
    pipe = CogVideoXPipeline(**{**pipe.components, "scheduler": cls.from_config(pipe.scheduler.config)})
    common = dict(prompt="a red fox running through fresh snow", negative_prompt="blurry", num_frames=9,
                  height=48, width=80, num_inference_steps=3, guidance_scale=6.0)
    expected = pipe(**common, output_type="np", generator=torch.Generator().manual_seed(4)).frames
    got = engine.generate(**common, generator=torch.Generator().manual_seed(4)).frames
    assert got.shape == expected.shape == (1, 9, 48, 80, 3)
    assert got.dtype == np.float32 and 0 <= got.min() and got.max() <= 1
    err = np.abs(got - expected).max()
    assert err <= FRAME_TOL, err
    assert expected.std() > 0.01  # not a constant image


def test_output_types_follow_diffusers(tiny_pair):
    engine, pipe = tiny_pair
    lat = torch.randn(1, 3, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    common = dict(prompt="a boat", num_frames=9, height=32, width=48, num_inference_steps=2)
    for output_type in ("pt", "pil"):
        exp = pipe(**common, latents=lat.clone(), output_type=output_type).frames
        got = engine.generate(**common, latents=lat.clone(), output_type=output_type).frames
        if output_type == "pt":
            assert got.shape == exp.shape == (1, 9, 3, 32, 48)
            assert (got - exp).abs().max() <= FRAME_TOL
        else:
            assert len(got) == len(exp) == 1 and len(got[0]) == len(exp[0]) == 9
            assert got[0][0].size == exp[0][0].size == (48, 32)
            diff = np.abs(np.asarray(got[0][2], np.int16) - np.asarray(exp[0][2], np.int16))
            assert diff.max() <= 1  # uint8 rounding of values within 1e-4


def test_saved_mp4_reads_back(tiny_pair, tmp_path):
    engine, _ = tiny_pair
    result = engine.generate("a boat", num_frames=9, height=48, width=64, num_inference_steps=2, seed=1,
                             num_videos_per_prompt=2)
    paths = result.save(tmp_path / "boat.mp4", fps=8, all_videos=True)
    assert [p.name for p in paths] == ["boat_0.mp4", "boat_1.mp4"]
    frames = read_mp4(paths[1])
    assert frames.shape == (9, 48, 64, 3) and frames.dtype == np.uint8
    # lossy H.264, but the content is the video's: mean error small against the frames saved
    expected = (result.frames[1] * 255).round()
    assert np.abs(frames.astype(np.float32) - expected).mean() < 12
    assert result.save(tmp_path / "first.mp4")[0].is_file()


def test_failed_write_keeps_the_video(tiny_pair, tmp_path):
    engine, _ = tiny_pair
    result = engine.generate("a boat", num_frames=9, height=32, width=32, num_inference_steps=1, seed=0)
    gone = tmp_path / "gone"
    gone.mkdir()
    target = gone / "v.mp4"
    shutil.rmtree(gone)  # the directory disappears while the video was being made
    with pytest.raises(VideoWriteError) as info:
        result.save(target)
    fallback = info.value.fallback_path
    assert fallback is not None and fallback.is_file() and str(fallback) in str(info.value)
    assert read_mp4(fallback).shape == (9, 32, 32, 3)
    os.unlink(fallback)


# ---------------------------------------------------------------- command line
def test_cli_demo_model_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COGVX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo.mp4"
    rc = main(["generate", "--prompt", "a lighthouse at dusk", "--frames", "9", "--height", "32", "--width", "48",
               "--steps", "2", "--seed", "0", "--out", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "random" in captured.err and "--model" in captured.err  # says it is noise, says what to do
    assert f"wrote {out}" in captured.out and "seconds:" in captured.out
    assert read_mp4(out).shape == (9, 32, 48, 3)
    assert (tmp_path / "cache" / "tiny-random-v2" / "model_index.json").is_file()  # cached for next time


@pytest.mark.parametrize("argv, message", [
    (["--out", "/nonexistent-dir/v.mp4"], "does not exist"),
    (["--out", "{tmp}/v.gif"], "must end in .mp4"),
    (["--out", "{tmp}"], "must end in .mp4"),
    (["--frames", "48"], "4k\\+1"),
    (["--height", "100"], "multiple of 16"),
    (["--steps", "0"], "num_inference_steps"),
])
def test_cli_bad_input_fails_before_loading(tmp_path, monkeypatch, capsys, argv, message):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(Engine, "load", boom)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "v.mp4")]
    rc = main(["generate", "--prompt", "x", *argv])
    assert rc == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def test_cli_missing_vae_is_a_clear_error(tiny_dir, tmp_path, capsys):
    d = tmp_path / "novae"
    shutil.copytree(tiny_dir, d)
    shutil.rmtree(d / "vae")
    rc = main(["generate", "--model", str(d), "--prompt", "x", "--out", str(tmp_path / "v.mp4")])
    assert rc == 2
    assert "vae/ directory is missing" in capsys.readouterr().err


def test_make_tiny_refuses_non_empty_directory(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("keep me")
    assert main(["make-tiny", "--out", str(tmp_path / "x")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "x" / "file").read_text() == "keep me"
