"""Several processes (issue 20, items 8 and 9), two gloo ranks on the CPU with hard time limits: ranks
that loaded different weights under one configuration are refused at load (a fingerprint of the files'
contents, not only the configs), an identical copy by another path is accepted, and a rank frozen with
SIGSTOP (before its generate, or inside the denoising loop) makes the other fail within
$COGVX_PARALLEL_TIMEOUT instead of waiting forever."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cogvx.engine.parallel import checkpoint_digest
from cogvx.engine.parallel.groups import parallel_timeout
from parallel_worker import TESTS, _free_port, spawn_ranks

GEN = dict(prompt="a fox", negative_prompt="blurry", num_frames=1, height=16, width=16, num_inference_steps=2,
           guidance_scale=6.0, seed=0, output_type="latent")
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def _changed_copy(src: Path, dst: Path) -> Path:
    """A full copy of ``src`` whose proj_out.weight differs (same configs, same file size)."""
    shutil.copytree(src, dst)
    t = load_file(str(dst / WEIGHTS))
    t["proj_out.weight"] = t["proj_out.weight"] + 0.25
    save_file(t, str(dst / WEIGHTS), metadata={"format": "pt"})
    return dst


def test_the_checkpoint_digest_sees_one_changed_weight(ckpt_factory, tmp_path):
    src = ckpt_factory("rope")
    same = shutil.copytree(src, tmp_path / "same")
    other = _changed_copy(src, tmp_path / "other")
    assert checkpoint_digest(same) == checkpoint_digest(src) != checkpoint_digest(other)
    big = tmp_path / "big"  # a large file goes through the block sums: one flipped byte in the middle shows
    shutil.copytree(src, big)
    blob = bytearray(os.urandom(9 << 20))
    (big / "transformer" / "extra.bin").write_bytes(bytes(blob))
    before = checkpoint_digest(big)
    blob[len(blob) // 2] ^= 1
    (big / "transformer" / "extra.bin").write_bytes(bytes(blob))
    assert checkpoint_digest(big) != before


@pytest.mark.parametrize("value", ["0", "-3", "nan", "soon"])
def test_a_bad_timeout_setting_is_refused(monkeypatch, value):
    monkeypatch.setenv("COGVX_PARALLEL_TIMEOUT", value)
    with pytest.raises(ValueError, match="COGVX_PARALLEL_TIMEOUT must be a number of seconds > 0"):
        parallel_timeout()


def _case(name, ckpt, **extra):
    return dict(name=name, ckpt=str(ckpt), load=dict(parallel="cfg"), generate=dict(GEN), **extra)


@pytest.mark.slow
def test_ranks_that_loaded_different_weights_are_refused(ckpt_factory, tmp_path):
    rope = ckpt_factory("rope")
    changed = _changed_copy(rope, tmp_path / "changed")
    copy = shutil.copytree(rope, tmp_path / "copy")
    cases = [_case("weights-differ", rope, rank_overrides={"1": {"ckpt": str(changed)}}),
             _case("same-contents", rope, rank_overrides={"1": {"ckpt": str(copy)}})]
    out = tmp_path / "out"
    spawn_ranks(2, dict(cases=cases), out, timeout=240)
    for rank in (0, 1):
        bad = json.loads((out / f"weights-differ.rank{rank}.json").read_text())
        assert "disagree on the arguments of Engine.load: model (rank 1 differs from rank 0)" in bad["error"]
        assert json.loads((out / f"same-contents.rank{rank}.json").read_text())["error"] is None


def _spawn(job: dict, out: Path, env: dict) -> list[subprocess.Popen]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.json").write_text(json.dumps(dict(job, out=str(out))))
    port = _free_port()
    return [subprocess.Popen([sys.executable, "-P", str(TESTS / "parallel_worker.py"), str(out / "job.json")],
                             env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", **env),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("at", ["generate", "step"])
def test_a_frozen_rank_makes_the_other_fail_within_the_timeout(ckpt_factory, tmp_path, at):
    out = tmp_path / "out"
    procs = _spawn(dict(cases=[_case(f"frozen-{at}", ckpt_factory("rope"), freeze=dict(rank=1, at=at))]), out,
                   dict(COGVX_PARALLEL_TIMEOUT="4"))
    try:
        log = procs[0].communicate(timeout=180)[0]  # load (a few s) + the 4 s bound + exit; never 30 minutes
        assert procs[0].returncode == 0, log[-3000:]
        assert procs[1].poll() is None  # still there, stopped: it never answered
        record = json.loads((out / f"frozen-{at}.rank0.json").read_text())
        assert "rank 0 waited longer than 4 s, $COGVX_PARALLEL_TIMEOUT for the other ranks" in record["error"], record
        assert record["seconds"] < 60
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
