"""cogvx.quantize: named quantization recipes (torchao, optimum-quanto, bitsandbytes), applied to one
component with ``quantize_(module, recipe)``, and quantized diffusers-layout checkpoints.

    from cogvx.quantize import RECIPES, quantize_, availability
    quantize_(engine.transformer, "int8wo")
"""

from .quiet import quiet_library_logs

quiet_library_logs()  # before anything imports torchao or bitsandbytes

from .apply import quantize_, quantized_layers, selected_layers  # noqa: E402
from .format import DTYPES  # noqa: E402
from .filters import COMPONENTS as QUANTIZABLE  # noqa: E402
from .filters import DEFAULT_FILTERS, ModuleFilter, default_filter  # noqa: E402
from .recipes import (  # noqa: E402
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
    "quantized_layers", "selected_layers", "quiet_library_logs",
]
