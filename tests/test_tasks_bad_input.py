"""Bad inputs of the image-, video-to-video and control tasks: each a clear error before any heavy work
(the transformer, the text encoder and the VAE encoder fail loudly if they are called)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cogvx.engine import Engine
from hostile_helpers import guard_inputs


ARGS = dict(num_frames=9, height=48, width=80, num_inference_steps=4)
IMG = np.zeros((48, 80, 3), np.float32)
VID = np.zeros((9, 48, 80, 3), np.float32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(image=IMG), r"image= needs an image-to-video checkpoint"),
    (dict(control_video=VID), r"control_video= needs a Fun-Control checkpoint"),
    (dict(video=VID, strength=0.0), r"strength must be a number from 0 to 1|leaves no step to run"),
    (dict(video=VID, strength=1.5), r"strength must be a number from 0 to 1"),
    (dict(video=VID, strength=float("nan")), r"strength must be a number"),
    (dict(video=VID, strength=0.1), r"strength=0.1 with num_inference_steps=4 leaves no step to run"),
    (dict(strength=0.5), r"strength applies to video-to-video only"),
    (dict(video=VID[:5]), r"the video has 5 frames but num_frames=9"),
    (dict(video=VID, image=IMG), r"pass one of image=, video=, control_video="),
    (dict(video=[VID, VID]), r"video is a list of 2 but there are 1 prompt"),
    (dict(video=np.zeros((9, 48, 80), np.float32)), r"video array must be \[F, H, W, 3\]"),
    (dict(video=np.full((9, 48, 80, 3), np.nan, np.float32)), r"NaN or inf"),
    (dict(video=VID, latents=torch.zeros(1, 3, 4, 6, 10)), r"either video= or latents="),
])
def test_text_to_video_checkpoint_refuses(t2v, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        t2v.generate("a cat", **{**ARGS, **kwargs})


def test_image_to_video_checkpoint_needs_an_image(i2v):
    with pytest.raises(ValueError, match="this is an image-to-video checkpoint: pass image="):
        i2v.generate("a cat", **ARGS)
    with pytest.raises(ValueError, match="video is not taken by it"):
        i2v.generate("a cat", video=VID, **ARGS)
    with pytest.raises(ValueError, match="image is a list of 3 but there are 2 prompt"):
        i2v.generate(["a", "b"], image=[IMG] * 3, **ARGS)
    with pytest.raises(ValueError, match="an image array must be \\[H, W, 3\\]"):
        i2v.generate("a cat", image=np.zeros((48, 80)), **ARGS)
    with pytest.raises(ValueError, match="learned positional embeddings for 48x80"):
        i2v.generate("a cat", image=IMG, **{**ARGS, "height": 64})


def test_control_checkpoint_needs_a_control_video(control):
    with pytest.raises(ValueError, match="this is a Fun-Control checkpoint: pass control_video="):
        control.generate("a cat", **ARGS)
    with pytest.raises(ValueError, match="control_video has 5 frames but num_frames=9"):
        control.generate("a cat", control_video=VID[:5], **ARGS)


def test_unreadable_and_empty_files(t2v, i2v, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        i2v.generate("a cat", image=bad, **ARGS)
    with pytest.raises(ValueError, match="image file .*missing.png does not exist"):
        i2v.generate("a cat", image=tmp_path / "missing.png", **ARGS)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.mp4"):
        t2v.generate("a cat", video=str(empty), **ARGS)
    junk = tmp_path / "junk.gif"
    junk.write_bytes(b"GIF89a" + b"\0" * 20)
    with pytest.raises(ValueError, match="junk.gif"):
        t2v.generate("a cat", video=junk, **ARGS)


def test_v15_video_to_video_needs_an_even_latent_count(ckpt_factory):
    engine = guard_inputs(Engine.load(ckpt_factory("v15")))
    with pytest.raises(ValueError, match=r"num_frames=9 gives 3 latent frames.*multiple of 2.*try num_frames"):
        engine.generate("a cat", video=VID, **ARGS)
