"""Prompt tokenizer and T5 text encoder against independent references.

References: transformers' T5Tokenizer on the same spiece.model (needs protobuf to convert it;
skipped without), sentencepiece's own encoder plus the T5 convention (text, EOS=1, pad=0), and a
tiny random transformers T5EncoderModel saved with save_pretrained.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from cogvx.engine.loading import load_text_encoder, load_tokenizer
from cogvx.engine.models.text_encoder import encode_prompts
from cogvx.engine.models.tokenizer import PromptTruncationWarning
from cogvx.engine.dev.tiny_tokenizer import make_tiny_tokenizer, tiny_corpus
from cogvx.engine.io import CheckpointError

EXTRA_IDS = 3

PROMPTS = [
    "A red fox runs across a snowy forest. The camera pans left.",
    "  leading and trailing spaces   ",
    "many    inner\tspaces\nand newlines",
    "Punctuation!!! (brackets), semi;colons: \"quotes\" - dashes — ellipsis...",
    "Digits 2024-05-01 at 12:30, 4K 1080p 24fps, 3.14159",
    "Unicode: café Zürich naïve Ｆｕｌｌｗｉｄｔｈ ① 日本語 😀",
    "",
    "x",
    "UPPER lower MiXeD",
]
# Literal special-token strings: transformers maps them to their ids (sentencepiece alone does not).
SPECIAL_PROMPTS = ["x </s> y <pad>", "a<unk>b", "<extra_id_0>hello<extra_id_2> there", "  </s>  "]
LONG = " ".join(tiny_corpus(12))  # a few hundred tokens with the tiny vocabulary


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=128, extra_ids=EXTRA_IDS)


@pytest.fixture(scope="module")
def sp(tok_dir):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tok_dir / "spiece.model"))


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    pytest.importorskip("google.protobuf", reason="transformers 5 needs protobuf to read spiece.model")
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(str(tok_dir))


def _hf_ids(hf_tok, prompts, max_length=226):
    out = hf_tok(prompts, padding="max_length", max_length=max_length, truncation=True,
                 add_special_tokens=True, return_tensors="pt")
    return out.input_ids


def _sp_ids(sp, prompts, max_length=226):
    """The documented T5 convention on sentencepiece's own ids: text[:L-1], EOS (1), pad (0)."""
    rows = []
    for p in prompts:
        ids = sp.encode(p)[: max_length - 1] + [1]
        rows.append(ids + [0] * (max_length - len(ids)))
    return torch.tensor(rows)


# ---------------------------------------------------------------- tokenizer


def test_tiny_tokenizer_is_deterministic_with_t5_ids(tmp_path, tok_dir, sp):
    again = make_tiny_tokenizer(tmp_path / "again", vocab_size=128, extra_ids=EXTRA_IDS)
    assert (again / "spiece.model").read_bytes() == (tok_dir / "spiece.model").read_bytes()
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert sp.bos_id() == -1 and sp.get_piece_size() == 128
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "T5Tokenizer" and cfg["model_max_length"] == 226
    assert json.loads((tok_dir / "special_tokens_map.json").read_text())["eos_token"] == "</s>"


def test_ids_match_sentencepiece_t5_convention(tok_dir, sp):
    tok = load_tokenizer(tok_dir)
    got = tok(PROMPTS)
    assert got.input_ids.dtype == torch.long and got.input_ids.shape == (len(PROMPTS), 226)
    assert torch.equal(got.input_ids, _sp_ids(sp, PROMPTS))
    assert got.num_truncated == [0] * len(PROMPTS)
    assert tok.vocab_size == 128 + EXTRA_IDS


def test_ids_match_transformers_t5tokenizer(tok_dir, hf_tok):
    tok = load_tokenizer(tok_dir)
    prompts = PROMPTS + SPECIAL_PROMPTS + [LONG]
    with pytest.warns(PromptTruncationWarning):
        got = tok(prompts).input_ids
    assert torch.equal(got, _hf_ids(hf_tok, prompts))
    assert tok.vocab_size == len(hf_tok)


def test_truncation_keeps_eos_and_names_dropped_count(tok_dir, sp):
    tok = load_tokenizer(tok_dir)
    n = len(sp.encode(LONG))
    assert n > 300, "the long prompt must exceed 226 tokens for this test"
    with pytest.warns(PromptTruncationWarning, match=rf"prompt 1 .*dropped the last {n - 225} tokens"):
        got = tok(["short", LONG])
    assert got.num_truncated == [0, n - 225]
    assert torch.equal(got.input_ids, _sp_ids(sp, ["short", LONG]))
    assert got.input_ids[1, -1].item() == 1  # EOS survives truncation
    small = tok(["short"], max_length=8).input_ids
    assert small.shape == (1, 8) and small[0, -1].item() == 0


def test_tokenizer_json_built_with_tokenizers_library(tmp_path, tok_dir, sp):
    # A Unigram tokenizer.json from the same pieces and scores, assembled with `tokenizers` alone
    # (no protobuf: NFKC stands in for sentencepiece's precompiled nmt_nfkc map, equal on ASCII).
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import Unigram

    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    t = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    t.normalizer = normalizers.NFKC()
    t.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    t.decoder = decoders.Metaspace()
    d = tmp_path / "tokjson"
    d.mkdir()
    t.save(str(d / "tokenizer.json"))
    shutil.copy(tok_dir / "tokenizer_config.json", d)
    tok = load_tokenizer(d)
    assert tok.source.name == "tokenizer.json"
    ascii_prompts = [p for p in PROMPTS if p.isascii()] + [LONG]
    with pytest.warns(PromptTruncationWarning):
        got = tok(ascii_prompts)
    assert torch.equal(got.input_ids, _sp_ids(sp, ascii_prompts))


def test_tokenizer_json_converted_by_transformers(tmp_path, hf_tok):
    d = tmp_path / "converted"
    hf_tok.save_pretrained(str(d))
    (d / "spiece.model").unlink(missing_ok=True)
    tok = load_tokenizer(d)
    assert tok.source.name == "tokenizer.json"
    prompts = PROMPTS + SPECIAL_PROMPTS
    assert torch.equal(tok(prompts).input_ids, _hf_ids(hf_tok, prompts))


def test_spiece_model_preferred_over_tokenizer_json(tmp_path, tok_dir):
    d = tmp_path / "both"
    shutil.copytree(tok_dir, d)
    (d / "tokenizer.json").write_text("not json: must not be read")
    assert load_tokenizer(d).source.name == "spiece.model"


def test_missing_tokenizer_files_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "spiece.model" in msg and "tokenizer.json" in msg


# ---------------------------------------------------------------- text encoder


def _tiny_t5(vocab_size):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=vocab_size,
                   feed_forward_proj="gated-gelu")
    torch.manual_seed(0)
    return T5EncoderModel(cfg).eval()


@pytest.fixture(scope="module")
def ref_t5(tok_dir):
    return _tiny_t5(load_tokenizer(tok_dir).vocab_size)


def _save(model, d, layout):
    """Save in one of the layouts a text_encoder/ folder can have."""
    if layout == "sharded":
        model.save_pretrained(str(d), safe_serialization=True, max_shard_size="8KB")
        assert (d / "model.safetensors.index.json").is_file()
        return
    model.save_pretrained(str(d), safe_serialization=True)
    if layout == "single":
        return
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if layout == "embed_tokens_only":
        del state["shared.weight"]
    save_file(state, str(d / "model.safetensors"))  # "both": shared.weight and encoder.embed_tokens.weight


@pytest.mark.parametrize("layout", ["single", "sharded", "both", "embed_tokens_only"])
def test_encode_matches_transformers(tmp_path, tok_dir, sp, ref_t5, layout):
    _save(ref_t5, tmp_path, layout)
    model = load_text_encoder(tmp_path)
    assert not model.training
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.shared.weight is model.encoder.embed_tokens.weight
    tok = load_tokenizer(tok_dir)
    prompts = PROMPTS[:4]
    got = encode_prompts(tok, model, prompts)
    with torch.no_grad():
        want = ref_t5(input_ids=_sp_ids(sp, prompts))[0]
    assert got.shape == (len(prompts), 226, 32) and got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 1e-6


def test_bfloat16_load_and_output_dtype(tmp_path, tok_dir, ref_t5):
    _save(ref_t5, tmp_path, "single")
    tok = load_tokenizer(tok_dir)
    model = load_text_encoder(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = encode_prompts(tok, model, ["a fox"], dtype=torch.float32)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_fp16_refused(tmp_path, ref_t5):
    _save(ref_t5, tmp_path, "single")
    with pytest.raises(ValueError, match="bfloat16"):
        load_text_encoder(tmp_path, dtype=torch.float16)


def test_missing_config_and_weights(tmp_path, ref_t5):
    with pytest.raises(CheckpointError, match="config.json"):
        load_text_encoder(tmp_path)
    ref_t5.config.to_json_file(str(tmp_path / "config.json"))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_text_encoder(tmp_path)


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_key_mismatch_names_the_key(tmp_path, ref_t5, change):
    _save(ref_t5, tmp_path, "single")
    state = {k: v.clone() for k, v in ref_t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    if change == "extra":
        state["encoder.not_a_layer.weight"] = torch.zeros(2)
        key = "encoder.not_a_layer.weight"
    else:
        del state[key]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_text_encoder(tmp_path)


def test_tokenizer_larger_than_embedding_refused(tmp_path, tok_dir):
    small = _tiny_t5(64)
    with pytest.raises(ValueError, match="not from the same checkpoint"):
        encode_prompts(load_tokenizer(tok_dir), small, ["a fox"])
