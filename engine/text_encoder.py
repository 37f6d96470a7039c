"""The CogVideoX prompt path: T5 tokenizer (sentencepiece) and T5 v1.1 encoder (transformers).

``prompt --PromptTokenizer--> input_ids [B, 226] --T5EncoderModel--> text embeddings [B, 226, 4096]``

The tokenizer reads ``spiece.model`` with sentencepiece itself: transformers 5 can only turn a
``spiece.model`` into its tokenizer through protobuf, and silently ignores ``vocab_file=``. The
ids follow the diffusers ``CogVideoXPipeline`` call ``tokenizer(prompt, padding="max_length",
max_length=226, truncation=True, add_special_tokens=True)``: text ids, then EOS, then pad ids.
The encoder is transformers' ``T5EncoderModel``, built on the meta device and filled from the
safetensors files with ``assign=True`` (the weights are never materialized twice).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .weights import CheckpointError, load_into, read_state_dict

if TYPE_CHECKING:
    from transformers import T5EncoderModel

__all__ = [
    "PromptTokenizer",
    "TokenizedPrompts",
    "PromptTruncationWarning",
    "load_text_encoder",
    "encode_prompts",
]

# The length the CogVideoX transformer was trained with (its text rows); the pipeline pads to it.
MAX_LENGTH = 226


class PromptTruncationWarning(UserWarning):
    """A prompt had more tokens than the text encoder takes; its tail was dropped."""


@dataclass(frozen=True)
class TokenizedPrompts:
    """``input_ids``: int64 [B, max_length]; ``num_truncated[b]``: tokens dropped from prompt b."""

    input_ids: torch.Tensor
    num_truncated: list[int]


class PromptTokenizer:
    """T5 tokenizer of a diffusers ``tokenizer/`` folder: ``spiece.model`` or ``tokenizer.json``.

    Build it with :meth:`from_dir`. Calling it gives the ids transformers' ``T5Tokenizer`` gives
    with ``padding="max_length", truncation=True, add_special_tokens=True``.
    """

    def __init__(self, encode_text: Callable[[str], list[int]], *, eos_id: int, pad_id: int,
                 vocab_size: int, source: Path):
        self._encode_text = encode_text
        self.eos_id = eos_id
        self.pad_id = pad_id
        # Ids run 0 .. vocab_size-1 (sentinels included); the encoder's embedding must be at least this big.
        self.vocab_size = vocab_size
        self.source = source

    @classmethod
    def from_dir(cls, tokenizer_dir: str | Path) -> "PromptTokenizer":
        """Read ``tokenizer_dir``: ``spiece.model`` if present, else ``tokenizer.json``.

        ``spiece.model`` wins when both exist: it is the model T5 was trained with, and
        sentencepiece's own encoder is what transformers 4's (slow, ``legacy=True``) T5Tokenizer
        ran for the CogVideoX releases; a ``tokenizer.json`` is a conversion of it whose
        whitespace and special-token handling has changed across transformers versions.
        ``tokenizer_config.json`` / ``special_tokens_map.json`` name the eos/pad tokens and the
        number of ``<extra_id_i>`` sentinels (default "</s>", "<pad>", 100 as in T5Tokenizer).
        """
        d = Path(tokenizer_dir)
        if not d.is_dir():
            raise CheckpointError(f"tokenizer directory {d} does not exist")
        cfg = _read_json(d / "tokenizer_config.json")
        cfg.update(_read_json(d / "special_tokens_map.json"))
        eos_tok = _token_str(cfg.get("eos_token", "</s>"))
        pad_tok = _token_str(cfg.get("pad_token", "<pad>"))
        if (d / "spiece.model").is_file():
            return cls._from_spiece(d / "spiece.model", cfg, eos_tok, pad_tok)
        if (d / "tokenizer.json").is_file():
            return cls._from_tokenizer_json(d / "tokenizer.json", eos_tok, pad_tok)
        raise CheckpointError(
            f"no tokenizer model in {d}: expected spiece.model (sentencepiece) or tokenizer.json "
            "(tokenizers); copy the tokenizer/ folder of the CogVideoX checkpoint there"
        )

    @classmethod
    def _from_spiece(cls, path: Path, cfg: dict, eos_tok: str, pad_tok: str) -> "PromptTokenizer":
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # sentencepiece raises OSError or RuntimeError for a bad file
            raise CheckpointError(f"cannot read sentencepiece model {path}: {e}") from e
        n = sp.get_piece_size()
        # transformers matches special-token strings inside the text (sentencepiece never emits
        # control pieces for text): the control pieces, <unk>, and the sentinels it appends after
        # the sentencepiece vocabulary in reverse order (<extra_id_0> has the largest id).
        special = {sp.id_to_piece(i): i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
        extra_ids = int(cfg.get("extra_ids", 100))
        special.update({f"<extra_id_{i}>": n + extra_ids - 1 - i for i in range(extra_ids)})
        for name, tok in (("eos_token", eos_tok), ("pad_token", pad_tok)):
            if tok not in special:
                raise CheckpointError(
                    f"{path}: {name} {tok!r} (from tokenizer_config.json) is not a control piece of the "
                    f"sentencepiece model; T5 expects '<pad>' (id 0) and '</s>' (id 1)"
                )
        split = re.compile("(" + "|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)) + ")")

        def encode_text(text: str) -> list[int]:
            ids: list[int] = []
            # Each piece between special tokens is encoded on its own, as transformers does
            # (so it gets its own "▁" prefix and its surrounding whitespace is dropped).
            for i, part in enumerate(split.split(text)):
                if i % 2:
                    ids.append(special[part])
                elif part:
                    ids.extend(sp.encode(part))
            return ids

        return cls(encode_text, eos_id=special[eos_tok], pad_id=special[pad_tok],
                   vocab_size=n + extra_ids, source=path)

    @classmethod
    def _from_tokenizer_json(cls, path: Path, eos_tok: str, pad_tok: str) -> "PromptTokenizer":
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for bad JSON
            raise CheckpointError(f"cannot read {path}: {e}") from e
        # Padding, truncation and EOS are done here, the same way for both file kinds.
        tok.no_padding()
        tok.no_truncation()
        ids = {}
        for name, t in (("eos_token", eos_tok), ("pad_token", pad_tok)):
            ids[name] = tok.token_to_id(t)
            if ids[name] is None:
                raise CheckpointError(f"{path}: {name} {t!r} is not in the vocabulary")

        def encode_text(text: str) -> list[int]:
            return tok.encode(text, add_special_tokens=False).ids

        return cls(encode_text, eos_id=ids["eos_token"], pad_id=ids["pad_token"],
                   vocab_size=tok.get_vocab_size(with_added_tokens=True), source=path)

    def encode_text(self, text: str) -> list[int]:
        """Ids of ``text`` alone: no EOS, no padding, no truncation."""
        return self._encode_text(text)

    def __call__(self, prompts: list[str] | str, max_length: int = MAX_LENGTH) -> TokenizedPrompts:
        """Tokenize ``prompts`` to int64 ``input_ids`` [B, max_length]: text ids, EOS, pad ids.

        A prompt of more than ``max_length - 1`` tokens keeps its first ``max_length - 1`` (the
        EOS always stays) and a :class:`PromptTruncationWarning` names the prompt and how many
        tokens were dropped. A single string is taken as a batch of one.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1 (room for the EOS token); got {max_length!r}")
        keep = max_length - 1
        rows, dropped = [], []
        for b, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt {b} is a {type(p).__name__}, expected str")
            ids = self._encode_text(p)
            n_drop = max(0, len(ids) - keep)
            if n_drop:
                warnings.warn(
                    f"prompt {b} ({_shorten(p)!r}) is {len(ids)} tokens but the text encoder takes "
                    f"{keep} plus EOS (max_length={max_length}): dropped the last {n_drop} tokens",
                    PromptTruncationWarning,
                    stacklevel=2,
                )
            ids = ids[:keep] + [self.eos_id]
            rows.append(ids + [self.pad_id] * (max_length - len(ids)))
            dropped.append(n_drop)
        input_ids = torch.tensor(rows, dtype=torch.long).reshape(len(rows), max_length)
        return TokenizedPrompts(input_ids=input_ids, num_truncated=dropped)


def load_text_encoder(text_encoder_dir: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> "T5EncoderModel":
    """Load a diffusers ``text_encoder/`` folder into a ``transformers.T5EncoderModel`` (eval mode).

    Reads ``config.json`` and the single or sharded safetensors weights; every checkpoint key must
    be used and every parameter filled (``CheckpointError`` names the key otherwise). Parameters
    are cast to ``dtype`` (float32 or bfloat16; float16 is refused: T5 activations overflow fp16)
    and placed on ``device``. The tied embedding ``shared.weight`` / ``encoder.embed_tokens.weight``
    may be stored under either name or both.
    """
    from transformers import T5Config, T5EncoderModel

    if dtype == torch.float16:
        raise ValueError(
            "the T5 text encoder cannot run in float16: its activations overflow fp16 and the "
            "embeddings become inf/NaN; use dtype=torch.bfloat16 (GPU) or torch.float32"
        )
    if not dtype.is_floating_point:
        raise ValueError(f"text encoder dtype must be a floating dtype (bfloat16 or float32); got {dtype}")
    d = Path(text_encoder_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(
            f"no config.json in {d}: a diffusers text_encoder/ folder holds config.json and "
            "model*.safetensors; point at the text_encoder/ folder of the CogVideoX checkpoint"
        )
    config = T5Config.from_json_file(str(cfg_path))
    state = read_state_dict(d)  # before building: a missing-weights error should come first, and fast
    _merge_tied_embedding(state, where=str(d))

    with torch.device("meta"):
        model = T5EncoderModel(config)
    load_into(model, state, where=str(d), dtype=dtype, device=device)
    # assign=True gave each name its own Parameter (two casts when dtype differs from the file);
    # tie them again so the embedding lives once, as transformers builds it.
    model.encoder.embed_tokens.weight = model.shared.weight
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        # T5EncoderModel has no non-persistent buffers (transformers 5.x); a version that adds
        # one needs code here to compute it, not a silent meta tensor.
        raise RuntimeError(f"{d}: tensors left on the meta device after loading: {left}; "
                           "this transformers version's T5EncoderModel has state cogvx does not fill")
    # Inference only: no parameter should ever collect a graph.
    return model.eval().requires_grad_(False)


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


def check_vocab(tokenizer: PromptTokenizer, text_encoder: "T5EncoderModel") -> None:
    """The tokenizer's ids must all index the encoder's embedding (both from one checkpoint)."""
    enc_vocab = text_encoder.config.vocab_size
    if tokenizer.vocab_size > enc_vocab:
        raise ValueError(
            f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} ids but the text encoder's "
            f"embedding has {enc_vocab} rows: they are not from the same checkpoint"
        )


@torch.no_grad()  # not inference_mode: callers may later write into the embeddings in place
def encode_ids(text_encoder: "T5EncoderModel", input_ids: torch.Tensor, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Text embeddings [B, L, d_model] of token ids [B, L]. ``device`` / ``dtype`` default to the text
    encoder's; the encoder runs in its own dtype and the output is cast to ``dtype``. No attention
    mask, as in the diffusers pipeline: the CogVideoX transformer was trained on embeddings whose pad
    rows attended to everything."""
    param = next(text_encoder.parameters())
    device = param.device if device is None else torch.device(device)
    dtype = param.dtype if dtype is None else dtype
    hidden = text_encoder(input_ids=input_ids.to(param.device))[0]
    return hidden.to(device=device, dtype=dtype)


def encode_prompts(tokenizer: PromptTokenizer, text_encoder: "T5EncoderModel", prompts: list[str] | str,
                   max_length: int = MAX_LENGTH, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Text embeddings [B, max_length, d_model] (4096 for T5-XXL) of ``prompts``: tokenize, then
    :func:`encode_ids`."""
    check_vocab(tokenizer, text_encoder)
    return encode_ids(text_encoder, tokenizer(prompts, max_length=max_length).input_ids, device, dtype)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def _token_str(tok) -> str:
    # Saved AddedTokens are dicts {"content": "</s>", "lstrip": ..., ...}.
    return tok["content"] if isinstance(tok, dict) else str(tok)


def _shorten(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
