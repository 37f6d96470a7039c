"""benchmarks/gpu_check.py, the one command a session lent a GPU runs: its CPU rehearsal (--smoke) end to
end, and the parts that cannot be tried anywhere else before the GPU run: installing carried wheels
into a target folder, telling which packages have no wheel, reading pytest's outcomes when a timeout
cut the run."""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import os
import subprocess
import time
import sys
import zipfile

import pytest
import torch

from hostile_helpers import REPO, cli_env

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


def test_smoke_runs_every_section_and_writes_results(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-P", str(SCRIPT), "--smoke", "--out", str(out), "--wheels",
                        str(tmp_path / "no-wheels")], env=cli_env(tmp_path), capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    [js] = list(out.glob("gpu-check-cpu-*.json"))
    md, log = js.with_suffix(".md"), js.with_name(js.stem + "-pytest.log")
    assert md.exists() and log.exists() and len(list(out.iterdir())) == 3  # $OUT brings back 8 files at most
    res = json.loads(js.read_text())
    assert res["meta"]["smoke"] and res["meta"]["device"] == "cpu" and res["meta"]["commit"]
    assert res["setup"]["install_error"] is None and res["setup"]["installed"] == []
    t = res["tests"]
    assert not t["timed_out"] and t["tests"] and set(t["tests"].values()) == {"skipped"}  # gpu tests, no CUDA
    assert all(name.startswith("tests/test_kernels_sage_attention.py::") for name in t["tests"])
    rows = {(k["kernel"], k["provider"]): k for k in res["kernels"]}
    assert {("adaln", "ours"), ("qk_norm_rope", "torch"), ("attention", "int8")} <= set(rows)
    assert all("error" not in k and k["median_ms"] > 0 for k in res["kernels"]), res["kernels"]
    assert rows[("attention", "int8")]["sqnr_db_vs_fp32"] > 30  # the 8-bit attention's reference path
    [p] = res["pipeline"]
    assert p["config"] == "cogvx-eager" and "error" not in p, p
    assert p["estimate_50_steps_s"] == pytest.approx(p["total_s"] + 49 * p["step_median_s"])
    text = md.read_text()
    assert "ESTIMATE" in text and "| 5b | attention | int8 |" in text and "SMOKE" in text


def _wheel(folder, dist: str, module_text: str):
    """A minimal pure-Python wheel of package ``dist`` (one module) written into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-1.0-py3-none-any.whl"
    info = f"{dist}-1.0.dist-info"
    files = {f"{dist}/__init__.py": module_text,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_setup_installs_missing_packages_from_wheels_and_names_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "PACKAGES", [("cogvx_probe_pkg", "cogvx_probe_pkg"),
                                                ("cogvx_absent_pkg", "cogvx_absent_pkg"), ("torch", "torch")])
    _wheel(tmp_path / "wheels", "cogvx_probe_pkg", "VALUE = 42\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    res = gpu_check.setup(tmp_path / "wheels", tmp_path / "site")
    assert res["install_error"] is None, res
    assert res["missing_before"] == ["cogvx_probe_pkg", "cogvx_absent_pkg"]  # torch is there
    assert res["installed"] == ["cogvx_probe_pkg-1.0-py3-none-any.whl"]
    assert res["still_missing"] == ["cogvx_absent_pkg"]
    assert importlib.import_module("cogvx_probe_pkg").VALUE == 42
    assert str(tmp_path / "site") in os.environ["PYTHONPATH"].split(os.pathsep)  # children see it too
    sys.modules.pop("cogvx_probe_pkg", None)


def test_outcomes_of_a_run_cut_by_the_timeout_come_from_its_verbose_lines():
    text = ("tests/test_a.py::test_one PASSED                                  [ 10%]\n"
            "tests/test_a.py::test_two[cuda-bfloat16] FAILED                   [ 20%]\n"
            "[gw1] [ 30%] SKIPPED tests/test_b.py::test_three \n"
            "[gw0] [ 40%] PASSED tests/test_b.py::test_four[5b] \n")  # fmt: skip
    got = {}
    for m in gpu_check._LINE.finditer(text):
        name, status = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        got[name] = status
    assert got == {"tests/test_a.py::test_one": "PASSED", "tests/test_a.py::test_two[cuda-bfloat16]": "FAILED",
                   "tests/test_b.py::test_three": "SKIPPED", "tests/test_b.py::test_four[5b]": "PASSED"}


def test_bad_usage_and_no_gpu_are_clear(tmp_path):
    r = subprocess.run([sys.executable, "-P", str(SCRIPT), "--budget-min", "0"], capture_output=True, text=True,
                       timeout=60, env=cli_env(tmp_path))  # fmt: skip
    assert r.returncode == 2 and "--budget-min must be > 0" in r.stderr, r.stderr[-1000:]
    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, "-P", str(SCRIPT), "--out", str(tmp_path / "o")], capture_output=True,
                           text=True, timeout=120, env=cli_env(tmp_path))  # fmt: skip
        assert r.returncode == 2 and "needs a CUDA device" in r.stderr and "--smoke" in r.stderr, r.stderr[-1000:]


def _wheel_specs() -> dict[str, str]:
    """{distribution (normalized): 'required' or 'optional'} from benchmarks/gpu_wheels.sh."""
    text = (REPO / "benchmarks" / "gpu_wheels.sh").read_text()
    out = {}
    for kind in ("REQUIRED", "OPTIONAL"):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"{kind}=("))
        for spec in line.split("(", 1)[1].rstrip(")").split():
            assert "==" in spec, f"{spec}: gpu_wheels.sh pins every version (two versions stop pip there)"
            out[spec.split("==")[0].replace("-", "_").lower()] = kind.lower()
    return out


def test_the_wheel_list_covers_what_the_check_installs():
    """Every package gpu_check looks for has a wheel in gpu_wheels.sh's lists, and the other way round."""
    specs = _wheel_specs()
    assert set(specs) == {dist.lower() for _, dist in gpu_check.PACKAGES}, (specs, gpu_check.PACKAGES)
    assert {"torchao", "diffusers"} <= {d for d, kind in specs.items() if kind == "required"}


@pytest.mark.slow
def test_the_wheel_list_resolves_and_fits(tmp_path):
    """Downloads the wheels (needs a package registry: skipped without one) and checks the size rule."""
    env = dict(cli_env(tmp_path), WHEELS_DIR=str(tmp_path / "wheels"))
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_wheels.sh")], capture_output=True, text=True,
                       timeout=600, env=env)  # fmt: skip
    if r.returncode and ("No matching distribution" in r.stderr or "Could not fetch" in r.stderr
                         or "NewConnectionError" in r.stderr):  # fmt: skip
        pytest.skip(f"no package registry reachable: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-2000:]
    names = {p.name.split("-")[0].lower() for p in (tmp_path / "wheels").glob("*.whl")}
    assert {d for d, kind in _wheel_specs().items() if kind == "required"} <= names
    assert "MiB of 64 MiB" in r.stdout


def test_a_test_run_cut_by_its_timeout_keeps_the_outcomes_so_far(tmp_path):
    """The time box ends the whole pytest process group and reads what finished from the -v lines."""
    f = tmp_path / "test_probe.py"
    f.write_text("import time, pytest\n\n@pytest.mark.gpu\ndef test_quick():\n    pass\n\n"
                 "@pytest.mark.gpu\ndef test_hangs():\n    time.sleep(120)\n")
    t0 = time.monotonic()
    res = gpu_check.run_tests(8, tmp_path / "log.txt", [str(f)], workers=1)  # the child reports test_quick in ~1 s
    assert time.monotonic() - t0 < 60 and res["timed_out"] and res["exit_status"] is None
    assert res["tests"] == {f"{f}::test_quick": "passed"} or list(res["tests"].values()) == ["passed"], res
