"""A tiny CogVideoX pipeline built from components, once with diffusers' classes and once with cogvx's drop-in
classes on the same modules (cogvx takes diffusers' modules over by config and state dict, sharing the tensors):
the reference pair of the drop-in tests. fp32, CPU, frames compared within 1e-4."""

from __future__ import annotations

import torch

FRAME_TOL = 1e-4

TRANSFORMER = dict(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
                   text_embed_dim=32, num_layers=2, sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
                   temporal_compression_ratio=4, max_text_seq_length=16)
VAE = dict(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
           up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
           layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)


def tokenizer(tmp_dir):
    from transformers import AutoTokenizer

    from cogvx.engine.dev.tiny_tokenizer import make_tiny_tokenizer

    return AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_dir, vocab_size=200, extra_ids=100))


def diffusers_components(tmp_dir, scheduler=None, seed: int = 0) -> dict:
    """diffusers' and transformers' modules with random weights (eval mode); a DDIMScheduler by default."""
    import diffusers
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tr = diffusers.CogVideoXTransformer3DModel(**TRANSFORMER).eval()
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLCogVideoX(**VAE).eval()
    torch.manual_seed(seed)
    te = T5EncoderModel(T5Config(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, vocab_size=400,
                                 relative_attention_num_buckets=8, dropout_rate=0.0)).eval()
    sched = scheduler if scheduler is not None else diffusers.DDIMScheduler()
    return dict(tokenizer=tokenizer(tmp_dir), text_encoder=te, vae=vae, transformer=tr, scheduler=sched)


def inputs(**overrides) -> dict:
    args = dict(prompt="a red fox runs across a snowy forest", negative_prompt="", num_inference_steps=3,
                guidance_scale=6.0, height=16, width=16, num_frames=9, max_sequence_length=16, output_type="pt",
                generator=torch.Generator().manual_seed(0))
    args.update(overrides)
    return args


def pair(tmp_dir, pipeline: str = "CogVideoXPipeline", scheduler=None, **component_overrides):
    """(diffusers' pipeline, cogvx's pipeline) over the same components."""
    import diffusers

    import cogvx.engine

    comps = {**diffusers_components(tmp_dir, scheduler), **component_overrides}
    ref = getattr(diffusers, pipeline)(**comps)
    ref.set_progress_bar_config(disable=True)
    ours = getattr(cogvx.engine, pipeline)(**comps)
    ours.set_progress_bar_config(disable=True)
    return ref, ours


def max_diff(a, b) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())
