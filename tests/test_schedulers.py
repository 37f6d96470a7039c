"""cogvx schedulers against diffusers' CogVideoX schedulers (the independent reference)."""

import json
import logging
import math
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from cogvx.engine.loading import load_scheduler
from cogvx.engine.models.noise import randn_like_diffusers
from cogvx.engine.models.schedulers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, SchedulerConfig, make_scheduler
from cogvx.engine.pipelines.guidance import guidance_scales
from diffusers import CogVideoXDDIMScheduler as RefDDIM
from diffusers import CogVideoXDPMScheduler as RefDPM
from diffusers.utils.torch_utils import randn_tensor

PAIRS = {"ddim": (CogVideoXDDIMScheduler, RefDDIM), "dpm": (CogVideoXDPMScheduler, RefDPM)}
CONFIGS = {
    "cogvideox5b": {},
    "leading_offset1": {"timestep_spacing": "leading", "steps_offset": 1},
    "linspace": {"timestep_spacing": "linspace"},
    "no_rescale": {"rescale_betas_zero_snr": False},
    "epsilon": {"prediction_type": "epsilon", "rescale_betas_zero_snr": False},
    "epsilon_leading": {"prediction_type": "epsilon", "timestep_spacing": "leading"},
    "sample": {"prediction_type": "sample"},
    "alpha_to_one_false": {"set_alpha_to_one": False},
    "linear_betas_shift1": {"beta_schedule": "linear", "snr_shift_scale": 1.0},
    "squaredcos": {"beta_schedule": "squaredcos_cap_v2", "rescale_betas_zero_snr": False},
    "trained_betas": {"trained_betas": tuple(0.0001 + 0.00002 * k for k in range(1000))},
}
SHAPE = (2, 3, 4, 5, 6)  # [B, F, C, H, W], tiny


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_pair(kind, overrides):
    ours_cls, ref_cls = PAIRS[kind]
    cfg = SchedulerConfig(**overrides)
    return ours_cls(cfg), ref_cls(**cfg.to_dict())


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_alphas_cumprod_bitwise(overrides):
    ours, ref = make_pair("ddim", overrides)
    assert ours.alphas_cumprod.dtype == ref.alphas_cumprod.dtype
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert float(ours.final_alpha_cumprod) == float(ref.final_alpha_cumprod)


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_timesteps_every_step_count(spacing):
    """All n in 1..1000. diffusers' trailing sometimes appends a spurious -1: we keep the first n."""
    ours, ref = make_pair("ddim", {"timestep_spacing": spacing})
    extra = []
    for n in range(1, 1001):
        got = ours.set_timesteps(n)
        ref.set_timesteps(n)
        want = ref.timesteps.tolist()
        assert got.dtype == torch.int64 and got.tolist() == ours.timesteps_host
        assert ours.timesteps_host == want[:n], n
        if len(want) != n:
            assert spacing == "trailing" and len(want) == n + 1 and want[-1] == -1, (n, want[-3:])
            extra.append(n)
    if spacing == "trailing":  # if diffusers fixes its rounding, revisit the module docstring
        assert 61 in extra and 103 in extra


@pytest.mark.parametrize("steps", [1, 4, 7, 50])
@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_loop_matches_diffusers(kind, overrides, steps):
    ours, ref = make_pair(kind, overrides)
    ts = ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert ts.tolist() == ref.timesteps.tolist()

    g = torch.Generator().manual_seed(1234)
    x0 = torch.randn(SHAPE, generator=g)
    outs = [torch.randn(SHAPE, generator=g) for _ in range(steps)]  # stand-in model outputs
    gen_ours, gen_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)

    x_ours, x_ref, state, old_ref = x0.clone(), x0.clone(), None, None
    for i, t in enumerate(ref.timesteps):
        x_ours, state = ours.step(i, outs[i], x_ours, state, generator=gen_ours)
        if kind == "ddim":
            x_ref = ref.step(outs[i], t, x_ref, return_dict=False)[0]
            assert state is None
        else:
            back = ref.timesteps[i - 1] if i > 0 else None
            x_ref, old_ref = ref.step(outs[i], old_ref, t, back, x_ref, generator=gen_ref, return_dict=False)
            # same number of noise draws so far, else every later step would differ grossly
            assert torch.equal(gen_ours.get_state(), gen_ref.get_state()), i
            assert rel_l2(state, old_ref) <= 1e-6, i
        assert torch.isfinite(x_ref).all()
        err = rel_l2(x_ours, x_ref)
        assert err <= 1e-6, (i, int(t), err)


def run_loop(kind, overrides, steps, gen_ours=None, gen_ref=None, shape=SHAPE):
    """(our samples, diffusers' samples) after each step, from the same start and model outputs."""
    ours, ref = make_pair(kind, overrides)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    g = torch.Generator().manual_seed(99)
    x_ours = x_ref = torch.randn(shape, generator=g)
    state = old_ref = None
    got, want = [], []
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(shape, generator=g)
        x_ours, state = ours.step(i, v, x_ours, state, generator=gen_ours)
        if kind == "ddim":
            x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
        else:
            back = ref.timesteps[i - 1] if i > 0 else None
            x_ref, old_ref = ref.step(v, old_ref, t, back, x_ref, generator=gen_ref, return_dict=False)
        got.append(x_ours)
        want.append(x_ref)
    return got, want


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_real_config_is_bit_identical(kind):
    """CogVideoX's scaled_linear (float64) table: same float64 coefficients, same fp32 op order.

    Stronger than the 1e-6 bound; if a torch/numpy upgrade moves a log/exp by one ulp this may
    fail while test_loop_matches_diffusers passes: then relax it to that bound.
    """
    got, want = run_loop(kind, {}, 50, torch.Generator().manual_seed(3), torch.Generator().manual_seed(3))
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), (i, rel_l2(a, b))


def test_dpm_list_of_generators():
    """One generator per batch element, as the pipeline allows: per-element draws line up."""
    def gens():
        return [torch.Generator().manual_seed(s) for s in (11, 12)]

    got, want = run_loop("dpm", {}, 7, gens(), gens())
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_l2(a, b) <= 1e-6, i


def test_dpm_global_rng_when_no_generator():
    ours, ref = make_pair("dpm", {})
    ours.set_timesteps(3)
    ref.set_timesteps(3)
    x, v = torch.ones(SHAPE), torch.full(SHAPE, 0.5)
    torch.manual_seed(3)
    a, _ = ours.step(0, v, x, None)
    torch.manual_seed(3)
    b = ref.step(v, None, ref.timesteps[0], None, x, return_dict=False)[0]
    assert rel_l2(a, b) <= 1e-6


def test_epsilon_at_zero_terminal_snr_is_an_error():
    """diffusers returns non-finite samples there; we refuse up front."""
    ours, ref = make_pair("ddim", {"prediction_type": "epsilon"})
    ref.set_timesteps(4)
    x = ref.step(torch.ones(SHAPE), ref.timesteps[0], torch.ones(SHAPE), return_dict=False)[0]
    assert not torch.isfinite(x).all()
    with pytest.raises(ValueError, match="v_prediction"):
        ours.set_timesteps(4)


@pytest.mark.parametrize("cls", [CogVideoXDDIMScheduler, CogVideoXDPMScheduler])
def test_bad_step_counts_and_order(cls):
    s = cls(SchedulerConfig())
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(0, torch.zeros(SHAPE), torch.zeros(SHAPE), None)
    for n in (0, -1, 1001):
        with pytest.raises(ValueError, match=r"between 1 and num_train_timesteps=1000 \(got"):
            s.set_timesteps(n)
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="out of range"):
        s.step(4, torch.zeros(SHAPE), torch.zeros(SHAPE), None)


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_load_from_diffusers_save_config(kind, tmp_path):
    ours_cls, ref_cls = PAIRS[kind]
    ref = ref_cls(**SchedulerConfig(timestep_spacing="leading", snr_shift_scale=2.0).to_dict())
    ref.save_config(tmp_path / "scheduler")
    for source in (tmp_path / "scheduler", str(tmp_path / "scheduler" / "scheduler_config.json")):
        s = load_scheduler(source)
        assert type(s) is ours_cls
        assert s.config.to_dict() == {k: v for k, v in ref.config.items() if not k.startswith("_")}
    ref.set_timesteps(7)
    assert s.set_timesteps(7).tolist() == ref.timesteps.tolist()


def test_load_defaults_dispatch_and_override(tmp_path):
    d = json.loads((_write_ref_config(RefDDIM, tmp_path)).read_text())
    assert type(make_scheduler(d)) is CogVideoXDDIMScheduler
    assert type(make_scheduler(d, class_name="CogVideoXDPMScheduler")) is CogVideoXDPMScheduler
    del d["_class_name"]
    assert type(make_scheduler({**d, "some_future_key": 1})) is CogVideoXDDIMScheduler


def _write_ref_config(ref_cls, tmp_path):
    ref_cls(**SchedulerConfig().to_dict()).save_config(tmp_path)
    return tmp_path / "scheduler_config.json"


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="'EulerDiscreteScheduler'.*CogVideoXDDIMScheduler, CogVideoXDPMScheduler"):
        make_scheduler({"_class_name": "EulerDiscreteScheduler"})
    with pytest.raises(ValueError, match=r"timestep_spacing='middle'.*'linspace', 'leading', 'trailing'"):
        make_scheduler({"timestep_spacing": "middle"})
    with pytest.raises(ValueError, match=r"prediction_type='flow'.*'v_prediction'"):
        SchedulerConfig.from_dict({"prediction_type": "flow"})
    with pytest.raises(ValueError, match=r"beta_schedule='cosine'.*'squaredcos_cap_v2'"):
        SchedulerConfig.from_dict({"beta_schedule": "cosine"})
    missing = tmp_path / "nowhere" / "scheduler"
    with pytest.raises(ValueError, match=str(missing)):
        load_scheduler(missing)


def test_guidance_scales_match_pipeline_formula():
    # Read, not imported: importing the pipeline module pulls in transformers (~7 s).
    src = (Path(diffusers.__file__).parent / "pipelines" / "cogvideo" / "pipeline_cogvideox.py").read_text()
    assert "math.cos(math.pi * ((num_inference_steps - t.item()) / num_inference_steps) ** 5.0)" in src
    ref = RefDDIM(**SchedulerConfig().to_dict())
    for n, g in ((50, 6.0), (7, 3.5)):
        ref.set_timesteps(n)
        want = [1 + g * ((1 - math.cos(math.pi * ((n - t.item()) / n) ** 5.0)) / 2) for t in ref.timesteps]
        got = guidance_scales(ref.timesteps.tolist(), n, g, use_dynamic_cfg=True)
        assert got == want
        assert guidance_scales(ref.timesteps.tolist(), n, g, use_dynamic_cfg=False) == [g] * n


def test_randn_matches_diffusers_randn_tensor():
    shape = (3, 2, 4, 5)
    cases = [
        lambda: torch.Generator().manual_seed(5),
        lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)],
        lambda: [torch.Generator().manual_seed(9)],
    ]
    for make in cases:
        a = randn_like_diffusers(shape, make(), torch.device("cpu"), torch.float32)
        b = randn_tensor(shape, generator=make(), device=torch.device("cpu"), dtype=torch.float32)
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="generators for batch size 3"):
        randn_like_diffusers(shape, [torch.Generator()] * 2, "cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_randn_cpu_generator_to_cuda_matches_diffusers():
    shape = (2, 3, 4, 5)
    for make in (lambda: torch.Generator().manual_seed(5), lambda: torch.Generator("cuda").manual_seed(5)):
        a = randn_like_diffusers(shape, make(), "cuda", torch.float16)
        b = randn_tensor(shape, generator=make(), device=torch.device("cuda"), dtype=torch.float16)
        assert a.device.type == "cuda" and torch.equal(a, b)


def test_config_round_trip_and_unknown_keys(caplog):
    cfg = SchedulerConfig(timestep_spacing="leading", snr_shift_scale=1.5)
    assert SchedulerConfig.from_dict(cfg.to_dict()) == cfg
    with caplog.at_level(logging.DEBUG, logger="cogvx.engine"):
        assert SchedulerConfig.from_dict({"_diffusers_version": "0.30", "eta_future": 1}) == SchedulerConfig()
    assert "eta_future" in caplog.text and "_diffusers_version" not in caplog.text
