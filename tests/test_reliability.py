"""What a new user following the README hits: the demo model with VAE tiling, odd frame sizes, the
compile cache location in a fresh process, default devices, the profile's total, file modes under
the user's umask, frame counts that do not come out exact, a fast --help, the seed of a video, and
messages that cite nothing outside the repository."""

from __future__ import annotations

import inspect
import os
import re
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import readme_examples
from cogvx.engine import Engine
from cogvx.engine.cli import main
from cogvx.engine.dev.tiny import TINY_VERSION, make_tiny_checkpoint
from cogvx.engine.io import video as video_io
from cogvx.engine.io.video import VideoWriteError, read_video, write_mp4
from cogvx.engine.models.config import VAEConfig
from cogvx.engine.models.vae import CogVideoXVAE
from cogvx.engine.pipelines.request import FrameCountWarning
from cogvx.engine.runtime import devices
from hostile_helpers import REPO, cli_env, small_call

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The make-tiny checkpoint (what the demo model and the README examples use)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def tiny_engine(tiny):
    return Engine.load(tiny)


def _child(code: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=timeout)


# ------------------------------------------------------------------ 1: VAE tiling of the demo model, odd sizes
@pytest.mark.parametrize("lh, lw", [(12, 16), (7, 9), (13, 21)])
def test_tiny_vae_tiles_decode_whole_8x_frames(lh, lw):
    """Tiles of the demo model's VAE stride by whole latent pixels: a tiled decode is exactly 8x."""
    vae = CogVideoXVAE(VAEConfig.tiny()).eval()
    vae.enable_tiling()
    out = vae.decode(torch.randn(1, 4, 1, lh, lw, generator=torch.Generator().manual_seed(0)))
    assert tuple(out.shape[-2:]) == (8 * lh, 8 * lw)


def test_demo_generate_with_vae_tiling_writes_the_requested_size(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COGVX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo.mp4"
    assert main(["generate", "--prompt", "a fox", "--vae-tiling", "--steps", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert read_video(out).shape == (9, 96, 128, 3)  # the demo defaults, decoded in tiles
    seed = int(re.search(r"seed (\d+)\)", printed).group(1))  # item 9: the seed drawn is printed
    assert 0 <= seed < 2**64 and (tmp_path / "cache" / f"tiny-random-v{TINY_VERSION}").is_dir()


def test_odd_frame_sizes_are_padded_to_even_with_a_warning(tmp_path):
    y, x = np.mgrid[0:105, 0:138]
    frames = np.stack([np.stack([y / 105, x / 138, (x + y + 20 * f) % 97 / 97], -1) for f in range(5)]).astype(np.float32)
    with pytest.warns(UserWarning, match=r"frames are 138x105; H.264 needs even sizes, so the mp4 is padded to 138x106"):
        write_mp4(tmp_path / "odd.mp4", frames)
    back = read_video(tmp_path / "odd.mp4")
    assert back.shape == (5, 106, 138, 3)
    err = np.abs(back[:, :105].astype(np.float32) - (frames * 255).round()).mean()
    assert err < 6  # lossy H.264, but the picture is the frames', not a blank or shifted one


# ------------------------------------------------------------------ 2: the compile cache, in fresh processes
def test_compile_cache_location_in_a_fresh_process(tiny, tmp_path):
    """torch sets TORCHINDUCTOR_CACHE_DIR to its own default when torch._inductor is imported; that is
    not the user's choice. Inductor's own resolver (cache_dir) must name the cogvx cache."""
    env = cli_env(tmp_path)
    code = f"""
        import os, torch._inductor  # what importing the engine's dependencies does first
        from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir
        from cogvx.engine import Engine
        torch_default = default_cache_dir()
        seen = {{}}
        Engine.load({str(tiny)!r}, compile=True)
        seen["default"] = cache_dir()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = torch_default  # as a fresh import leaves it
        os.environ["COGVX_COMPILE_CACHE"] = {str(tmp_path / 'env-cache')!r}
        Engine.load({str(tiny)!r}, compile=True)
        seen["env"] = cache_dir()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = {str(tmp_path / 'user-inductor')!r}  # the user's own setting wins
        Engine.load({str(tiny)!r}, compile=True)
        seen["user"] = cache_dir()
        Engine.load({str(tiny)!r}, compile=True, compile_cache_dir={str(tmp_path / 'explicit')!r})
        seen["explicit"] = cache_dir()
        seen["torch_default"] = torch_default
        print("SEEN " + repr(seen))
    """
    r = _child(code, env)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = eval(r.stdout.split("SEEN ", 1)[1])
    assert seen["default"] == str(tmp_path / "home" / ".cache" / "cogvx" / "inductor"), seen
    assert seen["env"] == str(tmp_path / "env-cache")
    assert seen["user"] == str(tmp_path / "user-inductor")
    assert seen["explicit"] == str(tmp_path / "explicit")
    assert all(Path(seen[k]).is_dir() for k in ("default", "env", "explicit"))


def test_cli_compile_cache_flag_reaches_the_engine(monkeypatch, tmp_path):
    got = {}

    def load(*a, **k):
        got.update(k)
        raise KeyboardInterrupt  # stop here: only the arguments matter

    monkeypatch.setattr(Engine, "load", load)
    main(["generate", "--model", str(tmp_path), "--prompt", "x", "--compile", "--compile-cache-dir",
          str(tmp_path / "cc"), "--out", str(tmp_path / "v.mp4")])
    assert got["compile"] is True and got["compile_cache_dir"] == str(tmp_path / "cc")


@pytest.mark.slow
def test_cli_compile_writes_into_the_cache_dir_given(tmp_path):
    """`cogvx generate --compile --compile-cache-dir D` in a fresh process: inductor's compiled graphs
    land in D, none in torch's default (under the process's TMPDIR), which only gets the precompiled
    C++ headers torch always puts there (its codecache fixes that path at import)."""
    env = cli_env(tmp_path, COGVX_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-P", "-m", "cogvx.engine.cli", "generate", "--prompt", "x", "--compile",
                        "--compile-cache-dir", str(tmp_path / "cc"), "--frames", "1", "--height", "16", "--width",
                        "16", "--steps", "1", "--out", str(tmp_path / "v.mp4")], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    kernels = [p for p in (tmp_path / "cc").rglob("*") if p.suffix in (".cpp", ".so", ".py")]
    assert kernels, sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "cc").rglob("*"))
    assert {p.name for p in (tmp_path / "tmp").glob("torchinductor_*/*")} <= {"precompiled_headers"}


# ------------------------------------------------------------------ 3: defaults that work, README examples
def test_device_none_means_cuda_when_available(monkeypatch, tiny):
    for fn in (Engine.load, Engine.from_preset):
        assert inspect.signature(fn).parameters["device"].default is None
    assert Engine.load(tiny).device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices.resolve_device(None) == torch.device("cuda", 0)
    assert devices.default_device() == "cuda"


FIXTURE_README = '''# demo

```
python -m pip install -e . && cogvx make-tiny --out tiny
```

Some prose with `cogvx generate --model /path/to/x` inline: not run.

```python
from cogvx.engine import Engine
engine = Engine.load("tiny")
result = engine.generate("a fox", num_frames=1, height=16, width=16, num_inference_steps=1)
```

## Kernels

```python
# needs CUDA: compiled here, not run
engine = Engine.load("tiny", device="cuda")
raise SystemExit("a needs-CUDA block ran")
```

```python
assert result.frames.shape == (1, 1, 16, 16, 3), result.frames.shape
print("frames", result.frames.shape)
```

```
python -P -m pytest -q
```
'''


def test_readme_runner_parses_blocks_and_marks():
    bs = readme_examples.blocks(FIXTURE_README)
    assert [(b.kind, b.needs_cuda, b.heading) for b in bs] == [
        ("shell", False, "demo"), ("python", False, "demo"), ("python", True, "Kernels"), ("python", False, "Kernels"),
        ("shell", False, "Kernels")]
    py = "/usr/bin/python3"
    assert readme_examples.shell_commands(bs[0], False, py) == [f"{py} -P -m cogvx.engine.cli make-tiny --out tiny"]
    assert readme_examples.shell_commands(bs[0], True, py) == [
        f"{py} -m pip install -e . && {py} -P -m cogvx.engine.cli make-tiny --out tiny"]
    assert readme_examples.shell_commands(bs[4], False, py) == []  # the test command is never run here


def test_readme_runner_runs_a_fixture_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(FIXTURE_README)
    code, out = readme_examples.run(readme)
    assert code == 0 and "ALL OK" in out, out[-3000:]
    assert "frames (1, 1, 16, 16, 3)" in out and "a needs-CUDA block ran" not in out


@pytest.mark.parametrize("text, expect", [
    ("```python\n# needs CUDA\nraise SystemExit(\n```\n", "FAILED line 1 (top): SyntaxError"),
    ("# Try\n```\ncogvx make-tiny\n```\n", "FAILED line 2 (Try): SystemExit: exit status 2"),
    ("```python\nx = 1\n```\n## Use\n```python\nassert x == 2, 'boom'\n```\n", "FAILED line 5 (Use): AssertionError: boom"),
])
def test_readme_runner_names_the_failing_block(tmp_path, text, expect):
    (tmp_path / "README.md").write_text(text)
    code, out = readme_examples.run(tmp_path / "README.md")
    assert code == 1 and expect in out, out[-3000:]


@pytest.mark.slow
def test_the_readme_examples_run_as_written():
    """The real README, as a new user runs it: its first command, then every Python block (those
    marked "needs CUDA" are compiled only on a machine without CUDA)."""
    code, out = readme_examples.run(REPO / "README.md")
    assert code == 0, out[-4000:]


# ------------------------------------------------------------------ 6: the profile's total includes save
def test_profile_total_includes_save(tiny_engine, tmp_path, monkeypatch):
    r = tiny_engine.generate(**small_call())
    before = r.profile.total_seconds
    real = video_io._write

    def slow_write(*a, **k):
        time.sleep(0.3)
        return real(*a, **k)

    monkeypatch.setattr(video_io, "_write", slow_write)
    r.save(tmp_path / "v.mp4")
    p = r.profile
    assert p.stages["save"] >= 0.3 and p.total_seconds == pytest.approx(before + p.stages["save"])
    assert sum(p.stages.values()) <= p.total_seconds + 1e-6
    assert p.table().index("save") < p.table().index("total")


# ------------------------------------------------------------------ 7: files follow the user's umask
@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def _modes(root: Path) -> set[tuple[str, int]]:
    """(kind, mode) of what was created under ``root`` (hard links to a source's weights keep its mode)."""
    return {("d" if p.is_dir() else "f", stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")]
            if p.is_dir() or p.stat().st_nlink == 1}


def test_written_files_follow_the_umask(umask_027, tmp_path, quantized_ckpt):
    tiny_dir = make_tiny_checkpoint(tmp_path / "tiny")
    assert _modes(tiny_dir) == {("d", 0o750), ("f", 0o640)}
    out = Engine.load(quantized_ckpt).save_quantized(tmp_path / "q")
    assert _modes(out) == {("d", 0o750), ("f", 0o640)}
    frames = np.zeros((1, 16, 16, 3), np.float32)
    assert stat.S_IMODE(write_mp4(tmp_path / "v.mp4", frames).stat().st_mode) == 0o640
    with pytest.raises(VideoWriteError) as e:
        write_mp4(tmp_path / "gone" / "v.mp4", frames)
    assert stat.S_IMODE(e.value.fallback_path.stat().st_mode) == 0o640
    e.value.fallback_path.unlink()


# ------------------------------------------------------------------ 8: frame counts that do not come out exact
@pytest.mark.parametrize("frames, latent, out, near", [(13, 4, 16, "9 or 17"), (5, 2, 8, "1 or 9"),
                                                       (21, 6, 24, "17 or 25")])
def test_frame_count_warning_says_what_comes_out(tiny_engine, frames, latent, out, near):
    with pytest.warns(FrameCountWarning, match=rf"num_frames={frames} gives {latent} latent frames, an even count: "
                                               rf"the VAE decodes them to {out} frames .* e.g. {near}"):
        r = tiny_engine.generate(**small_call(num_frames=frames))
    assert r.frames.shape[1] == out


def test_exact_frame_counts_say_nothing(tiny_engine):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrameCountWarning)
        assert tiny_engine.generate(**small_call(num_frames=9)).frames.shape[1] == 9
        tiny_engine.generate(**small_call(num_frames=13, output_type="latent"))  # nothing decoded: no warning


# ------------------------------------------------------------------ 9: a fast --help, and the seed of a video
def test_help_and_recipes_import_only_what_they_need(tmp_path):
    code = """
        import contextlib, io, sys
        from cogvx.engine.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                main(["--help"])
            except SystemExit:
                pass
        print("HELP", sorted(m for m in ("torch", "transformers", "diffusers") if m in sys.modules))
        with contextlib.redirect_stdout(io.StringIO()):
            main(["recipes"])
        heavy = ("transformers", "diffusers", "torchao", "optimum.quanto", "bitsandbytes", "cogvx.engine.pipelines",
                 "torch._inductor", "triton")
        print("RECIPES", sorted(m for m in heavy if m in sys.modules))
    """
    r = _child(code, cli_env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "HELP []" in r.stdout and "RECIPES []" in r.stdout, r.stdout


def test_the_seed_drawn_is_stored_and_reproduces_the_video(tiny_engine):
    first = tiny_engine.generate(**small_call(seed=None, output_type="latent"))
    assert isinstance(first.seed, int)
    again = tiny_engine.generate(**small_call(seed=first.seed, output_type="latent"))
    assert torch.equal(first.latents, again.latents) and again.seed == first.seed
    other = tiny_engine.generate(**small_call(seed=None, output_type="latent"))
    assert other.seed != first.seed and not torch.equal(other.latents, first.latents)
    assert tiny_engine.generate(**small_call(seed=None, generator=torch.Generator().manual_seed(1),
                                             output_type="latent")).seed is None


# ------------------------------------------------------------------ 4, 10: messages cite nothing outside the repo
def test_no_message_points_outside_the_repository():
    """No design-note section numbers, no "the" + "issue", no retired hub command in the sources,
    docs and tests (the two test files that check for them aside)."""
    patterns = re.compile("|".join(["DESIGN " + "§", "§" + r"\s*\d", r"\bthe " + "issue", "huggingface" + "-cli"]))
    bad = []
    for folder in ("engine", "kernels", "quantize", "benchmarks", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            if path.name in ("test_kernels_policy.py", "test_reliability.py"):
                continue
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if patterns.search(line):
                    bad.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    for name in ("README.md", "pyproject.toml"):
        text = (REPO / name).read_text(encoding="utf-8")
        bad += [f"{name}: {m.group(0)}" for m in patterns.finditer(text)]
    assert not bad, "\n".join(bad)

