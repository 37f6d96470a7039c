"""Hostile image and video inputs (issue 20): 16-bit and float images keep their values, floats outside
0..1 and tensors that hold no plain pixels are refused with the accepted ranges, files are named for what
they are (a directory, a URL, a huge image, a broken video: one short line), and a long 1080p clip is
decoded only as far as it is used, resized as it is read, under a fixed memory budget."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

from cogvx.engine.pipelines.media import MediaError, load_image, load_video

ARGS = dict(num_frames=9, height=48, width=80, num_inference_steps=4)


# ---------------------------------------------------------------- item 1: 16-bit and float images
def test_a_16_bit_png_is_scaled_by_its_range(tmp_path):
    Image.fromarray(np.full((48, 80), 61435, np.uint16)).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    got = load_image(tmp_path / "grey16.png", 48, 80)
    torch.testing.assert_close(got, torch.full((3, 48, 80), 2 * 61435 / 65535 - 1), rtol=0, atol=1e-6)


def test_a_16_bit_gradient_matches_its_8_bit_copy_through_a_resize(tmp_path):
    y, x = np.mgrid[0:96, 0:160]
    ramp = np.round(x * 255 / 159 * 0.7 + y * 255 / 95 * 0.3).astype(np.uint8)  # smooth: no edge rings
    Image.fromarray(ramp.astype(np.uint16) * 257).save(tmp_path / "ramp16.png")  # 257 * v8 spans 0..65535
    Image.fromarray(np.repeat(ramp[..., None], 3, -1)).save(tmp_path / "ramp8.png")
    deep, flat = load_image(tmp_path / "ramp16.png", 48, 80), load_image(tmp_path / "ramp8.png", 48, 80)
    assert (deep - flat).abs().max() <= 2 * 2 / 255  # in [-1, 1]: the 8-bit copy rounds each resized value once


def test_a_float_tiff_is_taken_as_0_to_1_or_refused(tmp_path):
    Image.fromarray(np.full((48, 80), 0.5, np.float32)).save(tmp_path / "half.tif")
    assert Image.open(tmp_path / "half.tif").mode == "F"
    torch.testing.assert_close(load_image(tmp_path / "half.tif", 48, 80), torch.zeros(3, 48, 80), rtol=0, atol=1e-6)
    Image.fromarray(np.full((48, 80), 200.0, np.float32)).save(tmp_path / "hot.tif")
    with pytest.raises(MediaError, match=r"mode-F image holds values from 200 to 200; cogvx takes 0\.\.1"):
        load_image(tmp_path / "hot.tif", 48, 80)


# ---------------------------------------------------------------- items 2-3: arrays and tensors
def _sparse():
    return torch.zeros(3, 48, 80).to_sparse()


BAD_IMAGES = [
    (np.full((48, 80, 3), 200.0), r"image array holds float values from 200 to 200; float images must be in 0\.\.1 "
                                  r"\(uint8 arrays 0\.\.255\); it looks like 0\.\.255"),
    (np.full((48, 80, 3), -0.5, np.float32), r"float values from -0.5 to -0.5"),
    (torch.full((3, 48, 80), 200.0), r"image tensor holds values from 200 to 200; image tensors must be in 0\.\.1 "
                                     r"\(or -1\.\.1"),
    (torch.full((3, 48, 80), -3.0), r"values from -3 to -3"),
    ("sparse", r"the image tensor is sparse_coo; pass a dense tensor \(t.to_dense\(\)\)"),
    (torch.zeros(3, 48, 80, device="meta"), r"image tensor is on the meta device"),
    (np.zeros((0, 80, 3), np.float32), r"image array is empty \(shape \(0, 80, 3\)\)"),
    (torch.zeros(3, 0, 80), r"image tensor is empty"),
]


@pytest.mark.parametrize("image, message", BAD_IMAGES)
def test_bad_image_values_are_refused_before_heavy_work(i2v, image, message):
    with pytest.raises(MediaError, match=message):
        i2v.generate("a cat", image=_sparse() if isinstance(image, str) else image, **ARGS)


@pytest.mark.parametrize("video, message", [
    (np.full((9, 48, 80, 3), 200.0), r"control_video array holds float values from 200 to 200"),
    (torch.full((9, 3, 48, 80), 2.0), r"control_video tensor holds values from 2 to 2"),
    (torch.zeros(9, 3, 48, 80).to_sparse(), r"control_video tensor is sparse_coo"),
    (torch.zeros(9, 3, 48, 80, device="meta"), r"control_video tensor is on the meta device"),
])
def test_bad_control_video_values_are_refused_before_heavy_work(control, video, message):
    with pytest.raises(MediaError, match=message):
        control.generate("a dancer", control_video=video, **ARGS)


def test_in_range_arrays_still_work():
    img = np.full((48, 80, 3), 0.25, np.float32)
    torch.testing.assert_close(load_image(img, 48, 80), torch.full((3, 48, 80), -0.5))
    u16 = np.full((48, 80, 3), 65535, np.uint16)
    torch.testing.assert_close(load_image(u16, 48, 80), torch.ones(3, 48, 80))
    torch.testing.assert_close(load_image(torch.full((3, 48, 80), -0.5), 48, 80), torch.full((3, 48, 80), -0.5))


# ---------------------------------------------------------------- weak: files named for what they are
def test_a_directory_a_url_and_a_huge_image_are_named(i2v, t2v, tmp_path):
    with pytest.raises(MediaError, match=r"image .* is a directory; give a file"):
        i2v.generate("a cat", image=tmp_path, **ARGS)
    with pytest.raises(MediaError, match=r"video .* is a directory"):
        t2v.generate("a cat", video=str(tmp_path), **ARGS)
    with pytest.raises(MediaError, match=r"image 'https://example.com/cat.png' is a URL; cogvx reads local files"):
        i2v.generate("a cat", image="https://example.com/cat.png", **ARGS)
    Image.new("L", (9000, 4)).save(tmp_path / "wide.png")
    with pytest.raises(MediaError, match=r"wide.png is 9000x4 pixels; cogvx reads images up to 8192 pixels a side"):
        i2v.generate("a cat", image=tmp_path / "wide.png", **ARGS)


def test_a_broken_video_is_one_short_line(t2v, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 400)
    with pytest.raises(MediaError) as e:
        t2v.generate("a cat", video=bad, **ARGS)
    msg = str(e.value)
    assert "bad.mp4" in msg and len(msg) < 600 and "ffmpeg version" not in msg and "configuration:" not in msg


# ---------------------------------------------------------------- item 4: a long 1080p clip, memory-bound
_CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    from cogvx.engine import Engine
    torch.set_num_threads(1)
    engine = Engine.load(sys.argv[1])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r = engine.generate("a cat", video=sys.argv[2], height=16, width=16, num_inference_steps=4, seed=0,
                        output_type="latent")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(dict(base=base, peak=peak, frames=r.profile.shape.get("frames"), lat=list(r.latents.shape))))
""")


@pytest.mark.slow
def test_a_long_1080p_clip_is_decoded_frame_by_frame_under_a_memory_budget(ckpt_factory, tmp_path):
    clip = tmp_path / "long.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc=size=1920x1080:rate=30", "-frames:v", "300", "-c:v", "libx264", "-preset", "ultrafast",
                    "-pix_fmt", "yuv420p", str(clip)], check=True, timeout=120)
    # The whole clip at full size would be 300 x 1920 x 1080 x 3 bytes = 1.87 GB of uint8 frames alone.
    out = subprocess.run([sys.executable, "-P", "-c", _CHILD, str(ckpt_factory("rope")), str(clip)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["lat"][1] == 75  # all 300 frames used: 297 = 4k+1 frames -> 75 latent frames
    assert got["peak"] - got["base"] < 300, got  # MiB above the loaded engine: a few full-size frames at most
