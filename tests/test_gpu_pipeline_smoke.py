"""benchmarks/gpu_pipeline.py on the CPU (--smoke): every configuration it runs on a GPU that a CPU
can run, the others recorded as skipped with the reason; a failing configuration and a spent time
budget are recorded and the results JSON is still written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hostile_helpers import REPO, cli_env

SCRIPT = REPO / "benchmarks" / "gpu_pipeline.py"
CONFIGS = ["cogvx-eager", "diffusers-eager", "cogvx-compiled", "cogvx-fp8dq-row-compiled", "diffusers-compiled",
           "cogvx-int8wo-compiled", "cogvx-int8attn-compiled"]


def _run(tmp_path, *args, timeout=600):
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, "-P", str(SCRIPT), "--smoke", "--out", str(out), *args],
                       env=cli_env(tmp_path), capture_output=True, text=True, timeout=timeout)
    files = list(out.glob("pipeline-cpu-*.json"))
    assert len(files) == 1, (r.returncode, r.stderr[-3000:])
    return r, json.loads(files[0].read_text())


@pytest.mark.slow
def test_smoke_runs_every_configuration_a_cpu_can(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the smoke mode is the CPU check")
    r, res = _run(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["config"]: row for row in res["rows"]}
    assert list(rows) == CONFIGS
    assert "compute capability" in rows["cogvx-fp8dq-row-compiled"]["skipped"]
    for name in CONFIGS:
        if name == "cogvx-fp8dq-row-compiled":
            continue
        row = rows[name]
        assert "error" not in row and "skipped" not in row, row
        assert row["frames_shape"] == [1, 9, 32, 32, 3] and row["total_s"] > 0 and row["step_median_s"] > 0
    assert rows["cogvx-compiled"]["compile_s"] > 0  # the compiled path really compiled (aot_eager)
    meta = res["meta"]
    assert meta["smoke"] and meta["compile_backend"] == "aot_eager" and meta["commit"] and meta["steps"] == 2


@pytest.mark.slow
def test_failures_and_a_spent_budget_are_recorded(tmp_path):
    r, res = _run(tmp_path, "--subprocess", "--models", "no-such-model", "--configs", "cogvx-eager")
    assert r.returncode == 1
    [row] = res["rows"]
    assert row["config"] == "cogvx-eager" and "no-such-model" in row["error"]
    r, res = _run(tmp_path / "b", "--budget-min", "0")
    assert r.returncode == 0 and all("time budget" in row["skipped"] or "compute capability" in row["skipped"]
                                     for row in res["rows"]) and len(res["rows"]) == len(CONFIGS)
