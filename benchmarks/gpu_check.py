"""The GPU check: one command a session lent a GPU runs once, inside a time budget (default 9 min).

    bash benchmarks/gpu_wheels.sh                 # here, with pip: the wheels the GPU machine lacks -> wheels/
    python benchmarks/gpu_check.py                # there (carry wheels/): writes under $OUT, else benchmarks/results
    python benchmarks/gpu_check.py --smoke        # the plumbing on a CPU (tiny stand-ins), < 30 s

Sections, in order, each time-boxed, each written to the results as soon as it is measured (the
JSON and the markdown table are rewritten after every row, so a cut run keeps what it measured):

1. setup: which of the packages the tests and peers need are missing; installs the missing ones from
   the carried wheels (``pip install --no-index --no-deps --target DIR``, then DIR on sys.path and
   PYTHONPATH) or says which have no wheel; makes ``cogvx`` importable from this tree if it is not.
2. tests: ``pytest -m gpu`` in a child process with a timeout (``--tests-min``); pass/fail per test
   from its junit XML, or from its -v lines when the timeout cut it.
3. kernels: each Triton kernel against what it replaces at the 2b and 5b shapes (benchmarks/gpu_kernels.py).
4. pipeline: the real-shape 5b text-to-video pipeline (49 frames, 720x480, CFG, random weights) per
   configuration, most important first, through benchmarks/gpu_pipeline.py with ``--steps`` steps:
   total and per-stage seconds, per-step times, peak CUDA memory. The 50-step figure is an estimate
   and says so: the measured total (every stage, N steps) + (50 - N) x the median step.

With --smoke (no CUDA needed): setup as above; the tests section runs one test file's gpu tests (they
skip without CUDA); the kernel rows run at a tiny shape on the CPU (PyTorch paths); the pipeline runs
the tiny preset for one configuration in this process. Exit status 0 when every section ran (a
failing test or row is a result, not an exit status), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # gpu_kernels, gpu_pipeline, _util, also under `python -P`

# (module to import, distribution the wheel is named by): what the GPU image lacks
# and what they need that it lacks too (diffusers: importlib_metadata).
PACKAGES = [("torchao", "torchao"), ("diffusers", "diffusers"), ("importlib_metadata", "importlib_metadata"),
            ("optimum.quanto", "optimum_quanto"), ("bitsandbytes", "bitsandbytes"),
            ("imageio_ffmpeg", "imageio_ffmpeg")]  # fmt: skip
PIPELINE_CONFIGS = ["cogvx-compiled", "cogvx-fp8dq-row-compiled", "cogvx-int8attn-compiled", "diffusers-compiled"]
MARGIN_S = 20  # kept for the last write
SMOKE_TEST_FILE = "tests/test_kernels_sage_attention.py"
# The kernels' CUDA tests first (most of the gpu tests, and what no CPU has run), then the rest;
# pytest drops the second collection of a file.
GPU_TEST_ORDER = ["tests/test_kernels_sage_attention.py", "tests/test_kernels_rope_attention.py",
                  "tests/test_kernels_adaln.py", "tests/test_kernels_adaln_fp8.py", "tests"]
SMOKE_CONFIG = "cogvx-eager"  # the tiny preset, 1 step: the plumbing (compiled paths: gpu_pipeline.py --smoke)


def _found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is itself missing
        return False


def _missing(packages) -> list[tuple[str, str]]:
    return [(module, dist) for module, dist in packages if not _found(module)]


def _wheel_name(path: Path) -> str:
    return re.sub(r"[-.]+", "_", path.name.split("-")[0]).lower()


def setup(wheels: Path, site: Path) -> dict:
    """Install the missing packages from ``wheels`` into ``site`` (added to sys.path and PYTHONPATH)."""
    site.mkdir(parents=True, exist_ok=True)
    missing = _missing(PACKAGES)
    have = {_wheel_name(p): p for p in sorted(wheels.glob("*.whl"))} if wheels.is_dir() else {}
    todo = [have[d.lower()] for _, d in missing if d.lower() in have]
    result = dict(wheels_dir=str(wheels), missing_before=[d for _, d in missing], installed=[], install_error=None)
    if todo:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, todo)]  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            result["install_error"] = (p.stderr or p.stdout)[-1500:]
        else:
            result["installed"] = [w.name for w in todo]
    if not _found("cogvx.engine"):
        shim = site / "cogvx"  # the package-dir mapping of pyproject.toml, as links into this tree
        shim.mkdir(exist_ok=True)
        for folder in ("engine", "kernels", "quantize"):
            if not (shim / folder).exists():
                (shim / folder).symlink_to(REPO / folder, target_is_directory=True)
        result["cogvx"] = f"linked from {REPO} into {site}"
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    importlib.invalidate_caches()
    result["still_missing"] = [d for _, d in _missing(PACKAGES)]
    return result


_LINE = re.compile(r"(\S+\.py::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)|"
                   r"(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\s+(\S+\.py::\S+)")  # fmt: skip


def _junit(path: Path) -> dict[str, str]:
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        kids = {c.tag for c in case}
        out[name] = ("failed" if "failure" in kids else "error" if "error" in kids else
                     "skipped" if "skipped" in kids else "passed")  # fmt: skip
    return out


def run_group(cmd: list[str], timeout: float, **kw) -> int | None:
    """Run cmd in its own process group; its exit status, or None when ``timeout`` seconds ended the whole
    group (pytest-xdist's workers, gpu_pipeline's children: they hold the GPU)."""
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def run_tests(timeout: float, log: Path, paths: list[str], workers: int) -> dict:
    """``pytest -m gpu`` on ``paths`` in a child with ``timeout`` seconds; outcome per test."""
    xml = Path(tempfile.mkdtemp(prefix="cogvx-junit-")) / "gpu.xml"
    # A module that fails to import (a package with no wheel there) must not stop the other modules' tests.
    # -P: the repository root off sys.path (its kernels/ folder would shadow the `kernels` distribution).
    cmd = [sys.executable, "-P", "-m", "pytest", "-m", "gpu", "-v", "-rA", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", f"--junit-xml={xml}", *paths]  # fmt: skip
    if workers > 1 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(workers)]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", str(int(max(90, timeout / 2)))]  # one hung test does not take the whole box
    t0 = time.monotonic()
    with open(log, "w") as f:
        code = run_group(cmd, timeout, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    timed_out = code is None
    text = log.read_text(errors="replace")
    if xml.exists() and not timed_out:
        outcomes = _junit(xml)
    else:  # cut by the timeout: what the -v lines say finished
        outcomes = {}
        for m in _LINE.finditer(text):
            name, status = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
            outcomes[name] = status.lower()
    counts = {}
    for status in outcomes.values():
        counts[status] = counts.get(status, 0) + 1
    summary = next((ln.strip("= ") for ln in reversed(text.splitlines()) if re.search(r"\d+ (passed|failed)", ln)), "")
    return dict(command=" ".join(cmd[1:]), seconds=round(time.monotonic() - t0, 1), timed_out=timed_out,
                exit_status=code, counts=counts, summary=summary, tests=outcomes,
                log=log.name)  # fmt: skip


def run_pipeline(configs, steps: int, deadline: float, smoke: bool, on_row, log: Path) -> None:
    """One gpu_pipeline.py run per configuration (the first gets 40% of the time, each next an equal
    share of what is left; its output appended to ``log``); rows as gpu_pipeline writes them, plus the
    50-step estimate."""
    import gpu_pipeline

    for i, name in enumerate(configs):
        left = deadline - time.monotonic()
        share = left * 0.4 if i == 0 and len(configs) > 1 else left / (len(configs) - i)
        if share < 30:
            on_row(dict(config=name, model="5b", skipped="time budget spent"))
            continue
        out = Path(tempfile.mkdtemp(prefix="cogvx-pipeline-"))
        args = ["--models", "tiny" if smoke else "5b", "--configs", name, "--steps", str(steps),
                "--budget-min", f"{share / 60:.3f}", "--out", str(out)] + (["--smoke"] if smoke else [])  # fmt: skip
        rows = []
        if smoke:  # in this process: the smoke run must stay fast
            gpu_pipeline.main(args)
        else:
            with open(log, "a") as f:
                if run_group([sys.executable, "-P", str(HERE / "gpu_pipeline.py"), *args], share + 15, stdout=f,
                             stderr=subprocess.STDOUT) is None:  # fmt: skip
                    rows = [dict(config=name, error=f"timed out after {share + 15:.0f} s")]
        files = sorted(out.glob("pipeline-*.json"))
        if files:  # written after every configuration: also what a cut run measured
            rows = json.loads(files[-1].read_text())["rows"]
        elif not rows:
            rows = [dict(config=name, error="gpu_pipeline.py wrote no results")]
        for r in rows:
            if r.get("step_median_s") and r.get("total_s"):
                n = len(r.get("steps_s") or []) or steps
                n = steps if r["config"].startswith("diffusers") else n  # its callback times n - 1 gaps
                r["steps_measured"] = n
                r["estimate_50_steps_s"] = r["total_s"] + (50 - n) * r["step_median_s"]
            on_row(r)


def _markdown(res: dict) -> str:
    import gpu_kernels

    m = res["meta"]
    lines = [f"# GPU check: {m['device']} ({m['date']}, commit {m['commit']}{' dirty' if m['dirty'] else ''})", "",
             f"torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}, Python {m['python']}; budget "
             f"{m['budget_min']} min{'; SMOKE (CPU stand-ins: the times mean nothing)' if m['smoke'] else ''}.", ""]
    s = res.get("setup")
    if s:
        lines += [f"Setup: missing {s['missing_before'] or 'nothing'}; installed {s['installed'] or 'nothing'}; "
                  f"still missing {s['still_missing'] or 'nothing'}.", ""]  # fmt: skip
    t = res.get("tests")
    if t:
        failed = sorted(n for n, st in t["tests"].items() if st in ("failed", "error"))
        lines += [f"## Tests (`pytest -m gpu`, {t['seconds']} s{', CUT BY THE TIMEOUT' if t['timed_out'] else ''})",
                  "", f"{t['counts']} {t['summary']}", ""] + [f"- FAILED {n}" for n in failed] + [""]  # fmt: skip
    if res.get("kernels"):
        lines += ["## Kernels (median ms, do_bench; `vs first`: against the first provider of the kernel)", ""]
        lines += gpu_kernels.markdown(res["kernels"]) + [""]
    if res.get("pipeline"):
        lines += ["## Pipeline: 5b, 49 frames, 720x480, CFG, random weights", "",
                  "The 50-step figure is an ESTIMATE: the measured total (all stages, N steps) + (50 - N) x the "
                  "median step.", "",
                  "| config | steps N | median step s | total N steps s | est. 50 steps s | compile s | peak GiB "
                  "| note |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in res["pipeline"]:
            peak = max(r["memory"].values()) / 2**30 if r.get("memory") else None
            note = (r.get("error") or r.get("skipped") or "").strip().splitlines()
            lines.append(f"| {r['config']} | {r.get('steps_measured', '-')} | {_f(r.get('step_median_s'), 3)} | "
                         f"{_f(r.get('total_s'), 1)} | {_f(r.get('estimate_50_steps_s'), 1)} | "
                         f"{_f(r.get('compile_s', r.get('warmup_s')), 1)} | {_f(peak, 1)} | "
                         f"{note[-1][:120] if note else ''} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _f(x, digits: int) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "-"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-min", type=float, default=9.0, help="the whole run, in minutes (default 9)")
    p.add_argument("--tests-min", type=float, default=2.5, help="time box of the tests section (default 2.5)")
    p.add_argument("--kernels-min", type=float, default=1.2, help="time box of the kernels section (default 1.2)")
    p.add_argument("--steps", type=int, default=5, help="denoising steps per pipeline configuration (default 5)")
    p.add_argument("--configs", nargs="+", default=PIPELINE_CONFIGS, help="pipeline configurations, in order")
    p.add_argument("--wheels", type=Path, default=REPO / "wheels", help="folder of carried wheels (default wheels/)")
    p.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "cogvx-gpu-site",
                   help="where the wheels are installed (default /tmp/cogvx-gpu-site)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default $OUT, else benchmarks/results)")
    p.add_argument("--test-workers", type=int, default=4, help="pytest-xdist workers where installed (default 4)")
    p.add_argument("--smoke", action="store_true", help="the plumbing on a CPU: tiny stand-ins, < 30 s")
    args = p.parse_args(argv)
    if args.budget_min <= 0 or args.steps < 1:
        p.error(f"--budget-min must be > 0 and --steps >= 1 (got {args.budget_min}, {args.steps})")
    t_start = time.monotonic()
    deadline = t_start + args.budget_min * 60 - MARGIN_S
    out = args.out or Path(os.environ.get("OUT") or HERE / "results")
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"setup": setup(args.wheels, args.site)}

    import torch

    from _util import git_commit, results_path

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("gpu_check needs a CUDA device (got none); --smoke runs its plumbing on the CPU", file=sys.stderr)
        return 2
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    commit, dirty = git_commit()
    if commit == "unknown":  # the device tool sends the tree without .git: the caller names the commit
        commit = os.environ.get("COGVX_COMMIT", "unknown")
    device = torch.cuda.get_device_name() if cuda else "cpu"
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res["meta"] = dict(device=device, commit=commit, dirty=dirty, date=date,
                       torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda,
                       python=platform.python_version(), budget_min=args.budget_min, smoke=args.smoke,
                       capability=list(torch.cuda.get_device_capability()) if cuda else None)  # fmt: skip
    stem = results_path("gpu-check", device, commit, suffix="", out=out)

    def save() -> None:
        res["meta"]["elapsed_s"] = round(time.monotonic() - t_start, 1)
        Path(f"{stem}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
        Path(f"{stem}.md").write_text(_markdown(res))

    save()
    print(f"setup: {res['setup']}", flush=True)
    box = min(args.tests_min * 60, deadline - time.monotonic())
    paths = [SMOKE_TEST_FILE] if args.smoke else GPU_TEST_ORDER
    res["tests"] = run_tests(box, Path(f"{stem}-pytest.log"), paths, 1 if args.smoke else args.test_workers)
    save()
    print(f"tests: {res['tests']['counts']} in {res['tests']['seconds']} s (timed out: {res['tests']['timed_out']})",
          flush=True)  # fmt: skip

    import gpu_kernels

    res["kernels"] = []

    def kernel_row(row):
        res["kernels"].append(row)
        save()
        print(f"kernel {row['model']} {row['kernel']} {row['provider']}: "
              f"{row.get('median_ms', row.get('error') or row.get('skipped'))}", flush=True)  # fmt: skip

    gpu_kernels.run(["5b"] if args.smoke else ["5b", "2b"], args.smoke,
                    min(deadline, time.monotonic() + args.kernels_min * 60), kernel_row)  # fmt: skip
    res["pipeline"] = []

    def pipeline_row(row):
        res["pipeline"].append(row)
        save()
        print(f"pipeline {row['config']}: est. 50 steps {row.get('estimate_50_steps_s')} s "
              f"{(row.get('error') or row.get('skipped') or '')[-300:]}", flush=True)  # fmt: skip

    configs = [SMOKE_CONFIG] if args.smoke and args.configs == PIPELINE_CONFIGS else args.configs
    run_pipeline(configs, 1 if args.smoke else args.steps, deadline, args.smoke, pipeline_row,
                 Path(f"{stem}-pipeline.log"))
    save()
    print(_markdown(res))
    print(f"wrote {stem}.json, .md, -pytest.log" + ("" if args.smoke else ", -pipeline.log"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
