"""Hostile outputs: a full disk under the mp4 writer, two writers of one file, several videos that
cannot be written, bad names and frame rates; quantized exports onto, into or around their source,
concurrent exports, stale temporaries, unwritable targets; and the command line's one-line errors."""

from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path

import imageio.v2
import numpy as np
import pytest
import torch

from cogvx.engine import Engine
from cogvx.engine.cli import main
from cogvx.engine.io.video import VideoWriteError, read_video, write_mp4
from cogvx.engine.pipelines import engine as engine_module
from cogvx.engine.pipelines import quantized_export
from cogvx.engine.pipelines.output import GenerationResult
from cogvx.quantize import RECIPES
from hostile_helpers import copy_ckpt

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _frames(n=5, h=32, w=48, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, h, w, 3), dtype=np.float32)


def _result(videos=1, **kw) -> GenerationResult:
    return GenerationResult(latents=torch.zeros(1), frames=np.stack([_frames(seed=i, **kw) for i in range(videos)]),
                            output_type="np")


@pytest.fixture
def disk_full_after_one_frame(monkeypatch):
    """The mp4 writer stops storing frames after the first, without an error: what a full disk did."""
    real = imageio.v2.get_writer

    def writer(*a, **k):
        w = real(*a, **k)
        store, count = w.append_data, [0]

        def append(frame, meta=None):
            count[0] += 1
            if count[0] == 1:
                store(frame)

        w.append_data = append
        return w

    monkeypatch.setattr(imageio.v2, "get_writer", writer)


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".partial-" in p.name)


# ------------------------------------------------------------------ item 14: video save
def test_full_disk_is_detected_and_the_frames_kept(disk_full_after_one_frame, tmp_path):
    r = _result()
    with pytest.raises(VideoWriteError, match=r"written file holds 1 frames of 48x32, expected 5 .*disk full") as e:
        r.save(tmp_path / "v.mp4")
    assert not (tmp_path / "v.mp4").exists() and not _leftovers(tmp_path)
    fb = e.value.fallback_path
    try:
        assert fb.suffix == ".npy"  # the fallback mp4 was short too: raw frames instead
        np.testing.assert_array_equal(np.load(fb), (r.frames[0] * 255).round().astype(np.uint8))
    finally:
        fb.unlink()


def test_every_video_gets_its_fallback(disk_full_after_one_frame, tmp_path):
    r = _result(videos=3)
    with pytest.raises(VideoWriteError) as e:
        r.save(tmp_path / "v.mp4", all_videos=True)
    fbs = e.value.fallback_paths
    try:
        assert len(fbs) == 3 and len(set(fbs)) == 3 and e.value.written == []
        for i, fb in enumerate(fbs):
            assert str(fb) in str(e.value)
            np.testing.assert_array_equal(np.load(fb), (r.frames[i] * 255).round().astype(np.uint8))
    finally:
        for fb in fbs:
            fb.unlink()


def test_one_failing_video_of_several(tmp_path):
    r = _result(videos=2)
    (tmp_path / "v_1.mp4").mkdir()  # the second target cannot be replaced
    with pytest.raises(VideoWriteError) as e:
        r.save(tmp_path / "v.mp4", all_videos=True)
    try:
        assert e.value.written == [tmp_path / "v_0.mp4"] and read_video(tmp_path / "v_0.mp4").shape == (5, 32, 48, 3)
        assert len(e.value.fallback_paths) == 1 and read_video(e.value.fallback_path).shape == (5, 32, 48, 3)
    finally:
        e.value.fallback_path.unlink()


def test_a_file_where_the_directory_should_be(tmp_path):
    """What a read-only or vanished target looks like to root (which ignores permission bits)."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(VideoWriteError, match="saved to") as e:
        _result().save(tmp_path / "afile" / "v.mp4")
    assert read_video(e.value.fallback_path).shape == (5, 32, 48, 3)
    e.value.fallback_path.unlink()


def test_two_writers_of_one_path_never_mix(tmp_path):
    """Each write has its own temporary: the file that stays is one whole video of the two."""
    a, b = _frames(9, 32, 48, 0), _frames(5, 64, 32, 1)
    errors = []

    def write(frames):
        try:
            for _ in range(3):
                write_mp4(tmp_path / "v.mp4", frames)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(f,)) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert read_video(tmp_path / "v.mp4").shape in ((9, 32, 48, 3), (5, 64, 32, 3))
    assert os.listdir(tmp_path) == ["v.mp4"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(path="v.avi"), r"must end in .mp4: cogvx writes H.264 mp4 only"),
    (dict(path="v"), r"must end in .mp4"),
    (dict(path="v.mp4.npy"), r"must end in .mp4"),
    (dict(fps=0), r"fps must be a number in \(0, 1000\]"),
    (dict(fps=-8), r"fps must be a number in \(0, 1000\]"),
    (dict(fps=float("nan")), r"fps must be a number"),
    (dict(fps=float("inf")), r"fps must be a number"),
    (dict(fps="8"), r"fps must be a number"),
    (dict(fps=True), r"fps must be a number"),
    (dict(fps=10**6), r"fps must be a number in \(0, 1000\]"),
    (dict(fps=torch.tensor(8.0)), r"fps must be a number"),
])
def test_save_checks_name_and_fps_before_writing(tmp_path, kwargs, message):
    kwargs = {"path": "v.mp4", **kwargs}
    with pytest.raises(ValueError, match=message):
        _result().save(tmp_path / kwargs.pop("path"), **kwargs)
    assert os.listdir(tmp_path) == []


def test_save_to_a_directory_and_latent_results(tmp_path):
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        _result().save(tmp_path / "d.mp4")
    with pytest.raises(ValueError, match="holds latents only"):
        GenerationResult(latents=torch.zeros(1)).save(tmp_path / "x.mp4")
    assert _result().save(tmp_path / "ok.mp4", fps=np.float32(12.5))[0].is_file()


def test_cli_full_disk_exit_status_and_no_wrote(disk_full_after_one_frame, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COGVX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "v.mp4"
    rc = main(["generate", "--prompt", "x", "--frames", "5", "--height", "16", "--width", "16", "--steps", "1",
               "--seed", "3", "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 1 and "wrote" not in cap.out and not out.exists()
    assert "saved to" in cap.err and "seed: 3" in cap.err
    Path(cap.err.split("saved to ")[1].split(" instead")[0]).unlink()


# ------------------------------------------------------------------ item 15: quantized exports
@pytest.fixture(scope="module")
def world(ckpt_factory, tmp_path_factory):
    """A source checkpoint among unrelated files, and an int8wo engine loaded from it."""
    root = tmp_path_factory.mktemp("world")
    src = copy_ckpt(ckpt_factory("rope"), root / "models" / "src")
    (root / "models" / "keep.txt").write_text("unrelated")
    return root, src, Engine.load(src, recipe="int8wo")


def _intact(root: Path, src: Path) -> None:
    assert (root / "models" / "keep.txt").read_text() == "unrelated"
    assert sorted(p.name for p in src.iterdir()) == ["model_index.json", "scheduler", "text_encoder", "tokenizer",
                                                     "transformer", "vae"]
    assert (src / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size > 1000


@pytest.mark.parametrize("target, message", [
    ("{src}", "onto itself"),
    ("{src}/..", "contains the source checkpoint .* \\(overwrite=True would delete it\\)"),
    ("{src}/../..", "contains the source checkpoint"),
    ("{src}/transformer", "is inside the source checkpoint"),
    ("{src}/new/deeper", "is inside the source checkpoint"),
    ("{link}", "onto itself"),
    ("{link}/vae", "is inside the source checkpoint"),
])
def test_outputs_on_in_or_around_the_source_are_refused(world, target, message):
    root, src, eng = world
    link = root / "link"
    if not link.exists():
        link.symlink_to(src)
    out = target.format(src=src, link=link)
    with pytest.raises(ValueError, match=message):
        eng.save_quantized(out, overwrite=True)
    _intact(root, src)


def test_cli_quantize_into_the_source_is_one_line(world, capsys):
    root, src, _ = world
    rc = main(["quantize", "--model", str(src), "--recipe", "int8wo", "--out", str(src.parent), "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "contains the source" in err
    _intact(root, src)


def test_the_copy_shares_no_editable_file_with_the_source(world, tmp_path):
    root, src, eng = world
    out = eng.save_quantized(tmp_path / "q")
    cfg = out / "scheduler" / "scheduler_config.json"
    with open(cfg, "a") as fh:  # an in-place edit of the copy
        fh.write("\n")
    assert (src / "scheduler" / "scheduler_config.json").read_text() != cfg.read_text()
    for rel in ("vae/config.json", "tokenizer/spiece.model", "model_index.json", "text_encoder/config.json"):
        assert not os.path.samefile(src / rel, out / rel), rel
    vae_w = next((src / "vae").glob("*.safetensors"))
    assert os.path.samefile(vae_w, out / "vae" / vae_w.name)  # weights: linked (never edited in place)
    _intact(root, src)


def test_concurrent_exports_to_one_new_directory(world, tmp_path):
    _, _, eng = world
    results, barrier = [], threading.Barrier(2)

    def export():
        barrier.wait()
        try:
            results.append(eng.save_quantized(tmp_path / "q"))
        except FileExistsError as e:
            results.append(e)

    threads = [threading.Thread(target=export) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(type(r).__name__ for r in results) == ["FileExistsError", "PosixPath"], results
    assert os.listdir(tmp_path) == ["q"]
    Engine.load(tmp_path / "q")  # the one that won is complete


def test_stale_temporaries_are_removed_live_ones_kept(world, tmp_path):
    _, _, eng = world
    dead, live = tmp_path / ".q.partial-999999999-abcd1234", tmp_path / ".q.partial-1-abcd1234"
    dead.mkdir()
    live.mkdir()
    eng.save_quantized(tmp_path / "q")
    assert not dead.exists() and live.is_dir()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EFBIG])
def test_full_disk_or_read_only_target_is_one_clear_error(world, tmp_path, monkeypatch, err):
    _, _, eng = world
    real = shutil.copyfile

    def copyfile(a, b, **k):
        if str(b).endswith("config.json"):
            raise OSError(err, os.strerror(err))
        return real(a, b, **k)

    monkeypatch.setattr(quantized_export.shutil, "copyfile", copyfile)
    with pytest.raises(OSError, match=rf"cannot write the checkpoint to {tmp_path / 'q'}: {os.strerror(err)}; "
                                      "nothing was left behind") as e:
        eng.save_quantized(tmp_path / "q")
    assert e.value.errno == err and os.listdir(tmp_path) == []


def test_output_under_a_file_is_one_clear_error(world, tmp_path):
    _, _, eng = world
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError, match="afile"):
        eng.save_quantized(tmp_path / "afile" / "q")
    assert (tmp_path / "afile").read_text() == "x"


# ------------------------------------------------------------------ the command line: one line, exit 2
@pytest.mark.parametrize("argv, message", [
    (["recipes", "--device", "tpu"], "is not a device name"),
    (["recipes", "--device", "cuda:x"], "is not a device name"),
    (["make-tiny", "--out", "{tmp}/afile/x"], "afile"),
    (["generate", "--prompt", "x", "--model", "{tmp}/afile", "--out", "{tmp}/v.mp4"], "is a file"),
    (["generate", "--prompt", "x", "--height", "100000000", "--out", "{tmp}/v.mp4"], "height must be"),
    (["generate", "--prompt", "x", "--frames", "1000000001", "--out", "{tmp}/v.mp4"], "num_frames must be"),
    (["generate", "--prompt", "x", "--fps", "0", "--out", "{tmp}/v.mp4"], "fps must be"),
    (["generate", "--prompt", "x", "--fps", "nan", "--out", "{tmp}/v.mp4"], "fps must be"),
    (["generate", "--prompt", "x", "--out", "{tmp}/afile/v.mp4"], "does not exist"),
    (["generate", "--prompt", "x", "--seed", "-1", "--steps", "1", "--frames", "1", "--height", "16", "--width", "16",
      "--out", "{tmp}/v.mp4"], "seed must be"),
    (["generate", "--prompt", "x", "--image", "{tmp}", "--out", "{tmp}/v.mp4"], "is not a file"),
    (["quantize", "--model", "{tmp}/none", "--recipe", "int8wo", "--out", "{tmp}/q"], "does not exist"),
    (["quantize", "--model", "{tmp}", "--recipe", "nope", "--out", "{tmp}/q"], "unknown quantization recipe"),
])
def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setenv("COGVX_CACHE", str(tmp_path / "cache"))
    (tmp_path / "afile").write_text("x")
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err and err[-1].startswith("error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_recipes_for_a_device_this_machine_lacks(capsys):
    """It used to assert; now every row says why the recipe does not run here."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["recipes", "--device", "cuda"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == len(RECIPES) and all(" no " in r and "no CUDA device" in r for r in rows), rows


def test_unwritable_caches_fail_before_any_weight_loads(tmp_path, monkeypatch, capsys, ckpt_factory):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(engine_module, "load_components", lambda *a, **k: pytest.fail("weights loaded first"))
    with pytest.raises(ValueError, match="compile cache .*afile.* cannot be created"):
        Engine.load(ckpt_factory("rope"), compile=True, compile_cache_dir=tmp_path / "afile" / "c")
    monkeypatch.setenv("COGVX_CACHE", str(tmp_path / "afile"))  # the demo model's home is a file
    rc = main(["generate", "--prompt", "x", "--out", str(tmp_path / "v.mp4")])
    assert rc == 2 and "afile" in capsys.readouterr().err
    monkeypatch.delenv("COGVX_CACHE")
    monkeypatch.setenv("COGVX_COMPILE_CACHE", str(tmp_path / "afile"))
    rc = main(["generate", "--model", str(ckpt_factory("rope")), "--compile", "--prompt", "x", "--out",
               str(tmp_path / "v.mp4")])
    assert rc == 2 and "compile cache" in capsys.readouterr().err


def test_keyboard_interrupt_is_exit_130(monkeypatch, capsys, tmp_path):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "load", interrupted)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "v.mp4")]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_smallest_video_still_writes(tmp_path):
    """1 frame of 16x16 (the smallest the checks allow) round-trips."""
    assert write_mp4(tmp_path / "one.mp4", _frames(1, 16, 16)).is_file()
    assert read_video(tmp_path / "one.mp4").shape == (1, 16, 16, 3)


def test_a_trace_that_cannot_be_written_keeps_the_result(world, tmp_path):
    """torch's trace exporter fails silently; the call says so and still returns the generation."""
    _, _, eng = world
    d = tmp_path / "traces"
    d.mkdir()

    def remove_dir(*a):
        shutil.rmtree(d, ignore_errors=True)

    with pytest.warns(RuntimeWarning, match=r"could not write the profile trace to .*trace.json; the result is returned"):
        r = eng.generate(prompt="a cat", num_frames=1, height=16, width=16, num_inference_steps=1, seed=0,
                         output_type="latent", profile_trace=d / "trace.json", callback_on_step_end=remove_dir)
    assert bool(torch.isfinite(r.latents).all())


def test_a_cache_the_engine_chose_earlier_is_not_taken_for_the_users(tmp_path, monkeypatch):
    """Once a compile has pointed TORCHINDUCTOR_CACHE_DIR at the cogvx cache, that value is the engine's,
    not the user's: a later $COGVX_COMPILE_CACHE still decides (and an unusable one still fails)."""
    from cogvx.engine.runtime import compiling

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setattr(compiling, "_set_by_us", {})
    assert compiling.use_cache_dir(tmp_path / "first") == tmp_path / "first"
    monkeypatch.setenv("COGVX_COMPILE_CACHE", str(tmp_path / "env"))
    assert compiling.use_cache_dir(None) == tmp_path / "env"
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("COGVX_COMPILE_CACHE", str(tmp_path / "afile"))
    with pytest.raises(ValueError, match="afile"):
        compiling.use_cache_dir(None)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "users"))  # the user's own setting wins
    assert compiling.use_cache_dir(None) == tmp_path / "users"
    assert compiling.use_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert compiling.use_cache_dir(None) == tmp_path / "users"  # and is remembered after an explicit path
