"""Hostile checkpoints: listed file names that escape the component folder, damaged and
inconsistent safetensors, files that are not files, wrongly typed weights. Each is a one-line
CheckpointError naming the file, raised before any weight is read; nothing outside the checkpoint
is opened, and no file is read that would make the load hang."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cogvx.engine import Engine
from cogvx.engine import loading
from cogvx.engine.loading import components, quantized, text  # noqa: F401  (loading.<part> below)
from cogvx.engine.io import CheckpointError
from hostile_helpers import WEIGHTS, copy_ckpt, edit_json, opened

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def sharded(ckpt_factory, tmp_path):
    """A private copy of the sharded tiny checkpoint (at tmp/ck) and its transformer index."""
    d = copy_ckpt(ckpt_factory("rope", shard=True), tmp_path / "ck")
    return d, next((d / "transformer").glob("*.index.json"))


@pytest.fixture
def plain(ckpt_factory, tmp_path):
    return copy_ckpt(ckpt_factory("rope"), tmp_path / "ck")


def _retarget_first_shard(index: Path, name) -> str:
    """Point every tensor of the index's first shard at ``name``; returns the shard's real name."""
    d = json.loads(index.read_text())
    first = sorted(set(d["weight_map"].values()))[0]
    d["weight_map"] = {k: (name if v == first else v) for k, v in d["weight_map"].items()}
    index.write_text(json.dumps(d))
    return first


# ------------------------------------------------------------------ item 11: paths out of the folder
@pytest.mark.parametrize("name, outside", [
    ("../outside.safetensors", "ck/outside.safetensors"),
    ("../../outside.safetensors", "outside.safetensors"),
    ("{abs}", "abs/outside.safetensors"),
    ("./../../outside.safetensors", "outside.safetensors"),
    ("sub/../../outside.safetensors", "ck/outside.safetensors"),
    ("..\\..\\outside.safetensors", None),
    ("/etc/passwd", None),
    ("/proc/self/environ", None),
    ("/dev/zero", None),
    ("..", None),
    ("", None),
    ("shard.safetensors\u0000.txt", None),
])
def test_shard_names_cannot_leave_the_folder(sharded, tmp_path, name, outside):
    d, index = sharded
    target = None
    if outside is not None:  # a valid shard waits outside: a loader that followed the name would succeed
        target = tmp_path / outside
        target.parent.mkdir(parents=True, exist_ok=True)
    if name == "{abs}":
        name = str(target)
    first = _retarget_first_shard(index, name)
    if target is not None:
        shutil.copyfile(d / "transformer" / first, target)
    with opened() as seen, pytest.raises(CheckpointError, match="not a (plain )?file name"):
        Engine.load(d)
    bad = [p for p in seen if p.startswith(("/etc", "/proc", "/dev")) or (target and Path(p) == target)]
    assert not bad, f"opened outside the checkpoint: {bad}"


@pytest.mark.parametrize("name", [12, None, ["a.safetensors"], {"f": 1}, True])
def test_shard_entries_that_are_not_names(sharded, name):
    d, index = sharded
    _retarget_first_shard(index, name)
    with pytest.raises(CheckpointError, match=r"index.json: shard entry .* is not a file name"):
        Engine.load(d)


@pytest.mark.parametrize("content, message", [
    ("{", "is not valid JSON"),
    ("[]", "holds a JSON list"),
    ('{"weight_map": []}', "no 'weight_map' entries"),
    ('{"weight_map": {}}', "no 'weight_map' entries"),
    ('{"metadata": {}}', "no 'weight_map' entries"),
    ('{"weight_map": {"x": "model.bin"}}', "not .safetensors files; pickle weights are never read"),
    (b"\xff\xfe{}", "is not valid JSON"),
])
def test_malformed_index(sharded, content, message):
    d, index = sharded
    index.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CheckpointError, match=message) as e:
        Engine.load(d)
    assert index.name in str(e.value)


def test_tensor_in_two_shards_is_refused(sharded):
    """A tensor stored twice used to load from whichever shard came last."""
    d, index = sharded
    shards = sorted((d / "transformer").glob("*.safetensors"))
    a, b = load_file(shards[0]), load_file(shards[1])
    key = next(iter(a))
    b[key] = torch.full_like(a[key], 7.0)
    save_file(b, shards[1])
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' is stored twice: in {shards[0].name} and in "
                                              rf"{shards[1].name}"):
        Engine.load(d)


def test_index_and_shards_that_disagree(sharded):
    """A shard holding a tensor the index places in another shard: the index is not what the files
    hold, so the checkpoint is refused (not loaded by whatever the files happen to contain)."""
    d, index = sharded
    m = json.loads(index.read_text())
    keys = sorted(m["weight_map"])
    shards = sorted(set(m["weight_map"].values()))
    k = next(k for k in keys if m["weight_map"][k] == shards[0])
    m["weight_map"][k] = shards[1]
    index.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=rf"{index.name}.*'{k}'"):
        Engine.load(d)


@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/passwd", "a/b.safetensors", "", 3])
def test_quantization_file_list_cannot_leave_the_folder(quantized_ckpt, tmp_path, name):
    d = copy_ckpt(quantized_ckpt, tmp_path / "q")
    edit_json(d / "transformer" / "quantization.json", files=[name])
    with opened() as seen, pytest.raises(CheckpointError, match="quantization.json: weight file .* (not a plain "
                                                                "file name|is not a file name)"):
        Engine.load(d)
    assert not [p for p in seen if p.startswith("/etc") or p.endswith("x.safetensors")]


# ------------------------------------------------------------------ damaged safetensors, odd files
def _header(f: Path, header: bytes, body: bytes = b"") -> None:
    f.write_bytes(struct.pack("<Q", len(header)) + header + body)


@pytest.mark.parametrize("make, message", [
    (lambda f: f.write_bytes(b""), "damaged or truncated"),
    (lambda f: f.write_bytes(b"\x01\x02\x03"), "damaged or truncated"),
    (lambda f: _header(f, b"[1, 2]"), "damaged or truncated"),
    (lambda f: _header(f, b"{nope"), "damaged or truncated"),
    (lambda f: _header(f, b'{"w": {"dtype": "F32"}}'), "damaged or truncated"),
    (lambda f: _header(f, b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', b"\0" * 8),
     "damaged or truncated"),
    (lambda f: f.write_bytes(struct.pack("<Q", 2**63) + b"{}"), "damaged or truncated"),
    (lambda f: _header(f, b'{"w": {"dtype": "F32", "shape": "x", "data_offsets": [0, 0]}}'), "damaged or truncated"),
    (lambda f: f.mkdir(), "is a directory, not a safetensors file"),
    (lambda f: f.symlink_to(f), "broken symbolic link \\(or a link loop\\)"),
    (lambda f: f.symlink_to(f.parent / "nowhere"), "broken symbolic link"),
    (lambda f: os.mkfifo(f), "not a regular file"),
    (lambda f: f.symlink_to("/dev/zero"), "not a regular file"),
])
def test_damaged_weight_files(plain, make, message):
    f = plain / "transformer" / WEIGHTS
    f.unlink()
    make(f)
    with pytest.raises(CheckpointError, match=message) as e:
        Engine.load(plain)  # a FIFO used to block this call forever
    assert WEIGHTS in str(e.value)


# ------------------------------------------------------------------ item 18: dtypes of stored weights
@pytest.mark.parametrize("component, key", [
    ("transformer", "proj_out.weight"),
    ("vae", "decoder.conv_out.conv.weight"),
    ("text_encoder", "encoder.final_layer_norm.weight"),
])
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_integer_or_complex_weights_are_refused(plain, component, key, dtype):
    f = next((plain / component).glob("*.safetensors"))
    state = load_file(f)
    state[key] = state[key].to(dtype)
    save_file(state, f)
    with pytest.raises(CheckpointError, match=rf"'{key}' is stored as {dtype}"):
        Engine.load(plain)


def _edit_quantized(d: Path, edit) -> None:
    f = d / "transformer" / WEIGHTS
    state = load_file(f)
    edit(state)
    save_file(state, f)


@pytest.mark.parametrize("key, to, message", [
    ("transformer_blocks.0.attn1.to_q._weight_scale", torch.int64, "holds scales but is stored as torch.int64"),
    ("transformer_blocks.0.attn1.to_q._weight_scale", torch.bool, "holds scales but is stored as torch.bool"),
    ("proj_out.weight", torch.int32, "'proj_out.weight' is stored as torch.int32"),
    ("proj_out.weight", torch.float16, "'proj_out.weight' is torch.float16, but the quantization file says"),
    ("norm_out.norm.weight", torch.uint8, "'norm_out.norm.weight' is stored as torch.uint8"),
    ("transformer_blocks.0.attn1.to_q._weight_qdata", torch.float32, "_weight_qdata' holds quantized weights but is "
                                                                      "stored as torch.float32"),
    ("transformer_blocks.0.attn1.to_q._weight_qdata", torch.int16, "_weight_qdata' holds quantized weights"),
])
def test_quantized_checkpoint_dtypes(quantized_ckpt, tmp_path, key, to, message):
    d = copy_ckpt(quantized_ckpt, tmp_path / "q")
    _edit_quantized(d, lambda s: s.__setitem__(key, s[key].to(to)))
    with pytest.raises(CheckpointError, match=message):
        Engine.load(d)


# ------------------------------------------------------------------ malformed JSON: one class of errors
CONFIG_CASES = [
    # (file, content: a dict merged into the real file, or a raw string), expected message
    ("model_index.json", "not json", "not valid JSON"),
    ("model_index.json", "[1]", "holds a JSON list"),
    ("model_index.json", "{}", "_class_name None is not a CogVideoX pipeline"),
    ("model_index.json", {"_class_name": ["CogVideoXPipeline"]}, "is not a CogVideoX pipeline"),
    ("model_index.json", {"_class_name": {"a": 1}}, "is not a CogVideoX pipeline"),
    ("transformer/config.json", "", "not valid JSON"),
    ("transformer/config.json", "null", "holds a JSON NoneType"),
    ("transformer/config.json", {"use_rotary_positional_embeddings": "False"}, "must be true or false"),
    ("transformer/config.json", {"sample_height": -12}, "sample_height=-12 is out of range"),
    ("transformer/config.json", {"num_layers": 10**9}, "num_layers=1000000000 is out of range"),
    ("transformer/config.json", {"num_layers": 500}, "num_layers=500 but the weight files hold 2 blocks"),
    ("transformer/config.json", {"num_attention_heads": "3"}, "num_attention_heads='3' must be an integer"),
    ("transformer/config.json", {"attention_head_dim": 16.5}, "attention_head_dim=16.5 must be an integer"),
    ("transformer/config.json", {"norm_eps": "1e-5"}, "norm_eps='1e-5' must be a finite number"),
    ("transformer/config.json", '{"norm_eps": NaN}', "norm_eps=nan must be a finite number"),
    ("transformer/config.json", {"patch_size_t": 0}, "patch_size_t=0 is out of range"),
    ("transformer/config.json", {"num_attention_heads": True}, "must be an integer"),
    ("transformer/config.json", {"activation_fn": 5}, "activation_fn=5 must be a string"),
    ("transformer/config.json", {"text_embed_dim": 10**7}, "text_embed_dim=10000000 is out of range"),
    ("vae/config.json", {"block_out_channels": "abc"}, "block_out_channels='abc' must be a list"),
    ("vae/config.json", {"block_out_channels": [8, "8", 8, 8]}, r"block_out_channels\[1\]='8' must be an integer"),
    ("vae/config.json", {"latents_mean": ["x"]}, r"latents_mean\[0\]='x' must be a finite number"),
    ("vae/config.json", {"block_out_channels": [8, 8, 8, 8.5]}, r"block_out_channels\[3\]=8.5 must be an integer"),
    ("vae/config.json", {"scaling_factor": 0}, "scaling_factor=0 is out of range"),
    ("vae/config.json", {"temporal_compression_ratio": 3}, "must be a power of two"),
    ("vae/config.json", {"down_block_types": 5}, "down_block_types=5 must be a list"),
    ("vae/config.json", {"layers_per_block": 10**6}, "layers_per_block=1000000 is out of range"),
    ("text_encoder/config.json", {"d_model": "20"}, "d_model='20' must be an integer"),
    ("text_encoder/config.json", {"num_layers": 10**9}, "num_layers=1000000000 must be an integer from 1"),
    ("text_encoder/config.json", {"vocab_size": -1}, "vocab_size=-1 must be an integer from 1"),
    ("text_encoder/config.json", {"feed_forward_proj": 5}, "feed_forward_proj"),
    ("text_encoder/config.json", {"layer_norm_epsilon": "x"}, "layer_norm_epsilon='x' must be a finite number"),
    ("text_encoder/config.json", {"relative_attention_num_buckets": "32"}, "relative_attention_num_buckets='32'"),
    ("text_encoder/config.json", {"num_layers": 5}, "num_layers=5 but the weight files hold 2 blocks"),
    ("scheduler/scheduler_config.json", {"num_train_timesteps": 10**9}, "num_train_timesteps=1000000000"),
    ("scheduler/scheduler_config.json", {"set_alpha_to_one": "False"}, "set_alpha_to_one='False'"),
    ("scheduler/scheduler_config.json", {"rescale_betas_zero_snr": 0}, "rescale_betas_zero_snr=0"),
    ("scheduler/scheduler_config.json", {"trained_betas": ["x"] * 1000}, "trained_betas"),
    ("scheduler/scheduler_config.json", {"trained_betas": [2.0] * 1000}, "trained_betas"),
    ("scheduler/scheduler_config.json", {"beta_schedule": 5}, "beta_schedule=5"),
    ("scheduler/scheduler_config.json", {"snr_shift_scale": "3"}, "snr_shift_scale='3'"),
    ("scheduler/scheduler_config.json", "[]", "holds a JSON list"),
    ("tokenizer/tokenizer_config.json", {"extra_ids": 10**6}, "extra_ids=1000000 must be an integer from 0"),
    ("tokenizer/tokenizer_config.json", {"extra_ids": "100"}, "extra_ids='100' must be an integer"),
    ("tokenizer/tokenizer_config.json", {"extra_ids": 500}, "extra_ids=500 exceeds the text encoder's vocabulary"),
    ("tokenizer/special_tokens_map.json", {"eos_token": 5}, "special token 5 is not a string"),
    ("tokenizer/special_tokens_map.json", {"eos_token": {"content": None}}, "is not a string"),
    ("tokenizer/special_tokens_map.json", {"pad_token": "<nope>"}, "pad_token '<nope>'.*is not a control piece"),
    ("tokenizer/tokenizer_config.json", "[]", "holds a JSON list"),
    ("tokenizer/special_tokens_map.json", "{", "not valid JSON"),
]


@pytest.mark.parametrize("rel, content, message", CONFIG_CASES, ids=lambda v: str(v)[:40])
def test_malformed_config_files_are_named_before_weights_are_read(plain, monkeypatch, rel, content, message):
    path = plain / rel
    if isinstance(content, dict):
        base = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**base, **content}))
    else:
        path.write_text(content)
    for part in (loading.components, loading.text, loading.quantized):  # every loader that reads weights
        monkeypatch.setattr(part, "read_tensors", lambda *a, **k: pytest.fail("weights read before the check"))
    with pytest.raises(CheckpointError, match=message) as e:
        Engine.load(plain)
    assert path.name in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("rel", ["model_index.json", "transformer/config.json", "scheduler/scheduler_config.json"])
def test_a_directory_or_a_fifo_where_a_json_file_belongs(plain, rel):
    path = plain / rel
    path.unlink()
    path.mkdir()
    with pytest.raises(CheckpointError, match=f"{path.name} is a directory"):
        Engine.load(plain)
    path.rmdir()
    os.mkfifo(path)
    with pytest.raises(CheckpointError, match=f"{path.name}.* not a regular file"):
        Engine.load(plain)  # would block forever in open()


@pytest.mark.parametrize("content, message", [
    ({"files": "x.safetensors"}, "'files' must be a JSON list"),
    ({"layers": []}, "'layers' must be a JSON object"),
    ({"format_version": "1"}, "format_version '1' is not supported"),
    ({"recipe": {"name": 5}}, "recipe has no name"),
    ({"recipe": "int8wo"}, "'recipe' must be a JSON object"),
    ({"recipe": {"name": "nope"}}, "unknown quantization recipe 'nope'"),
    ({"dtype": "float64"}, "dtype 'float64' is not one of"),
    ({"fused_qkv": "true"}, "fused_qkv must be true or false"),
    ({"backend": "bnb"}, "backend 'bnb' does not match recipe"),
    ({"layers": {"transformer_blocks.0.attn1.to_q": 5}}, "every entry of 'layers' must be a JSON object"),
    ({"layers": {"transformer_blocks.9.attn1.to_q": {}}}, "is not a Linear layer of the model"),
    ({"fused_qkv": True}, "fused q/k/v"),
])
def test_malformed_quantization_file(quantized_ckpt, tmp_path, content, message):
    d = copy_ckpt(quantized_ckpt, tmp_path / "q")
    edit_json(d / "transformer" / "quantization.json", **content)
    with pytest.raises(CheckpointError, match=message) as e:
        Engine.load(d)
    assert "quantization.json" in str(e.value)


# ------------------------------------------------------------------ further hostile cases
@pytest.mark.parametrize("rel", ["model_index.json", "transformer/config.json",
                                 "transformer/diffusion_pytorch_model.safetensors.index.json"])
def test_a_huge_json_file_is_refused_unread(plain, rel):
    path = plain / rel
    with open(path, "ab") as fh:
        fh.truncate(65 * 2**20)  # sparse: 65 MiB that would take json.loads seconds and gigabytes
    with opened() as seen, pytest.raises(CheckpointError, match=rf"{path.name} is 68157440 bytes, more than any"):
        Engine.load(plain)
    assert str(path) not in seen


def test_nul_in_the_model_path(plain):
    with pytest.raises(CheckpointError, match="holds a NUL character"):
        Engine.load(str(plain) + "\0/x")


def test_many_unindexed_shards_are_named_briefly(plain):
    f = plain / "transformer" / WEIGHTS
    for i in range(500):
        os.link(f, plain / "transformer" / f"part-{i:04d}.safetensors")
    with pytest.raises(CheckpointError, match=r"several .safetensors files \('diffusion.*' and 495 more\) but no") as e:
        Engine.load(plain)
    assert len(str(e.value)) < 600
