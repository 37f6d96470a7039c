"""Reliability pass 3 (issue 20): prompts that are not Unicode text, an int8dq-cpu engine loaded under
torch.inference_mode(), a LoRA loaded after quantization surviving save_quantized, ``--overwrite`` that
replaces only what cogvx wrote, and ``cogvx eval`` refusing NaN goldens, NaN floors and tampered goldens
before it generates."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from cogvx.engine import Engine
from cogvx.engine.cli import main
from cogvx.engine.pipelines.quantized_export import export_quantized
from hostile_helpers import copy_ckpt, guard, small_call, unguard

SMALL = ["--frames", "1", "--height", "16", "--width", "16", "--steps", "1", "--seeds", "0"]


@pytest.fixture(scope="module")
def engine(ckpt_factory):
    return Engine.load(ckpt_factory("rope"))


# ---------------------------------------------------------------- item 5: a lone surrogate in the prompt
@pytest.mark.parametrize("kw, where", [(dict(prompt="a\ud800b"), "prompt"),
                                       (dict(prompt=["ok", "x\udfff"]), "prompt 1"),
                                       (dict(negative_prompt="bad \udc80"), "negative_prompt")])
def test_a_lone_surrogate_is_a_clear_error_before_tokenizing(engine, kw, where):
    guard(engine)
    try:
        with pytest.raises(ValueError, match=rf"{where} holds a lone surrogate U\+D[89A-F][0-9A-F]{{2}} at character"):
            engine.generate(**small_call(**kw))
    finally:
        unguard(engine)


def test_the_tokenizer_itself_refuses_a_lone_surrogate(engine):
    with pytest.raises(ValueError, match="prompt 0 holds a lone surrogate U\\+D800 at character 1"):
        engine.tokenizer(["a\ud800b"])


# ---------------------------------------------------------------- item 11: int8dq-cpu under inference_mode
def test_int8dq_cpu_engine_loaded_under_inference_mode_generates(ckpt_factory):
    ckpt = ckpt_factory("rope")
    outside = Engine.load(ckpt, recipe="int8dq-cpu").generate(**small_call()).latents
    with torch.inference_mode():
        inside = Engine.load(ckpt, recipe="int8dq-cpu").generate(**small_call()).latents
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)


# ---------------------------------------------------------------- item 6: save_quantized keeps a LoRA
def _lora_file(engine, path, seed=0):
    """A rank-2 LoRA on two of the tiny transformer's layers, in diffusers' key format (no metadata:
    scale 1), written as a safetensors file."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in ("transformer_blocks.0.attn1.to_q", "proj_out"):
        layer = engine.transformer.get_submodule(name)
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(2, layer.in_features, generator=g) * 0.5
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, 2, generator=g) * 0.5
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("recipe", ["int8wo", "quanto-int8", "int8dq-cpu", "bnb-int8"])  # the four the trial named
def test_save_quantized_keeps_a_lora_loaded_after_quantization(ckpt_factory, tmp_path, recipe):
    q = Engine.load(ckpt_factory("rope"), recipe=recipe)
    base = q.generate(**small_call()).latents
    q.load_lora(_lora_file(q, tmp_path / "l.safetensors"), scale=0.7)
    with_lora = q.generate(**small_call()).latents
    assert (with_lora - base).abs().max() > 1e-3  # the LoRA changes the output
    again = Engine.load(q.save_quantized(tmp_path / "q"))
    torch.testing.assert_close(again.generate(**small_call()).latents, with_lora, rtol=0, atol=1e-6)
    assert again.lora.active == {"default_0": 0.7}


# ---------------------------------------------------------------- item 7: --overwrite replaces only ours
def _users_folder(d):
    d.mkdir()
    (d / "thesis.txt").write_text("four years of work")
    (d / "docs").mkdir()
    (d / "docs" / "notes.md").write_text("notes")
    return d


def _tree(d):
    return sorted((str(p.relative_to(d)), p.read_bytes() if p.is_file() else None) for p in d.rglob("*"))


def test_quantize_overwrite_refuses_a_folder_it_did_not_write(ckpt_factory, tmp_path, capsys):
    users = _users_folder(tmp_path / "mine")
    before = _tree(users)
    rc = main(["quantize", "--model", str(ckpt_factory("rope")), "--recipe", "int8wo", "--out", str(users),
               "--overwrite"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "not what this command writes" in err and "docs/" in err and "thesis.txt" in err
    assert _tree(users) == before  # nothing changed


def test_quantize_overwrite_replaces_its_own_checkpoint_and_an_empty_folder(ckpt_factory, tmp_path):
    src = ckpt_factory("rope")
    (tmp_path / "empty").mkdir()
    export_quantized(src, "int8wo", tmp_path / "empty", overwrite=True)
    export_quantized(src, "int8wo", tmp_path / "q")
    out = export_quantized(src, "fp8wo", tmp_path / "q", overwrite=True)
    assert json.loads((out / "transformer" / "quantization.json").read_text())["recipe"]["name"] == "fp8wo"
    (out / "thesis.txt").write_text("mine")  # a user file put inside: no longer replaceable
    with pytest.raises(FileExistsError, match="thesis.txt"):
        export_quantized(src, "int8wo", out, overwrite=True)
    assert (out / "thesis.txt").read_text() == "mine"


def test_quantize_out_dot_fails_before_the_work(ckpt_factory, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr("cogvx.engine.pipelines.quantized_export.load_transformer", lambda *a, **k: 1 / 0)
    for argv in (["--out", "."], ["--out", ".", "--overwrite"], ["--out", ".."]):
        assert main(["quantize", "--model", str(ckpt_factory("rope")), "--recipe", "int8wo", *argv]) == 2
        assert "current directory" in capsys.readouterr().err
    assert os.listdir(work) == []


# ---------------------------------------------------------------- item 12 and weak: cogvx eval's goldens
@pytest.fixture(scope="module")
def goldens(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval3")
    assert main(["make-tiny", "--out", str(d / "tiny")]) == 0
    assert main(["eval", "--model", str(d / "tiny"), "--recipe", "int8wo", "--reference", "none", *SMALL,
                 "--out", str(d / "rep"), "--record", str(d / "g")]) == 0  # weak: crashed with no reference
    return d


def _compare(d, goldens_dir, *extra):
    return main(["eval", "--model", str(d / "tiny"), "--recipe", "int8wo", "--reference", "none",
                 "--compare", str(goldens_dir), "--out", str(d / "cmp"), *extra])


def _tamper(d, name, edit_doc=None, edit_tensors=None):
    g = copy_ckpt(d / "g", d / name)
    if edit_doc:
        doc = json.loads((g / "goldens.json").read_text())
        edit_doc(doc)
        (g / "goldens.json").write_text(json.dumps(doc))
    if edit_tensors:
        t = load_file(str(g / "video_000.safetensors"))
        edit_tensors(t)
        save_file(t, str(g / "video_000.safetensors"))
    return g


def _nan(t):
    t["latents"][0, 0, 0, 0] = float("nan")
    t["frames"][0, 0, 0, 0] = float("nan")


def _inf(t):
    t["latents"][..., 0] = float("inf")


@pytest.mark.parametrize("name, doc, tensors, message", [
    ("nan", None, _nan, "holds NaN or inf values"),
    ("inf", None, _inf, "holds NaN or inf values"),
    ("missing", lambda d: d["videos"].pop(), None, "lists 1 video\\(s\\) but its settings make 2"),
    ("frames", lambda d: d["settings"].update(num_frames=4097), None, "holds 1 frames but the goldens' settings say "
                                                                      "num_frames=4097"),
    ("size", lambda d: d["settings"].update(height=32), None, "do not fit the goldens' settings"),
])
def test_tampered_goldens_are_refused_before_generating(goldens, monkeypatch, capsys, name, doc, tensors, message):
    g = _tamper(goldens, name, doc, tensors)
    monkeypatch.setattr("cogvx.engine.cli.eval.run_videos", lambda *a, **k: 1 / 0)
    assert _compare(goldens, g) == 2
    err = capsys.readouterr().err
    assert "record the goldens again" in err
    assert re.search(message, err), err


@pytest.mark.parametrize("flag", ["--min-psnr", "--min-ssim", "--min-sqnr"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_non_finite_floor_is_refused(goldens, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        _compare(goldens, goldens / "g", f"{flag}={value}")
    assert e.value.code == 2
    assert "must be a finite number" in capsys.readouterr().err


def test_record_overwrite_replaces_only_goldens(goldens, capsys):
    users = _users_folder(goldens / "users")
    before = _tree(users)
    assert main(["eval", "--model", str(goldens / "tiny"), "--recipe", "int8wo", "--reference", "none", *SMALL,
                 "--out", str(goldens / "r2"), "--record", str(users), "--overwrite"]) == 2
    assert "is not a goldens folder" in capsys.readouterr().err and _tree(users) == before
    assert _compare(goldens, goldens / "g") == 0  # the untampered goldens still pass
