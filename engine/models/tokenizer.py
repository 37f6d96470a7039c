"""The T5 tokenizer of the CogVideoX prompt path, with sentencepiece itself (transformers 5 can only
turn a ``spiece.model`` into its tokenizer through protobuf, and silently ignores ``vocab_file=``).

The ids follow the diffusers ``CogVideoXPipeline`` call ``tokenizer(prompt, padding="max_length",
max_length=226, truncation=True, add_special_tokens=True)``: text ids, then EOS, then pad ids. Built from
bytes by ``cogvx.engine.loading.load_tokenizer``, which reads the checkpoint's ``tokenizer/`` folder.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import sentencepiece as spm
import torch
from tokenizers import Tokenizer

__all__ = ["MAX_LENGTH", "PromptTokenizer", "PromptTruncationWarning", "TokenizedPrompts", "TokenizerError",
           "check_unicode"]

# The length the CogVideoX transformer was trained with (its text rows); the pipeline pads to it.
MAX_LENGTH = 226
MAX_EXTRA_IDS = 1000  # T5 has 100 sentinels; the bound keeps a hostile config from building a huge regex


class TokenizerError(ValueError):
    """A tokenizer file or setting that cannot make the T5 tokenizer."""


class PromptTruncationWarning(UserWarning):
    """A prompt had more tokens than the text encoder takes; its tail was dropped."""


@dataclass(frozen=True)
class TokenizedPrompts:
    """``input_ids``: int64 [B, max_length]; ``num_truncated[b]``: tokens dropped from prompt b."""

    input_ids: torch.Tensor
    num_truncated: list[int]


def check_unicode(name: str, text: str) -> None:
    """A ValueError when ``text`` is not valid Unicode text: a lone surrogate (U+D800..U+DFFF, e.g. from
    ``bytes.decode(errors="surrogateescape")`` or a JSON ``"\\ud800"`` escape) cannot be encoded as UTF-8,
    which sentencepiece and the tokenizers library need."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start:e.end]
        raise ValueError(f"{name} holds a lone surrogate {', '.join(f'U+{ord(c):04X}' for c in bad[:3])} at character "
                         f"{e.start}, which is not valid Unicode text (half of a UTF-16 pair; often from decoding bytes "
                         "with errors='surrogateescape' or a broken \\uD8xx escape); remove it, or decode the "
                         "prompt's bytes as UTF-8") from None


class PromptTokenizer:
    """T5 tokenizer of a diffusers ``tokenizer/`` folder: ``spiece.model`` or ``tokenizer.json``.

    Built by ``cogvx.engine.loading.load_tokenizer``. Calling it gives the ids transformers'
    ``T5Tokenizer`` gives with ``padding="max_length", truncation=True, add_special_tokens=True``.
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
    def from_sentencepiece(cls, model: bytes, *, extra_ids: int = 100, eos_token: str = "</s>",
                           pad_token: str = "<pad>", source: Path | None = None) -> "PromptTokenizer":
        """From the bytes of a ``spiece.model``, with ``extra_ids`` ``<extra_id_i>`` sentinels after the
        sentencepiece vocabulary (transformers' T5Tokenizer convention). ``source`` names the file in errors."""
        if not isinstance(extra_ids, int) or isinstance(extra_ids, bool) or not 0 <= extra_ids <= MAX_EXTRA_IDS:
            raise TokenizerError(f"{source}: extra_ids={extra_ids!r} must be an integer from 0 to {MAX_EXTRA_IDS} "
                                 "(T5 uses 100)")
        try:
            sp = spm.SentencePieceProcessor(model_proto=model)
        except Exception as e:  # sentencepiece raises OSError or RuntimeError for a bad model
            raise TokenizerError(f"cannot read sentencepiece model {source}: {e}") from e
        n = sp.get_piece_size()
        path, eos_tok, pad_tok = source, eos_token, pad_token
        # transformers matches special-token strings inside the text (sentencepiece never emits
        # control pieces for text): the control pieces, <unk>, and the sentinels it appends after
        # the sentencepiece vocabulary in reverse order (<extra_id_0> has the largest id).
        special = {sp.id_to_piece(i): i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
        special.update({f"<extra_id_{i}>": n + extra_ids - 1 - i for i in range(extra_ids)})
        for name, tok in (("eos_token", eos_tok), ("pad_token", pad_tok)):
            if tok not in special:
                raise TokenizerError(
                    f"{path}: {name} {tok!r} (from tokenizer_config.json or special_tokens_map.json) is not a control "
                    "piece of the sentencepiece model; T5 expects '<pad>' (id 0) and '</s>' (id 1)"
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
    def from_tokenizer_json(cls, text: str, *, eos_token: str = "</s>", pad_token: str = "<pad>",
                            source: Path | None = None) -> "PromptTokenizer":
        """From the text of a ``tokenizer.json`` (the tokenizers library's format)."""
        path, eos_tok, pad_tok = source, eos_token, pad_token
        try:
            tok = Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception for bad JSON
            raise TokenizerError(f"cannot read {path}: {e}") from e
        # Padding, truncation and EOS are done here, the same way for both file kinds.
        tok.no_padding()
        tok.no_truncation()
        ids = {}
        for name, t in (("eos_token", eos_tok), ("pad_token", pad_tok)):
            ids[name] = tok.token_to_id(t)
            if ids[name] is None:
                raise TokenizerError(f"{path}: {name} {t!r} is not in the vocabulary")

        def encode_text(text: str) -> list[int]:
            return tok.encode(text, add_special_tokens=False).ids

        return cls(encode_text, eos_id=ids["eos_token"], pad_id=ids["pad_token"],
                   vocab_size=tok.get_vocab_size(with_added_tokens=True), source=path)

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
            check_unicode(f"prompt {b}", p)
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


def _shorten(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
