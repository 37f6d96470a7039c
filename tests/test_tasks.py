"""Image-to-video, video-to-video and control-video generation against diffusers' own pipelines
(CogVideoXImageToVideoPipeline, CogVideoXVideoToVideoPipeline, CogVideoXFunControlPipeline) on the same
weights, fp32, odd non-square sizes, several latent frames, both schedulers, dynamic CFG on and off.

Fun-Control in diffusers cannot step the DPM scheduler (it calls step with DDIM's arguments), so the
control task under DPM is checked against diffusers' transformer and DPM scheduler driven step by step
here, with the control latents encoded by diffusers' VAE.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (
    CogVideoXFunControlPipeline,
    CogVideoXImageToVideoPipeline,
    CogVideoXVideoToVideoPipeline,
)
from PIL import Image

from checkpoints import TEXT_DIM, build_reference_components
from cogvx.engine import Engine
from helpers import TRANSFORMER_VARIANTS, rel_l2, where_differs

TOL = 1e-4
FRAME_TOL = 1e-4
SCHEDULERS = ["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"]
PIPELINES = {"i2v": CogVideoXImageToVideoPipeline, "v2v": CogVideoXVideoToVideoPipeline,
             "control": CogVideoXFunControlPipeline}


def _pipeline(task, variant, scheduler):
    c = build_reference_components(variant, scheduler=scheduler)
    return PIPELINES[task](tokenizer=None, text_encoder=c["text_encoder"], vae=c["vae"], transformer=c["transformer"],
                           scheduler=c["scheduler"])


def _embeds(variant, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = TRANSFORMER_VARIANTS[variant]["max_text_seq_length"]
    return torch.randn(batch, n, TEXT_DIM, generator=g), torch.randn(batch, n, TEXT_DIM, generator=g)


def _pixels(frames, height, width, seed):
    """A smooth random video [F, H, W, 3] float32 in [0, 1] (smooth: the tiny VAE then sees image-like input)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(frames, 3, max(height // 8, 1), max(width // 8, 1), generator=g)
    return torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear").permute(0, 2, 3, 1).numpy()


# (variant, num_frames, height, width): 5b-I2V has learned positions for its sample size only (48x80 px);
# 1.5-I2V pads 3 latent frames to 4 and takes the ofs embedding.
I2V_CASES = {"i2v-5b": ("learned", 9, 48, 80), "i2v-1.5": ("v15_ofs", 9, 48, 80)}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("case", list(I2V_CASES))
def test_image_to_video_matches_diffusers(ckpt_factory, case, scheduler, dynamic):
    variant, f, h, w = I2V_CASES[case]
    engine = Engine.load(ckpt_factory(variant, scheduler))
    pipe = _pipeline("i2v", variant, scheduler)
    pe, npe = _embeds(variant)
    image = torch.from_numpy(_pixels(1, h, w, seed=3)[0]).permute(2, 0, 1)  # [3, H, W] in [0, 1]
    common = dict(prompt_embeds=pe, negative_prompt_embeds=npe, num_frames=f, height=h, width=w,
                  num_inference_steps=4, guidance_scale=6.0, use_dynamic_cfg=dynamic)
    # The generator draws the image latents' sample, then the noise (and DPM's per-step noise).
    expected = pipe(image=image, **common, output_type="latent", generator=torch.Generator().manual_seed(5)).frames
    got = engine.generate(image=image, **common, generator=torch.Generator().manual_seed(5)).latents
    extra = expected.shape[1] - got.shape[1]
    assert extra == (1 if variant == "v15_ofs" else 0)
    err = rel_l2(got, expected[:, extra:])
    assert err <= TOL, f"rel L2 {err:.2e} at {where_differs(got, expected[:, extra:])}"
    # ... and separately from the same initial latents
    lat = torch.randn(expected.shape, generator=torch.Generator().manual_seed(9))
    expected = pipe(image=image, **common, latents=lat.clone(), output_type="latent",
                    generator=torch.Generator().manual_seed(6)).frames
    got = engine.generate(image=image, **common, latents=lat.clone(), generator=torch.Generator().manual_seed(6)).latents
    assert rel_l2(got, expected[:, extra:]) <= TOL


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("variant, frames", [("rope", 9), ("sincos", 9), ("v15", 13)])
def test_video_to_video_matches_diffusers(ckpt_factory, variant, frames, scheduler, dynamic):
    """strength 0.6 of 5 steps: the schedule starts at step 2, from the encoded and noised video."""
    engine = Engine.load(ckpt_factory(variant, scheduler))
    pipe = _pipeline("v2v", variant, scheduler)
    pe, npe = _embeds(variant)
    video = _pixels(frames, 48, 80, seed=4)
    common = dict(prompt_embeds=pe, negative_prompt_embeds=npe, height=48, width=80, num_inference_steps=5,
                  strength=0.6, guidance_scale=6.0, use_dynamic_cfg=dynamic)
    expected = pipe(video=video, **common, output_type="latent",
                    generator=torch.Generator().manual_seed(7)).frames
    got = engine.generate(video=video, **common, generator=torch.Generator().manual_seed(7))
    assert got.latents.shape == expected.shape
    assert len(got.timesteps) == 3 and got.timesteps == pipe.scheduler.timesteps[2:].tolist()
    err = rel_l2(got.latents, expected)
    assert err <= TOL, f"rel L2 {err:.2e} at {where_differs(got.latents, expected)}"
    # ... and from the same (already noised) starting latents instead of a video, as diffusers takes them
    # (diffusers cannot for 1.5: it takes the latent frame count for a video frame count and refuses)
    if variant == "v15":
        return
    lat = torch.randn(expected.shape, generator=torch.Generator().manual_seed(8))
    expected = pipe(**common, latents=lat.clone(), output_type="latent", generator=torch.Generator().manual_seed(2)).frames
    got = engine.generate(**common, latents=lat.clone(), generator=torch.Generator().manual_seed(2))
    assert rel_l2(got.latents, expected) <= TOL


@pytest.mark.parametrize("dynamic", [False, True])
def test_control_video_matches_diffusers_ddim(ckpt_factory, dynamic):
    engine = Engine.load(ckpt_factory("control"))
    pipe = _pipeline("control", "control", "CogVideoXDDIMScheduler")
    pe, npe = _embeds("control")
    control = [Image.fromarray((f * 255).astype(np.uint8)) for f in _pixels(13, 48, 80, seed=5)]
    common = dict(prompt_embeds=pe, negative_prompt_embeds=npe, height=48, width=80, num_inference_steps=4,
                  guidance_scale=6.0, use_dynamic_cfg=dynamic)
    expected = pipe(control_video=control, **common, output_type="latent",
                    generator=torch.Generator().manual_seed(3)).frames
    got = engine.generate(control_video=control, **common, generator=torch.Generator().manual_seed(3)).latents
    assert got.shape == expected.shape == (1, 4, 4, 6, 10)
    err = rel_l2(got, expected)
    assert err <= TOL, f"rel L2 {err:.2e} at {where_differs(got, expected)}"
    lat = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    expected = pipe(control_video=control, **common, latents=lat.clone(), output_type="latent").frames
    got = engine.generate(control_video=control, **common, latents=lat.clone()).latents
    assert rel_l2(got, expected) <= TOL


@pytest.mark.parametrize("dynamic", [False, True])
def test_control_video_with_dpm_matches_a_stepwise_reference(ckpt_factory, dynamic):
    """DPM-Solver++ on a control checkpoint: diffusers' transformer and DPM scheduler stepped by hand."""
    from diffusers import CogVideoXDPMScheduler

    engine = Engine.load(ckpt_factory("control", "CogVideoXDPMScheduler"))
    c = build_reference_components("control", scheduler="CogVideoXDPMScheduler")
    pe, npe = _embeds("control")
    video = _pixels(9, 48, 80, seed=6)
    steps, g = 4, 6.0
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        x = torch.randn((1, 3, 4, 6, 10), generator=gen)  # the noise first, as the control pipeline draws it
        px = torch.from_numpy(video).permute(3, 0, 1, 2)[None] * 2 - 1  # [1, 3, F, H, W] in [-1, 1]
        ctrl = (c["vae"].encode(px).latent_dist.mode() * c["vae"].config.scaling_factor).permute(0, 2, 1, 3, 4)
        sched: CogVideoXDPMScheduler = c["scheduler"]
        sched.set_timesteps(steps)
        text = torch.cat([npe, pe])
        old = None
        for i, t in enumerate(sched.timesteps):
            inp = torch.cat([torch.cat([x, x]), torch.cat([ctrl, ctrl])], dim=2)
            pred = c["transformer"](hidden_states=inp, encoder_hidden_states=text, timestep=t.expand(2),
                                    image_rotary_emb=_diffusers_rope(c["transformer"], 48, 80, 3),
                                    return_dict=False)[0].float()
            w = 1 + g * ((1 - math.cos(math.pi * ((steps - t.item()) / steps) ** 5.0)) / 2) if dynamic else g
            un, co = pred.chunk(2)
            pred = un + w * (co - un)
            x, old = sched.step(pred, old, t, sched.timesteps[i - 1] if i > 0 else None, x, generator=gen,
                                return_dict=False)
    got = engine.generate(control_video=video, prompt_embeds=pe, negative_prompt_embeds=npe, height=48, width=80,
                          num_inference_steps=steps, guidance_scale=g, use_dynamic_cfg=dynamic,
                          generator=torch.Generator().manual_seed(4)).latents
    assert rel_l2(got, x) <= TOL, where_differs(got, x)


def _diffusers_rope(transformer, height, width, latent_frames):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    cfg = transformer.config
    gh, gw = height // 8 // cfg.patch_size, width // 8 // cfg.patch_size
    base_w, base_h = cfg.sample_width // cfg.patch_size, cfg.sample_height // cfg.patch_size
    crops = get_resize_crop_region_for_grid((gh, gw), base_w, base_h)
    return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=crops, grid_size=(gh, gw),
                                   temporal_size=latent_frames, device="cpu")


# ------------------------------------------------------------------ end to end: frames of one run per task
E2E = {
    "i2v": ("learned", dict(image="pil", num_frames=9)),
    "v2v": ("rope", dict(video="np", strength=0.8, num_frames=9)),
    "control": ("control", dict(control_video="pil", num_frames=9)),
}


@pytest.mark.parametrize("task", list(E2E))
def test_frames_match_diffusers_end_to_end(ckpt_factory, task):
    """Prompt-embedding inputs to decoded frames; the image and video inputs are given at another size and
    resized by each side (PIL Lanczos for images, nearest for arrays)."""
    variant, kw = E2E[task]
    engine = Engine.load(ckpt_factory(variant))
    pipe = _pipeline(task, variant, "CogVideoXDDIMScheduler")
    pe, npe = _embeds(variant)
    inputs = dict(kw)
    if inputs.get("image") == "pil":
        inputs["image"] = Image.fromarray((_pixels(1, 60, 90, seed=1)[0] * 255).astype(np.uint8))
    for k in ("video", "control_video"):
        if inputs.get(k) == "np":
            inputs[k] = _pixels(9, 64, 96, seed=2)
        elif inputs.get(k) == "pil":  # diffusers' control pipeline takes a list of PIL frames only
            inputs[k] = [Image.fromarray((f * 255).astype(np.uint8)) for f in _pixels(9, 64, 96, seed=2)]
    common = dict(prompt_embeds=pe, negative_prompt_embeds=npe, height=48, width=80, num_inference_steps=3,
                  guidance_scale=6.0)
    ref_kw = {k: v for k, v in inputs.items() if not (task in ("v2v", "control") and k == "num_frames")}
    expected = pipe(**ref_kw, **common, output_type="np", generator=torch.Generator().manual_seed(0)).frames
    got = engine.generate(**inputs, **common, generator=torch.Generator().manual_seed(0)).frames
    assert got.shape == expected.shape == (1, 9, 48, 80, 3)
    err = np.abs(got - expected).max()
    assert err <= FRAME_TOL, err
    assert expected.std() > 0.01


# ------------------------------------------------------------------ compiled: one graph per shape, no break
def test_compiled_tasks_have_no_graph_break_and_compile_once(ckpt_factory, tmp_path):
    """dynamo's graphs (the "eager" backend: the graphs inductor would get, without code generation; the
    text-to-video test in test_compile_profile.py runs inductor itself)."""
    import torch._dynamo

    from cogvx.engine.runtime.compiling import dynamo_counts

    cases = {
        "i2v": ("learned", dict(image=torch.rand(3, 48, 80))),
        "v2v": ("rope", dict(video=torch.rand(9, 3, 48, 80), strength=0.7)),
        "control": ("control", dict(control_video=torch.rand(9, 3, 48, 80))),
    }
    torch._dynamo.reset()
    for task, (variant, inputs) in cases.items():
        eager = Engine.load(ckpt_factory(variant)).generate("a fox", num_frames=9, height=48, width=80,
                                                             num_inference_steps=3, seed=0, output_type="latent",
                                                             **inputs)
        engine = Engine.load(ckpt_factory(variant))
        engine.compile(True, tmp_path / "cache", backend="eager")
        before = dynamo_counts()
        first = engine.generate("a fox", num_frames=9, height=48, width=80, num_inference_steps=3, seed=0,
                                output_type="latent", **inputs)
        after = dynamo_counts()
        assert after["graph_breaks"] == 0, task
        assert after["unique_graphs"] - before["unique_graphs"] == 1, task
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = engine.generate("a fox", num_frames=9, height=48, width=80, num_inference_steps=3, seed=1,
                                    output_type="latent", **inputs)
        assert dynamo_counts() == after, task
        assert rel_l2(first.latents, eager.latents) <= 1e-4, task
        assert rel_l2(again.latents, first.latents) > 1e-3, task  # the seed is used
