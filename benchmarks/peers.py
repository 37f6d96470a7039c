"""The rows a sweep times: cogvx's transformer step per recipe, diffusers' on the same weights (fp32,
bf16, and with torchao's int8 dynamic-activation recipe, as the diffusers-torchao project applies
it), and end-to-end generations (text encoding + denoising steps + VAE decode) of both.

Every builder returns a ``Row``: a name, what it is, and a zero-argument callable that runs one
step (or one generation) and returns a float32 tensor to compare. Nothing here times anything:
``sweep.py`` alternates the rows in one process.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cogvx.engine.models.presets import get_preset
from cogvx.engine.pipelines.engine import Engine
from cogvx.engine.quantizing import quantize_transformer
from cogvx.engine.runtime.compiling import compile_module
from cogvx.kernels import resolve_backend

PEERS = ("diffusers-fp32", "diffusers-bf16", "diffusers-int8dq")
PROMPT, NEGATIVE = "a red fox running through fresh snow", ""


@dataclass
class Row:
    name: str
    impl: str  # "cogvx" or "diffusers"
    recipe: str
    dtype: str
    compiled: bool
    kind: str  # "step" or "e2e"
    fn: Callable[[], torch.Tensor]
    extra: dict = field(default_factory=dict)


def _compile(module, compiled: bool, device):
    return compile_module(module, True, device) if compiled else module


def cogvx_step(model, recipe: str, inputs, device, *, compiled=True, kernels="auto", fuse_qkv=True) -> Row:
    """cogvx's transformer (a deep copy of ``model``, fp32 weights), ``recipe`` applied ("none": none)."""
    m = copy.deepcopy(model)
    if fuse_qkv:
        m.fuse_qkv()
    m.set_kernel_backend(resolve_backend(kernels, device), "sdpa")
    if recipe != "none":
        quantize_transformer(m, recipe)
    fn = _compile(m, compiled, device)
    lat, text, t, pos = inputs
    name = f"cogvx {recipe if recipe != 'none' else 'fp32'}{'' if compiled else ' eager'}"
    return Row(name, "cogvx", recipe, "float32", compiled, "step", lambda: fn(lat, text, t, pos).float())


def diffusers_transformer(model, dtype):
    from diffusers import CogVideoXTransformer3DModel

    cfg = model.config
    device = next(model.parameters()).device
    # Built on the device (not meta): its sin-cos table is a non-persistent buffer made in __init__.
    with torch.device(device):
        ref = CogVideoXTransformer3DModel(**{k: v for k, v in cfg.to_dict().items() if k[0] != "_"})
    ref.load_state_dict(model.state_dict())
    return ref.to(dtype).eval().requires_grad_(False)


def _torchao_int8dq(module) -> None:
    """diffusers-torchao's int8dq recipe: every nn.Linear, torchao's defaults."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(module, Int8DynamicActivationInt8WeightConfig())


def diffusers_step(model, peer: str, inputs, device, *, compiled=True) -> Row:
    """diffusers' CogVideoXTransformer3DModel on ``model``'s weights: "diffusers-fp32", "-bf16", "-int8dq"."""
    dtype = torch.bfloat16 if peer == "diffusers-bf16" else torch.float32
    ref = diffusers_transformer(model, dtype)
    if peer == "diffusers-int8dq":
        _torchao_int8dq(ref)
    fn = _compile(ref, compiled, device)
    lat, text, t, pos = (*(x.to(dtype) if x.is_floating_point() else x for x in inputs[:3]), inputs[3])
    rope = pos.rope

    def step():
        return fn(hidden_states=lat, encoder_hidden_states=text, timestep=t, image_rotary_emb=rope,
                  return_dict=False)[0].float()

    return Row(f"{peer}{'' if compiled else ' eager'}", "diffusers", {"diffusers-int8dq": "torchao int8dq"}.get(peer, "none"),
               str(dtype).removeprefix("torch."), compiled, "step", step)


# ------------------------------------------------------------------------------------ end to end
@dataclass(frozen=True)
class E2E:
    """An end-to-end generation: ``steps`` denoising steps at the preset's video shape, CFG, decoded."""

    preset: str
    steps: int = 2
    t5_layers: int = 2  # of T5-XXL's 24 (4096 wide): the full encoder (19 GB in fp32) does not fit here
    seed: int = 0


def base_engine(e: E2E, device) -> Engine:
    """The fp32 engine every end-to-end row shares its text encoder, VAE and weights with (random
    weights of the preset; T5-XXL cut to ``e.t5_layers`` layers)."""
    return Engine.from_preset(e.preset, device, torch.float32, seed=e.seed, t5_layers=e.t5_layers)


VAE_BF16 = "+vae-bf16"


def cogvx_e2e(e: E2E, base: Engine, recipe: str, device) -> Row:
    """Engine.generate from prompt to decoded frames: the base engine's weights, q/k/v fused,
    ``recipe`` applied, transformer compiled; text encoder and VAE shared with ``base``. A recipe
    ending in "+vae-bf16" runs a bf16 copy of the VAE (Engine.load's vae_dtype="bfloat16")."""
    name = recipe
    recipe, bf16_vae = recipe.removesuffix(VAE_BF16), recipe.endswith(VAE_BF16)
    vae = copy.deepcopy(base.vae).to(torch.bfloat16) if bf16_vae else base.vae
    m = copy.deepcopy(base.transformer)
    m.fuse_qkv()
    if recipe != "none":
        quantize_transformer(m, recipe)
    eng = Engine(transformer=m, scheduler=base.scheduler, tokenizer=base.tokenizer, text_encoder=base.text_encoder,
                 vae=vae, device=torch.device(device), dtype=torch.float32)
    eng.compile(True)
    p = get_preset(e.preset)
    kw = dict(num_frames=p.num_frames, height=p.height, width=p.width, num_inference_steps=e.steps,
              guidance_scale=6.0, seed=e.seed, output_type="pt", negative_prompt=NEGATIVE)
    stages: dict = {}

    def run():
        res = eng.generate(PROMPT, **kw)
        stages.clear()
        stages.update(res.profile.stages)
        return torch.as_tensor(res.frames).float()

    return Row(f"e2e cogvx {name if recipe != 'none' else 'fp32' + VAE_BF16 * bf16_vae}", "cogvx", recipe, "float32",
               True, "e2e", run,
               {"stages": stages})


def diffusers_e2e(e: E2E, base: Engine, peer: str, device) -> Row:
    """diffusers' CogVideoXPipeline on the base engine's weights (transformer, VAE, scheduler config);
    the prompts go through the same tokenizer and T5 module first (both projects run transformers' T5),
    timed as part of the row."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    p = get_preset(e.preset)
    dtype = torch.bfloat16 if peer == "diffusers-bf16" else torch.float32
    tr = diffusers_transformer(base.transformer, dtype)
    if peer == "diffusers-int8dq":
        _torchao_int8dq(tr)
    tr = _compile(tr, True, device)
    with torch.device(device):
        vae = AutoencoderKLCogVideoX(**base.vae.config.to_dict())
    vae.load_state_dict(base.vae.state_dict())
    vae = vae.to(dtype).eval()
    cfg = {k: v for k, v in dataclasses.asdict(base.scheduler.config).items() if v is not None}
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr,
                             scheduler=CogVideoXDDIMScheduler(**cfg))
    pipe.set_progress_bar_config(disable=True)
    stages: dict = {}

    def run():
        t0 = time.perf_counter()
        with torch.inference_mode():
            emb = base.encode([NEGATIVE, PROMPT]).to(dtype)
        t1 = time.perf_counter()
        with torch.inference_mode():
            out = pipe(prompt_embeds=emb[1:], negative_prompt_embeds=emb[:1], num_frames=p.num_frames,
                       height=p.height, width=p.width, num_inference_steps=e.steps, guidance_scale=6.0,
                       output_type="pt", generator=torch.Generator(device).manual_seed(e.seed)).frames
        stages.clear()
        stages.update(text_encode=t1 - t0, steps_and_decode=time.perf_counter() - t1)
        return out.float()  # [B, F, 3, H, W] in [0, 1], as cogvx's "pt"

    return Row(f"e2e {peer}", "diffusers", {"diffusers-int8dq": "torchao int8dq"}.get(peer, "none"),
               str(dtype).removeprefix("torch."), True, "e2e", run, {"stages": stages})
