"""Test setup shared by every test module."""

import os
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run on the CPU only through the interpreter, and the variable must be set
# before any @triton.jit function is defined: set here, before any test imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory):
    """Writes (once per argument set) a tiny diffusers-layout checkpoint and returns its path."""
    from checkpoints import write_checkpoint

    cache = {}

    def make(variant="rope", scheduler="CogVideoXDDIMScheduler", shard=False, seed=0):
        key = (variant, scheduler, shard, seed)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ckpt-{variant}-{scheduler[8:11]}-{int(shard)}-{seed}")
            cache[key] = write_checkpoint(out, variant, seed=seed, scheduler=scheduler, shard=shard)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def quantized_ckpt(ckpt_factory, tmp_path_factory):
    """The tiny "rope" checkpoint with an int8wo transformer, saved once per session (copy it to break it)."""
    from cogvx.engine import Engine

    return Engine.load(ckpt_factory("rope"), recipe="int8wo").save_quantized(tmp_path_factory.mktemp("q8") / "q")


# Engines whose transformer, text encoder and VAE fail if called (hostile_helpers.guard_inputs): the bad-input
# tests of test_hostile_media.py and test_tasks_bad_input.py share one of each per session (they only read them).
@pytest.fixture(scope="session")
def t2v(ckpt_factory):
    from cogvx.engine import Engine
    from hostile_helpers import guard_inputs

    return guard_inputs(Engine.load(ckpt_factory("rope")))


@pytest.fixture(scope="session")
def i2v(ckpt_factory):
    from cogvx.engine import Engine
    from hostile_helpers import guard_inputs

    return guard_inputs(Engine.load(ckpt_factory("learned")))


@pytest.fixture(scope="session")
def control(ckpt_factory):
    from cogvx.engine import Engine
    from hostile_helpers import guard_inputs

    return guard_inputs(Engine.load(ckpt_factory("control")))
