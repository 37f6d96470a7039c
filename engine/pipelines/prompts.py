"""Prompt embeddings of a generate call: the whole CFG batch [uncond; cond], each prompt's videos
consecutive (as diffusers orders them)."""

from __future__ import annotations

import torch

from ..models.text_encoder import encode_ids
from ..models.tokenizer import PromptTokenizer
from ..runtime.profiling import Profile, stage
from .request import Plan

__all__ = ["embed_prompts"]


def _repeat(embeds: torch.Tensor, k: int) -> torch.Tensor:
    return embeds if k == 1 else embeds.repeat_interleave(k, dim=0)


def embed_prompts(plan: Plan, tokenizer: PromptTokenizer | None, text_encoder, prompt, negative_prompt,
                  prompt_embeds, negative_prompt_embeds, *, device: torch.device, dtype: torch.dtype,
                  profile: Profile) -> torch.Tensor:
    """[2N or N, Nt, Dtext] in ``dtype`` on ``device``: [uncond; cond] under CFG, else cond."""
    texts = []
    if prompt_embeds is None:
        texts.append([prompt] if isinstance(prompt, str) else list(prompt))
    if plan.cfg and negative_prompt_embeds is None:
        neg = negative_prompt if negative_prompt is not None else ""
        texts.insert(0, [neg] * plan.b if isinstance(neg, str) else list(neg))
    if texts:
        with stage(profile, "tokenize", device):
            ids = [tokenizer(t, max_length=plan.max_length).input_ids for t in texts]
        with stage(profile, "text_encode", device):
            embeds = [encode_ids(text_encoder, i, device, dtype) for i in ids]
        if prompt_embeds is None:
            prompt_embeds = embeds.pop()
        if plan.cfg and negative_prompt_embeds is None:
            negative_prompt_embeds = embeds.pop()
    k = plan.videos_per_prompt
    cond = _repeat(prompt_embeds.to(device, dtype), k)
    if not plan.cfg:
        return cond
    return torch.cat([_repeat(negative_prompt_embeds.to(device, dtype), k), cond])
