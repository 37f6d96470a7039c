"""A tiny T5-style sentencepiece tokenizer, trained offline, for tests and ``cogvx make-tiny``.

The real CogVideoX tokenizer is T5 v1.1's 32,000-piece ``spiece.model``; nothing can be downloaded
here, so tests train a small unigram model with the same conventions (pad 0 ``<pad>``, eos 1
``</s>``, unk 2 ``<unk>``, no bos, NMT-NFKC normalization, dummy prefix, extra whitespace removed)
from a corpus built into this file, and write it in the diffusers ``tokenizer/`` layout.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

__all__ = ["make_tiny_tokenizer", "tiny_corpus"]

# Word lists for the corpus. Prompts for a video model: subjects, actions, places, camera and light.
# A few accented words and digits so that those characters are in the vocabulary; other scripts
# (CJK, emoji) are left out on purpose so that tests see <unk>.
_SUBJECTS = [
    "A golden retriever", "An old fisherman", "Two children", "A red fox", "The astronaut",
    "A small café owner", "A jazz band", "Three horses", "A paper boat", "The city tram",
    "A hummingbird", "An elderly woman", "A robot", "A sailboat", "The chef",
]
_ACTIONS = [
    "runs across", "slowly walks through", "dances in", "flies above", "sits quietly beside",
    "plays music near", "drifts along", "jumps over", "looks out over", "cooks dinner in",
    "rides a bicycle through", "paints a picture of",
]
_PLACES = [
    "a snowy forest", "the busy market", "a quiet beach at sunset", "the mountains",
    "a neon-lit street in Tokyo", "an empty train station", "the garden, full of flowers",
    "a river under the bridge", "the desert (at noon)", "a small village in Provence",
    "the Zürich old town", "a kitchen with 3 windows",
]
_CAMERA = [
    "The camera pans left.", "Close-up shot, shallow depth of field.", "Wide angle, 4K, 24 fps.",
    "Slow motion; soft light.", "Drone view from 120 meters!", "Handheld camera, natural colors?",
    "Cinematic lighting — warm tones.", "Time-lapse of 10 minutes, in 1080p.",
]


def tiny_corpus(n: int = 64) -> list[str]:
    """``n`` English video prompts, the same on every call (pure index arithmetic, no RNG)."""
    out = []
    for i in range(n):
        s = _SUBJECTS[i % len(_SUBJECTS)]
        a = _ACTIONS[(i * 7 + 3) % len(_ACTIONS)]
        p = _PLACES[(i * 5 + 1) % len(_PLACES)]
        c = _CAMERA[(i * 3 + 2) % len(_CAMERA)]
        out.append(f"{s} {a} {p}. {c}")
    return out


def make_tiny_tokenizer(
    out_dir: str | Path,
    vocab_size: int = 128,
    extra_ids: int = 0,
    model_max_length: int = 226,
) -> Path:
    """Train a small T5-convention sentencepiece unigram model and write a diffusers ``tokenizer/`` folder.

    Writes ``spiece.model``, ``tokenizer_config.json`` (``"tokenizer_class": "T5Tokenizer"``, like
    the real CogVideoX one) and ``special_tokens_map.json`` into ``out_dir`` (created if needed).
    Deterministic: the same arguments give a byte-identical ``spiece.model``. Takes well under 2 s.

    The sentencepiece model holds ``vocab_size`` pieces; the built-in corpus supplies about 180 at
    most, and a larger request gives that many (``hard_vocab_limit`` is off), so read the size
    from the result, not from the argument. ``extra_ids`` sentinel tokens ``<extra_id_i>`` are not in the
    model, they follow it (ids ``vocab_size .. vocab_size + extra_ids - 1``, in reverse order) as
    transformers' T5Tokenizer adds them. Returns ``Path(out_dir)``.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus()),
        model_writer=buf,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        # T5 ids: no bos; pad, eos, unk first (what T5EncoderModel's embedding rows expect).
        pad_id=0, pad_piece="<pad>",
        eos_id=1, eos_piece="</s>",
        unk_id=2, unk_piece="<unk>",
        bos_id=-1,
        normalization_rule_name="nmt_nfkc",
        character_coverage=1.0,
        byte_fallback=False,
        # Determinism: one thread, no sampling or shuffling of the (small) corpus.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    (out / "spiece.model").write_bytes(buf.getvalue())

    sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    if sentinels:
        special["additional_special_tokens"] = sentinels
    config = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": model_max_length,
        "extra_ids": extra_ids,
        # The real CogVideoX config sets legacy=true; for prompts without special-token strings
        # legacy and non-legacy encode the same.
        "legacy": True,
        "add_prefix_space": True,
        "clean_up_tokenization_spaces": True,
        "sp_model_kwargs": {},
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out
