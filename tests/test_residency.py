"""CPU residency (``Engine.load(offload=...)`` on a CPU): each component is read from the checkpoint for
its stage and released after. The reference is the same engine without offload (itself checked against
diffusers in test_generate / test_tasks): latents and frames must be bit-identical, the schedule of
moves must be text encoder -> transformer -> VAE with nothing held across stages, and a child process's
peak RSS must fall to about the largest component (the slow test at the end)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import CogVideoXPipeline
from PIL import Image
from safetensors.torch import load_file

from cogvx.engine import Engine
from cogvx.engine.cli import main
from cogvx.engine.dev.tiny import make_tiny_checkpoint
from cogvx.engine.pipelines.offload import check_offload
from cogvx.engine.runtime.compiling import dynamo_counts
from cogvx.engine.runtime.residency import is_released
from cogvx.quantize import quantize_
from test_lora import _make_lora

GEN = dict(prompt="a fox in the snow", negative_prompt="blurry", num_frames=9, height=32, width=48,
           num_inference_steps=2, guidance_scale=6.0, seed=0)
SCHEDULE = [("text_encoder", "in"), ("text_encoder", "out"), ("transformer", "in"), ("transformer", "out"),
            ("vae", "in"), ("vae", "out")]


@pytest.fixture(scope="module")
def ckpt(ckpt_factory):
    return ckpt_factory("rope")


@pytest.fixture(scope="module")
def reference(ckpt):
    return Engine.load(ckpt, device="cpu").generate(**GEN)


def _released(engine) -> dict[str, bool]:
    return {n: is_released(getattr(engine, n)) for n in ("text_encoder", "transformer", "vae")}


def test_each_stage_holds_only_its_component_and_the_result_is_unchanged(ckpt, reference):
    engine = Engine.load(ckpt, device="cpu", offload="model")
    assert _released(engine) == dict(text_encoder=True, transformer=True, vae=True)  # nothing read at load
    during = []

    def watch(e, i, t, kw):
        during.append(_released(e))

    out = engine.generate(**GEN, callback_on_step_end=watch)
    assert list(engine.residency.events) == SCHEDULE
    assert during == [dict(text_encoder=True, transformer=False, vae=True)] * GEN["num_inference_steps"]
    assert _released(engine) == dict(text_encoder=True, transformer=True, vae=True)
    assert torch.equal(out.latents, reference.latents)
    assert (out.frames == reference.frames).all()
    assert out.profile.stages["offload"] > 0  # the reads are timed apart from the stages they serve
    again = engine.generate(**GEN)  # a second call reads everything again, the same way
    assert list(engine.residency.events) == SCHEDULE * 2
    assert torch.equal(again.latents, reference.latents)


def test_stages_that_need_no_component_read_none(ckpt, reference):
    engine = Engine.load(ckpt, device="cpu", offload="model")
    cond = engine.encode([GEN["prompt"]])
    uncond = engine.encode([GEN["negative_prompt"]])
    assert list(engine.residency.events) == SCHEDULE[:2] * 2  # Engine.encode asks the residency too
    engine.residency.events.clear()
    out = engine.generate(**{**GEN, "prompt": None, "negative_prompt": None}, prompt_embeds=cond,
                          negative_prompt_embeds=uncond, output_type="latent")
    assert list(engine.residency.events) == SCHEDULE[2:4]  # no T5 (embeddings given), no VAE (latents out)
    assert torch.equal(out.latents, reference.latents)


def test_a_vae_in_its_own_dtype_is_read_in_that_dtype(ckpt):
    latents = torch.randn(1, 2, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    plain = Engine.load(ckpt, device="cpu", vae_dtype="bfloat16")
    plain.vae.enable_tiling()
    engine = Engine.load(ckpt, device="cpu", vae_dtype="bfloat16", offload="model")
    engine.vae.enable_tiling()  # a switch on the module: kept across releases
    out = engine.decode(latents)  # Engine.decode asks the residency for the VAE
    assert list(engine.residency.events) == [("vae", "in"), ("vae", "out")]
    assert engine.vae.use_tiling and next(engine.vae.parameters()).dtype == torch.bfloat16
    assert torch.equal(out, plain.decode(latents))


def test_image_to_video_reads_the_vae_for_the_image_then_again_for_decoding(tmp_path):
    d = make_tiny_checkpoint(tmp_path / "i2v", task="i2v")
    args = dict(prompt="a fox", num_frames=9, height=96, width=128, num_inference_steps=2, seed=0,
                image=Image.new("RGB", (128, 96), (200, 120, 40)), output_type="latent")
    ref = Engine.load(d, device="cpu").generate(**args)
    engine = Engine.load(d, device="cpu", offload="model")
    out = engine.generate(**{**args, "output_type": "np"})
    assert list(engine.residency.events) == [("text_encoder", "in"), ("text_encoder", "out"), ("vae", "in"),
                                             ("vae", "out"), ("transformer", "in"), ("transformer", "out"),
                                             ("vae", "in"), ("vae", "out")]
    assert torch.equal(out.latents, ref.latents)


def test_lora_side_branches_survive_releases_and_a_fused_lora_keeps_the_transformer(ckpt, tmp_path):
    pipe = CogVideoXPipeline.from_pretrained(ckpt)
    lora, _, _ = _make_lora(pipe, "a", tmp_path / "a", 1)
    plain = Engine.load(ckpt, device="cpu", lora=[(lora, 0.7)])
    ref = plain.generate(**GEN, output_type="latent").latents
    engine = Engine.load(ckpt, device="cpu", offload="model", lora=[(lora, 0.7)])
    assert torch.equal(engine.generate(**GEN, output_type="latent").latents, ref)
    assert torch.equal(engine.generate(**GEN, output_type="latent").latents, ref)  # branches kept across releases
    plain.fuse_lora()
    engine.fuse_lora()
    engine.residency.events.clear()
    fused = engine.generate(**GEN, output_type="latent").latents
    # fused weights are not the checkpoint's: the transformer stays in memory while they are fused
    assert ("transformer", "kept") in engine.residency.events and not is_released(engine.transformer)
    assert torch.equal(fused, plain.generate(**GEN, output_type="latent").latents)
    engine.unfuse_lora()
    engine.residency.events.clear()
    engine.generate(**GEN, output_type="latent")
    assert ("transformer", "out") in engine.residency.events


def test_a_quantized_transformer_stays_and_the_rest_is_read_per_stage(ckpt, tmp_path):
    ref = Engine.load(ckpt, device="cpu", recipe="int8wo").generate(**GEN, output_type="latent").latents
    engine = Engine.load(ckpt, device="cpu", recipe="int8wo", offload="model")
    out = engine.generate(**GEN, output_type="latent").latents
    assert list(engine.residency.events) == SCHEDULE[:2]  # T5 read and released; the int8 transformer stays
    assert "resident" in engine.residency.describe()["transformer"]
    assert torch.equal(out, ref)
    saved = engine.save_quantized(tmp_path / "q")  # every component read in for the export
    assert _released(engine) == dict(text_encoder=True, transformer=False, vae=True)
    assert torch.equal(Engine.load(saved, device="cpu").generate(**GEN, output_type="latent").latents, ref)


def test_a_component_quantized_after_loading_is_kept_not_silently_reread(ckpt):
    engine = Engine.load(ckpt, device="cpu", offload="model")
    with engine.residency.use("transformer") as transformer:
        quantize_(transformer, "int8wo")  # behind the engine's back: not in engine.recipes
    assert list(engine.residency.events)[-1] == ("transformer", "kept") and not is_released(engine.transformer)


def test_compiled_forward_is_not_rebuilt_by_a_release(ckpt, reference):
    """aot_eager keeps the weights as graph inputs: a re-read transformer runs the same graph. Inductor on
    the CPU freezes the weights into the graph: the transformer is kept in memory instead."""
    engine = Engine.load(ckpt, device="cpu", offload="model")
    engine.compile(backend="aot_eager")
    first = engine.generate(**GEN, output_type="latent").latents
    before = dynamo_counts()
    second = engine.generate(**GEN, output_type="latent").latents
    after = dynamo_counts()
    assert after["recompiles"] == before["recompiles"] and after["unique_graphs"] == before["unique_graphs"]
    assert torch.equal(first, reference.latents) and torch.equal(second, reference.latents)
    assert list(engine.residency.events)[-2:] == [("transformer", "in"), ("transformer", "out")]
    engine.compile(True)  # inductor (nothing compiles until a call): its CPU freezing holds the weights
    with pytest.warns(UserWarning, match="keeps the transformer in memory"):
        with engine.residency.use("transformer"):
            pass
    assert list(engine.residency.events)[-1] == ("transformer", "kept")


def test_offload_can_be_turned_off_and_on_again(ckpt, reference):
    engine = Engine.load(ckpt, device="cpu", offload="model")
    engine.enable_offload(None)  # every component read back and kept
    assert _released(engine) == dict(text_encoder=False, transformer=False, vae=False)
    engine.residency.events.clear()
    assert torch.equal(engine.generate(**GEN).latents, reference.latents)
    assert not engine.residency.events  # nothing moves
    engine.enable_offload("model")
    assert _released(engine) == dict(text_encoder=True, transformer=True, vae=True)
    assert torch.equal(engine.generate(**GEN).latents, reference.latents)
    assert list(engine.residency.events) == SCHEDULE


def test_bad_offload_requests_fail_before_loading(ckpt):
    with pytest.raises(ValueError, match="offload must be None, 'model', 'group' or 'sequential'"):
        Engine.load(ckpt, device="cpu", offload="layers")
    with pytest.raises(ValueError, match="does not combine with parallel"):  # (load needs a process group first)
        check_offload("model", torch.device("cpu"), parallel="cfg")
    with pytest.raises(ValueError, match="streams weights from hooks that a compiled graph cannot trace"):
        check_offload("group", torch.device("cuda"), compile=True)
    preset = Engine.from_preset("tiny", device="cpu")
    with pytest.raises(ValueError, match="not loaded from a checkpoint directory"):
        preset.enable_offload("model")
    with pytest.warns(UserWarning, match="no accelerator to stream blocks to"):
        engine = Engine.load(ckpt, device="cpu", offload="group")
    assert _released(engine) == dict(text_encoder=True, transformer=True, vae=True)


def test_cli_offload_flag(ckpt, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    rc = main(["generate", "--model", str(ckpt), "--prompt", "a fox", "--frames", "9", "--height", "32", "--width",
               "48", "--steps", "1", "--seed", "0", "--offload", "model", "--out", str(out)])
    assert rc == 0 and out.is_file()
    assert "offload " in capsys.readouterr().out  # the reads are reported as their own stage
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(ckpt), "--offload", "layers", "--out", str(out)])
    assert "invalid choice: 'layers'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ peak memory (slow)
_CHILD = r"""
import json, sys
import torch
from safetensors.torch import save_file
from cogvx.engine import Engine
from cogvx.engine.cli import main

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

torch.set_num_threads(1)
model, mode, out = sys.argv[1], None if sys.argv[2] == "none" else sys.argv[2], sys.argv[3]
base = status("VmRSS:")  # torch imported, nothing loaded
engine = Engine.load(model, device="cpu", offload=mode)
r = engine.generate("a fox in the snow", num_frames=9, height=96, width=128, num_inference_steps=2, seed=0)
save_file({"latents": r.latents.contiguous(), "frames": torch.from_numpy(r.frames).contiguous()}, out)
print(json.dumps(dict(base=base, peak=status("VmHWM:"), events=list(engine.residency.events))))
"""

# Widths whose fp32 components are 129 MB (T5: 8 layers, d_model 512) and 150 MB (transformer: 6 layers,
# inner dim 512): of similar size, as in the real 5b (T5-XXL 4.7B, transformer 5.6B parameters).
WIDE_TRANSFORMER = dict(num_attention_heads=8, attention_head_dim=64, text_embed_dim=512, time_embed_dim=512,
                        num_layers=6)
WIDE_T5 = dict(d_kv=64, num_heads=8, d_ff=2048, num_layers=8)


@pytest.mark.slow
def test_peak_memory_is_about_the_largest_component(tmp_path):
    d = make_tiny_checkpoint(tmp_path / "wide", transformer=WIDE_TRANSFORMER, t5=WIDE_T5)
    sizes = {c: sum(f.stat().st_size for f in (d / c).glob("*.safetensors")) for c in ("text_encoder", "transformer")}
    assert 100e6 < min(sizes.values()) and max(sizes.values()) < 200e6
    runs = {}
    for mode in ("none", "model"):
        out = tmp_path / f"{mode}.safetensors"
        p = subprocess.run([sys.executable, "-P", "-c", _CHILD, str(d), mode, str(out)], capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[mode] = json.loads(p.stdout.strip().splitlines()[-1])
        runs[mode]["out"] = out
    a, b = load_file(runs["none"]["out"]), load_file(runs["model"]["out"])
    assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["frames"], b["frames"])
    assert runs["model"]["events"] == [list(e) for e in SCHEDULE]
    # what the generate adds to the process (the imported libraries are the same ~0.5 GB in both)
    grown = {m: r["peak"] - r["base"] for m, r in runs.items()}
    ratio = grown["model"] / grown["none"]
    print(f"\npeak RSS above the imports: none {grown['none'] / 1e6:.0f} MB, model {grown['model'] / 1e6:.0f} MB "
          f"(ratio {ratio:.2f}); whole process {runs['none']['peak'] / 1e6:.0f} / "
          f"{runs['model']['peak'] / 1e6:.0f} MB; "
          f"components {sizes['text_encoder'] / 1e6:.0f} + {sizes['transformer'] / 1e6:.0f} MB")
    assert ratio <= 0.6, grown
