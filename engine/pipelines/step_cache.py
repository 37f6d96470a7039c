"""Step caching settings: which steps of the denoising loop may reuse the transformer's work of an
earlier step, and by what rule.

Two rules, both deciding once per step for the whole batch (the two halves of classifier-free
guidance and every video of the call decide together):

- ``"first-block"`` (first-block cache): run the first transformer block; if the relative L1 change
  of its residual since the last fully computed step, ``mean|r - r_prev| / mean|r_prev|``, is below
  ``threshold``, add the cached residual of the remaining blocks instead of running them.
- ``"teacache"`` (TeaCache, Liu et al. 2024, arXiv:2411.19108): the relative L1 change of the time
  embedding between consecutive steps, rescaled by a polynomial fitted per model, is accumulated
  over the steps since the last computed one; while the sum stays below ``threshold`` the residual
  of all blocks is reused. The time embedding depends on the timestep alone, so the rule needs no
  look at the latents.

The first ``warmup_steps`` and the last ``cooldown_steps`` steps are always computed. ``threshold=0``
never reuses a step (and, computed step by step on the same weights, gives the uncached result).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from ..models.config import TransformerConfig
from .checks import as_int

__all__ = ["StepCache", "MODES", "TEACACHE_COEFFICIENTS", "teacache_coefficients", "parse_step_cache",
           "check_step_cache"]

MODES = ("first-block", "teacache")

# TeaCache's rescaling polynomials (highest power first, as numpy.poly1d takes them), fitted by its
# authors on the released checkpoints: ``coefficients_dict`` in TeaCache4CogVideoX1.5/teacache_sample_video.py
# of github.com/ali-vilab/TeaCache (commit 7c10efc; the 2b and 5b rows also in eval/teacache/experiments/cogvideox.py).
TEACACHE_COEFFICIENTS: dict[str, tuple[float, ...]] = {
    "CogVideoX-2b": (-3.10658903e01, 2.54732368e01, -5.92380459e00, 1.75769064e00, -3.61568434e-03),
    "CogVideoX-5b": (-1.53880483e03, 8.43202495e02, -1.34363087e02, 7.97131516e00, -5.23162339e-02),
    "CogVideoX-5b-I2V": (-1.53880483e03, 8.43202495e02, -1.34363087e02, 7.97131516e00, -5.23162339e-02),
    "CogVideoX1.5-5B": (2.50210439e02, -1.65061612e02, 3.57804877e01, -7.81551492e-01, 3.58559703e-02),
    "CogVideoX1.5-5B-I2V": (1.22842302e02, -1.04088754e02, 2.62981677e01, -3.06009921e-01, 3.71213220e-02),
}

_HINT = ("; 0 turns reuse off, TeaCache's published CogVideoX runs use 0.1-0.3, and "
         "benchmarks/bench_step_cache.py --model DIR measures the speed/quality curve of a checkpoint")


@dataclass(frozen=True)
class StepCache:
    """How ``Engine.generate(..., step_cache=StepCache(0.05))`` may skip transformer work.

    threshold: finite, >= 0; a step is reused while its indicator is below it (higher: faster, further
        from the uncached video; 0: never).
    mode: "first-block" (default) or "teacache" (see the module docstring).
    warmup_steps: the first steps always computed (>= 1: the first step has nothing to reuse).
    cooldown_steps: the last steps always computed (>= 0). TeaCache's published runs use 1 and 1.
    coefficients: teacache only: the rescaling polynomial, highest power first; None takes TeaCache's
        published one for the loaded model's family (``TEACACHE_COEFFICIENTS``).

    A ``callback_on_step_end`` that returns replacement latents makes the next step a computed one
    (and restarts TeaCache's sum): a residual cached for other latents is never added to new ones.
    Latents edited in place by a callback (returning None) are not seen: return them instead.

    Cost: first-block keeps two [B, S, D] tensors (block 0's residual and the rest's), teacache one;
    first-block reads one scalar to the host on each step that may be reused (on CUDA a sync after that
    step's first block), teacache reads its indicator for all steps once, before the loop.
    """

    threshold: float
    mode: str = "first-block"
    warmup_steps: int = 2
    cooldown_steps: int = 2
    coefficients: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"step cache mode must be one of {', '.join(map(repr, MODES))} (got {self.mode!r})")
        t = self.threshold
        if not _is_real(t):
            raise ValueError(f"step cache threshold must be a number (got {type(t).__name__} {t!r}){_HINT}")
        if not math.isfinite(float(t)) or float(t) < 0:
            raise ValueError(f"step cache threshold must be a finite number >= 0 (got {t!r}){_HINT}")
        object.__setattr__(self, "threshold", float(t))
        object.__setattr__(self, "warmup_steps", as_int("step cache warmup_steps", self.warmup_steps, 1, 10**6,
                                                        "; the first step is always computed"))
        object.__setattr__(self, "cooldown_steps", as_int("step cache cooldown_steps", self.cooldown_steps, 0, 10**6))
        if self.coefficients is not None:
            if self.mode != "teacache":
                raise ValueError("step cache coefficients apply to mode='teacache' only")
            c = self.coefficients
            if isinstance(c, (str, bytes)) or not hasattr(c, "__len__") or not len(c) or \
                    not all(_is_real(x) and math.isfinite(float(x)) for x in c):
                raise ValueError("step cache coefficients must be a non-empty sequence of finite numbers "
                                 f"(highest power first, as numpy.poly1d; got {c!r})")
            object.__setattr__(self, "coefficients", tuple(float(x) for x in c))

    def to_dict(self) -> dict:
        return dict(mode=self.mode, threshold=self.threshold, warmup_steps=self.warmup_steps,
                    cooldown_steps=self.cooldown_steps)


def _is_real(x) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def teacache_coefficients(cfg: TransformerConfig) -> tuple[str, tuple[float, ...]]:
    """(name, polynomial) of TeaCache's published fit for the model family a config belongs to: 2b has
    no RoPE; 1.5 has a temporal patch; image-to-video takes twice the latent channels."""
    if not cfg.use_rotary_positional_embeddings:
        name = "CogVideoX-2b"
    elif cfg.patch_size_t is None:
        name = "CogVideoX-5b-I2V" if cfg.image_to_video else "CogVideoX-5b"
    else:
        name = "CogVideoX1.5-5B-I2V" if cfg.image_to_video else "CogVideoX1.5-5B"
    return name, TEACACHE_COEFFICIENTS[name]


def parse_step_cache(spec: str, warmup_steps: int = 2, cooldown_steps: int = 2) -> StepCache:
    """``"MODE:THRESHOLD"`` (``first-block:0.05``, ``teacache:0.2``) or a bare threshold (first-block)."""
    mode, _, value = spec.rpartition(":")
    mode = mode or "first-block"
    try:
        threshold = float(value)
    except ValueError:
        raise ValueError(f"--step-cache takes MODE:THRESHOLD with MODE one of {', '.join(MODES)} and a number "
                         f"(got {spec!r}); e.g. first-block:0.05 or teacache:0.2") from None
    return StepCache(threshold, mode=mode, warmup_steps=warmup_steps, cooldown_steps=cooldown_steps)


def check_step_cache(value) -> StepCache | None:
    """``generate``'s step_cache argument: None or a :class:`StepCache`."""
    if value is None or isinstance(value, StepCache):
        return value
    raise TypeError(f"step_cache must be None or a StepCache, e.g. StepCache(0.05) or StepCache(0.2, "
                    f"mode='teacache') (got {type(value).__name__} {value!r})")
