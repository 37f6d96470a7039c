"""Build the components of a diffusers-layout CogVideoX checkpoint: the transformer, VAE and T5 encoder
on the meta device filled with ``assign=True`` (never materialized twice), the tokenizer and the
scheduler; a quantized component folder loads as saved, never re-quantized. Cheap checks run first:
every config is validated and compared with the safetensors headers, and every shape is checked,
before a single weight is read."""

from .components import (
    DEFERRABLE,
    load_components,
    load_scheduler,
    load_transformer,
    load_vae,
    merge_loras,
    read_config,
    required_components,
    skeleton,
)
from .deferred import reloader
from .quantized import read_quantization
from .text import load_text_encoder, load_tokenizer, t5_config

__all__ = [
    "load_components", "load_transformer", "load_vae", "load_text_encoder", "load_tokenizer", "load_scheduler",
    "read_config", "read_quantization", "required_components", "merge_loras", "t5_config", "skeleton",
    "reloader", "DEFERRABLE",
]
