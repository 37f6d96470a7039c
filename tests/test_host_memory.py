"""The engine's allocator setting on the CPU (cogvx.engine.runtime.host_memory): each case runs in its own
process, since the setting is process-wide and would change the rest of the suite."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Page faults of malloc'ing, touching and freeing a 256 MiB block.
_FAULTS = """
import ctypes, resource
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(256 << 20); ctypes.memset(p, 1, 256 << 20); libc.free(p)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
"""


def _run(code: str, **env) -> str:
    run = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip()


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt: Linux")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    """With glibc's defaults a 256 MiB block is mmapped and faulted in on every allocation (65536 pages);
    after keep_freed_memory() the heap keeps the freed block and the next allocation reuses its pages."""
    code = _FAULTS + """
from cogvx.engine.runtime.host_memory import keep_freed_memory
faults()
plain = faults()
print(keep_freed_memory(), plain, faults(), faults())
"""
    state, plain, first, again = _run(code, COGVX_CPU_MALLOC="keep").split()
    assert state == "keep" and int(plain) > 60000  # glibc's default: every page faulted again
    assert int(again) < 1000  # the heap keeps the freed pages (the first call after the switch grows it)
    state, _, _, again = _run(code, COGVX_CPU_MALLOC="system").split()
    assert state == "system" and int(again) > 60000


def test_the_engine_sets_it_on_a_cpu_load_and_a_bad_value_fails_before_the_weights_load(ckpt_factory, monkeypatch):
    code = f"""
from cogvx.engine import Engine
from cogvx.engine.runtime import host_memory
from cogvx.engine.pipelines import engine as engine_module
def no_weights(*a, **k):
    raise SystemExit("the weights started loading")
if {{bad!r}}:
    engine_module.load_components = no_weights
Engine.load({str(ckpt_factory())!r}, device="cpu")
print(repr(host_memory.setting()))
"""
    assert _run(code.replace("{bad!r}", "False")) == "'keep'"
    run = subprocess.run([sys.executable, "-P", "-c", code.replace("{bad!r}", "True")], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "COGVX_CPU_MALLOC": "jemalloc"})
    assert run.returncode != 0 and "the weights started loading" not in run.stderr
    assert "COGVX_CPU_MALLOC='jemalloc' is not one of keep, system" in run.stderr
