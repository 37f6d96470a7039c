"""Reliability pass 3 (issue 20), the weak spots: links out of a checkpoint, NaN weights, bf16 LoRA
fuse/unfuse, set_adapters' numbers and names, a list of images, hints and limits that were wrong, flags
checked before the work, a closed stdout pipe and a full disk named as such."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import imageio.v2
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cogvx.engine import Engine
from cogvx.engine.cli import main
from cogvx.engine.io.checkpoint import CheckpointError
from cogvx.engine.io.video import VideoWriteError, write_mp4
from cogvx.engine.models.lora import LoraError
from cogvx.engine.pipelines.quantized_export import export_quantized
from hostile_helpers import WEIGHTS, cli_env, copy_ckpt, guard, small_call, unguard
from test_reliability3 import _lora_file


# ---------------------------------------------------------------- links out of the checkpoint
def test_a_weight_file_linked_from_outside_is_refused(ckpt_factory, tmp_path):
    ck = copy_ckpt(ckpt_factory("rope"), tmp_path / "ck")
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(ck / "transformer" / WEIGHTS, outside)
    (ck / "transformer" / WEIGHTS).symlink_to(outside)
    with pytest.raises(CheckpointError, match=r"weight file .* is a symbolic link to .*elsewhere.safetensors, outside"):
        Engine.load(ck)


def test_a_component_folder_linked_from_outside_is_refused(ckpt_factory, tmp_path):
    ck = copy_ckpt(ckpt_factory("rope"), tmp_path / "ck")
    shutil.move(ck / "transformer", tmp_path / "other-transformer")
    (ck / "transformer").symlink_to(tmp_path / "other-transformer", target_is_directory=True)
    with pytest.raises(CheckpointError, match=r"component folder .*transformer is a symbolic link to .*other-transformer"):
        Engine.load(ck)


def test_a_shard_linked_from_outside_is_refused(ckpt_factory, tmp_path):
    ck = copy_ckpt(ckpt_factory("rope", shard=True), tmp_path / "ck")
    shard = sorted((ck / "transformer").glob("*-of-*.safetensors"))[1]
    shutil.move(shard, tmp_path / shard.name)
    shard.symlink_to(tmp_path / shard.name)
    with pytest.raises(CheckpointError, match=rf"weight file .*{shard.name} is a symbolic link"):
        Engine.load(ck)


def test_hugging_face_cache_links_are_followed(ckpt_factory, tmp_path):
    """The hub cache layout: snapshots/<rev>/<component>/<file> links to ../../../blobs/<hash>."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = copy_ckpt(ckpt_factory("rope"), repo / "snapshots" / "abc123")
    (repo / "blobs").mkdir()
    for f in sorted(snap.rglob("*.safetensors")):
        blob = repo / "blobs" / f"{abs(hash(str(f))):x}"
        shutil.move(f, blob)
        f.symlink_to(os.path.relpath(blob, f.parent))
    ref = Engine.load(ckpt_factory("rope")).generate(**small_call()).latents
    torch.testing.assert_close(Engine.load(snap).generate(**small_call()).latents, ref, rtol=0, atol=0)


def test_nan_transformer_weights_are_a_load_error(ckpt_factory, tmp_path):
    ck = copy_ckpt(ckpt_factory("rope"), tmp_path / "ck")
    f = ck / "transformer" / WEIGHTS  # a private copy (copy_ckpt copies the files)
    t = load_file(str(f))
    t["proj_out.weight"][0, 0] = float("nan")
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensor 'proj_out.weight' holds NaN or inf values"):
        Engine.load(ck)


# ---------------------------------------------------------------- LoRA
def test_bf16_fuse_and_unfuse_restore_the_weights_exactly(ckpt_factory, tmp_path):
    engine = Engine.load(ckpt_factory("rope"), dtype="bfloat16")
    before = {k: v.clone() for k, v in engine.transformer.state_dict().items()}
    base = engine.generate(**small_call()).latents
    engine.load_lora(_lora_file(engine, tmp_path / "l.safetensors"), adapter_name="a", scale=0.9)
    for _ in range(2):
        engine.fuse_lora()
        assert not torch.equal(engine.transformer.proj_out.weight, before["proj_out.weight"])
        engine.unfuse_lora()
    after = engine.transformer.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    engine.delete_adapters("a")
    torch.testing.assert_close(engine.generate(**small_call()).latents, base, rtol=0, atol=0)


def test_set_adapters_takes_numpy_numbers_and_refuses_repeated_names(ckpt_factory, tmp_path):
    engine = Engine.load(ckpt_factory("rope"))
    engine.load_lora(_lora_file(engine, tmp_path / "a.safetensors"), adapter_name="a")
    engine.load_lora(_lora_file(engine, tmp_path / "b.safetensors", seed=1), adapter_name="b")
    engine.set_adapters(["a", "b"], [np.float32(0.5), np.float64(0.25)])
    assert engine.lora.active == {"a": 0.5, "b": 0.25}
    engine.set_adapters("a", np.float32(0.75))
    assert engine.lora.active == {"a": 0.75}
    with pytest.raises(LoraError, match=r"set_adapters got 'a' more than once"):
        engine.set_adapters(["a", "a"], [0.5, 0.5])
    with pytest.raises(LoraError, match=r"must be a finite number"):
        engine.set_adapters("a", np.bool_(True))


# ---------------------------------------------------------------- inputs, hints and limits
def test_a_list_of_pil_images_is_one_image_per_prompt(ckpt_factory):
    i2v = guard(Engine.load(ckpt_factory("learned")))
    ims = [Image.new("RGB", (80, 48), c) for c in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    args = dict(num_frames=9, height=48, width=80, num_inference_steps=1)
    try:
        with pytest.raises(AssertionError, match="heavy work started"):  # accepted: the model is reached
            i2v.generate(["a", "b"], image=ims[:2], **args)
        with pytest.raises(ValueError, match=r"image is a list of 3 but there are 2 prompt"):
            i2v.generate(["a", "b"], image=ims, **args)
    finally:
        unguard(i2v)


def test_the_num_frames_hint_is_a_value_in_range(ckpt_factory):
    engine = guard(Engine.load(ckpt_factory("rope")))
    try:
        with pytest.raises(ValueError, match=r"from 1 to 4097 \(got 1000000001\); try 4097$"):
            engine.generate(**small_call(num_frames=10**9 + 1))
    finally:
        unguard(engine)


@pytest.mark.parametrize("bad", [0, -5, 1.5, True])
def test_max_shard_bytes_must_be_positive(ckpt_factory, tmp_path, bad):
    with pytest.raises(ValueError, match=r"max_shard_bytes must be a positive integer number of bytes"):
        export_quantized(ckpt_factory("rope"), "int8wo", tmp_path / "q", max_shard_bytes=bad)
    assert not (tmp_path / "q").exists()


def test_make_tiny_onto_a_full_folder_suggests_no_missing_flag(tmp_path, capsys):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x").write_text("x")
    assert main(["make-tiny", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "already exists and is not empty" in err and "--overwrite" not in err


# ---------------------------------------------------------------- the CLI checks flags before the work
@pytest.fixture
def no_load(monkeypatch):
    monkeypatch.setattr("cogvx.engine.cli.generate.Engine.load", lambda *a, **k: 1 / 0)


def test_compile_cache_dir_without_compile_is_refused(no_load, tmp_path, capsys):
    assert main(["generate", "--prompt", "a", "--out", str(tmp_path / "v.mp4"), "--compile-cache-dir",
                 str(tmp_path / "cache")]) == 2
    assert "--compile-cache-dir applies with --compile only" in capsys.readouterr().err


@pytest.mark.parametrize("read_only", ["p.json", "ro"])
def test_profile_json_not_writable_fails_before_the_work(no_load, tmp_path, capsys, monkeypatch, read_only):
    (tmp_path / "ro").mkdir()
    target = tmp_path / "ro" / "p.json"
    target.write_text("{}")
    # os.access as a non-root user sees a read-only file or folder (root writes through any mode bits)
    monkeypatch.setattr(os, "access", lambda p, mode: not str(p).endswith(read_only))
    assert main(["generate", "--prompt", "a", "--out", str(tmp_path / "v.mp4"), "--profile-json", str(target)]) == 2
    assert "cannot be written (read-only file or directory)" in capsys.readouterr().err


def test_recipes_into_a_closed_pipe_ends_quietly(tmp_path):
    p = subprocess.Popen([sys.executable, "-P", "-m", "cogvx.engine.cli", "recipes"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=cli_env(tmp_path))
    p.stdout.close()  # the reader is gone before the first line: every write is EPIPE
    err = p.communicate(timeout=120)[1].decode()
    assert p.returncode == 0 and "Broken pipe" not in err and "Exception ignored" not in err, err


def test_a_full_disk_under_the_mp4_writer_says_so(monkeypatch, tmp_path):
    real = imageio.v2.get_writer

    def writer(path, *a, **k):
        w = real(path, *a, **k)

        def append(frame, meta=None):  # what imageio-ffmpeg raises when ffmpeg died on ENOSPC
            raise BrokenPipeError(errno.EPIPE, "[Errno 32] Broken pipe\n\nFFMPEG COMMAND:\nffmpeg -y -f rawvideo "
                                  "-vcodec rawvideo ...\n\nFFMPEG STDERR OUTPUT:\nav_interleaved_write_frame(): No "
                                  "space left on device")

        w.append_data = append
        return w

    monkeypatch.setattr(imageio.v2, "get_writer", writer)
    with pytest.raises(VideoWriteError) as e:
        write_mp4(tmp_path / "v.mp4", np.zeros((5, 32, 48, 3), np.float32))
    msg = str(e.value)
    assert f"the disk holding {tmp_path} is full (no space left on device)" in msg and "FFMPEG COMMAND" not in msg
    assert e.value.fallback_path is not None and str(e.value.fallback_path) in msg  # the .npy of the frames
    e.value.fallback_path.unlink()
