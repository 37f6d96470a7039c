"""Small random CogVideoX checkpoints built with diffusers and transformers (the independent
references) and written with ``save_pretrained`` in the diffusers layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from helpers import PIPELINE_CLASS, TRANSFORMER_VARIANTS, randomize_

TEXT_DIM = 20  # = text_embed_dim of every test variant


def tiny_vae_kwargs() -> dict:
    # 4 blocks: spatial compression 8 and temporal 4, as the real VAE.
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, temporal_compression_ratio=4, sample_height=32, sample_width=32,
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
    )


def build_reference_components(variant: str, seed: int = 0, scheduler: str = "CogVideoXDDIMScheduler"):
    """diffusers/transformers modules of a tiny model (random weights, eval mode)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = randomize_(CogVideoXTransformer3DModel(**TRANSFORMER_VARIANTS[variant]).eval(), seed + 1, std=0.1)
    vae = AutoencoderKLCogVideoX(**tiny_vae_kwargs()).eval()
    te = T5EncoderModel(T5Config(d_model=TEXT_DIM, d_ff=32, num_layers=2, num_heads=2, d_kv=8, vocab_size=260,
                                 feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
    sched_cls = {"CogVideoXDDIMScheduler": CogVideoXDDIMScheduler, "CogVideoXDPMScheduler": CogVideoXDPMScheduler}
    sched = sched_cls[scheduler](
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, prediction_type="v_prediction",
        rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=3.0, timestep_spacing="trailing",
    )
    return dict(transformer=transformer, vae=vae, text_encoder=te, scheduler=sched)


def write_checkpoint(out: Path, variant: str = "rope", seed: int = 0, scheduler: str = "CogVideoXDDIMScheduler",
                     shard: bool = False) -> Path:
    """A complete diffusers-layout directory (model_index.json and the five components)."""
    from cogvx.engine.dev.tiny_tokenizer import make_tiny_tokenizer

    comps = build_reference_components(variant, seed, scheduler)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(safe_serialization=True)
    comps["transformer"].save_pretrained(out / "transformer", max_shard_size="20KB" if shard else "10GB", **kw)
    comps["vae"].save_pretrained(out / "vae", **kw)
    comps["text_encoder"].save_pretrained(out / "text_encoder", **kw)
    comps["scheduler"].save_pretrained(out / "scheduler")
    make_tiny_tokenizer(out / "tokenizer", vocab_size=256)
    index = {
        "_class_name": PIPELINE_CLASS.get(variant, "CogVideoXPipeline"),
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", scheduler],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
