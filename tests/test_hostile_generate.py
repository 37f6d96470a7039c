"""Hostile generate calls: sizes that would allocate without bound, arguments of the wrong type or
kind, non-finite values, and concurrent calls on one engine. Each is a clear error before heavy work
(the guarded engine fails if its text encoder, transformer or VAE is called) or correct behaviour."""

from __future__ import annotations

import resource
import threading
import warnings

import imageio.v2
import numpy as np
import pytest
import torch

from cogvx.engine import Engine
from cogvx.engine.io.video import write_mp4
from cogvx.engine.pipelines import request
from cogvx.engine.pipelines.denoise import NonFiniteError, NonFiniteWarning
from hostile_helpers import finite, guard, small_call, unguard

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SHAPE = (1, 1, 4, 2, 2)  # latents of small_call() on the "rope" checkpoint


@pytest.fixture(scope="module")
def engine(ckpt_factory):
    return Engine.load(ckpt_factory("rope"))


@pytest.fixture
def guarded(engine):
    yield guard(engine)
    unguard(engine)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


BAD = [
    # ---- item 12: sizes beyond any model, refused before anything is allocated
    (dict(num_frames=10**9 + 1), ValueError, r"num_frames must be an integer from 1 to 4097"),
    (dict(height=10**6), ValueError, r"height must be an integer from 1 to 8192 \(got 1000000\); try 8192"),
    (dict(width=10**8), ValueError, r"width must be an integer from 1 to 8192"),
    (dict(height=2**64), ValueError, r"height must be an integer from 1 to 8192"),
    (dict(height=-16), ValueError, r"height must be an integer from 1 to 8192 \(got -16\)"),
    (dict(num_frames=4097, height=8192, width=8192), ValueError, r"need at least .* GiB on cpu, but .* available"),
    (dict(num_videos_per_prompt=10**6), ValueError, r"num_videos_per_prompt must be an integer from 1 to 1024"),
    (dict(prompt=["a"] * 1024, num_videos_per_prompt=1024, height=512, width=512), ValueError, r"need at least"),
    (dict(max_sequence_length=10**4), ValueError, r"max_sequence_length must be an integer from 1 to 512"),
    (dict(max_sequence_length=0), ValueError, r"max_sequence_length must be an integer from 1 to 512"),
    (dict(max_sequence_length=226.0), ValueError, r"max_sequence_length must be an integer \(got 226.0\)"),
    (dict(prompt="a" * 2_000_001), ValueError, r"prompt is 2000001 characters"),
    (dict(prompt=["ok", "b" * 2_000_001]), ValueError, r"prompt 1 is 2000001 characters"),
    (dict(num_inference_steps=10**9), ValueError, r"num_inference_steps must be an integer from 1 to 1000"),
    # ---- seeds, generators
    (dict(seed=2**64), ValueError, r"seed must be an integer from 0 to 18446744073709551615"),
    (dict(seed=-1), ValueError, r"seed must be an integer from 0"),
    (dict(seed=1.5), ValueError, r"seed must be an integer \(got 1.5\)"),
    (dict(seed="42"), ValueError, r"seed must be an integer \(got str '42'\)"),
    (dict(seed=True), ValueError, r"seed must be an integer \(got True\)"),
    (dict(seed=None, generator="gen"), TypeError, r"generator must be a torch.Generator or a list of them"),
    (dict(seed=None, generator=[]), TypeError, r"generator must be a torch.Generator"),
    (dict(seed=None, generator=[torch.Generator(), 3]), TypeError, r"generator must be a torch.Generator"),
    (dict(seed=None, generator=[torch.Generator()] * 3), ValueError, r"got 3 generators for 1 video"),
    (dict(seed=None, generator=np.random.default_rng(0)), TypeError, r"generator must be a torch.Generator"),
    # ---- booleans and numbers of the wrong kind
    (dict(use_dynamic_cfg="yes"), ValueError, r"use_dynamic_cfg must be True or False \(got 'yes'\)"),
    (dict(use_dynamic_cfg=1), ValueError, r"use_dynamic_cfg must be True or False"),
    (dict(use_dynamic_cfg=None), ValueError, r"use_dynamic_cfg must be True or False"),
    (dict(guidance_scale="6"), ValueError, r"guidance_scale must be a number \(got str '6'\)"),
    (dict(guidance_scale=torch.tensor(6.0)), ValueError, r"guidance_scale must be a number"),
    (dict(guidance_scale=float("inf")), ValueError, r"guidance_scale must be a number from 0 to 100"),
    (dict(num_inference_steps=True), ValueError, r"num_inference_steps must be an integer \(got True\)"),
    (dict(num_frames="9"), ValueError, r"num_frames must be an integer"),
    (dict(height=16.5), ValueError, r"height must be an integer \(got 16.5\)"),
    (dict(num_videos_per_prompt=np.float64(2)), ValueError, r"num_videos_per_prompt must be an integer"),
    (dict(output_type=None), ValueError, r"output_type must be one of"),
    (dict(check_finite="maybe"), ValueError, r"check_finite must be 'warn', 'raise' or 'off'"),
    # ---- item 17 and latents of the wrong kind
    (dict(latents=torch.full(SHAPE, float("nan"))), ValueError, r"latents hold NaN or inf"),
    (dict(latents=torch.full(SHAPE, float("inf"))), ValueError, r"latents hold NaN or inf"),
    (dict(latents=torch.zeros(SHAPE, dtype=torch.int64)), ValueError, r"latents must be a floating-point tensor"),
    (dict(latents=torch.zeros(SHAPE, dtype=torch.bool)), ValueError, r"latents must be a floating-point tensor"),
    (dict(latents=torch.zeros(SHAPE, dtype=torch.complex64)), ValueError, r"floating-point tensor"),
    (dict(latents=np.zeros(SHAPE, np.float32)), TypeError, r"latents must be a tensor \(got ndarray\)"),
    (dict(latents=torch.zeros(SHAPE, device="meta")), ValueError, r"latents are on the meta device"),
    (dict(prompt=None, prompt_embeds=torch.full((1, 7, 20), float("nan"))), ValueError, r"prompt_embeds holds NaN"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 7, 20),
          negative_prompt_embeds=torch.full((1, 7, 20), float("-inf"))), ValueError, r"negative_prompt_embeds holds"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 7, 20, dtype=torch.int32)), ValueError, r"must be a float tensor"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 7, 20, device="meta")), ValueError, r"on the meta device"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 10**4, 20)), ValueError, r"tokens <= 512"),
]


@pytest.mark.parametrize("kwargs, exc, message", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_arguments_fail_before_heavy_work(guarded, kwargs, exc, message):
    before = _rss_mib()
    with pytest.raises(exc, match=message) as e:
        guarded.generate(**small_call(**kwargs))
    assert "\n" not in str(e.value)
    assert _rss_mib() - before < 300, "the check allocated hundreds of MiB before failing"


def test_memory_floor_is_checked_against_available_memory(guarded, monkeypatch):
    monkeypatch.setattr(request, "_available_bytes", lambda device: 2**20)
    with pytest.raises(ValueError, match=r"need at least 0.1 GiB on cpu, but 0.0 GiB is available; use fewer"):
        guarded.generate(**small_call(num_frames=49, height=256, width=256))


@pytest.mark.parametrize("kwargs", [
    dict(num_frames=np.int64(1), height=np.int32(16), width=np.uint16(16), num_inference_steps=np.int8(1)),
    dict(seed=np.uint64(2**64 - 1)),
    dict(seed=2**64 - 1),
    dict(guidance_scale=np.float32(6.0), use_dynamic_cfg=np.bool_(True)),
    dict(max_sequence_length=np.int64(7)),
])
def test_numpy_scalars_and_extreme_valid_values_work(engine, kwargs):
    """numpy integers and the largest seed are accepted and give the same result as Python values."""
    got = engine.generate(**small_call(output_type="latent", **kwargs)).latents
    plain = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in kwargs.items()}
    ref = engine.generate(**small_call(output_type="latent", **plain)).latents
    assert torch.equal(got, ref) and finite(got)


# ---------------------------------------------------------------- item 17: non-finite during the loop
def _poison_at(engine, call: int):
    """A forward hook that makes the transformer's ``call``-th output (0-based) inf."""
    count = [0]

    def hook(mod, args, out):
        count[0] += 1
        return out * float("inf") if count[0] - 1 == call else out

    return engine.transformer.register_forward_hook(hook)


def test_latents_turning_non_finite_warn_naming_the_step(engine):
    h = _poison_at(engine, 1)
    try:
        with pytest.warns(NonFiniteWarning, match=r"turned NaN or inf at denoising step 1 of 3"):
            engine.generate(**small_call(num_inference_steps=3, output_type="latent"))
        with pytest.raises(NonFiniteError, match=r"at denoising step 0 of 2"):
            _poison_at(engine, 0)
            engine.generate(**small_call(num_inference_steps=2, output_type="latent"), check_finite="raise")
    finally:
        engine.transformer._forward_hooks.clear()
        h.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)  # a finite run says nothing
        engine.generate(**small_call(num_inference_steps=2, output_type="latent"))


@pytest.mark.parametrize("returned, exc, message", [
    ("garbage", TypeError, r"must return None or a dict \(got str at step 0\)"),
    ({"latents": "x"}, ValueError, r"returned latents str at step 0"),
    ({"latents": torch.zeros(1, 2, 3)}, ValueError, r"returned latents torch.float32 \(1, 2, 3\) at step 0"),
    ({"latents": torch.zeros(SHAPE, dtype=torch.int32)}, ValueError, r"returned latents torch.int32"),
    ({"latents": torch.full(SHAPE, float("nan"))}, ValueError, r"NaN or inf values at step 0"),
    ({"latents": torch.zeros(SHAPE, device="meta")}, ValueError, r"on the meta device"),
])
def test_callback_results_are_checked(engine, returned, exc, message):
    with pytest.raises(exc, match=message):
        engine.generate(**small_call(output_type="latent"), callback_on_step_end=lambda *a: returned)


def test_callback_may_replace_the_latents(engine):
    seen = []

    def cb(eng, i, t, kw):
        seen.append(i)
        return {"latents": torch.zeros_like(kw["latents"])}

    out = engine.generate(**small_call(num_inference_steps=2, output_type="latent"), callback_on_step_end=cb).latents
    assert seen == [0, 1] and torch.equal(out, torch.zeros(SHAPE))


# ---------------------------------------------------------------- item 16: concurrent calls on one engine
@pytest.mark.parametrize("scheduler", ["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"])
def test_concurrent_generate_calls_match_sequential_ones(ckpt_factory, scheduler):
    """Different step counts and seeds in four threads: each result equals the same call run alone
    (the scheduler's per-call state used to be shared: wrong results or "step index out of range")."""
    eng = Engine.load(ckpt_factory("rope"), scheduler=scheduler)
    calls = [small_call(num_inference_steps=n, seed=s, output_type="latent") for n, s in ((2, 0), (5, 1), (3, 2),
                                                                                           (1, 3))]
    ref = [eng.generate(**c).latents for c in calls]
    got: list = [None] * len(calls)
    errors = []

    def run(i):
        try:
            got[i] = eng.generate(**calls[i]).latents
        except Exception as e:  # reported below: a thread's exception would otherwise be lost
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert all(torch.equal(g, r) for g, r in zip(got, ref))
    assert len({tuple(r.flatten().tolist()) for r in ref}) == len(ref)  # the calls really differ


# ---------------------------------------------------------------- further hostile cases
def test_a_long_input_video_is_not_decoded_whole(engine, tmp_path, monkeypatch):
    """video-to-video reads only the frames it uses (a long file used to be decoded whole into memory)."""
    long = tmp_path / "long.mp4"
    write_mp4(long, np.zeros((60, 32, 32, 3), np.float32))
    real, decoded = imageio.v2.get_reader, [0]

    def reader(*a, **k):
        r = real(*a, **k)
        frames = iter(r)

        class Counting:
            def __iter__(self):
                for f in frames:
                    decoded[0] += 1
                    yield f

            def close(self):
                r.close()

        return Counting()

    monkeypatch.setattr(imageio.v2, "get_reader", reader)
    engine.generate(**small_call(num_frames=5, video=str(long), strength=0.5, num_inference_steps=2,
                                 output_type="latent"))
    assert decoded[0] <= 5


def test_a_failing_callback_leaves_the_engine_usable(engine):
    def cb(*a):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.generate(**small_call(output_type="latent"), callback_on_step_end=cb)
    done = []
    t = threading.Thread(target=lambda: done.append(engine.generate(**small_call(output_type="latent"))))
    t.start()
    t.join(timeout=120)
    assert done and finite(done[0].latents)  # the lock was released
