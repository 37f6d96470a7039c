"""The drop-in classes behave as diffusers' (issue 19's numbered list), each checked against diffusers' own
pipeline on the same modules: fp32 frames within 1e-4 (``diffusers_dropin.pair``)."""

from __future__ import annotations

import diffusers
import pytest
import torch

import cogvx.engine
from cogvx.engine import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel
from cogvx.engine.models.transformer import CogVideoXTransformer
from diffusers_dropin import FRAME_TOL, TRANSFORMER, VAE, diffusers_components, inputs, max_diff, pair


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    return pair(tmp_path_factory.mktemp("tok"))


def test_1_built_from_components_shares_the_weights_and_matches(pipes, tmp_path):
    ref, ours = pipes
    assert isinstance(ours.transformer, CogVideoXTransformer) and isinstance(ours.vae, AutoencoderKLCogVideoX)
    for a, b in ((ours.transformer.patch_embed.proj.weight, ref.transformer.patch_embed.proj.weight),
                 (ours.vae.decoder.conv_out.conv.weight, ref.vae.decoder.conv_out.conv.weight)):
        assert a.data_ptr() == b.data_ptr()  # taken over by state dict with assign=True: no second copy
    assert max_diff(ref(**inputs()).frames, ours(**inputs()).frames) < FRAME_TOL
    # cogvx's own modules, built from the config like diffusers' (the same random weights for one seed)
    torch.manual_seed(0)
    tr = CogVideoXTransformer3DModel(**TRANSFORMER)
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX.from_config(VAE)
    mine = CogVideoXPipeline(**{**ref.components, "transformer": tr, "vae": vae})
    assert type(mine.transformer) is CogVideoXTransformer3DModel and mine.transformer is tr
    assert max_diff(ref(**inputs()).frames, mine(**inputs()).frames) < FRAME_TOL
    mine.vae = ref.vae  # a component set afterwards, as diffusers allows (diffusers' module, taken over)
    assert isinstance(mine.vae, AutoencoderKLCogVideoX) and max_diff(ref(**inputs()).frames,
                                                                    mine(**inputs()).frames) < FRAME_TOL


@pytest.mark.parametrize("name", ["DDIMScheduler", "DPMSolverMultistepScheduler", "CogVideoXDPMScheduler"])
def test_2_any_diffusers_scheduler(pipes, name):
    ref, ours = pipes
    sched = getattr(diffusers, name).from_config(ref.scheduler.config)
    ref.scheduler = sched
    ours.scheduler = getattr(diffusers, name).from_config(sched.config)
    try:
        assert max_diff(ref(**inputs()).frames, ours(**inputs()).frames) < FRAME_TOL
        assert (type(ours.scheduler).__module__.startswith("cogvx")) == name.startswith("CogVideoX")
    finally:
        ref.scheduler, ours.scheduler = diffusers.DDIMScheduler(), diffusers.DDIMScheduler()


def test_3_4_frames_not_4k1_and_the_output_forms(pipes):
    ref, ours = pipes
    a, b = ref(**inputs(num_frames=8)), ours(**inputs(num_frames=8))
    assert b.frames.shape == a.frames.shape and max_diff(a.frames, b.frames) < FRAME_TOL
    assert b[0] is b.frames and b["frames"] is b.frames
    t = ours(**inputs(num_frames=8), return_dict=False)
    assert isinstance(t, tuple) and len(t) == 1 and max_diff(t[0], a.frames) < FRAME_TOL


def test_5_save_pretrained_loads_in_diffusers_and_back(pipes, tmp_path):
    ref, ours = pipes
    ours.save_pretrained(tmp_path / "p", variant="fp16")
    assert (tmp_path / "p" / "transformer" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not list((tmp_path / "p").rglob("*.bin"))
    theirs = diffusers.CogVideoXPipeline.from_pretrained(tmp_path / "p", variant="fp16")
    back = CogVideoXPipeline.from_pretrained(tmp_path / "p", variant="fp16", device_map="cpu",
                                             torch_dtype={"transformer": torch.float32, "default": torch.float32})
    want = ref(**inputs()).frames
    assert max_diff(theirs(**inputs()).frames, want) < FRAME_TOL
    assert max_diff(back(**inputs()).frames, want) < FRAME_TOL
    with pytest.raises(ValueError, match="variant=bf16"):
        CogVideoXPipeline.from_pretrained(tmp_path / "p", variant="bf16")
    bf = CogVideoXPipeline.from_pretrained(tmp_path / "p", variant="fp16", torch_dtype={"transformer": torch.bfloat16})
    assert bf.transformer.dtype == torch.bfloat16 and bf.vae.dtype == torch.float32


def test_6_to_dtype_and_device(tmp_path):
    ref, ours = pair(tmp_path)
    ref.to(torch.float64)
    ours.to("cpu", torch.float64)
    assert {ours.transformer.dtype, ours.vae.dtype, ours.text_encoder.dtype, ours.dtype} == {torch.float64}
    assert max_diff(ref(**inputs()).frames, ours(**inputs()).frames) < FRAME_TOL


def test_7_callbacks_change_guidance_interrupt_and_see_prompt_embeds(pipes):
    ref, ours = pipes
    seen = {}

    def louder(pipe, i, t, kw):
        pipe._guidance_scale += 1.0
        seen[type(pipe).__module__.split(".")[0]] = sorted(kw)
        return kw

    names = ours._callback_tensor_inputs
    a = ref(**inputs(callback_on_step_end=louder, callback_on_step_end_tensor_inputs=names)).frames
    b = ours(**inputs(callback_on_step_end=louder, callback_on_step_end_tensor_inputs=names)).frames
    plain = ours(**inputs()).frames
    assert max_diff(a, b) < FRAME_TOL and max_diff(b, plain) > 100 * FRAME_TOL  # the change took effect
    assert seen["diffusers"] == seen["cogvx"] == sorted(names)

    def stop(pipe, i, t, kw):
        pipe._interrupt = i == 0
        return kw

    a = ref(**inputs(callback_on_step_end=stop, output_type="latent")).frames
    b = ours(**inputs(callback_on_step_end=stop, output_type="latent")).frames
    assert max_diff(a, b) < FRAME_TOL


def test_8_encode_prompt_slicing_unfuse_and_caches(pipes):
    ref, ours = pipes
    for x, y in zip(ref.encode_prompt("a fox", "", True, max_sequence_length=16),
                    ours.encode_prompt("a fox", "", True, max_sequence_length=16)):
        assert max_diff(x, y) < FRAME_TOL
    want = ref(**inputs()).frames
    ours.enable_attention_slicing()
    ours.fuse_qkv_projections()
    ours.unfuse_qkv_projections()
    assert max_diff(ours(**inputs()).frames, want) < FRAME_TOL
    configs = [diffusers.FirstBlockCacheConfig(threshold=0.8),
               diffusers.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                         spatial_attention_timestep_skip_range=(100, 800)),
               diffusers.FasterCacheConfig(spatial_attention_block_skip_range=2, unconditional_batch_skip_range=2,
                                           spatial_attention_timestep_skip_range=(-1, 901),
                                           attention_weight_callback=lambda _: 0.5)]
    plain = ours(**inputs(num_inference_steps=6)).frames
    for cfg in configs:
        out = []
        for p in (ref, ours):
            if hasattr(cfg, "current_timestep_callback") and not isinstance(cfg, diffusers.FirstBlockCacheConfig):
                cfg.current_timestep_callback = lambda p=p: p.current_timestep
            p.transformer.enable_cache(cfg)
            out.append(p(**inputs(num_inference_steps=6)).frames)
            p.transformer.disable_cache()
        assert max_diff(*out) < FRAME_TOL, type(cfg).__name__
        assert max_diff(out[1], plain) > 100 * FRAME_TOL, type(cfg).__name__  # the cache did reuse work
        # cogvx's class of the same name (a script whose import line now reads cogvx.engine): the same video
        mine = getattr(cogvx.engine, type(cfg).__name__)(**{k: v for k, v in vars(cfg).items()
                                                            if k != "current_timestep_callback" and not k.startswith("_")})
        if hasattr(mine, "current_timestep_callback"):
            mine.current_timestep_callback = lambda: ours.current_timestep
        ours.transformer.enable_cache(mine)
        assert max_diff(ours(**inputs(num_inference_steps=6)).frames, out[0]) < FRAME_TOL, type(cfg).__name__
        ours.transformer.disable_cache()
    with pytest.raises(ValueError, match="TaylorSeer"):
        ours.transformer.enable_cache(diffusers.TaylorSeerCacheConfig())
    with pytest.raises(NotImplementedError, match="recipe"):
        ours.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn)


def test_10_lora_from_a_file_and_a_state_dict_on_linear_and_conv_layers(pipes, tmp_path):
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    ref, ours = pipes
    torch.manual_seed(3)
    donor = diffusers.CogVideoXTransformer3DModel(**TRANSFORMER)
    donor.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj"],
                                 init_lora_weights=False))
    sd = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(donor).items()}
    assert sd["transformer.patch_embed.proj.lora_A.weight"].ndim == 4  # "proj" reaches the patch-embedding conv
    save_file(sd, str(tmp_path / "lora.safetensors"))
    ref.load_lora_weights(str(tmp_path / "lora.safetensors"), adapter_name="a")
    want = ref(**inputs()).frames
    ref.unload_lora_weights()
    for src in (str(tmp_path / "lora.safetensors"), sd):
        ours.load_lora_weights(src, adapter_name="a")
        try:
            assert max_diff(ours(**inputs()).frames, want) < FRAME_TOL
            ours.fuse_lora()  # merged into the weights (the conv's kernel too): the same video
            assert max_diff(ours(**inputs()).frames, want) < FRAME_TOL
        finally:
            ours.unload_lora_weights()
    assert max_diff(ours(**inputs()).frames, ref(**inputs()).frames) < FRAME_TOL  # unloaded: the base model


def test_11_num_videos_per_prompt_is_one_as_in_diffusers(pipes):
    ref, ours = pipes
    a, b = ref(**inputs(num_videos_per_prompt=2)).frames, ours(**inputs(num_videos_per_prompt=2)).frames
    assert a.shape[0] == b.shape[0] == 1


def test_a_component_that_is_not_one_is_a_clear_error(ckpt_factory, tmp_path):
    with pytest.raises(TypeError, match="text_encoder=.*T5EncoderModel.*str"):
        CogVideoXPipeline.from_pretrained(ckpt_factory("rope"), text_encoder="nope")
    with pytest.raises(TypeError, match="scheduler"):
        CogVideoXPipeline(**{**diffusers_components(tmp_path), "scheduler": object()})


def test_importing_cogvx_engine_does_not_need_diffusers():
    import subprocess
    import sys

    code = ("import sys; sys.modules['diffusers'] = None; import cogvx.engine as e; "
            "e.CogVideoXPipeline; e.CogVideoXTransformer3DModel(**" + repr(TRANSFORMER) + ")")
    subprocess.run([sys.executable, "-P", "-c", code], check=True)
    assert cogvx.engine.CogVideoXPipeline is CogVideoXPipeline


def test_9_the_docs_quantization_script_maps_onto_cogvx_recipes(ckpt_factory):
    from cogvx.engine import AutoModel, PipelineQuantizationConfig, TorchAoConfig
    from cogvx.quantize import quantized_layers

    ckpt = ckpt_factory("rope")
    tr = AutoModel.from_pretrained(ckpt, subfolder="transformer", quantization_config=TorchAoConfig("int8wo"))
    assert type(tr) is CogVideoXTransformer3DModel and quantized_layers(tr, "torchao")
    vae = AutoModel.from_pretrained(ckpt, subfolder="vae")
    assert type(vae) is AutoencoderKLCogVideoX
    qc = PipelineQuantizationConfig(quant_backend="torchao", quant_kwargs={"quant_type": "int8wo"},
                                    components_to_quantize=["transformer"])
    pipe = CogVideoXPipeline.from_pretrained(ckpt, quantization_config=qc)
    ref = diffusers.CogVideoXPipeline.from_pretrained(ckpt)
    args = dict(prompt="a fox", num_frames=9, height=32, width=48, num_inference_steps=2, output_type="pt")
    a = ref(**args, generator=torch.Generator().manual_seed(0)).frames
    b = pipe(**args, generator=torch.Generator().manual_seed(0)).frames
    c = CogVideoXPipeline(**{**pipe.components, "transformer": tr})(
        **args, generator=torch.Generator().manual_seed(0)).frames
    assert quantized_layers(pipe.transformer, "torchao") and max_diff(b, c) < FRAME_TOL  # one recipe, two ways to ask
    assert 0 < max_diff(a, b) < 0.05  # int8 weights: close to diffusers' fp32, not equal
    with pytest.raises(ValueError, match="int4wo"):
        TorchAoConfig("int4wo") and AutoModel.from_pretrained(ckpt, subfolder="transformer",
                                                             quantization_config=TorchAoConfig("int4wo"))


@pytest.mark.parametrize("variant", ["1.5 t2v", "1.5 i2v", "rope dpm"])
def test_3_rope_and_cogvideox_1_5_at_frame_counts_that_are_not_4k1(tmp_path, variant):
    """CogVideoX 1.5 (temporal patch, padded latents, ofs for I2V) and 5b-style RoPE with the DPM scheduler."""
    import numpy as np
    from PIL import Image

    rope = dict(use_rotary_positional_embeddings=True, num_attention_heads=2, attention_head_dim=16)
    extra, name, args = {
        "1.5 t2v": (dict(rope, patch_size_t=2, patch_bias=False), "CogVideoXPipeline", dict(num_frames=12)),
        "1.5 i2v": (dict(rope, patch_size_t=2, patch_bias=False, in_channels=8, ofs_embed_dim=2),
                    "CogVideoXImageToVideoPipeline",
                    dict(num_frames=12, image=Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255)
                                                              .astype("uint8")))),
        "rope dpm": (rope, "CogVideoXPipeline", dict(num_frames=13)),
    }[variant]
    torch.manual_seed(0)
    tr = diffusers.CogVideoXTransformer3DModel(**{**TRANSFORMER, **extra}).eval()
    sched = diffusers.CogVideoXDPMScheduler(timestep_spacing="trailing") if variant == "rope dpm" else None
    ref, ours = pair(tmp_path, name, scheduler=sched, transformer=tr)
    a, b = ref(**inputs(**args)).frames, ours(**inputs(**args)).frames
    assert a.shape == b.shape and max_diff(a, b) < FRAME_TOL
