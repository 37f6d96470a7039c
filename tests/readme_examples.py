"""Run a README's examples as a new user would: from a fresh copy of the repository, in order.

    python -P tests/readme_examples.py [README.md] [--install] [--keep]

What it runs, in document order, in one temporary directory (a copy of the repository's files,
with HOME, TMPDIR and the cogvx cache inside it):
- every ```python block, in one fresh Python process sharing one namespace (as one session would);
  a block whose first line is a comment containing "needs CUDA" is compiled (syntax-checked) and
  run only when CUDA is available;
- every shell block (``` with no language, sh, bash, shell or console) holding a ``cogvx`` command:
  its ``&&``-joined commands run through the shell, with ``cogvx`` calling this copy
  (``python -P -m cogvx.engine.cli``); ``pip install`` steps run only with --install (otherwise the
  copy is imported through a .pyroot folder of links, as the tests do); ``pytest`` commands never
  run here (the README's test command is what CI runs).
Exit status 0 when every runnable block ran, 1 otherwise (the failing block is named).
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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHELL_LANGS = ("", "sh", "bash", "shell", "console")
CUDA_MARK = re.compile(r"^\s*#.*needs CUDA", re.IGNORECASE)
PACKAGES = {"engine": "engine", "kernels": "kernels", "quantize": "quantize"}


@dataclass
class Block:
    kind: str  # "python" or "shell"
    code: str
    line: int  # 1-based line of the opening fence
    heading: str  # the section it is in

    @property
    def needs_cuda(self) -> bool:
        first = next((ln for ln in self.code.splitlines() if ln.strip()), "")
        return bool(CUDA_MARK.match(first))

    @property
    def where(self) -> str:
        return f"line {self.line} ({self.heading})"


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text, with their language and section heading."""
    out, heading, fence, buf, start, lang = [], "top", None, [], 0, ""
    for i, line in enumerate(text.splitlines(), 1):
        if fence is None:
            m = re.match(r"^(```+|~~~+)\s*([\w+-]*)", line)
            if m:
                fence, lang, buf, start = m.group(1), m.group(2).lower(), [], i
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif line.startswith(fence):
            code = "\n".join(buf) + "\n"
            if lang in ("python", "py"):
                out.append(Block("python", code, start, heading))
            elif lang in SHELL_LANGS:
                out.append(Block("shell", code, start, heading))
            fence = None
        else:
            buf.append(line)
    return out


def shell_commands(block: Block, install: bool, python: str) -> list[str]:
    """The commands of a shell block this runner executes ([] when it holds no cogvx command)."""
    cmds = []
    for line in block.code.splitlines():
        line = line.strip().removeprefix("$ ").strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split("&&")]
        if not any(re.match(r"cogvx(\s|$)", p) for p in parts):
            continue
        keep = []
        for p in parts:
            if re.search(r"\bpytest\b", p):
                continue
            if re.search(r"\bpip\s+install\b", p):
                if install:
                    keep.append(re.sub(r"^python3?\b", python, p))
                continue
            keep.append(re.sub(r"^cogvx\b", f"{python} -P -m cogvx.engine.cli", re.sub(r"^python3?\b", python, p)))
        if keep:
            cmds.append(" && ".join(keep))
    return cmds


def fresh_copy(dest: Path) -> Path:
    """The repository's files (tracked and not ignored) copied to ``dest``, with a .pyroot of links."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for f in files:
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    root = dest / ".pyroot" / "cogvx"
    root.mkdir(parents=True)
    for name, folder in PACKAGES.items():
        (root / name).symlink_to(dest / folder, target_is_directory=True)
    return dest


DRIVER = r'''
import json, subprocess, sys, traceback
plan = json.load(open(sys.argv[1]))
ns = {"__name__": "__main__"}
for step in plan:
    print(f"--- {step['where']}: {step['what']}", flush=True)
    try:
        if step["kind"] == "compile":
            compile(step["code"], step["where"], "exec")
        elif step["kind"] == "python":
            exec(compile(step["code"], step["where"], "exec"), ns)
        else:
            r = subprocess.run(step["code"], shell=True)
            if r.returncode:
                raise SystemExit(f"exit status {r.returncode}")
    except BaseException as e:
        traceback.print_exc()
        print(f"FAILED {step['where']}: {type(e).__name__}: {e}", flush=True)
        sys.exit(1)
print("ALL OK", flush=True)
'''


def plan(readme: Path, install: bool, python: str, cuda: bool) -> list[dict]:
    steps = []
    for b in blocks(readme.read_text(encoding="utf-8")):
        if b.kind == "python":
            run = cuda or not b.needs_cuda
            steps.append(dict(kind="python" if run else "compile", code=b.code, where=b.where,
                              what="run" if run else "compile only (needs CUDA)"))
        else:
            steps += [dict(kind="shell", code=c, where=b.where, what=c) for c in shell_commands(b, install, python)]
    return steps


def run(readme: Path, install: bool = False, keep: bool = False, timeout: float = 1800) -> tuple[int, str]:
    """(exit status, output) of running ``readme``'s examples in a fresh copy."""
    import torch  # only to know whether "needs CUDA" blocks can run here

    tmp = Path(tempfile.mkdtemp(prefix="cogvx-readme-"))
    try:
        repo = fresh_copy(tmp / "repo")
        steps = plan(Path(readme), install, sys.executable, torch.cuda.is_available())
        (tmp / "plan.json").write_text(json.dumps(steps))
        (tmp / "driver.py").write_text(DRIVER)
        for d in ("home", "tmp", "cache"):
            (tmp / d).mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("COGVX_", "TORCHINDUCTOR_"))}
        env.update(HOME=str(tmp / "home"), TMPDIR=str(tmp / "tmp"), COGVX_CACHE=str(tmp / "cache"))
        env.pop("XDG_CACHE_HOME", None)
        if not install:
            env["PYTHONPATH"] = str(repo / ".pyroot")
        r = subprocess.run([sys.executable, "-P", str(tmp / "driver.py"), str(tmp / "plan.json")], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=timeout)
        return r.returncode, r.stdout + r.stderr
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("readme", nargs="?", default=str(REPO / "README.md"))
    p.add_argument("--install", action="store_true", help="also run the README's pip install steps")
    p.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = p.parse_args(argv)
    code, out = run(Path(args.readme), args.install, args.keep)
    print(out)
    return code


if __name__ == "__main__":
    sys.exit(main())
