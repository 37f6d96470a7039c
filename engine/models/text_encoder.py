"""The T5 v1.1 encoder of the CogVideoX prompt path (transformers' ``T5EncoderModel``):

``input_ids [B, 226] --T5EncoderModel--> text embeddings [B, 226, 4096]``

Built on the meta device here and filled from safetensors by ``cogvx.engine.loading``.
"""

from __future__ import annotations

import torch
from transformers import T5Config, T5EncoderModel

from .tokenizer import PromptTokenizer

__all__ = ["build_text_encoder", "check_vocab", "encode_ids", "encode_prompts", "text_encoder_dtype", "tie_embedding"]


def text_encoder_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype T5 runs in for a pipeline dtype: T5 overflows in fp16, so an fp16 pipeline runs it in
    bf16 on GPUs and in fp32 on the CPU; every other dtype is kept."""
    return dtype if dtype != torch.float16 else (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)


def build_text_encoder(config: T5Config | dict, device: str | torch.device = "meta") -> T5EncoderModel:
    """An uninitialized ``T5EncoderModel`` (on the meta device by default: no memory), eval mode."""
    cfg = config if isinstance(config, T5Config) else T5Config(**config)
    with torch.device(device):
        model = T5EncoderModel(cfg)
    return model.eval().requires_grad_(False)


def tie_embedding(model: T5EncoderModel) -> None:
    """T5 ties its input embedding to ``shared``; assign=True loading gives each name its own Parameter."""
    model.encoder.embed_tokens.weight = model.shared.weight


def check_vocab(tokenizer: PromptTokenizer, text_encoder: T5EncoderModel) -> None:
    """The tokenizer's ids must all index the encoder's embedding (both from one checkpoint)."""
    enc_vocab = text_encoder.config.vocab_size
    if tokenizer.vocab_size > enc_vocab:
        raise ValueError(
            f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} ids but the text encoder's "
            f"embedding has {enc_vocab} rows: they are not from the same checkpoint"
        )


@torch.no_grad()  # not inference_mode: callers may later write into the embeddings in place
def encode_ids(text_encoder: T5EncoderModel, input_ids: torch.Tensor, device: str | torch.device | None = None,
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


def encode_prompts(tokenizer: PromptTokenizer, text_encoder: T5EncoderModel, prompts: list[str] | str,
                   max_length: int = 226, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Text embeddings [B, max_length, d_model] (4096 for T5-XXL) of ``prompts``: tokenize, then
    :func:`encode_ids`."""
    check_vocab(tokenizer, text_encoder)
    return encode_ids(text_encoder, tokenizer(prompts, max_length=max_length).input_ids, device, dtype)
