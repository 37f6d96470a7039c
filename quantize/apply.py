"""``quantize_(module, recipe)``: quantize one component in place, as torchao's ``quantize_`` does."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .backends import get_backend
from .filters import ModuleFilter
from .recipes import Recipe, get_recipe

__all__ = ["quantize_", "selected_layers", "quantized_layers"]


def selected_layers(module: nn.Module, recipe: str | Recipe, component: str = "transformer",
                    module_filter: ModuleFilter | None = None) -> list[str]:
    """Qualified names of the Linear layers the recipe's filter (or ``module_filter``) selects."""
    flt = module_filter or get_recipe(recipe).filter_for(component)
    return [fqn for fqn, m in module.named_modules() if flt(m, fqn)]


def quantize_(module: nn.Module, recipe: str | Recipe, component: str = "transformer", *,
              module_filter: ModuleFilter | None = None,
              calibrate: Callable[[nn.Module], None] | None = None) -> list[str]:
    """Quantize ``module``'s selected Linear layers in place; returns their qualified names.

    module: a loaded component (weights materialized, eval mode), in the dtype it will run in.
    component: "transformer" or "text_encoder" (picks the recipe's module filter).
    calibrate: for recipes with static activation scales (``quanto-w8a8``), a function that runs
        representative inputs through ``module`` (see ``cogvx.quantize.calibration``).
    Availability on the module's device is the caller's check (``check_runnable``).
    """
    r = get_recipe(recipe)
    fqns = selected_layers(module, r, component, module_filter)
    if r.needs_calibration and calibrate is None:
        raise ValueError(f"recipe {r.name!r} has static activation scales: pass calibrate=, a function that runs "
                         "sample inputs through the module (cogvx.quantize.calibration)")
    get_backend(r.backend).quantize(module, fqns, r.options, calibrate=calibrate)
    return fqns


def quantized_layers(module: nn.Module, backend: str) -> dict[str, nn.Module]:
    """{qualified name: layer} of the layers that ``backend`` has quantized in ``module``."""
    b = get_backend(backend)
    return {fqn: m for fqn, m in module.named_modules() if b.is_quantized(m)}
