"""A small random-weight CogVideoX checkpoint in the diffusers layout, made offline with the project's
own modules: the built-in demo model of ``cogvx generate`` and the output of ``cogvx make-tiny``."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel
from transformers.utils import logging as hf_logging

from ..io.atomic import apply_umask, atomic_directory, umask_mode
from ..io.cache import cache_root
from ..models.presets import PRESETS
from ..models.schedulers import SchedulerConfig
from ..models.tasks import KINDS, TASKS, class_of_kind
from ..models.transformer import build_transformer
from ..models.vae import CogVideoXVAE
from .tiny_tokenizer import make_tiny_tokenizer

__all__ = ["make_tiny_checkpoint", "default_tiny_dir", "ensure_tiny_checkpoint", "tiny_t5_config", "TINY_VERSION"]

TINY_VERSION = 2  # bump when the tiny model's layout changes, so stale caches are rebuilt
_DIFFUSERS_VERSION = "0.32.0"  # the oldest diffusers whose CogVideoX classes read these configs


def make_tiny_checkpoint(out_dir: str | os.PathLike, seed: int = 0, task: str = "t2v", *,
                         transformer: dict | None = None, t5: dict | None = None) -> Path:
    """Write a complete tiny checkpoint (model_index.json, transformer/, vae/, text_encoder/,
    tokenizer/, scheduler/) to ``out_dir``; atomic: built in a temporary sibling and renamed.

    task: "t2v" (text-to-video, also video-to-video), "i2v" (image-to-video: the transformer takes the
    image latents concatenated, twice the input channels) or "control" (Fun-Control, likewise).
    The weights are random (seeded): the videos it makes are noise, but every stage of the real
    pipeline runs, and diffusers' pipeline of the same class loads the same directory.
    transformer / t5: fields that override the tiny TransformerConfig / T5Config (wider test models,
    e.g. the residency memory test's; T5's d_model follows the transformer's text_embed_dim).
    """
    if task not in KINDS:
        raise ValueError(f"task must be one of {', '.join(KINDS)} (got {task!r})")
    out = Path(out_dir).expanduser()
    with atomic_directory(out) as tmp:
        _write_all(tmp, seed, task, transformer or {}, t5 or {})
    return out


def tiny_t5_config(d_model: int, vocab_size: int) -> T5Config:
    """A 2-layer T5 v1.1-style encoder config of width ``d_model`` (the tiny and small test models)."""
    return T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                    feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False)


def _write_all(d: Path, seed: int, task: str, t_over: dict, t5_over: dict) -> None:
    torch.manual_seed(seed)
    preset = PRESETS["tiny"]
    tcfg = dataclasses.replace(preset.transformer, **t_over)
    if TASKS[task].concat_channels:
        tcfg = dataclasses.replace(tcfg, in_channels=2 * tcfg.out_channels_)
    # transformer
    transformer = build_transformer(tcfg, device="cpu", dtype=torch.float32)
    _save_module(transformer, d / "transformer", tcfg.to_dict())
    # VAE: the real 8x / 4x compression, few channels
    vcfg = preset.vae
    if vcfg.latent_channels != tcfg.out_channels_:
        raise AssertionError("tiny VAE and transformer disagree on latent channels")
    _save_module(CogVideoXVAE(vcfg), d / "vae", vcfg.to_dict())
    # tokenizer + T5 encoder sized to it
    make_tiny_tokenizer(d / "tokenizer")
    vocab = spm.SentencePieceProcessor(model_file=str(d / "tokenizer" / "spiece.model")).get_piece_size()
    t5_cfg = tiny_t5_config(tcfg.text_embed_dim, vocab)
    t5_cfg.update(t5_over)
    t5 = T5EncoderModel(t5_cfg).eval()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' "Writing model shards" bar, for one tiny file
    try:
        t5.save_pretrained(d / "text_encoder", safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    apply_umask(*(d / "text_encoder").glob("*.safetensors"))  # safetensors writes 0600 files
    # scheduler
    (d / "scheduler").mkdir()
    sched = {"_class_name": preset.scheduler, "_diffusers_version": _DIFFUSERS_VERSION, **SchedulerConfig().to_dict()}
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
    index = {
        "_class_name": class_of_kind(task),
        "_diffusers_version": _DIFFUSERS_VERSION,
        "_cogvx_tiny_version": TINY_VERSION,
        "scheduler": ["diffusers", preset.scheduler],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"],
    }
    (d / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _save_module(module: torch.nn.Module, d: Path, config: dict) -> None:
    d.mkdir(parents=True, mode=umask_mode())
    config = {**config, "_diffusers_version": _DIFFUSERS_VERSION}
    (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(d / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    apply_umask(d / "diffusion_pytorch_model.safetensors")


def default_tiny_dir() -> Path:
    """Where the built-in demo model is cached: <cogvx cache>/tiny-random-v<N> ($COGVX_CACHE, else
    $XDG_CACHE_HOME/cogvx, else ~/.cache/cogvx)."""
    return cache_root() / f"tiny-random-v{TINY_VERSION}"


def ensure_tiny_checkpoint() -> tuple[Path, bool]:
    """The cached demo checkpoint, made on first use. Returns (path, made_now)."""
    d = default_tiny_dir()
    if (d / "model_index.json").is_file():
        return d, False
    if d.exists():  # left over from an interrupted run of an older version: rebuild
        shutil.rmtree(d)
    try:
        return make_tiny_checkpoint(d), True
    except (OSError, FileExistsError):
        if (d / "model_index.json").is_file():  # another process made it first
            return d, False
        raise
