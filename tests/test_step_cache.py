"""Step caching: threshold 0 is the uncached loop bit for bit; reused steps really skip the blocks and
add the cached residual of the last computed step; TeaCache decides by its published rule; every task,
recipes and kernels; compiled with no graph break and no recompilation; bad input."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from checkpoints import build_reference_components
from cogvx.engine import Engine, StepCache
from cogvx.engine.cli import main
from cogvx.engine.models.positions import make_positions
from cogvx.engine.pipelines.cached_denoiser import CachedDenoiser, Regions
from cogvx.engine.pipelines.step_cache import TEACACHE_COEFFICIENTS
from cogvx.engine.runtime.compiling import dynamo_counts
from cogvx.engine.runtime.profiling import block_flops
from helpers import rel_l2

KW = dict(prompt="a fox in the snow", negative_prompt="blurry", num_frames=9, height=48, width=80,
          num_inference_steps=8, seed=0, output_type="latent")
MODES = ["first-block", "teacache"]
ALWAYS = 1e9  # a threshold every indicator stays below: each step that may be reused is


@pytest.fixture(scope="module")
def engine(ckpt_factory):
    return Engine.load(ckpt_factory("rope"))


class BlockCalls:
    """Counts the calls of each transformer block per denoising step (forward hooks; the callback
    closes a step)."""

    def __init__(self, transformer):
        self.current: list[int] = []
        self.per_step: list[list[int]] = []
        self.handles = [blk.register_forward_hook(lambda m, a, o, i=i: self.current.append(i))
                        for i, blk in enumerate(transformer.transformer_blocks)]

    def callback(self, engine, k, t, kwargs):
        self.per_step.append(self.current)
        self.current = []

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scheduler", ["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"])
def test_threshold_zero_is_bit_identical_to_the_uncached_loop(ckpt_factory, mode, scheduler):
    engine = Engine.load(ckpt_factory("rope", scheduler))
    ref = engine.generate(**KW, use_dynamic_cfg=True)
    got = engine.generate(**KW, use_dynamic_cfg=True, step_cache=StepCache(0, mode=mode))
    assert torch.equal(got.latents, ref.latents)
    p = got.profile
    assert p.steps_computed == list(range(8)) and p.steps_reused == [] and p.flops_saved == 0
    assert p.step_cache["host_reads"] == 0
    assert ref.profile.step_cache == {} and ref.profile.steps_reused == []


@pytest.mark.parametrize("mode", MODES)
def test_reused_steps_skip_the_blocks(engine, mode):
    calls = BlockCalls(engine.transformer)
    try:
        got = engine.generate(**KW, step_cache=StepCache(ALWAYS, mode=mode), callback_on_step_end=calls.callback)
    finally:
        calls.remove()
    p = got.profile
    n_layers = engine.config.num_layers
    assert p.steps_reused == [2, 3, 4, 5]  # warm-up 2, cool-down 2 of 8 steps
    assert p.steps_computed == [0, 1, 6, 7]
    for k, seen in enumerate(calls.per_step):
        if k in p.steps_reused:
            assert seen == ([0] if mode == "first-block" else []), (k, seen)
        else:
            assert seen == list(range(n_layers)), (k, seen)
    skipped = n_layers - (1 if mode == "first-block" else 0)
    s = p.shape
    assert p.flops_saved == 4 * skipped * block_flops(engine.config, 2, s["text_tokens"], s["video_tokens"])
    assert "4 of 8 steps reused" in p.table() and "2, 3, 4, 5" in p.table()
    d = json.loads(p.to_json())
    assert d["steps_reused"] == [2, 3, 4, 5] and d["step_cache"]["mode"] == mode
    assert d["step_cache"]["host_reads"] == (4 if mode == "first-block" else 0)
    ref = engine.generate(**KW)
    assert 0 < rel_l2(got.latents, ref.latents) < 1  # reuse changed the result, and not into garbage


@pytest.mark.parametrize("mode", MODES)
def test_a_reused_step_adds_the_residual_of_the_last_computed_step(engine, mode):
    """The cached denoiser called directly, against the regions composed by hand."""
    m = engine.transformer
    cfg = m.config
    pos = make_positions(cfg, 3, 6, 10)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, 7, cfg.text_embed_dim, generator=g)
    xa, xb, xc = (torch.randn(2, 3, 4, 6, 10, generator=g) for _ in range(3))
    ta, tb, tc = (torch.tensor([v, v]) for v in (900, 850, 800))
    cache = StepCache(ALWAYS, mode=mode, warmup_steps=1, cooldown_steps=0)
    model = CachedDenoiser(Regions(m), cache, 3, rescaled=[math.nan, 0.1, 0.1])
    with torch.no_grad():
        out_a, out_b, out_c = model(xa, text, ta, pos), model(xb, text, tb, pos), model(xc, text, tc, pos)
        assert torch.equal(out_a, m(xa, text, ta, pos))  # step 0 computes
        first = 1 if mode == "first-block" else 0
        emb = {}
        for name, x, t in (("a", xa, ta), ("b", xb, tb), ("c", xc, tc)):
            e, silu = m.embed(x, text, t, pos)
            h1 = m.blocks(e, silu, pos, 7, 0, first)
            emb[name] = (e, silu, h1)
        e_a, s_a, h1_a = emb["a"]
        rest_a = m.blocks(h1_a, s_a, pos, 7, first) - h1_a
        for name, got, x in (("b", out_b, xb), ("c", out_c, xc)):
            _, silu, h1 = emb[name]
            assert torch.allclose(got, m.head(h1 + rest_a, silu, 7, x.shape), rtol=0, atol=1e-6), name
    assert model.reused == [1, 2]
    if mode == "first-block":  # both compared with step 0, the last computed one
        r_a = h1_a - e_a
        for k, name in ((1, "b"), (2, "c")):
            r = emb[name][2] - emb[name][0]
            want = ((r - r_a).abs().mean() / r_a.abs().mean()).item()
            assert model.indicator[k] == pytest.approx(want, rel=1e-5)
    else:  # accumulated
        assert model.indicator[1:] == pytest.approx([0.1, 0.2])


def _published_teacache(timesteps, coefficients, threshold):
    """TeaCache's rule, as its CogVideoX script computes it, on diffusers' own time embedding of the
    same weights: reused step indices."""
    ref = build_reference_components("rope")["transformer"]
    poly = np.poly1d(coefficients)
    reused, acc, prev = [], 0.0, None
    with torch.no_grad():
        for k, t in enumerate(timesteps):
            emb = ref.time_embedding(ref.time_proj(torch.tensor([t, t])).float())
            if k == 0 or k == len(timesteps) - 1:
                acc = 0.0
            else:
                acc += poly(((emb - prev).abs().mean() / prev.abs().mean()).item())
                if acc < threshold:
                    reused.append(k)
                else:
                    acc = 0.0
            prev = emb
    return reused


@pytest.mark.parametrize("coefficients, threshold", [
    (TEACACHE_COEFFICIENTS["CogVideoX-5b"], 0.2),  # random weights: the fitted polynomial goes negative
    ((1.0, 0.0), 1.5),  # the raw relative change: a mix of computed and reused steps
])
def test_teacache_follows_the_published_rule(engine, coefficients, threshold):
    cache = StepCache(threshold, mode="teacache", warmup_steps=1, cooldown_steps=1,
                      coefficients=None if len(coefficients) == 5 else coefficients)
    got = engine.generate(**{**KW, "num_inference_steps": 20}, step_cache=cache)
    want = _published_teacache(got.timesteps, coefficients, threshold)
    assert got.profile.steps_reused == want
    assert got.profile.step_cache["coefficients"] == ("CogVideoX-5b" if len(coefficients) == 5 else "custom")
    if len(coefficients) == 2:
        assert 3 <= len(want) <= 15


@pytest.mark.parametrize("mode", MODES)
def test_a_callback_that_replaces_the_latents_forces_the_next_step(engine, mode):
    def replace_at_3(eng, k, t, kwargs):
        return {"latents": kwargs["latents"].clone()} if k == 3 else None

    def same_object(eng, k, t, kwargs):
        return {"latents": kwargs["latents"]}

    kw = {**KW, "num_inference_steps": 10}
    replaced = engine.generate(**kw, step_cache=StepCache(ALWAYS, mode=mode), callback_on_step_end=replace_at_3)
    assert replaced.profile.steps_reused == [2, 3, 5, 6, 7]
    assert replaced.profile.step_cache["indicator"][4] is None  # no decision taken: computed
    kept = engine.generate(**kw, step_cache=StepCache(ALWAYS, mode=mode), callback_on_step_end=same_object)
    assert kept.profile.steps_reused == [2, 3, 4, 5, 6, 7]


@pytest.fixture(scope="module")
def control_ckpt(ckpt_factory, tmp_path_factory):
    """The image-to-video test checkpoint (2x latent channels) declared as a Fun-Control pipeline."""
    d = tmp_path_factory.mktemp("control") / "ckpt"
    shutil.copytree(ckpt_factory("learned"), d)
    index = json.loads((d / "model_index.json").read_text())
    (d / "model_index.json").write_text(json.dumps({**index, "_class_name": "CogVideoXFunControlPipeline"}))
    return d


@pytest.mark.parametrize("task", ["i2v", "v2v", "control"])
def test_every_task(ckpt_factory, control_ckpt, task):
    rng = np.random.default_rng(0)
    if task == "i2v":
        engine = Engine.load(ckpt_factory("learned"))
        extra = dict(image=rng.integers(0, 255, (48, 80, 3), dtype=np.uint8))
        steps = [2, 3, 4, 5]
    elif task == "v2v":
        engine = Engine.load(ckpt_factory("rope"))
        extra = dict(video=rng.random((9, 48, 80, 3), dtype=np.float32), strength=0.8)
        steps = [2, 3]  # int(8 * 0.8) = 6 steps run
    else:
        engine = Engine.load(control_ckpt)
        extra = dict(control_video=rng.random((9, 48, 80, 3), dtype=np.float32))
        steps = [2, 3, 4, 5]
    kw = {**KW, **extra}
    ref = engine.generate(**kw)
    assert ref.task == task
    for mode in MODES:
        assert torch.equal(engine.generate(**kw, step_cache=StepCache(0, mode=mode)).latents, ref.latents)
        got = engine.generate(**kw, step_cache=StepCache(ALWAYS, mode=mode))
        assert got.profile.steps_reused == steps
        assert 0 < rel_l2(got.latents, ref.latents) < 1


# (The Triton kernels inside the engine are checked by test_compile_profile; under the interpreter a
# step-cache run of them took 90 s on the 2-core machine and checked nothing the regions do not.)
@pytest.mark.parametrize("load", [dict(recipe="int8wo"), dict(recipe="int8dq-cpu", fuse_qkv=True)],
                         ids=["int8wo", "int8dq-cpu"])
def test_with_recipes_and_kernels(ckpt_factory, load):
    engine = Engine.load(ckpt_factory("rope"), **load)
    kw = {**KW, "num_inference_steps": 4}
    ref = engine.generate(**kw)
    assert torch.equal(engine.generate(**kw, step_cache=StepCache(0)).latents, ref.latents)
    calls = BlockCalls(engine.transformer)
    try:
        got = engine.generate(**kw, step_cache=StepCache(ALWAYS, warmup_steps=1, cooldown_steps=1),
                              callback_on_step_end=calls.callback)
    finally:
        calls.remove()
    assert got.profile.steps_reused == [1, 2]
    assert calls.per_step[1] == calls.per_step[2] == [0]
    assert 0 < rel_l2(got.latents, ref.latents) < 1


@pytest.mark.slow
def test_compiled_step_cache_has_no_graph_break_and_never_recompiles(ckpt_factory, tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    eager = Engine.load(ckpt_factory("rope"))
    # Graph breaks and recompiles are dynamo's; aot_eager keeps inductor's code generation (30 s on the
    # 2-core machine; its numerics are the whole-forward compile tests') out of the suite.
    engine = Engine.load(ckpt_factory("rope"))
    engine.compile(True, tmp_path / "cache", backend="aot_eager")
    for mode in MODES:
        cache = StepCache(ALWAYS, mode=mode)
        before = dynamo_counts()
        first = engine.generate(**KW, step_cache=cache)
        after = dynamo_counts()
        assert after["graph_breaks"] == 0
        # first-block: embed + block 0, the change, blocks 1.., head; teacache adds embed and blocks 0..
        assert after["unique_graphs"] - before["unique_graphs"] == (4 if mode == "first-block" else 2)
        assert "compile" in first.profile.stages
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = engine.generate(**{**KW, "seed": 1}, step_cache=cache)
            third = engine.generate(**KW, step_cache=cache)
        assert dynamo_counts() == after
        assert "compile" not in second.profile.stages
        assert first.profile.steps_reused == second.profile.steps_reused == [2, 3, 4, 5]
        assert torch.equal(third.latents, first.latents)
        ref = eager.generate(**KW, step_cache=cache)
        assert rel_l2(first.latents, ref.latents) <= 1e-4
    # threshold 0 compiled: the regions compiled apart give the whole forward's result
    plain = engine.generate(**KW)
    assert rel_l2(engine.generate(**KW, step_cache=StepCache(0)).latents, plain.latents) <= 1e-5


def test_block_flops_match_torch_flop_counter(engine):
    cfg = engine.config
    blk = engine.transformer.transformer_blocks[0]
    pos = make_positions(cfg, 3, 6, 10)
    x = torch.randn(2, 9 + 45, cfg.inner_dim)
    silu = torch.randn(2, cfg.time_embed_dim)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        blk(x, silu, pos.rope, 9)
    assert block_flops(cfg, 2, 9, 45) == pytest.approx(counter.get_total_flops(), rel=1e-3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(threshold=-0.1), r"threshold must be a finite number >= 0 \(got -0.1\); 0 turns reuse off"),
    (dict(threshold=float("nan")), r"threshold must be a finite number >= 0 \(got nan\)"),
    (dict(threshold=float("inf")), r"threshold must be a finite number >= 0 \(got inf\)"),
    (dict(threshold=True), r"threshold must be a number \(got bool True\)"),
    (dict(threshold="0.1"), r"threshold must be a number \(got str '0.1'\)"),
    (dict(threshold=0.1, mode="fast"), r"mode must be one of 'first-block', 'teacache' \(got 'fast'\)"),
    (dict(threshold=0.1, warmup_steps=0), r"warmup_steps must be an integer from 1 .*first step is always"),
    (dict(threshold=0.1, cooldown_steps=-1), r"cooldown_steps must be an integer from 0"),
    (dict(threshold=0.1, coefficients=(1.0, 0.0)), r"coefficients apply to mode='teacache' only"),
    (dict(threshold=0.1, mode="teacache", coefficients=()), r"coefficients must be a non-empty sequence"),
    (dict(threshold=0.1, mode="teacache", coefficients=(1.0, float("nan"))), r"finite numbers"),
])
def test_bad_step_cache_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StepCache(**kwargs)


def test_generate_refuses_a_step_cache_of_the_wrong_type_before_work(ckpt_factory):
    engine = Engine.load(ckpt_factory("rope"))

    def boom(*a, **k):
        raise AssertionError("heavy work started before the input was checked")

    engine.text_encoder.forward = boom
    with pytest.raises(TypeError, match=r"step_cache must be None or a StepCache, e.g. StepCache\(0.05\)"):
        engine.generate(**KW, step_cache=0.05)


def test_cli_step_cache(ckpt_factory, tmp_path, capsys):
    args = ["generate", "--model", str(ckpt_factory("rope")), "--prompt", "a fox", "--frames", "9", "--height", "48",
            "--width", "80", "--steps", "6", "--seed", "0", "--out", str(tmp_path / "v.mp4")]
    assert main(args + ["--step-cache", f"first-block:{ALWAYS}", "--step-cache-warmup", "1"]) == 0
    assert "step cache: 3 of 6 steps reused (1, 2, 3)" in capsys.readouterr().out
    for bad, message in ((["--step-cache", "fast:0.1"], "mode must be one of"),
                         (["--step-cache", "first-block:nan"], "finite number >= 0"),
                         (["--step-cache", "teacache"], "MODE:THRESHOLD"),
                         (["--step-cache-cooldown", "3"], "apply with --step-cache")):
        assert main(args + bad) == 2
        assert message in capsys.readouterr().err
