"""Build the components of a diffusers-layout CogVideoX checkpoint: the transformer, VAE and T5 encoder
on the meta device filled with ``assign=True`` (never materialized twice), the tokenizer and the
scheduler; a quantized component folder (``quantization.json``) loads as saved, never re-quantized.

Cheap checks run first: every config is validated and compared with the safetensors headers, and
every shape is checked, before a single weight is read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from transformers import T5Config

from cogvx.quantize import QUANTIZABLE
from cogvx.quantize.format import QUANT_FILE, QuantizedFormatError, check_info, fill_quantized, prepare_quantized

from .io.checkpoint import CheckpointError, PIPELINE_CLASSES, check_file_name, read_json, read_model_index
from .io.safetensors import (
    TensorInfo,
    check_filled,
    check_index,
    check_shapes,
    load_into,
    read_headers,
    read_tensors,
    weight_files,
)
from .models.config import ConfigError, TransformerConfig, VAEConfig
from .models.schedulers import SCHEDULERS, make_scheduler
from .models.text_encoder import build_text_encoder, text_encoder_dtype, tie_embedding
from .models.tokenizer import MAX_EXTRA_IDS, PromptTokenizer, TokenizerError
from .models.transformer import CogVideoXTransformer, build_transformer
from .models.vae import CogVideoXVAE
from .quantizing import quantize_text_encoder, quantize_transformer, resolve_quantization

__all__ = [
    "load_components", "load_transformer", "load_vae", "load_text_encoder", "load_tokenizer", "load_scheduler",
    "read_config", "read_quantization", "required_components",
]

# Components a pipeline needs, with the file each must hold (the tokenizer's files are checked by its loader).
_REQUIRED = {"transformer": "config.json", "scheduler": "scheduler_config.json", "text_encoder": "config.json",
             "tokenizer": None, "vae": "config.json"}
# Sizes no T5 encoder comes near; a hostile config.json must not make the meta build run for minutes.
_T5_RANGES = {"vocab_size": (1, 1 << 20), "d_model": (1, 65536), "d_kv": (1, 4096), "d_ff": (1, 1 << 18),
              "num_layers": (1, 256), "num_heads": (1, 1024), "relative_attention_num_buckets": (1, 4096),
              "relative_attention_max_distance": (1, 1 << 20)}
_T5_FLOATS = {"layer_norm_epsilon": (1e-12, 1.0), "dropout_rate": (0.0, 1.0), "initializer_factor": (0.0, 1e6)}


def required_components() -> dict[str, str | None]:
    return dict(_REQUIRED)


def read_config(cls, path: Path):
    """A TransformerConfig or VAEConfig from a diffusers ``config.json``; errors name the file and key."""
    what = "transformer" if cls is TransformerConfig else "VAE"
    d = read_json(path, f"the {what} config.json of a diffusers checkpoint (a JSON object)")
    try:
        return cls.from_dict(d, where=str(path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from e


# ----------------------------------------------------------------------------------------- components
def read_quantization(component_dir: Path) -> dict[str, Any] | None:
    """The component's quantization.json, checked; None when the component is not quantized."""
    p = Path(component_dir) / QUANT_FILE
    if not p.exists():
        return None
    info = read_json(p, "a cogvx quantization file (a JSON object)")
    try:
        info = check_info(info, str(p))
    except QuantizedFormatError as e:
        raise CheckpointError(str(e)) from e
    for name in info["files"]:
        check_file_name(name, p, "weight file")
    return info


def load_transformer(transformer_dir: str | Path, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, fuse_qkv: bool = False,
                     info: dict[str, Any] | None = None) -> CogVideoXTransformer:
    """Transformer from a diffusers ``transformer/`` folder (plain or quantized); every key consumed,
    every parameter filled. The config is checked against the weight headers before anything is built."""
    d = Path(transformer_dir)
    cfg = read_config(TransformerConfig, d / "config.json")
    info = info if info is not None else read_quantization(d)
    files = _listed_files(d, info) if info else weight_files(d)
    headers = read_headers(files)
    if not info:
        check_index(d, headers)
    _check_layer_count(headers, "transformer_blocks", cfg.num_layers, d / "config.json", "num_layers")
    model = build_transformer(cfg)
    if info is not None:
        if fuse_qkv and not info.get("fused_qkv"):
            raise CheckpointError(
                f"{d} was quantized with separate q/k/v projections and quantized weights cannot be fused at load "
                "time; load it with fuse_qkv=False, or export from an engine loaded with fuse_qkv=True")
        if info.get("fused_qkv"):
            model.fuse_qkv()  # on the meta device: only the module structure changes
        _load_quantized(model, d, info, headers, device, dtype)
    else:
        check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}, headers, d / "config.json")
        load_into(model, dict(read_tensors(files, device)), where=f"transformer checkpoint {d}", dtype=dtype,
                  device=device)
        if fuse_qkv:
            model.fuse_qkv()
    check_filled(model, str(d))
    return model.eval().requires_grad_(False)


def load_vae(vae_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> CogVideoXVAE:
    """The VAE of a diffusers ``vae/`` folder (config.json + safetensors, single or sharded), in eval mode.
    Built on the meta device and filled with ``assign=True``; every key consumed, every parameter filled."""
    d = Path(vae_dir)
    if not d.is_dir():
        raise CheckpointError(f"VAE directory {d} does not exist; pass the vae/ folder of a diffusers-layout "
                              "CogVideoX checkpoint")
    cfg = read_config(VAEConfig, d / "config.json")
    files = weight_files(d)
    headers = read_headers(files)
    check_index(d, headers)
    with torch.device("meta"):
        model = CogVideoXVAE(cfg)
    check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}, headers, d / "config.json")
    load_into(model, dict(read_tensors(files, device)), where=f"VAE checkpoint {d}", dtype=dtype, device=device)
    return model.eval().requires_grad_(False)


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
    files = _listed_files(d, info) if info else weight_files(d)
    headers = read_headers(files)
    if not info:
        check_index(d, headers)
    _check_layer_count(headers, "encoder.block", config.num_layers, d / "config.json", "num_layers")
    model = build_text_encoder(config)
    if info is not None:
        _load_quantized(model, d, info, headers, device, dtype)
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


def load_scheduler(source: str | Path, class_name: str | None = None):
    """A scheduler from a diffusers ``scheduler/`` directory or its ``scheduler_config.json``."""
    path = Path(source)
    if path.is_dir():
        path = path / "scheduler_config.json"
    if class_name is not None and class_name not in SCHEDULERS:
        raise ValueError(f"unsupported scheduler class {class_name!r}; accepted: {', '.join(SCHEDULERS)}")
    config = read_json(path, "a diffusers scheduler_config.json (a JSON object)")
    try:
        return make_scheduler(config, class_name)
    except (ValueError, TypeError) as e:  # the file's values: name the file
        raise CheckpointError(f"{path}: {e}") from e


def load_components(model_dir: Path, device: torch.device, dtype: torch.dtype, *, fuse_qkv: bool = False,
                    scheduler: str | None = None, recipe=None) -> dict:
    """Every component of a checked checkpoint directory, loaded once.

    Returns a dict with "transformer", "scheduler", "tokenizer", "text_encoder", "vae", "recipes"
    ({component: recipe name} of what is quantized) and "task" ("t2v", "i2v" or "control", from
    model_index.json). Cheap reads and checks come first (configs, recipe availability, quantization
    files, headers), so that a bad request or a broken checkpoint fails before weights are read.
    """
    index = read_model_index(model_dir, _REQUIRED)
    task = PIPELINE_CLASSES[index["_class_name"]]
    t_cfg = read_config(TransformerConfig, model_dir / "transformer" / "config.json")
    _check_task(task, t_cfg, model_dir)
    te_cfg = t5_config(model_dir / "text_encoder")
    if te_cfg.d_model != t_cfg.text_embed_dim:
        raise CheckpointError(f"{model_dir}: the text encoder gives {te_cfg.d_model}-dim embeddings but the "
                              f"transformer expects text_embed_dim={t_cfg.text_embed_dim}")
    read_config(VAEConfig, model_dir / "vae" / "config.json")
    saved = {c: info for c in QUANTIZABLE if (info := read_quantization(model_dir / c)) is not None}
    requested = resolve_quantization(recipe, saved, device, dtype, model_dir)
    sched = load_scheduler(model_dir / "scheduler", class_name=scheduler)
    tokenizer = load_tokenizer(model_dir / "tokenizer", vocab_limit=te_cfg.vocab_size)
    # Every component's headers against its config before any weight is read (the loaders check again).
    _check_headers(model_dir / "transformer", saved.get("transformer"), "transformer_blocks", t_cfg.num_layers)
    _check_headers(model_dir / "text_encoder", saved.get("text_encoder"), "encoder.block", te_cfg.num_layers)
    check_index(model_dir / "vae", read_headers(weight_files(model_dir / "vae")))
    te_dtype = text_encoder_dtype(dtype, device)
    text_encoder = load_text_encoder(model_dir / "text_encoder", device, te_dtype, info=saved.get("text_encoder"))
    if "text_encoder" in requested:
        quantize_text_encoder(text_encoder, requested["text_encoder"], tokenizer)
    vae = load_vae(model_dir / "vae", device=device, dtype=dtype)
    transformer = load_transformer(model_dir / "transformer", device, dtype, fuse_qkv=fuse_qkv,
                                   info=saved.get("transformer"))
    if "transformer" in requested:
        quantize_transformer(transformer, requested["transformer"], tokenizer, text_encoder, dtype)
    recipes = {c: info["recipe"]["name"] for c, info in saved.items()}
    recipes.update({c: r.name for c, r in requested.items()})
    return dict(transformer=transformer, scheduler=sched, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                recipes=recipes, task=task)


# ----------------------------------------------------------------------------------------- helpers
def _check_task(task: str, cfg: TransformerConfig, model_dir: Path) -> None:
    takes_latents = cfg.image_to_video
    if task == "t2v" and takes_latents:
        raise CheckpointError(f"{model_dir}: model_index.json names a text-to-video pipeline but the transformer "
                              f"takes {cfg.in_channels} input channels (conditioning latents): the index and the "
                              "transformer come from different checkpoints")
    if task in ("i2v", "control") and cfg.in_channels == cfg.out_channels_:
        raise CheckpointError(f"{model_dir}: model_index.json names an image-to-video / control pipeline but the "
                              f"transformer takes no conditioning channels (in_channels={cfg.in_channels})")


def _listed_files(d: Path, info: dict[str, Any]) -> list[Path]:
    """The weight files quantization.json lists (plain names, checked when it was read), all present."""
    files = [d / f for f in info["files"]]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: {d / QUANT_FILE} lists it among the weight files; the checkpoint "
                                  "is incomplete: copy or export it again")
    return files


def _check_headers(d: Path, info: dict[str, Any] | None, prefix: str, layers: int) -> None:
    headers = read_headers(_listed_files(d, info) if info else weight_files(d))
    if not info:
        check_index(d, headers)
    _check_layer_count(headers, prefix, layers, d / "config.json", "num_layers")


def _check_layer_count(headers: dict[str, TensorInfo], prefix: str, n: int, config_path: Path, key: str) -> None:
    """The config's layer count against the blocks the weight files hold (before building anything)."""
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in headers if (m := pat.match(k))}
    stored = max(found) + 1 if found else 0
    if stored != n:
        raise CheckpointError(f"{config_path}: {key}={n} but the weight files hold {stored} blocks "
                              f"({prefix}.0 .. {prefix}.{stored - 1}); the config and the weights do not match")


def _load_quantized(model: torch.nn.Module, d: Path, info: dict[str, Any], headers: dict[str, TensorInfo],
                    device, dtype: torch.dtype) -> None:
    """Fill a meta-built component from a quantized folder: the recorded layers become the backend's
    quantized modules, every stored tensor is checked against the headers, then assigned."""
    where = str(d / QUANT_FILE)
    try:
        layers, expected = prepare_quantized(model, info, dtype, where)
        for key, shape in expected.items():
            if key not in headers:
                raise CheckpointError(f"{d}: tensor {key!r} is missing from {', '.join(info['files'])}; "
                                      "the checkpoint is incomplete or damaged: export it again")
            if headers[key].shape != shape:
                raise CheckpointError(f"{headers[key].file}: tensor {key!r} has shape {headers[key].shape} but "
                                      f"{d / 'config.json'} gives {shape}; the config and the weights come from "
                                      "different models")
        prefixes = tuple(f"{fqn}." for fqn in layers)
        unexpected = sorted(k for k in headers if k not in expected and not k.startswith(prefixes))
        if unexpected:
            raise CheckpointError(f"{d}: unexpected tensor(s) {unexpected[:6]} in {headers[unexpected[0]].file.name}; "
                                  "the weights do not match the config")
        fill_quantized(model, layers, info, read_tensors(sorted({h.file for h in headers.values()}), device),
                       dtype, device, where)
    except QuantizedFormatError as e:
        raise CheckpointError(str(e)) from e


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

