"""The transformer call's owner (``cogvx.engine.pipelines.forward.Forward``): one rebuild rule after a weight
change. A LoRA loaded on an engine that was compiled and already ran the step cache's regions gives the
latents of an engine that had the LoRA from the start (a compiled graph freezes the weights it saw, so a
region left un-rebuilt would run the weights without the LoRA). The tasks are one table."""

from __future__ import annotations

import diffusers
import pytest
import torch
from safetensors.torch import save_file

from cogvx.engine import Engine, StepCache
from cogvx.engine.models.tasks import INPUTS, KINDS, PIPELINE_CLASSES, TASKS, tasks_of_kind
from cogvx.engine.pipelines.conditioning import CONDITIONING
from helpers import rel_l2

KW = dict(prompt="a fox in the snow", negative_prompt="blurry", num_frames=9, height=48, width=80,
          num_inference_steps=3, guidance_scale=6.0, seed=0)


def _lora_file(path, inner: int = 48, rank: int = 2):
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for blk in (0, 1):
        for proj in ("to_q", "to_v", "to_out.0"):
            key = f"transformer.transformer_blocks.{blk}.attn1.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inner, generator=g) * 0.3
            tensors[f"{key}.lora_B.weight"] = torch.randn(inner, rank, generator=g) * 0.3
    save_file(tensors, str(path))
    return path


@pytest.mark.slow
def test_lora_after_compiled_step_cache_matches_lora_from_the_start(ckpt_factory, tmp_path):
    ckpt, lora = ckpt_factory("rope"), _lora_file(tmp_path / "lora.safetensors")
    cache = StepCache(0)  # every step computed, through the regions
    engine = Engine.load(ckpt, compile=True, compile_cache_dir=tmp_path / "cache")
    base = engine.generate(**KW, step_cache=cache).latents  # the regions compiled with the base weights
    engine.load_lora(lora)
    got = engine.generate(**KW, step_cache=cache)
    assert "compile" in got.profile.stages  # rebuilt, and compiled again outside the steps
    ref = Engine.load(ckpt, compile=True, compile_cache_dir=tmp_path / "cache", lora=[(lora, 1.0)])
    want = ref.generate(**KW, step_cache=cache).latents
    assert rel_l2(base, want) > 1e-2, "the LoRA must change the latents for this test to mean anything"
    assert rel_l2(got.latents, want) <= 1e-5
    # and the whole compiled forward follows the adapter too
    assert rel_l2(engine.generate(**KW).latents, ref.generate(**KW).latents) <= 1e-5


def test_forward_rebuilds_by_one_rule(ckpt_factory):
    """Every weight change goes through Forward.weights_changed: the regions are new objects, warm shapes
    are forgotten; moving the call to a device rebuilds the position tables there."""
    engine = Engine.load(ckpt_factory("rope"))
    fwd = engine.forward
    regions, pos = fwd.regions, engine.positions(3, 6, 10)
    assert engine.positions(3, 6, 10) is pos  # computed once per shape
    fwd.weights_changed()
    assert fwd.regions is not regions and not fwd.warm_shapes
    engine.device = torch.device("cpu")
    assert engine.positions(3, 6, 10) is not pos and engine.forward.device == torch.device("cpu")


def test_tasks_are_one_table():
    """Every task has its conditioning, every diffusers CogVideoX pipeline class names a task, and the
    checkpoint kinds are the tasks that need no other checkpoint."""
    assert set(CONDITIONING) == set(TASKS)
    theirs = {n for n in dir(diffusers) if n.startswith("CogVideoX") and n.endswith("Pipeline")}
    assert theirs and theirs == set(PIPELINE_CLASSES)
    assert set(KINDS) == {"t2v", "i2v", "control"} and INPUTS == ("image", "video", "control_video")
    assert [t.name for t in tasks_of_kind("t2v")] == ["t2v", "v2v"]
    for kind in KINDS:
        assert all(t.kind == kind for t in tasks_of_kind(kind)) and tasks_of_kind(kind)[0].name == kind
