"""diffusers' own CogVideoX pipeline tests (vendored, unchanged: tests/diffusers_suite) pass against cogvx's
classes with only their ``from diffusers import`` lines changed. diffusers' own classes pass 81 of them on a
CPU (the rest need a GPU); the ones cogvx fails test diffusers internals (README, diffusers section)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "diffusers_suite"))

import run as suite  # noqa: E402

# Tests of diffusers internals that no drop-in can pass: each needs diffusers' own objects.
EXPECTED_FAILURES = {
    # ReturnNameVisitor looks the class up in diffusers.pipelines and requires a DiffusionPipeline subclass
    "TestCogVideoXPipeline::test_encode_prompt_works_in_isolation",
    "TestCogVideoXImageToVideoPipeline::test_encode_prompt_works_in_isolation",
    "TestCogVideoXVideoToVideoPipeline::test_encode_prompt_works_in_isolation",
    "TestCogVideoXFunControlPipeline::test_encode_prompt_works_in_isolation",
    # count diffusers' HookRegistry objects (module._diffusers_hook) and their state fields
    "TestCogVideoXPipelinePyramidAttentionBroadcast::test_pyramid_attention_broadcast_layers",
    "TestCogVideoXPipelineFasterCache::test_faster_cache_state",
}


def test_staging_changes_only_the_import_line():
    src = "from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, DDIMScheduler\nx = 1\n"
    out = suite.rewrite_import(src, "cogvx")
    assert out == ("from diffusers import DDIMScheduler\nfrom cogvx.engine import AutoencoderKLCogVideoX, "
                   "CogVideoXPipeline\nx = 1\n")


@pytest.mark.slow
def test_diffusers_own_pipeline_tests_pass_on_cogvx():
    res = suite.run("cogvx")
    failed = {t for t, (outcome, _) in res["tests"].items() if outcome in ("failed", "error")}
    assert res["counts"].get("passed", 0) >= 75, sorted(failed)
    assert failed <= EXPECTED_FAILURES, sorted(failed - EXPECTED_FAILURES)
