"""Commands print nothing of other libraries' import-time noise: no torchao library-load failures (on
a machine without CUDA, where those CUDA kernel libraries cannot matter), no torch Enum deprecation
lines, no "Writing model shards" bar from make-tiny, and bitsandbytes' per-matmul cast warning once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

NOISE = ["is an Enum subclass and is now natively supported by torch.compile", "Writing model shards",
         "Failed to load CPU gemm_4bit_forward"]
if not torch.cuda.is_available():
    NOISE.append("torchao/_C")  # "Failed to load .../torchao/_C_mxfp8...so"


def _cogvx(*argv, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-m", "cogvx.engine.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_recipes_prints_only_its_table():
    r = _cogvx("recipes")
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr
    assert r.stdout.startswith("quantization recipes on")


@pytest.mark.slow
def test_demo_generate_with_bitsandbytes_is_quiet(tmp_path):
    r = _cogvx("generate", "--prompt", "a fox", "--frames", "9", "--height", "32", "--width", "48", "--steps", "2",
               "--seed", "0", "--recipe", "bnb-int8", "--out", str(tmp_path / "v.mp4"),
               env={"COGVX_CACHE": str(tmp_path / "cache")})  # a fresh cache: the demo model is written too
    assert r.returncode == 0, r.stderr
    found = [n for n in NOISE if n in r.stderr]
    assert not found, f"noise on stderr: {found}\n{r.stderr}"
    assert r.stderr.count("MatMul8bitLt: inputs will be cast") == 1  # once, not once per layer and step
    assert "made just now" in r.stderr  # the demo model was written in this run (save_pretrained ran)
