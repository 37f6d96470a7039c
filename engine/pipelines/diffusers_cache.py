"""diffusers' cache API on cogvx's transformer, mapped onto cogvx's step cache where the semantics agree.

    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))   # -> StepCache(0.2, "first-block")
    pipe.transformer.disable_cache()

- ``FirstBlockCacheConfig(threshold)``: diffusers runs the first block and reuses the rest's residual while the
  relative L1 change of the first block's output residual stays below ``threshold``: cogvx's ``"first-block"``
  rule, decided once per step for the whole CFG batch as diffusers' ``cache_context("cond_uncond")`` does.
  diffusers has no warm-up or cool-down steps: the mapping uses one warm-up step (the first has nothing to
  reuse) and no cool-down.
- ``PyramidAttentionBroadcastConfig`` and ``FasterCacheConfig`` reuse *attention outputs* per block (and
  FasterCache the unconditional branch) on a timestep schedule, which cogvx's step cache (whole-step residuals)
  does not do: they run with diffusers' own rules on cogvx's attention (``diffusers_attention_cache``).
- TaylorSeer and MagCache are refused with a ValueError that says what to use instead.

The configs are read by their class name and fields: diffusers need not be installed for cogvx to run a
StepCache, only to build diffusers' config objects.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

from .diffusers_attention_cache import AttentionReuse
from .step_cache import StepCache

__all__ = ["CacheMethods", "step_cache_of", "FirstBlockCacheConfig", "PyramidAttentionBroadcastConfig",
           "FasterCacheConfig"]


# diffusers' config classes, same names, fields and defaults, for scripts whose import line now reads cogvx.engine
@dataclass
class FirstBlockCacheConfig:
    threshold: float = 0.05


@dataclass
class PyramidAttentionBroadcastConfig:
    spatial_attention_block_skip_range: int | None = None
    temporal_attention_block_skip_range: int | None = None
    cross_attention_block_skip_range: int | None = None
    spatial_attention_timestep_skip_range: tuple[int, int] = (100, 800)
    temporal_attention_timestep_skip_range: tuple[int, int] = (100, 800)
    cross_attention_timestep_skip_range: tuple[int, int] = (100, 800)
    spatial_attention_block_identifiers: tuple[str, ...] = ("blocks", "transformer_blocks", "single_transformer_blocks")
    temporal_attention_block_identifiers: tuple[str, ...] = ("temporal_transformer_blocks",)
    cross_attention_block_identifiers: tuple[str, ...] = ("blocks", "transformer_blocks")
    current_timestep_callback: Callable[[], int] | None = None


@dataclass
class FasterCacheConfig:
    spatial_attention_block_skip_range: int = 2
    temporal_attention_block_skip_range: int | None = None
    spatial_attention_timestep_skip_range: tuple[int, int] = (-1, 681)
    temporal_attention_timestep_skip_range: tuple[int, int] = (-1, 681)
    low_frequency_weight_update_timestep_range: tuple[int, int] = (99, 901)
    high_frequency_weight_update_timestep_range: tuple[int, int] = (-1, 301)
    alpha_low_frequency: float = 1.1
    alpha_high_frequency: float = 1.1
    unconditional_batch_skip_range: int = 5
    unconditional_batch_timestep_skip_range: tuple[int, int] = (-1, 641)
    spatial_attention_block_identifiers: tuple[str, ...] = ("^blocks.*attn", "^transformer_blocks.*attn",
                                                            "^single_transformer_blocks.*attn")
    temporal_attention_block_identifiers: tuple[str, ...] = ("^temporal_transformer_blocks.*attn",)
    attention_weight_callback: Callable | None = None
    low_frequency_weight_callback: Callable | None = None
    high_frequency_weight_callback: Callable | None = None
    tensor_format: str = "BCFHW"
    is_guidance_distilled: bool = False
    current_timestep_callback: Callable[[], int] | None = None

_ATTENTION = ("PyramidAttentionBroadcastConfig", "FasterCacheConfig")
_REFUSED = {
    "TaylorSeerCacheConfig": "TaylorSeer extrapolates block outputs from past steps",
    "MagCacheConfig": "MagCache skips steps by calibrated magnitude ratios",
}


def step_cache_of(config) -> StepCache:
    """The StepCache a diffusers cache config maps onto, or a ValueError saying why none does."""
    name = type(config).__name__
    if isinstance(config, StepCache):
        return config
    if name == "FirstBlockCacheConfig":
        return StepCache(float(config.threshold), mode="first-block", warmup_steps=1, cooldown_steps=0)
    if name in _REFUSED:
        raise ValueError(f"enable_cache({name}): {_REFUSED[name]}; cogvx's step cache reuses whole-step residuals, "
                         "which gives other results, so this config is not mapped. Use FirstBlockCacheConfig("
                         "threshold=...), PyramidAttentionBroadcastConfig, FasterCacheConfig or cogvx's "
                         "StepCache(threshold, mode='teacache')")
    raise TypeError(f"enable_cache() takes diffusers' FirstBlockCacheConfig or cogvx's StepCache (got {name})")


class CacheMethods:
    """Mixed into ``CogVideoXTransformer3DModel``: ``enable_cache`` / ``disable_cache`` / ``cache_context``."""

    step_cache: StepCache | None = None
    attention_reuse: AttentionReuse | None = None

    def enable_cache(self, config) -> None:
        """diffusers' ``enable_cache(config)``: FirstBlockCacheConfig, PyramidAttentionBroadcastConfig,
        FasterCacheConfig, or cogvx's StepCache."""
        if self.is_cache_enabled:
            raise ValueError("a cache is already enabled on this transformer: call disable_cache() first")
        if type(config).__name__ in _ATTENTION:
            self.attention_reuse = AttentionReuse(self, config)
        else:
            self.step_cache = step_cache_of(config)

    def disable_cache(self) -> None:
        if not self.is_cache_enabled:
            raise ValueError("disable_cache(): no cache is enabled on this transformer")
        if self.attention_reuse is not None:
            self.attention_reuse.remove()
        self.step_cache = self.attention_reuse = None

    @property
    def is_cache_enabled(self) -> bool:
        return self.step_cache is not None or self.attention_reuse is not None

    @contextlib.contextmanager
    def cache_context(self, name: str):
        """diffusers' per-branch cache scope; cogvx decides for the whole CFG batch in one call."""
        yield
