"""`python -P -m cogvx.kernels.aot`: every Triton kernel compiles for sm_80, sm_89 and sm_90 (no GPU
needed) without register spills and within shared memory, at the configurations the launchers pick.

The test runs the module's ``--quick`` subset (every kernel, every target and every configuration the
launchers offer for CogVideoX-5b (RoPE) and -2b (no RoPE), bfloat16 only: 81 compiles, about two minutes
on 2 cores with a cold Triton cache, seconds with a warm one). The full matrix (+ 1.5-5b, + float16:
244 compiles) is ``python -P -m cogvx.kernels.aot``; its table is in benchmarks/results/aot-*.md.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.aot


def _aot(*args, code=None, interpret=False, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for GPUs, not interpret
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-P"] + (["-c", code] if code else ["-m", "cogvx.kernels.aot"]) + list(args)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _expected(targets, models, dtypes):
    """(kernel, model, variant, config label or None, target) the launchers can produce, from the
    launchers' own configuration tables (imported in a child: this process interprets the kernels)."""
    code = (
        "import json, sys\n"
        "from cogvx.kernels.aot import jobs, _flash_configs, _sage_configs\n"
        f"out = [[j.kernel, j.model, j.variant, j.config_index, j.target]\n"
        f"       for j in jobs({models}, {dtypes}, {targets})]\n"
        "tiles = {str(t): {str(r): [f\"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}\"\n"
        "                           for c in _flash_configs(t, r)] for r in (True, False)} for t in (80, 89, 90)}\n"
        "sage = {str(t): [f\"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}\"\n"
        "                 for c in _sage_configs(t)] for t in (80, 89, 90)}\n"
        "print(json.dumps({'jobs': out, 'tiles': tiles, 'sage': sage}))\n"
    )
    proc = _aot(code=code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_every_kernel_compiles_spill_free_for_sm80_89_90(tmp_path):
    out = tmp_path / "aot.json"
    proc = _aot("--quick", "--json", str(out))
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    data = json.loads(out.read_text())
    rows = data["rows"]
    expected = _expected([80, 89, 90], ["5b", "2b"], ["bfloat16"])
    assert len(rows) == len(expected["jobs"]) == 81, (len(rows), len(expected["jobs"]))
    for r in rows:
        where = f"{r['kernel']} {r['model']} {r['variant']} {r['config']} sm_{r['target']}"
        assert r["status"] == "ok", f"{where}: {r['status']} {r.get('error', '')}"
        assert r["spill_stores"] == r["spill_loads"] == 0 and 0 < r["registers"] <= 255, where
        assert 0 <= r["smem"] <= r["smem_limit"] == {80: 166912, 89: 101376, 90: 232448}[r["target"]], where
    kernels = {(r["kernel"], r["target"]) for r in rows}
    for t in (80, 89, 90):
        assert {("adaln", t), ("qk_norm_rope", t), ("rope_flash_attention", t), ("sage_quant", t),
                ("sage_attention", t)} <= kernels
    # fp8 conversion needs sm_89+: the fp8 adaLN exists exactly where its dispatcher launches it.
    assert {t for k, t in kernels if k == "adaln_fp8"} == {89, 90}
    # Exactly the flash-attention configurations the launcher offers on each target, no more, no less.
    for t in (80, 89, 90):
        for rope in (True, False):
            variant = "rope" if rope else "no rope"
            got = [r["config"] for r in rows if r["kernel"] == "rope_flash_attention" and r["target"] == t
                   and r["variant"] == variant]  # fmt: skip
            assert got == expected["tiles"][str(t)][str(rope)], (t, variant, got)
    # And the 8-bit attention's, per target and model; its quantization kernel for q and for smoothed k.
    for t in (80, 89, 90):
        for model in ("5b", "2b"):
            got = [r["config"] for r in rows if r["kernel"] == "sage_attention" and r["target"] == t
                   and r["model"] == model]  # fmt: skip
            assert got == expected["sage"][str(t)], (t, model, got)
            assert sorted(r["variant"] for r in rows if r["kernel"] == "sage_quant" and r["target"] == t
                          and r["model"] == model) == ["k smoothed", "q"]  # fmt: skip
    # The printed table has one line per compile.
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ") and "sm_" in ln]
    assert len(table) == 81 and "81 compiles (81 ok)" in proc.stdout, proc.stdout[-2000:]
    assert "spill st/ld" in proc.stdout and "smem" in proc.stdout


def test_a_spilling_configuration_fails_the_check():
    """A configuration known to spill (128x64 tiles, 4 warps, RoPE) offered on sm_80: exit 1, row says spill."""
    code = (
        "import sys\n"
        "from cogvx.kernels import aot, rope_flash_attention as r\n"
        "r._TILES['sm80'][True] = [(128, 64, 4, 3)]\n"
        "sys.exit(aot.main(['--targets', '80', '--models', '5b', '--dtypes', 'bfloat16', '--jobs', '1']))\n"
    )
    proc = _aot(code=code)
    assert proc.returncode == 1, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
    assert "FAILED: rope_flash_attention 5b bfloat16 rope 128x64 w4 s3 sm_80: spill" in proc.stderr, proc.stderr


def test_shared_memory_over_the_limit_fails_the_check():
    code = (
        "import sys\n"
        "from cogvx.kernels import aot\n"
        "aot.SMEM_LIMITS[90] = 1024\n"
        "sys.exit(aot.main(['--targets', '90', '--models', '2b', '--dtypes', 'bfloat16', '--jobs', '1']))\n"
    )
    proc = _aot(code=code)
    assert proc.returncode == 1, f"exit {proc.returncode}\n{proc.stderr[-2000:]}"
    assert ": smem" in proc.stderr and "rope_flash_attention 2b" in proc.stderr, proc.stderr


def test_bad_usage_says_what_is_accepted():
    proc = _aot("--targets", "75")
    assert proc.returncode == 2 and "unknown targets [75]; choose from 80, 89, 90" in proc.stderr, proc.stderr
    proc = _aot("--quick", interpret=True)
    assert proc.returncode == 2 and "env -u TRITON_INTERPRET" in proc.stderr, proc.stderr
