"""LoRA: adapters made with peft on a small diffusers checkpoint and saved with diffusers'
``save_lora_weights`` give the frames diffusers' ``load_lora_weights`` gives (fp32, relative L2 <= 1e-4),
at two scales, with two adapters, with fused q/k/v, merged into the weights; on int8wo the recipe's
SQNR floor holds; compiled with no graph break; bad LoRA files are refused before anything changes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import CogVideoXPipeline
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from cogvx.engine import Engine
from cogvx.engine.cli import main
from cogvx.engine.io.checkpoint import CheckpointError
from cogvx.engine.models.lora import LoraError
from cogvx.engine.runtime.compiling import dynamo_counts
from cogvx.quantize.metrics import sqnr
from helpers import rel_l2
from test_quantize_accuracy import FLOORS

TOL = 1e-4
GEN = dict(prompt="a fox in the snow", negative_prompt="blurry", num_frames=9, height=32, width=48,
           num_inference_steps=2, guidance_scale=6.0)


def _lora_config(kind: str) -> LoraConfig:
    if kind == "a":  # attention only, a rank and an alpha pattern, alpha != rank
        return LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                          rank_pattern={"to_v": 2}, alpha_pattern={"to_out.0": 3}, init_lora_weights=False)
    # feed-forward and q/v with a bias on lora_B, rank-stabilized scaling
    return LoraConfig(r=3, lora_alpha=5, target_modules=["to_q", "to_v", "ff.net.0.proj", "ff.net.2"],
                      lora_bias=True, use_rslora=True, init_lora_weights=False)


def _make_lora(pipe, kind: str, out, seed: int) -> tuple:
    """A random LoRA made by peft on the diffusers transformer, saved by diffusers."""
    torch.manual_seed(seed)
    cfg = _lora_config(kind)
    pipe.transformer.add_adapter(cfg, adapter_name="tmp")
    sd = {k: v * 0.5 for k, v in get_peft_model_state_dict(pipe.transformer, adapter_name="tmp").items()}
    pipe.transformer.delete_adapters("tmp")
    CogVideoXPipeline.save_lora_weights(out, transformer_lora_layers=sd, transformer_lora_adapter_metadata=cfg.to_dict())
    return out, sd, cfg


@pytest.fixture(scope="module")
def setup(ckpt_factory, tmp_path_factory):
    ckpt = ckpt_factory("rope")
    pipe = CogVideoXPipeline.from_pretrained(ckpt)
    pipe.set_progress_bar_config(disable=True)
    d = tmp_path_factory.mktemp("loras")
    a = _make_lora(pipe, "a", d / "a", 1)
    b = _make_lora(pipe, "b", d / "b", 2)
    base = pipe(**GEN, output_type="np", generator=torch.Generator().manual_seed(0)).frames
    pipe.load_lora_weights(a[0], adapter_name="a")
    pipe.load_lora_weights(b[0], adapter_name="b")
    return dict(ckpt=ckpt, pipe=pipe, a=a, b=b, dir=d, base=base)


def _diffusers(setup, names, weights):
    pipe = setup["pipe"]
    pipe.set_adapters(names, weights)
    return pipe(**GEN, output_type="np", generator=torch.Generator().manual_seed(0)).frames


def _ours(engine):
    return engine.generate(**GEN, generator=torch.Generator().manual_seed(0)).frames


def _close(got, expected, what):
    err = rel_l2(torch.from_numpy(got), torch.from_numpy(expected))
    assert err <= TOL, f"{what}: relative L2 {err:.3g} > {TOL}"


@pytest.mark.parametrize("scale", [1.0, 0.4])
def test_one_adapter_at_two_scales_matches_diffusers(setup, scale):
    engine = Engine.load(setup["ckpt"])
    engine.load_lora(setup["a"][0], "a", scale=scale)
    expected = _diffusers(setup, ["a"], [scale])
    _close(_ours(engine), expected, f"adapter a at {scale}")
    assert rel_l2(torch.from_numpy(expected), torch.from_numpy(setup["base"])) > 20 * TOL  # the LoRA changes the video far beyond the tolerance


@pytest.mark.parametrize("fuse_qkv", [False, True])
def test_two_adapters_with_weights_and_fused_qkv_match_diffusers(setup, fuse_qkv):
    engine = Engine.load(setup["ckpt"], fuse_qkv=fuse_qkv)
    engine.load_lora(setup["a"][0], "a")
    engine.load_lora(setup["b"][0] / "pytorch_lora_weights.safetensors", "b")
    engine.set_adapters(["a", "b"], [0.7, 1.3])
    expected = _diffusers(setup, ["a", "b"], [0.7, 1.3])
    _close(_ours(engine), expected, f"adapters a+b, fuse_qkv={fuse_qkv}")
    engine.set_adapters("b", 0.5)
    _close(_ours(engine), _diffusers(setup, ["b"], [0.5]), "adapter b alone after set_adapters")


def test_fused_into_the_weights_matches_and_unfuses(setup):
    engine = Engine.load(setup["ckpt"], fuse_qkv=True)
    engine.load_lora(setup["a"][0], "a")
    engine.load_lora(setup["b"][0], "b")
    engine.set_adapters(["a", "b"], [0.7, 1.3])
    engine.fuse_lora()
    assert not any(hasattr(m, "lora") for m in engine.transformer.modules())  # merged: no side branch left
    _close(_ours(engine), _diffusers(setup, ["a", "b"], [0.7, 1.3]), "fused a+b")
    with pytest.raises(LoraError, match="unfuse_lora"):
        engine.set_adapters("a", 1.0)
    engine.unfuse_lora()
    engine.set_adapters([], [])
    _close(_ours(engine), setup["base"], "after unfuse, no adapter active")


def test_network_alpha_keys_read_like_the_metadata(setup, tmp_path):
    """The same adapter written with per-module '.alpha' scalars and no metadata."""
    _, sd, cfg = setup["a"]
    tensors = {f"transformer.{k}": v.contiguous() for k, v in sd.items()}
    for key, v in sd.items():
        if key.endswith("lora_A.weight"):
            mod = key[: -len(".lora_A.weight")]
            leaf = mod.split(".")[-2] + "." + mod.split(".")[-1] if mod.endswith("to_out.0") else mod.split(".")[-1]
            r, alpha = cfg.rank_pattern.get(leaf, cfg.r), cfg.alpha_pattern.get(leaf, cfg.lora_alpha)
            assert v.shape[0] == r
            tensors[f"transformer.{mod}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(tmp_path / "alpha.safetensors"))
    engine = Engine.load(setup["ckpt"])
    engine.load_lora(tmp_path / "alpha.safetensors", "a")
    _close(_ours(engine), _diffusers(setup, ["a"], [1.0]), "alpha keys")


def _forward_pair(setup, engine):
    """cogvx's transformer and diffusers' (adapter a at 1.0, fp32) on one fixed CFG batch."""
    pipe = setup["pipe"]
    pipe.set_adapters(["a"], [1.0])
    cfg = engine.config
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(2, 3, cfg.in_channels, 6, 10, generator=g)
    text = torch.randn(2, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)
    t = torch.tensor([900, 300])
    rot = pipe._prepare_rotary_positional_embeddings(48, 80, 3, torch.device("cpu"))
    with torch.inference_mode():
        ref = pipe.transformer(hidden_states=lat, encoder_hidden_states=text, timestep=t, image_rotary_emb=rot,
                               return_dict=False)[0]
        return ref, engine.transformer(lat, text, t, engine.positions(3, 6, 10)).float()


@pytest.mark.parametrize("how", ["side branch on int8wo", "merged before int8wo"])
def test_int8wo_keeps_its_sqnr_floor_with_a_lora(setup, how):
    if how == "side branch on int8wo":
        engine = Engine.load(setup["ckpt"], recipe="int8wo")
        engine.load_lora(setup["a"][0], "a")
        assert hasattr(engine.transformer.transformer_blocks[0].attn1.to_q, "lora")
    else:
        engine = Engine.load(setup["ckpt"], recipe="int8wo", lora=[(setup["a"][0], 1.0)])
        assert engine.lora.baked and not engine.lora.files
        engine.load_lora(setup["b"][0], "b")  # a further adapter runs as a side branch on the int8 layers,
        with pytest.raises(LoraError, match="quantized"):  # but cannot be merged into them
            engine.fuse_lora()
        engine.delete_adapters("b")
    ref, got = _forward_pair(setup, engine)
    fp32 = _forward_pair(setup, Engine.load(setup["ckpt"], lora=[(setup["a"][0], 1.0)]))[1]
    assert rel_l2(fp32, ref) <= TOL
    s = sqnr(ref, got)
    assert s >= FLOORS["int8wo"][0], f"{how}: SQNR {s:.1f} dB < {FLOORS['int8wo'][0]} dB"


@pytest.mark.parametrize("recipe", ["quanto-int8", "bnb-int8", "fp8wo"])
def test_side_branch_on_other_quantized_layers_keeps_their_floor(setup, recipe):
    """optimum-quanto and bitsandbytes replace the Linear modules; the branch hooks onto theirs."""
    engine = Engine.load(setup["ckpt"], recipe=recipe)
    engine.load_lora(setup["a"][0], "a")
    ref, got = _forward_pair(setup, engine)
    s = sqnr(ref, got)
    assert s >= FLOORS[recipe][0], f"{recipe} + LoRA side branch: SQNR {s:.1f} dB < {FLOORS[recipe][0]} dB"


@pytest.mark.slow
def test_compiled_with_lora_has_no_graph_break_and_follows_adapter_changes(setup):
    eager = Engine.load(setup["ckpt"])
    eager.load_lora(setup["a"][0], "a")
    engine = Engine.load(setup["ckpt"], compile=True)
    engine.load_lora(setup["a"][0], "a")
    before = dynamo_counts()["graph_breaks"]
    _close(_ours(engine), _ours(eager), "compiled, adapter a")
    for e in (engine, eager):
        e.set_adapters("a", 0.3)
    result = engine.generate(**GEN, generator=torch.Generator().manual_seed(0))
    _close(result.frames, _ours(eager), "compiled after set_adapters (a new graph, not the frozen old one)")
    assert "compile" in result.profile.stages  # recompiled in the compile stage, not inside the steps
    assert dynamo_counts()["graph_breaks"] == before


def _write(tmp_path, tensors, name="l.safetensors", metadata=None):
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(tmp_path / name), metadata=metadata)
    return tmp_path / name


def test_bad_lora_files_are_refused_before_anything_changes(setup, tmp_path):
    engine = Engine.load(setup["ckpt"])
    torch.save({"x": torch.zeros(1)}, tmp_path / "lora.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        engine.load_lora(tmp_path / "lora.bin")
    (tmp_path / "only").mkdir()
    torch.save({}, tmp_path / "only" / "pytorch_lora_weights.bin")
    with pytest.raises(CheckpointError, match="pickle files are never loaded"):
        engine.load_lora(tmp_path / "only")
    a, b = torch.zeros(2, 48), torch.zeros(48, 2)
    good = {"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": a,
            "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": b}
    cases = [
        ({**good, "transformer.transformer_blocks.9.attn1.to_q.lora_A.weight": a,
          "transformer.transformer_blocks.9.attn1.to_q.lora_B.weight": b}, None, LoraError, "not in this transformer"),
        ({k: v[:, :40] if "lora_A" in k else v for k, v in good.items()}, None, LoraError, "trained for another model"),
        ({k.replace("lora_B", "lora_magnitude_vector") if "lora_B" in k else k: v for k, v in good.items()}, None,
         CheckpointError, "DoRA"),
        (good, {"lora_adapter_metadata": json.dumps({"transformer.use_dora": True})}, CheckpointError, "DoRA"),
        (good, {"lora_adapter_metadata": json.dumps({"transformer.r": 8})}, CheckpointError, "r=8"),
        # a convolution's LoRA takes a 1x1 lora_B (peft's); and its lora_A must fit the layer's kernel
        ({"transformer.patch_embed.proj.lora_A.weight": torch.zeros(2, 4, 2, 2),
          "transformer.patch_embed.proj.lora_B.weight": torch.zeros(48, 2, 2, 2)}, None, CheckpointError,
         "convolution"),
        ({"transformer.patch_embed.proj.lora_A.weight": torch.zeros(2, 4, 3, 3),
          "transformer.patch_embed.proj.lora_B.weight": torch.zeros(48, 2, 1, 1)}, None, LoraError,
         "trained for another model"),
    ]
    state = {k: v.clone() for k, v in engine.transformer.state_dict().items()}
    for tensors, meta, exc, message in cases:
        with pytest.raises(exc, match=message):
            engine.load_lora(_write(tmp_path, tensors, metadata=meta))
    assert not engine.lora.names and not any(hasattr(m, "lora") for m in engine.transformer.modules())
    assert all(torch.equal(v, state[k]) for k, v in engine.transformer.state_dict().items())
    engine.load_lora(_write(tmp_path, good), "x")
    with pytest.raises(LoraError, match="already loaded"):
        engine.load_lora(_write(tmp_path, good), "x")
    with pytest.raises(LoraError, match="unknown adapter"):
        engine.set_adapters(["y"], [1.0])


def test_cli_lora_flag(setup, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    rc = main(["generate", "--model", str(setup["ckpt"]), "--prompt", "a fox", "--frames", "9", "--height", "32",
               "--width", "48", "--steps", "1", "--seed", "0", "--lora", f"{setup['a'][0]}:0.5",
               "--lora", str(setup["b"][0]), "--recipe", "int8wo", "--out", str(out)])
    assert rc == 0 and out.is_file()
    (tmp_path / "x.pt").write_bytes(b"\x80")
    rc = main(["generate", "--model", str(setup["ckpt"]), "--prompt", "a fox", "--lora", str(tmp_path / "x.pt"),
               "--out", str(out)])
    assert rc == 2 and "pickle" in capsys.readouterr().err


def test_lora_frames_are_finite_numbers(setup):
    engine = Engine.load(setup["ckpt"])
    engine.load_lora(setup["b"][0])
    assert engine.lora.names == ["default_0"]
    frames = _ours(engine)
    assert np.isfinite(frames).all()
