"""Offload on CUDA (``Engine.load(offload=...)`` with a GPU): "model" and "group" give the same latents and
frames as no offload, "sequential" too; the peak CUDA memory of each is recorded
(benchmarks/results/offload-*.json); model offload keeps a compiled forward (no recompile per move).
The GPU tests are marked gpu (``pytest -m gpu``). The block/layer streaming hooks run on the CPU too
(without the copies: the execution device is the CPU), which the first tests check everywhere.
The step time of "group" at the 5b shape is a benchmark: ``python benchmarks/bench_offload.py``."""

from __future__ import annotations

import datetime
import json
import re
import subprocess

import pytest
import torch
from diffusers import CogVideoXPipeline

from cogvx.engine import Engine
from cogvx.engine.dev.tiny import make_tiny_checkpoint
from cogvx.engine.runtime.compiling import dynamo_counts
from cogvx.engine.runtime.group_offload import BlockStreamer, block_units
from cogvx.engine.runtime.residency import Streamed
from helpers import rel_l2
from hostile_helpers import REPO
from test_lora import _make_lora
from test_residency import WIDE_T5, WIDE_TRANSFORMER

GEN = dict(prompt="a fox in the snow", negative_prompt="blurry", num_frames=9, height=96, width=128,
           num_inference_steps=3, guidance_scale=6.0, seed=0)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "t")


def test_block_streaming_hooks_run_every_unit_and_leave_the_result_unchanged_on_the_cpu(tiny):
    """The sequential placements (T5 and transformer one block at a time) with the CPU as the execution
    device: every hook and swap runs, only the copies are trivial."""
    ref = Engine.load(tiny, device="cpu").generate(**GEN, output_type="latent").latents
    engine = Engine.load(tiny, device="cpu")
    cpu = torch.device("cpu")
    t5 = BlockStreamer(lambda m: block_units(m.encoder.block, 1), cpu, use_stream=False)
    blocks = BlockStreamer(lambda m: block_units(m.transformer_blocks, 1), cpu, use_stream=False)
    engine.residency.place("text_encoder", Streamed(t5))
    engine.residency.place("transformer", Streamed(blocks))
    order = []
    for unit in block_units(engine.transformer.transformer_blocks, 1):
        unit[0].register_forward_pre_hook(lambda m, a, i=len(order): order.append(i))
        order.append(None)
    order.clear()
    seen = []

    def watch(e, i, t, kw):
        seen.append((len(blocks.handles), dict(blocks.on_gpu)))

    out = engine.generate(**GEN, output_type="latent", callback_on_step_end=watch)
    assert torch.equal(out.latents, ref)
    assert list(engine.residency.events) == [("text_encoder", "in"), ("text_encoder", "out"), ("transformer", "in"),
                                             ("transformer", "out")]
    n = engine.config.num_layers
    assert len(blocks.units) == n > 1 and len(t5.units) == len(engine.text_encoder.encoder.block)
    assert order == list(range(n)) * GEN["num_inference_steps"]  # every block, in order, each step
    # hooked during the stage, and after each step no unit is left on the device (no prefetch without a stream)
    assert all(h == 2 * n and not present for h, present in seen)
    assert not blocks.handles and not t5.handles  # unhooked at the stage's end


def test_group_units_are_groups_of_consecutive_blocks():
    blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(5))
    assert [len(u) for u in block_units(blocks, 2)] == [2, 2, 1]
    with pytest.raises(ValueError, match="group_size must be at least 1"):
        block_units(blocks, 0)


# ---------------------------------------------------------------------------------------- CUDA
@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("wide") / "w", transformer=WIDE_TRANSFORMER, t5=WIDE_T5)


def _run(model, offload, **load):
    torch.cuda.empty_cache()
    engine = Engine.load(model, device="cuda", dtype="float32", offload=offload, **load)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = engine.generate(**GEN)
    torch.cuda.synchronize()
    return engine, out, torch.cuda.max_memory_allocated()


@pytest.mark.gpu
@cuda
def test_model_group_and_sequential_offload_give_the_frames_of_no_offload_and_less_memory(wide, tmp_path):
    _, ref, peak_none = _run(wide, None)
    peaks, rows = {"none": peak_none}, []
    for mode in ("model", "group", "sequential"):
        engine, out, peak = _run(wide, mode)
        peaks[mode] = peak
        rows.append(dict(mode=mode, peak_cuda_bytes=peak, events=list(engine.residency.events),
                         same_latents=bool(torch.equal(out.latents, ref.latents))))
        assert torch.equal(out.latents, ref.latents), mode
        assert (out.frames == ref.frames).all(), mode
        assert not any(p.is_cuda for n in ("text_encoder", "transformer", "vae")
                       for p in getattr(engine, n).parameters()), f"{mode}: a component stayed on the GPU"
        del engine
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    device = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-")
    path = REPO / "benchmarks" / "results" / f"offload-{device}-{datetime.date.today():%Y%m%d}-{commit.strip()}.json"
    path.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), commit=commit.strip(), dtype="float32",
                                    shape=dict(frames=9, height=96, width=128, steps=GEN["num_inference_steps"]),
                                    checkpoint="tiny with T5 8x512 (129 MB) and transformer 6x512 (157 MB), fp32",
                                    peak_cuda_bytes=peaks, rows=rows), indent=2) + "\n")
    print(json.dumps(peaks), path)
    assert peaks["model"] < peaks["none"] and peaks["sequential"] < peaks["model"], peaks


@pytest.mark.gpu
@cuda
def test_model_offload_keeps_the_compiled_forward(wide):
    _, ref, _ = _run(wide, None, compile=True)
    engine, first, _ = _run(wide, "model", compile=True)
    before = dynamo_counts()
    second = engine.generate(**GEN)
    after = dynamo_counts()
    assert after["recompiles"] == before["recompiles"] and after["unique_graphs"] == before["unique_graphs"]
    assert torch.equal(first.latents, ref.latents) and torch.equal(second.latents, ref.latents)


@pytest.mark.gpu
@cuda
def test_group_offload_of_a_quantized_transformer(wide):
    """Offloaded components are quantized where they load (the CPU): the same int8 weights whether moved
    whole or streamed by blocks; against the GPU-quantized engine, only the quantization's rounding differs."""
    _, ref, _ = _run(wide, None, recipe="int8wo")
    _, moved, _ = _run(wide, "model", recipe="int8wo")
    _, streamed, _ = _run(wide, "group", recipe="int8wo")
    assert torch.equal(streamed.latents, moved.latents)
    assert rel_l2(streamed.latents, ref.latents) < 1e-3


@pytest.mark.gpu
@cuda
def test_model_and_group_offload_with_a_lora(wide, tmp_path):
    lora, _, _ = _make_lora(CogVideoXPipeline.from_pretrained(wide), "a", tmp_path / "a", 1)
    _, ref, _ = _run(wide, None, lora=[(lora, 0.7)])
    for mode in ("model", "group"):
        engine, out, _ = _run(wide, mode, lora=[(lora, 0.7)])
        assert torch.equal(out.latents, ref.latents), mode
        engine.fuse_lora()  # merged into the weights where they wait (CPU), moved or streamed with them
        fused = engine.generate(**GEN)
        assert rel_l2(fused.latents, ref.latents) < 1e-4, mode
