"""cogvx.quantize: named quantization recipes (torchao, optimum-quanto, bitsandbytes), applied to one
component with ``quantize_(module, recipe)``, and quantized diffusers-layout checkpoints.

    from cogvx.quantize import RECIPES, quantize_, availability
    quantize_(engine.transformer, "int8wo")
"""

from .apply import quantize_, quantized_layers, selected_layers
from .format import DTYPES
from .filters import COMPONENTS as QUANTIZABLE
from .filters import DEFAULT_FILTERS, ModuleFilter, default_filter
from .recipes import (
    RECIPES,
    Recipe,
    RecipeError,
    availability,
    check_runnable,
    get_recipe,
    parse_recipe_spec,
    resolve_recipes,
    runnable_recipes,
)

__all__ = [
    "DTYPES", "QUANTIZABLE", "RECIPES", "Recipe", "RecipeError", "ModuleFilter", "DEFAULT_FILTERS", "default_filter", "availability",
    "check_runnable", "get_recipe", "parse_recipe_spec", "resolve_recipes", "runnable_recipes", "quantize_",
    "quantized_layers", "selected_layers",
]
