"""torchao recipes are saved in torchao's own safetensors format: diffusers loads a cogvx export with
``CogVideoXTransformer3DModel.from_pretrained`` (and the whole pipeline), and cogvx loads a transformer
that diffusers quantized with torchao and saved; format_version 1 folders written before keep loading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import CogVideoXPipeline as DiffusersPipeline
from diffusers import CogVideoXTransformer3DModel, TorchAoConfig
from safetensors import safe_open
from safetensors.torch import save_file
from torchao.quantization import Int8WeightOnlyConfig

from cogvx.engine import Engine
from cogvx.engine.io.checkpoint import CheckpointError
from cogvx.quantize.format import QUANT_FILE, export_component
from cogvx.quantize.metrics import sqnr

INT8WO_SQNR_FLOOR = 50.0  # tests/test_quantize_accuracy.py FLOORS["int8wo"]


def _inputs(cfg):
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(2, 3, cfg.in_channels, 6, 10, generator=g)
    text = torch.randn(2, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)
    return lat, text, torch.tensor([900, 300])


def _theirs(model, ckpt):
    """diffusers' forward on the fixed inputs (its own rotary tables)."""
    pipe = DiffusersPipeline.from_pretrained(ckpt, transformer=model)
    lat, text, t = _inputs(model.config)
    rot = pipe._prepare_rotary_positional_embeddings(48, 80, 3, torch.device("cpu"))
    with torch.inference_mode():
        return model(hidden_states=lat, encoder_hidden_states=text, timestep=t, image_rotary_emb=rot,
                     return_dict=False)[0]


def _ours(engine):
    lat, text, t = _inputs(engine.config)
    with torch.inference_mode():
        return engine.transformer(lat, text, t, engine.positions(3, 6, 10)).float()


@pytest.mark.parametrize("fuse_qkv", [False, True])
def test_int8wo_export_loads_in_diffusers(ckpt_factory, tmp_path, fuse_qkv):
    ckpt = ckpt_factory("rope")
    engine = Engine.load(ckpt, recipe="int8wo", fuse_qkv=fuse_qkv)
    out = engine.save_quantized(tmp_path / "q")
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "torchao"
    assert cfg["quantization_config"]["quant_type"]["default"]["_type"] == "Int8WeightOnlyConfig"
    info = json.loads((out / "transformer" / QUANT_FILE).read_text())
    assert info["format_version"] == 1 and not info["fused_qkv"]  # still a cogvx checkpoint; q/k/v written apart
    theirs = CogVideoXTransformer3DModel.from_pretrained(out, subfolder="transformer", torch_dtype=torch.float32)
    assert type(theirs.transformer_blocks[1].attn1.to_v.weight).__name__ == "Int8Tensor"
    assert type(theirs.proj_out.weight) is torch.nn.Parameter  # kept in full precision by the recipe's filter
    s = sqnr(_ours(engine), _theirs(theirs, ckpt))
    assert s >= INT8WO_SQNR_FLOOR, f"diffusers' forward of the export is {s:.1f} dB from cogvx's"
    again = Engine.load(out, fuse_qkv=fuse_qkv)  # fused again at load: the per-row int8 parts are joined
    assert (again.transformer.transformer_blocks[0].attn1.to_qkv is not None) == fuse_qkv
    assert again.recipes == {"transformer": "int8wo"} and torch.equal(_ours(again), _ours(engine))


def test_exported_pipeline_runs_in_diffusers(ckpt_factory, tmp_path):
    ckpt = ckpt_factory("rope")
    out = Engine.load(ckpt, recipe="int8wo").save_quantized(tmp_path / "q")
    pipe = DiffusersPipeline.from_pretrained(out, torch_dtype=torch.float32)  # diffusers' torchao default: bf16
    pipe.set_progress_bar_config(disable=True)
    common = dict(prompt="a boat", num_frames=9, height=32, width=48, num_inference_steps=2, output_type="np")
    expected = pipe(**common, generator=torch.Generator().manual_seed(0)).frames
    got = Engine.load(out).generate(**common, generator=torch.Generator().manual_seed(0)).frames
    assert abs(got - expected).max() <= 1e-4


def _diffusers_quantized_pipeline(ckpt, tmp_path):
    """A copy of the checkpoint whose transformer diffusers quantized (torchao int8 weight-only) and saved."""
    d = tmp_path / "dq"
    shutil.copytree(ckpt, d)
    shutil.rmtree(d / "transformer")
    model = CogVideoXTransformer3DModel.from_pretrained(ckpt, subfolder="transformer", torch_dtype=torch.float32,
                                                        quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    model.save_pretrained(d / "transformer", safe_serialization=True)
    return d, model


def test_cogvx_loads_a_transformer_diffusers_quantized(ckpt_factory, tmp_path):
    ckpt = ckpt_factory("rope")
    d, model = _diffusers_quantized_pipeline(ckpt, tmp_path)
    assert not (d / "transformer" / QUANT_FILE).exists()
    engine = Engine.load(d)
    assert engine.recipes == {"transformer": "int8wo"}
    assert type(engine.transformer.time_embedding.linear_1.weight).__name__ == "Int8Tensor"  # diffusers quantized all
    s = sqnr(_theirs(model, ckpt), _ours(engine))
    assert s >= INT8WO_SQNR_FLOOR, f"cogvx's forward of diffusers' checkpoint is {s:.1f} dB from diffusers'"
    out = engine.save_quantized(tmp_path / "again")  # and it can be exported again
    assert torch.equal(_ours(Engine.load(out)), _ours(engine))


def test_format_version_1_folders_still_load(ckpt_factory, tmp_path):
    """The layout cogvx wrote before: plain tensors, no safetensors metadata, no quantization_config."""
    ckpt = ckpt_factory("rope")
    engine = Engine.load(ckpt, recipe="int8wo")
    d = tmp_path / "v1"
    shutil.copytree(ckpt, d)
    tr = d / "transformer"
    for f in tr.glob("*.safetensors"):
        f.unlink()
    tensors, info = export_component(engine.transformer, "transformer", "int8wo")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tr / "diffusion_pytorch_model.safetensors"),
              metadata={"format": "pt"})
    info["files"] = ["diffusion_pytorch_model.safetensors"]
    (tr / QUANT_FILE).write_text(json.dumps(info))
    with safe_open(str(tr / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert set(f.metadata()) == {"format"}
    assert torch.equal(_ours(Engine.load(d)), _ours(engine))


@pytest.mark.parametrize("edit, message", [
    (lambda qc: {"quant_method": "bitsandbytes", "load_in_8bit": True}, "quant_method is 'bitsandbytes'"),
    (lambda qc: {**qc, "quant_type": {"default": {**qc["quant_type"]["default"], "_type": "Int4WeightOnlyConfig",
                                                  "_data": {"group_size": 128}}}}, "matches no cogvx recipe"),
])
def test_other_quantized_folders_are_clear_errors(ckpt_factory, tmp_path, edit, message):
    d, _ = _diffusers_quantized_pipeline(ckpt_factory("rope"), tmp_path)
    cfg_path = d / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = edit(cfg["quantization_config"])
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        Engine.load(d)


def test_text_encoder_export_loads_in_transformers(ckpt_factory, tmp_path):
    from transformers import T5EncoderModel

    engine = Engine.load(ckpt_factory("rope"), recipe={"text_encoder": "int8wo"})
    out = engine.save_quantized(tmp_path / "q")
    theirs = T5EncoderModel.from_pretrained(out, subfolder="text_encoder", torch_dtype=torch.float32)
    assert type(theirs.encoder.block[0].layer[0].SelfAttention.q.weight).__name__ == "Int8Tensor"
    ids = torch.randint(0, 250, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s = sqnr(engine.text_encoder(input_ids=ids)[0], theirs(input_ids=ids)[0])
    assert s >= INT8WO_SQNR_FLOOR, f"transformers' forward of the export is {s:.1f} dB from cogvx's"
