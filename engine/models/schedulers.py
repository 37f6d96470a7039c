"""The two CogVideoX schedulers (DDIM and DPM-Solver++ 2M), matching diffusers numerically.

``CogVideoXDDIMScheduler`` and ``CogVideoXDPMScheduler`` reproduce diffusers' classes of the same
names (``diffusers/schedulers/scheduling_{ddim,dpm}_cogvideox.py``), including their quirks:
alphas_cumprod shifted by ``snr_shift_scale`` then rescaled to zero terminal SNR, and the
"previous timestep" taken as ``t - num_train_timesteps // num_inference_steps`` rather than the next
entry of the schedule. diffusers is never imported here; tests/test_schedulers.py checks parity.

All per-step coefficients are computed once in ``set_timesteps`` on the host in float64 (as
diffusers does with its float64 0-d tensors) and stored as Python floats, so ``step`` reads no
tensor value: no ``.item()``, no device sync, no branching on tensor data.

One deliberate difference: for some step counts (61, 103, 121, ...) diffusers' "trailing" spacing
yields ``n + 1`` timesteps ending in ``-1`` (a float ``np.arange`` rounding artefact), and its
pipeline then runs an extra step at t = -1 that wraps to alphas_cumprod[-1]. We keep the first
``n`` timesteps, which equal diffusers' first ``n`` exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import known_fields
from .noise import randn_like_diffusers

__all__ = [
    "SchedulerConfig",
    "Schedule",
    "CogVideoXDDIMScheduler",
    "CogVideoXDPMScheduler",
    "SCHEDULERS",
    "make_scheduler",
]

logger = logging.getLogger(__name__)

MAX_TRAIN_TIMESTEPS = 100_000
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


@dataclass(frozen=True)
class SchedulerConfig:
    """Scheduler settings; field names are diffusers' ``scheduler_config.json`` keys.

    Defaults are the shipped CogVideoX-5b values. ``clip_sample``, ``clip_sample_range`` and
    ``sample_max_value`` are kept for round-tripping but unused: diffusers' CogVideoX schedulers
    ignore them too.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "v_prediction"
    timestep_spacing: str = "trailing"
    rescale_betas_zero_snr: bool = True
    snr_shift_scale: float = 3.0

    def __post_init__(self):
        def bad(field, expected):
            raise ValueError(
                f"scheduler config: {field}={repr(getattr(self, field))[:80]} is invalid; expected {expected}"
            )

        for name, choices in (
            ("beta_schedule", BETA_SCHEDULES),
            ("timestep_spacing", TIMESTEP_SPACINGS),
            ("prediction_type", PREDICTION_TYPES),
        ):
            if getattr(self, name) not in choices:
                bad(name, "one of " + ", ".join(repr(c) for c in choices))
        for name in ("clip_sample", "set_alpha_to_one", "rescale_betas_zero_snr"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "true or false (a JSON boolean, not a string or a number)")
        for name in ("num_train_timesteps", "steps_offset"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                bad(name, "an integer")
        if not 1 <= self.num_train_timesteps <= MAX_TRAIN_TIMESTEPS:  # the tables hold one value per timestep
            bad("num_train_timesteps", f"an integer from 1 to {MAX_TRAIN_TIMESTEPS} (CogVideoX: 1000)")
        if self.steps_offset < 0:
            bad("steps_offset", "an integer >= 0")
        for name in ("beta_start", "beta_end", "clip_sample_range", "sample_max_value", "snr_shift_scale"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                bad(name, "a finite number")
            object.__setattr__(self, name, float(v))  # JSON may hold 1 for 1.0
        if self.snr_shift_scale <= 0:
            bad("snr_shift_scale", "a number > 0 (1.0 means no shift)")
        if not 0 <= self.beta_start <= self.beta_end < 1:
            bad("beta_start", f"0 <= beta_start <= beta_end < 1 (beta_end={self.beta_end})")
        if self.trained_betas is not None:
            tb = self.trained_betas
            if not isinstance(tb, (list, tuple)) or not all(
                    isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1 for b in tb):
                bad("trained_betas", "a list of numbers in (0, 1), one per training timestep")
            betas = tuple(float(b) for b in tb)
            if len(betas) != self.num_train_timesteps:
                bad("trained_betas", f"{self.num_train_timesteps} values (num_train_timesteps), got {len(betas)}")
            object.__setattr__(self, "trained_betas", betas)

    @classmethod
    def from_dict(cls, d: dict) -> SchedulerConfig:
        """Build from a diffusers config dict. Keys starting with ``_`` and unknown keys are skipped."""
        return cls(**known_fields(cls, d, "scheduler"))

    def to_dict(self) -> dict:
        """JSON-ready dict with diffusers' key names (``trained_betas`` as a list or None)."""
        d = dataclasses.asdict(self)
        if d["trained_betas"] is not None:
            d["trained_betas"] = list(d["trained_betas"])
        return d


def _alphas_cumprod(cfg: SchedulerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas_cumprod [T], final_alpha_cumprod 0-d) on CPU, in the dtypes diffusers uses.

    scaled_linear is float64 in diffusers, the other schedules float32; reproducing that keeps the
    table equal to diffusers' to the last bit.
    """
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = torch.tensor(cfg.trained_betas, dtype=torch.float32)
    elif cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float64) ** 2
    else:  # squaredcos_cap_v2: the cosine alpha_bar of Nichol & Dhariwal, betas capped at 0.999
        def abar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float32
        )
    ac = torch.cumprod(1.0 - betas, dim=0)
    s = cfg.snr_shift_scale
    ac = ac / (s + (1 - s) * ac)  # SNR / s: CogVideoX trains with a shifted noise schedule
    if cfg.rescale_betas_zero_snr:  # Lin et al. 2023, Algorithm 1: make sqrt(alpha_bar_T) exactly 0
        sq = ac.sqrt()
        sq0, sqT = sq[0].clone(), sq[-1].clone()
        ac = ((sq - sqT) * (sq0 / (sq0 - sqT))) ** 2
    final = torch.tensor(1.0) if cfg.set_alpha_to_one else ac[0]
    return ac, final


def _timesteps(cfg: SchedulerConfig, n: int) -> list[int]:
    """Descending integer timesteps, the same numpy expressions as diffusers' set_timesteps."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    elif cfg.timestep_spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + cfg.steps_offset
    else:  # trailing; [:n] drops diffusers' occasional spurious trailing -1 (see module docstring)
        ts = (np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1)[:n]
    ts = [int(t) for t in ts]
    if max(ts) >= T:
        raise ValueError(
            f"steps_offset={cfg.steps_offset} with {n} 'leading' steps gives timestep {max(ts)}, beyond "
            f"num_train_timesteps={T}; lower steps_offset or num_inference_steps"
        )
    return ts


@dataclass(frozen=True)
class Schedule:
    """The timesteps of one sampling run and every step's coefficients (Python floats, computed on the
    host): what ``step`` reads. Built per call by ``scheduler.schedule(n)``, so concurrent generate
    calls with different step counts never share state."""

    num_inference_steps: int
    timesteps_host: tuple[int, ...]
    coefs: tuple[tuple[float, ...], ...]

    def __len__(self) -> int:
        return len(self.timesteps_host)

    def timesteps(self, device: str | torch.device | None = None) -> torch.Tensor:
        """The timesteps as an int64 tensor [num_inference_steps] on ``device``."""
        return torch.tensor(self.timesteps_host, dtype=torch.int64, device=device)

    def coefficients(self, i: int) -> tuple[float, ...]:
        if not 0 <= i < len(self.coefs):
            raise ValueError(f"step index i={i} out of range for {len(self.coefs)} timesteps")
        return self.coefs[i]


class _CogVideoXScheduler:
    """Shared config, alpha table, timesteps and x0 prediction of the two schedulers."""

    order = 1
    init_noise_sigma = 1.0

    def __init__(self, config: SchedulerConfig | None = None):
        self.config = config if config is not None else SchedulerConfig()
        self.alphas_cumprod, self.final_alpha_cumprod = _alphas_cumprod(self.config)
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        self.timesteps_host: list[int] = []
        self._schedule: Schedule | None = None

    def schedule(self, num_inference_steps: int) -> Schedule:
        """The schedule of ``num_inference_steps`` steps, every coefficient precomputed (host float64
        -> floats). Pure: the scheduler itself is not changed."""
        T = self.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise TypeError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
        if not 1 <= num_inference_steps <= T:
            raise ValueError(
                f"num_inference_steps must be between 1 and num_train_timesteps={T} "
                f"(got {num_inference_steps}); CogVideoX is usually sampled with 50"
            )
        ts = _timesteps(self.config, num_inference_steps)
        prev = [t - T // num_inference_steps for t in ts]  # diffusers' formula, not ts[i + 1]
        # diffusers' float64 0-d tensor expressions, vectorized over the steps in numpy: host math
        # that stays off torch's thread pool. 1/0 -> inf at the schedule's ends (alpha 0 or 1) is
        # intended; the formulas turn it back into finite coefficients. For the float32 tables
        # (linear, squaredcos_cap_v2, trained_betas; no CogVideoX model uses them) diffusers does
        # this math in float32, so results agree to ~1e-6 over 50 steps rather than bit for bit.
        ac = self.alphas_cumprod.double().numpy()
        prev_a = np.array(prev)
        a_t = ac[ts]
        a_prev = np.where(prev_a >= 0, ac[np.maximum(prev_a, 0)], float(self.final_alpha_cumprod))
        if self.config.prediction_type == "epsilon" and (a_t == 0).any():
            raise ValueError(
                f"prediction_type='epsilon' is undefined at timestep {ts[int(np.argmax(a_t == 0))]}, where "
                "alphas_cumprod is 0 "
                "(zero terminal SNR from rescale_betas_zero_snr=True); use prediction_type='v_prediction', "
                "rescale_betas_zero_snr=False, or 'leading' spacing"
            )
        with np.errstate(divide="ignore", invalid="ignore"):
            # columns: sqrt(alpha_t), sqrt(1 - alpha_t) (x0 from sample, model_output), then per class
            coefs = np.stack([np.sqrt(a_t), np.sqrt(1 - a_t), *self._step_coefficients(a_t, a_prev, prev_a)], 1)
        if not np.isfinite(coefs).all():  # cannot happen for valid configs; never hand NaN to the loop
            raise ValueError(
                f"non-finite scheduler coefficients at {num_inference_steps} steps; check beta_start/beta_end, "
                "trained_betas and snr_shift_scale in the scheduler config"
            )
        return Schedule(num_inference_steps, tuple(ts), tuple(tuple(c) for c in coefs.tolist()))

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> torch.Tensor:
        """diffusers-style stateful form of :meth:`schedule`: keep the schedule on the scheduler for
        ``step`` calls without ``schedule=``. Returns the timesteps as int64 [num_inference_steps] on
        ``device``; also stored in ``self.timesteps`` and, as Python ints, in ``self.timesteps_host``."""
        self._schedule = self.schedule(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self.timesteps_host = list(self._schedule.timesteps_host)
        self.timesteps = self._schedule.timesteps(device)
        return self.timesteps

    def _coefficients(self, i: int, schedule: Schedule | None) -> tuple[float, ...]:
        schedule = schedule or self._schedule
        if schedule is None:
            raise ValueError(f"{type(self).__name__}.step called before set_timesteps(num_inference_steps)")
        return schedule.coefficients(i)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
        """``sqrt(a_t) * original + sqrt(1 - a_t) * noise`` at an integer timestep (diffusers'
        ``add_noise``, same operation order and float dtype of the coefficients)."""
        a = self.alphas_cumprod.to(dtype=original.dtype)[timestep]
        return a**0.5 * original + (1 - a) ** 0.5 * noise

    def _pred_original_sample(self, sqrt_a: float, sqrt_b: float, model_output, sample):
        # Operation order as in diffusers, so fp32 results match it bit for bit.
        kind = self.config.prediction_type
        if kind == "v_prediction":
            return sqrt_a * sample - sqrt_b * model_output
        if kind == "epsilon":
            return (sample - sqrt_b * model_output) / sqrt_a
        return model_output


class CogVideoXDDIMScheduler(_CogVideoXScheduler):
    """Deterministic DDIM (eta = 0), as diffusers' CogVideoXDDIMScheduler."""

    def _step_coefficients(self, a_t, a_prev, prev):
        a = np.sqrt((1 - a_prev) / (1 - a_t))
        b = np.sqrt(a_prev) - np.sqrt(a_t) * a
        return a, b

    def step(self, i: int, model_output: torch.Tensor, sample: torch.Tensor, state=None, generator=None,
             schedule: Schedule | None = None):
        """One DDIM step at step ``i`` of ``schedule`` (default: the one ``set_timesteps`` kept).

        model_output, sample: same shape (e.g. [B, F, C, H, W]) and dtype. Returns
        ``(prev_sample, None)``; ``state`` and ``generator`` are unused (this DDIM draws no noise).
        """
        sqrt_a, sqrt_b, a, b = self._coefficients(i, schedule)
        x0 = self._pred_original_sample(sqrt_a, sqrt_b, model_output, sample)
        return a * sample + b * x0, None


class CogVideoXDPMScheduler(_CogVideoXScheduler):
    """Stochastic DPM-Solver++ (2M), as diffusers' CogVideoXDPMScheduler.

    Each step draws one noise tensor, and a second one in the second-order branch (the first is
    then discarded), in diffusers' order, so a torch.Generator gives diffusers' exact samples.
    """

    def _step_coefficients(self, a_t, a_prev, prev):
        lamb = np.log(np.sqrt(a_t / (1 - a_t)))  # log-SNR / 2; -inf at zero terminal SNR
        h = np.log(np.sqrt(a_prev / (1 - a_prev))) - lamb
        mult1 = np.sqrt((1 - a_prev) / (1 - a_t)) * np.exp(-h)
        mult2 = np.expm1(-2 * h) * np.sqrt(a_prev)
        mult_noise = np.sqrt(1 - a_prev) * np.sqrt(1 - np.exp(-2 * h))
        # Second order (timestep_back = previous entry) only where diffusers takes that branch;
        # elsewhere r may be 0 or undefined and mult3/mult4 are unused: store 0.
        second = prev >= 0
        second[0] = False
        r = (lamb - np.concatenate([lamb[:1], lamb[:-1]])) / h
        mult3 = np.where(second, 1 + 1 / (2 * r), 0.0)
        mult4 = np.where(second, 1 / (2 * r), 0.0)
        return mult1, mult2, mult3, mult4, mult_noise, second.astype(np.float64)

    def step(self, i: int, model_output: torch.Tensor, sample: torch.Tensor, state=None, generator=None,
             schedule: Schedule | None = None):
        """One DPM-Solver++ (2M) step at step ``i`` of ``schedule`` (default: the one ``set_timesteps`` kept).

        model_output, sample: same shape [B, ...] and dtype. state: the previous step's
        pred_original_sample (None at the first step). generator: torch.Generator, a list of one per
        batch element, or None (global RNG). Returns ``(prev_sample, pred_original_sample)``; pass the
        second back as ``state`` next step.
        """
        sqrt_a, sqrt_b, mult1, mult2, mult3, mult4, mult_noise, second = self._coefficients(i, schedule)
        x0 = self._pred_original_sample(sqrt_a, sqrt_b, model_output, sample)
        noise = randn_like_diffusers(sample.shape, generator, sample.device, sample.dtype)
        if state is None or not second:
            return mult1 * sample - mult2 * x0 + mult_noise * noise, x0
        denoised_d = mult3 * x0 - mult4 * state
        noise = randn_like_diffusers(sample.shape, generator, sample.device, sample.dtype)  # 1st discarded
        return mult1 * sample - mult2 * denoised_d + mult_noise * noise, x0


SCHEDULERS = {"CogVideoXDDIMScheduler": CogVideoXDDIMScheduler, "CogVideoXDPMScheduler": CogVideoXDPMScheduler}


def make_scheduler(config: dict, class_name: str | None = None) -> CogVideoXDDIMScheduler | CogVideoXDPMScheduler:
    """A scheduler from a diffusers scheduler config dict. The class comes from ``class_name`` if given,
    else the config's ``_class_name`` (DDIM if absent): ``class_name="CogVideoXDPMScheduler"`` swaps in DPM."""
    name = class_name or config.get("_class_name") or "CogVideoXDDIMScheduler"
    if name not in SCHEDULERS:
        raise ValueError(f"unsupported scheduler class {name!r}; accepted: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](SchedulerConfig.from_dict(config))
