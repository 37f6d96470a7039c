"""Run diffusers' own CogVideoX pipeline tests against cogvx's classes (or diffusers', for the reference count).

    python tests/diffusers_suite/run.py                     # cogvx's classes; exits 1 below --min-pass
    python tests/diffusers_suite/run.py --library diffusers # the same files on diffusers' own classes
    python tests/diffusers_suite/run.py -- -k callback -x   # anything after "--" goes to pytest

``vendor/tests`` holds diffusers' test files unchanged (Apache-2.0, see ``vendor/NOTICE``). The runner copies
them to a temporary folder and changes two things there, nothing else:

1. in the four ``pipelines/cogvideo/test_*.py`` files, the ``from diffusers import ...`` line imports the pipeline
   and model classes (``CogVideoX*Pipeline``, ``CogVideoXTransformer3DModel``, ``AutoencoderKLCogVideoX``) from
   ``cogvx.engine``; every other name on it (``DDIMScheduler``) still comes from diffusers;
2. the hub-only tiny T5 ``hf-internal-testing/tiny-random-t5`` becomes a local folder with the same config
   (d_model 32, d_ff 37, d_kv 8, 4 heads, 5 layers, vocabulary 1103) and an offline sentencepiece tokenizer
   (``cogvx.engine.dev.tiny_tokenizer``), built here. Nothing is fetched at run time.

The run also loads ``freeze_gc.py`` (a pytest plugin, not a change to any test): the objects alive after
collection go to gc's permanent generation, so the ``gc.collect()`` diffusers calls around every test
does not rescan the imported libraries each time (about half the suite's time on the 2-core machine).

Prints one line per outcome and the counts; the exit status is 0 when at least ``--min-pass`` passed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENDOR = HERE / "vendor" / "tests"
TINY_T5 = "hf-internal-testing/tiny-random-t5"
TEST_FILES = ("test_cogvideox.py", "test_cogvideox_image2video.py", "test_cogvideox_video2video.py",
              "test_cogvideox_fun_control.py")
# The names a diffusers user switches to cogvx: the pipeline and model classes.
COGVX_NAMES = {"CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline",
               "CogVideoXFunControlPipeline", "CogVideoXTransformer3DModel", "AutoencoderKLCogVideoX"}
# hf-internal-testing/tiny-random-t5's config.json (its encoder; the decoder fields do not matter here).
TINY_T5_CONFIG = {
    "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "d_model": 32, "d_ff": 37, "d_kv": 8,
    "num_heads": 4, "num_layers": 5, "num_decoder_layers": 5, "vocab_size": 1103, "dropout_rate": 0.1,
    "feed_forward_proj": "relu", "initializer_factor": 0.002, "is_encoder_decoder": True,
    "layer_norm_epsilon": 1e-06, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 128,
    "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
}


def rewrite_import(source: str, library: str) -> str:
    """The test file with its ``from diffusers import a, b`` line pointing the cogvx names at ``library``."""
    if library == "diffusers":
        return source
    m = re.search(r"^from diffusers import (.+)$", source, flags=re.M)
    if m is None:
        raise SystemExit("no 'from diffusers import' line found: the vendored files changed")
    names = [n.strip() for n in m.group(1).split(",")]
    ours = [n for n in names if n in COGVX_NAMES]
    theirs = [n for n in names if n not in COGVX_NAMES]
    lines = [f"from cogvx.engine import {', '.join(ours)}"]
    if theirs:
        lines.insert(0, f"from diffusers import {', '.join(theirs)}")
    return source[:m.start()] + "\n".join(lines) + source[m.end():]


def build_tiny_t5(out: Path) -> Path:
    """A local stand-in for hf-internal-testing/tiny-random-t5: its config and an offline tokenizer."""
    sys.path.insert(0, str(HERE.parents[1]))
    from cogvx.engine.dev.tiny_tokenizer import make_tiny_tokenizer

    make_tiny_tokenizer(out, vocab_size=1003, extra_ids=100, model_max_length=512)
    (out / "config.json").write_text(json.dumps(TINY_T5_CONFIG, indent=2) + "\n")
    return out


def stage(root: Path, library: str) -> Path:
    """Copy the vendored tests under ``root`` with the two changes; returns the tests folder."""
    tests = root / "tests"
    shutil.copytree(VENDOR, tests, ignore=shutil.ignore_patterns("__pycache__"))
    t5 = build_tiny_t5(root / "tiny-random-t5")
    for name in TEST_FILES:
        f = tests / "pipelines" / "cogvideo" / name
        f.write_text(rewrite_import(f.read_text(), library).replace(TINY_T5, str(t5)))
    return tests


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """test id -> (outcome, first line of the reason) from pytest's junit XML."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        tid = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome, reason = "passed", ""
        for kind in ("failure", "error", "skipped"):
            el = case.find(kind)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                reason = (el.get("message") or "").strip().splitlines()[0][:200] if el.get("message") else ""
                break
        out[tid] = (outcome, reason)
    return out


def run(library: str = "cogvx", pytest_args: list[str] | None = None, keep: Path | None = None) -> dict:
    """Stage and run the suite; returns ``{"counts": {...}, "tests": {id: (outcome, reason)}}``."""
    root = Path(tempfile.mkdtemp(prefix=f"diffusers-suite-{library}-")) if keep is None else keep
    try:
        tests = stage(root, library)
        junit = root / "junit.xml"
        cmd = [sys.executable, "-P", "-m", "pytest", str(tests / "pipelines" / "cogvideo"), "-q", "-p",
               "no:cacheprovider", "--rootdir", str(root), "-c", str(root / "pytest.ini"), f"--junitxml={junit}",
               "-W", "ignore::DeprecationWarning", "-p", "freeze_gc", *(pytest_args or [])]
        (root / "pytest.ini").write_text("[pytest]\n")
        shutil.copy(HERE / "freeze_gc.py", root)  # the plugin, importable from root (pytest's rootdir)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
        subprocess.run(cmd, cwd=root, check=False, env=env)
        tests_out = outcomes(junit)
        counts: dict[str, int] = {}
        for outcome, _ in tests_out.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        return {"counts": counts, "tests": tests_out}
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--library", choices=("cogvx", "diffusers"), default="cogvx")
    p.add_argument("--min-pass", type=int, default=75)
    p.add_argument("--keep", type=Path, help="stage into this (empty) folder and keep it")
    p.add_argument("--json", type=Path, help="write the outcomes here")
    a = p.parse_args(argv)
    res = run(a.library, extra, a.keep)
    for tid, (outcome, reason) in sorted(res["tests"].items()):
        if outcome != "passed":
            print(f"{outcome:8s} {tid}  {reason}")
    print(f"{a.library}: " + ", ".join(f"{n} {k}" for k, n in sorted(res["counts"].items())))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1, sort_keys=True))
    return 0 if res["counts"].get("passed", 0) >= a.min_pass else 1


if __name__ == "__main__":
    sys.exit(main())
