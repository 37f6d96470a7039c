"""Every task with every recipe that runs on this machine, with the Triton kernels, and through
save_quantized: the conditioning (concatenated channels, ofs, the part-way schedule) composes with the rest."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cogvx.engine import Engine
from cogvx.quantize import RECIPES, availability
from helpers import rel_l2

RUNNABLE = [n for n in RECIPES if availability(n, "cpu")[0]]
IMG = np.random.default_rng(0).random((48, 80, 3), dtype=np.float32)
VID = np.random.default_rng(1).random((9, 48, 80, 3), dtype=np.float32)
TASKS = {  # task -> (checkpoint variant, inputs)
    "i2v-1.5": ("v15_ofs", dict(image=IMG)),
    "i2v-5b": ("learned", dict(image=IMG)),
    "v2v": ("rope", dict(video=VID, strength=0.8)),
    "control": ("control", dict(control_video=VID)),
}
ARGS = dict(prompt="a fox", num_frames=9, height=48, width=80, num_inference_steps=2, seed=0, output_type="latent")


@pytest.fixture(scope="module")
def v15_reference(ckpt_factory):
    return Engine.load(ckpt_factory("v15_ofs")).generate(image=IMG, **ARGS).latents


@pytest.mark.parametrize("recipe", RUNNABLE)
def test_every_runnable_recipe_runs_image_to_video_15(ckpt_factory, v15_reference, recipe):
    """CogVideoX 1.5 I2V: its linear patch embedding and ofs embedding go through each recipe's filter
    (quanto-w8a8 also calibrates with the ofs input)."""
    ref = v15_reference
    got = Engine.load(ckpt_factory("v15_ofs"), recipe=recipe).generate(image=IMG, **ARGS).latents
    assert torch.isfinite(got).all()
    assert rel_l2(got, ref) < 0.3, recipe  # quantized, but the same video (a wrong wiring gives ~1.4)


@pytest.mark.parametrize("task", list(TASKS))
def test_tasks_with_int8wo_kernels_and_save_quantized(ckpt_factory, task, tmp_path):
    variant, inputs = TASKS[task]
    torch_k = Engine.load(ckpt_factory(variant), recipe="int8wo", kernels="torch")
    ref = torch_k.generate(**inputs, **ARGS).latents
    triton_k = Engine.load(ckpt_factory(variant), recipe="int8wo", kernels="triton")  # the interpreter here
    assert rel_l2(triton_k.generate(**inputs, **ARGS).latents, ref) <= 1e-5
    out = torch_k.save_quantized(tmp_path / "q")
    again = Engine.load(out, kernels="torch")
    assert again.task == torch_k.task and again.recipes == {"transformer": "int8wo"}
    assert torch.equal(again.generate(**inputs, **ARGS).latents, ref)
