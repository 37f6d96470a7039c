"""The prompt path's components: the T5 encoder's config (checked before anything is built), its weights
(plain or quantized), and the tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import T5Config


from ..io.checkpoint import CheckpointError, read_json
from ..io.safetensors import check_filled, check_shapes, load_into, read_tensors
from ..models.text_encoder import build_text_encoder, tie_embedding
from ..models.tokenizer import MAX_EXTRA_IDS, PromptTokenizer, TokenizerError
from .quantized import checked_headers, load_quantized, read_quantization


# Sizes no T5 encoder comes near; a hostile config.json must not make the meta build run for minutes.
_T5_RANGES = {"vocab_size": (1, 1 << 20), "d_model": (1, 65536), "d_kv": (1, 4096), "d_ff": (1, 1 << 18),
              "num_layers": (1, 256), "num_heads": (1, 1024), "relative_attention_num_buckets": (1, 4096),
              "relative_attention_max_distance": (1, 1 << 20)}


_T5_FLOATS = {"layer_norm_epsilon": (1e-12, 1.0), "dropout_rate": (0.0, 1.0), "initializer_factor": (0.0, 1e6)}


def t5_config(text_encoder_dir: Path) -> T5Config:
    """The text encoder's T5Config, its sizes checked before anything is built."""
    path = Path(text_encoder_dir) / "config.json"
    d = read_json(path, "the T5 encoder's config.json (a JSON object)")
    for key, (lo, hi) in _T5_RANGES.items():
        v = d.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi):
            raise CheckpointError(f"{path}: {key}={v!r} must be an integer from {lo} to {hi}")
    for key, (lo, hi) in _T5_FLOATS.items():
        v = d.get(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi):
            raise CheckpointError(f"{path}: {key}={v!r} must be a finite number from {lo:g} to {hi:g}")
    if not isinstance(d.get("feed_forward_proj", "relu"), str):
        raise CheckpointError(f"{path}: feed_forward_proj={d['feed_forward_proj']!r} must be a string such as "
                              "'gated-gelu'")
    try:
        return T5Config(**{k: v for k, v in d.items() if not k.startswith("_")})
    except Exception as e:  # transformers raises several types for bad values
        msg = " ".join(f"{type(e).__name__}: {e}".split())  # one line
        raise CheckpointError(f"{path}: not a T5 config ({msg})") from e


def load_text_encoder(text_encoder_dir: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, info: dict[str, Any] | None = None):
    """A diffusers ``text_encoder/`` folder (plain or quantized) as a transformers ``T5EncoderModel``.

    Parameters are cast to ``dtype`` (float32 or bfloat16; float16 is refused: T5 activations overflow
    fp16). The tied embedding ``shared.weight`` / ``encoder.embed_tokens.weight`` may be stored under
    either name or both.
    """
    if dtype == torch.float16:
        raise ValueError("the T5 text encoder cannot run in float16: its activations overflow fp16 and the "
                         "embeddings become inf/NaN; use dtype=torch.bfloat16 (GPU) or torch.float32")
    d = Path(text_encoder_dir)
    config = t5_config(d)
    info = info if info is not None else read_quantization(d)
    files, headers = checked_headers(d, info, "encoder.block", config.num_layers)
    model = build_text_encoder(config)
    if info is not None:
        load_quantized(model, d, info, headers, device, dtype)
    else:
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_shapes(expected, headers, d / "config.json")
        state = dict(read_tensors(files, device))
        _merge_tied_embedding(state, where=str(d))
        load_into(model, state, where=str(d), dtype=dtype, device=device)
    # assign=True gave each name its own Parameter: tie them again so the embedding lives once.
    tie_embedding(model)
    check_filled(model, str(d))
    return model.eval().requires_grad_(False)


def load_tokenizer(tokenizer_dir: str | Path, vocab_limit: int | None = None) -> PromptTokenizer:
    """The tokenizer of a diffusers ``tokenizer/`` folder: ``spiece.model`` if present, else ``tokenizer.json``.

    ``spiece.model`` wins when both exist: it is the model T5 was trained with, and sentencepiece's own
    encoder is what transformers 4's (slow, ``legacy=True``) T5Tokenizer ran for the CogVideoX releases;
    a ``tokenizer.json`` is a conversion of it whose whitespace and special-token handling has changed
    across transformers versions. ``tokenizer_config.json`` / ``special_tokens_map.json`` name the eos/pad
    tokens and the number of ``<extra_id_i>`` sentinels (default "</s>", "<pad>", 100 as in T5Tokenizer).
    ``vocab_limit``: the text encoder's vocabulary size, checked before the tokenizer is built.
    """
    d = Path(tokenizer_dir)
    if not d.is_dir():
        raise CheckpointError(f"tokenizer directory {d} does not exist")
    cfg: dict[str, Any] = {}
    origin: dict[str, Path] = {}  # key -> the file it came from (the later file wins, as in transformers)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (d / name).exists():
            part = read_json(d / name, f"the tokenizer's {name} (a JSON object)")
            cfg.update(part)
            origin.update({k: d / name for k in part})
    eos = _token_str(cfg.get("eos_token", "</s>"), origin.get("eos_token", d), "eos_token")
    pad = _token_str(cfg.get("pad_token", "<pad>"), origin.get("pad_token", d), "pad_token")
    try:
        if (d / "spiece.model").is_file():
            extra = cfg.get("extra_ids", 100)
            if not isinstance(extra, int) or isinstance(extra, bool) or not 0 <= extra <= MAX_EXTRA_IDS:
                raise TokenizerError(f"{origin.get('extra_ids', d)}: extra_ids={extra!r} must be an integer from 0 to "
                                     f"{MAX_EXTRA_IDS} (T5 uses 100)")
            if vocab_limit is not None and extra > vocab_limit:
                raise TokenizerError(f"{origin.get('extra_ids', d)}: extra_ids={extra} exceeds the text encoder's "
                                     f"vocabulary ({vocab_limit}); they are not from the same checkpoint")
            tok = PromptTokenizer.from_sentencepiece((d / "spiece.model").read_bytes(), extra_ids=extra,
                                                     eos_token=eos, pad_token=pad, source=d / "spiece.model")
        elif (d / "tokenizer.json").is_file():
            tok = PromptTokenizer.from_tokenizer_json((d / "tokenizer.json").read_text(encoding="utf-8"),
                                                      eos_token=eos, pad_token=pad, source=d / "tokenizer.json")
        else:
            raise CheckpointError(
                f"no tokenizer model in {d}: expected spiece.model (sentencepiece) or tokenizer.json "
                "(tokenizers); copy the tokenizer/ folder of the CogVideoX checkpoint there")
    except (TokenizerError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(str(e)) from e
    if vocab_limit is not None and tok.vocab_size > vocab_limit:
        raise CheckpointError(f"tokenizer {tok.source} has {tok.vocab_size} ids but the text encoder's embedding "
                              f"has {vocab_limit} rows: they are not from the same checkpoint")
    return tok


def _merge_tied_embedding(state: dict[str, torch.Tensor], where: str) -> None:
    """Put the one T5 input embedding under both its names (transformers saves only one)."""
    a, b = state.get("shared.weight"), state.get("encoder.embed_tokens.weight")
    if a is not None and b is not None and not torch.equal(a, b):
        raise CheckpointError(
            f"{where}: 'shared.weight' and 'encoder.embed_tokens.weight' differ, but T5EncoderModel "
            "ties them (one embedding); the checkpoint is not a T5 encoder as transformers saves it"
        )
    emb = a if a is not None else b
    if emb is not None:
        state["shared.weight"] = state["encoder.embed_tokens.weight"] = emb


def _token_str(tok, where: Path, key: str) -> str:
    # Saved AddedTokens are dicts {"content": "</s>", "lstrip": ..., ...}.
    value = tok.get("content") if isinstance(tok, dict) else tok
    if not isinstance(value, str):
        raise CheckpointError(f"{where}: {key}: special token {tok!r} is not a string")
    return value
