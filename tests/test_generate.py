"""Engine.generate against diffusers' CogVideoXPipeline(output_type="latent") on the same tiny checkpoint."""

from __future__ import annotations

import pytest
import torch
from diffusers import CogVideoXPipeline

from checkpoints import TEXT_DIM, build_reference_components
from cogvx.engine import Engine
from helpers import TRANSFORMER_VARIANTS, rel_l2, where_differs

TOL = 1e-4
SCHEDULERS = ["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"]


def _pipeline(variant, scheduler):
    c = build_reference_components(variant, scheduler=scheduler)
    return CogVideoXPipeline(tokenizer=None, text_encoder=c["text_encoder"], vae=c["vae"],
                             transformer=c["transformer"], scheduler=c["scheduler"])


def _embeds(variant, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = TRANSFORMER_VARIANTS[variant]["max_text_seq_length"]
    return torch.randn(batch, n, TEXT_DIM, generator=g), torch.randn(batch, n, TEXT_DIM, generator=g)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("dynamic", [False, True])
def test_generate_matches_diffusers_given_latents(ckpt_factory, scheduler, dynamic):
    engine = Engine.load(ckpt_factory("rope", scheduler))
    pipe = _pipeline("rope", scheduler)
    pe, npe = _embeds("rope")
    # 9 frames -> 3 latent frames; 48x80 px -> 6x10 latents (non-square)
    lat = torch.randn(1, 3, 4, 6, 10, generator=torch.Generator().manual_seed(7))
    common = dict(prompt_embeds=pe, negative_prompt_embeds=npe, num_frames=9, height=48, width=80,
                  num_inference_steps=4, guidance_scale=6.0, use_dynamic_cfg=dynamic)
    # DPM draws noise every step: give both the same generator state.
    expected = pipe(**common, latents=lat.clone(), output_type="latent",
                    generator=torch.Generator().manual_seed(3)).frames
    got = engine.generate(**common, latents=lat.clone(), generator=torch.Generator().manual_seed(3)).latents
    assert got.shape == expected.shape == (1, 3, 4, 6, 10)
    err = rel_l2(got, expected)
    assert err <= TOL, f"rel L2 {err:.2e} at {where_differs(got, expected)}"


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_seeded_generator_reproduces_diffusers_including_initial_noise(ckpt_factory, scheduler):
    """No latents given: the engine draws the initial latents (and DPM's per-step noise) exactly as
    diffusers does from the same torch.Generator."""
    engine = Engine.load(ckpt_factory("rope", scheduler))
    pipe = _pipeline("rope", scheduler)
    pe, npe = _embeds("rope", batch=2)
    common = dict(prompt_embeds=pe, negative_prompt_embeds=npe, num_frames=13, height=64, width=48,
                  num_inference_steps=5, guidance_scale=5.0)
    expected = pipe(**common, output_type="latent", generator=torch.Generator().manual_seed(11)).frames
    got = engine.generate(**common, generator=torch.Generator().manual_seed(11)).latents
    assert got.shape == expected.shape == (2, 4, 4, 8, 6)
    assert rel_l2(got, expected) <= TOL
    # and a different seed gives a different video (the seed really is used)
    other = engine.generate(**common, generator=torch.Generator().manual_seed(12)).latents
    assert rel_l2(other, expected) > 0.1


@pytest.mark.parametrize("variant", ["sincos", "v15"])
def test_other_variants_generate_like_diffusers(ckpt_factory, variant):
    """2b-style sin-cos positions, and 1.5 with its padding latent frame (dropped from .latents as the
    diffusers pipeline drops it before decoding)."""
    engine = Engine.load(ckpt_factory(variant, "CogVideoXDPMScheduler"))
    pipe = _pipeline(variant, "CogVideoXDPMScheduler")
    pe, npe = _embeds(variant)
    common = dict(prompt_embeds=pe, negative_prompt_embeds=npe, num_frames=9, height=48, width=80,
                  num_inference_steps=3, guidance_scale=6.0, use_dynamic_cfg=True)
    expected = pipe(**common, output_type="latent", generator=torch.Generator().manual_seed(5)).frames
    got = engine.generate(**common, generator=torch.Generator().manual_seed(5)).latents
    extra = expected.shape[1] - got.shape[1]
    assert extra == (1 if variant == "v15" else 0)
    assert got.shape[1] == 3
    assert rel_l2(got, expected[:, extra:]) <= TOL


def test_no_cfg_and_prompt_path(ckpt_factory):
    """guidance <= 1 runs without the unconditional branch; prompts go through our tokenizer + T5."""
    engine = Engine.load(ckpt_factory("rope"))
    pipe = _pipeline("rope", "CogVideoXDDIMScheduler")
    pe = engine.encode(["a red fox"])
    lat = torch.randn(1, 2, 4, 4, 6, generator=torch.Generator().manual_seed(1))
    common = dict(num_frames=5, height=32, width=48, num_inference_steps=3, guidance_scale=1.0)
    expected = pipe(prompt_embeds=pe, latents=lat.clone(), output_type="latent", **common).frames
    got = engine.generate("a red fox", latents=lat.clone(), **common).latents
    assert rel_l2(got, expected) <= TOL


def test_num_videos_per_prompt_and_callback(ckpt_factory):
    engine = Engine.load(ckpt_factory("rope"))
    pe, npe = _embeds("rope")
    seen = []

    def cb(eng, i, t, kw):
        seen.append((i, t, tuple(kw["latents"].shape)))
        return {}

    out = engine.generate(prompt_embeds=pe, negative_prompt_embeds=npe, num_frames=5, height=32, width=32,
                          num_inference_steps=3, num_videos_per_prompt=2, seed=0, callback_on_step_end=cb)
    assert out.latents.shape == (2, 2, 4, 4, 4)
    assert [s[0] for s in seen] == [0, 1, 2]
    assert [s[1] for s in seen] == out.timesteps
    assert not torch.equal(out.latents[0], out.latents[1])  # two draws, not one copied
    # the same seed gives the same videos
    again = engine.generate(prompt_embeds=pe, negative_prompt_embeds=npe, num_frames=5, height=32, width=32,
                            num_inference_steps=3, num_videos_per_prompt=2, seed=0)
    assert torch.equal(again.latents, out.latents)
