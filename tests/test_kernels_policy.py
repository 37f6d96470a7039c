"""Which implementation runs (cogvx.kernels.policy), the package without triton, and the package's
boundaries (no imports of cogvx.engine / cogvx.quantize)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogvx.kernels import _common, policy
from cogvx.kernels.adaln import _adaln_kernel

KERNELS_DIR = Path(policy.__file__).parent


def _run(code: str, interpret: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_backend_errors_and_resolution():
    inp = (torch.randn(1, 3, 8), None, None, None, None, torch.randn(1, 2, 8), torch.randn(1, 2, 8), 1)
    from cogvx.kernels import adaptive_layernorm

    with pytest.raises(ValueError, match="backend must be one of"):
        adaptive_layernorm(*inp, backend="cuda")
    assert policy.resolve_backend("torch", "cuda") == "torch"
    assert policy.resolve_backend("auto", "cpu") == "torch"
    assert policy.resolve_backend("triton", "cpu") == "triton"
    assert policy.resolve_backend("auto", torch.device("cuda", 0)) == ("triton" if _common.HAS_TRITON else "torch")
    with pytest.raises(ValueError, match="'auto', 'triton', 'torch'"):
        policy.resolve_backend("fast", "cpu")


def test_without_triton(monkeypatch):
    """No triton: "auto" resolves to torch, CUDA + "triton" is a clear error, CPU runs the references."""
    monkeypatch.setattr(_common, "HAS_TRITON", False)
    assert policy.resolve_backend("auto", "cuda") == "torch"
    with pytest.raises(RuntimeError, match="needs the triton package"):
        policy.resolve_backend("triton", "cuda")
    with pytest.raises(RuntimeError, match="needs the triton package"):
        policy.use_triton("triton", torch.device("cuda"), _adaln_kernel)
    assert not policy.use_triton("triton", torch.device("cpu"), _adaln_kernel)


_WARN_CODE = """
import warnings
from cogvx.kernels import resolve_backend
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert resolve_backend("triton", "cpu") == "triton"
    assert resolve_backend("triton", "cpu") == "triton"
    assert resolve_backend("torch", "cpu") == "torch" and resolve_backend("auto", "cpu") == "torch"
for w in caught:
    print("WARNING", w.category.__name__, w.message)
"""


def test_triton_on_cpu_without_the_interpreter_warns_once():
    """kernels='triton' on the CPU with kernels compiled, not interpreted: the references run, and
    resolve_backend says so once, naming TRITON_INTERPRET=1 as the way to run the kernels."""
    proc = _run(_WARN_CODE, interpret=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("WARNING")]
    assert len(lines) == 1, proc.stdout
    assert "RuntimeWarning" in lines[0] and "PyTorch references" in lines[0], lines[0]
    assert "TRITON_INTERPRET=1" in lines[0] and "kernels='torch'" in lines[0], lines[0]


def test_triton_on_cpu_under_the_interpreter_is_silent():
    proc = _run(_WARN_CODE, interpret=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "WARNING" not in proc.stdout, proc.stdout


def test_kernel_modules_import_without_triton():
    code = (
        "import sys, torch; sys.modules['triton'] = None\n"
        "import warnings\n"
        "from cogvx.kernels import adaln, adaln_fp8, qk_norm_rope, rope_flash_attention, resolve_backend\n"
        "x, p = torch.randn(1, 4, 8), torch.randn(1, 2, 8)\n"
        "out = adaln.adaptive_layernorm(x, x, p, None, None, p, p, 2, backend='triton')\n"
        "ref = adaln.adaln_reference(x, x, p, None, None, p, p, 2)\n"
        "assert all(torch.equal(a, b) for a, b in zip(out, ref))\n"
        "out = adaln_fp8.adaptive_layernorm_fp8(x, x, p, None, None, p, p, 2, backend='triton')\n"
        "ref = adaln_fp8.adaln_fp8_reference(x, x, p, None, None, p, p, 2)\n"
        "assert all(torch.equal(a.float(), b.float()) for a, b in zip(out, ref))\n"
        "q = torch.randn(1, 2, 4, 16)\n"
        "assert torch.equal(rope_flash_attention.attention(q, q, q, backend='triton'),\n"
        "                   rope_flash_attention.attention(q, q, q))\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    resolve_backend('triton', 'cpu')\n"
        "assert len(w) == 1 and 'failed to import' in str(w[0].message), [str(m.message) for m in w]\n"
    )
    proc = _run(code, interpret=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_package_imports_neither_engine_nor_quantize():
    code = (
        "import sys, cogvx.kernels, cogvx.kernels.aot\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('cogvx.engine', 'cogvx.quantize')))\n"
        "assert not bad, bad\n"
    )
    proc = _run(code, interpret=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_one_op_per_file_and_no_design_citations():
    names = {p.name for p in KERNELS_DIR.glob("*.py")}
    assert {"adaln.py", "adaln_fp8.py", "qk_norm_rope.py", "rope_flash_attention.py", "rope.py", "policy.py",
            "_common.py", "aot.py"} <= names, names
    assert not names & {"rope_attention.py", "select.py"}, "old module names are back"
    for path in KERNELS_DIR.glob("*.py"):
        text = path.read_text()
        assert "DESIGN §" not in text and "the issue" not in text, f"{path.name} cites notes outside the repo"
        assert len(text.splitlines()) <= 400, f"{path.name} has {len(text.splitlines())} lines"


def test_attention_choice_tolerates_a_missing_file(monkeypatch, tmp_path):
    monkeypatch.setattr(policy, "CHOICE_FILE", tmp_path / "absent.json")
    policy._table.cache_clear()
    try:
        assert policy._table() == {}
        assert policy.choose(policy._table(), 48, 17776, torch.bfloat16) == "sdpa"
    finally:
        policy._table.cache_clear()
