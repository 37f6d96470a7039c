"""diffusers' quantization configs, mapped onto cogvx's recipes (``cogvx recipes`` lists them).

    from cogvx.engine import AutoModel, CogVideoXPipeline, PipelineQuantizationConfig, TorchAoConfig
    transformer = AutoModel.from_pretrained(path, subfolder="transformer", quantization_config=TorchAoConfig("int8wo"))
    pipe = CogVideoXPipeline.from_pretrained(path, quantization_config=PipelineQuantizationConfig(
        quant_backend="torchao", quant_kwargs={"quant_type": "int8wo"}, components_to_quantize=["transformer"]))

A config names a recipe; cogvx applies the recipe (its module filter keeps the layers diffusers' quantizer
also keeps in full precision: embeddings, norms, the output projection). A quant type with no recipe is refused
with the list of those that have one. The configs are also read by class name and fields, so diffusers' or
transformers' own ``TorchAoConfig`` objects work as well.
"""

from __future__ import annotations

__all__ = ["TorchAoConfig", "PipelineQuantizationConfig", "recipe_of", "pipeline_recipes"]

# torchao quant types (diffusers' strings and torchao's config classes) -> cogvx recipe
_TORCHAO = {
    "int8wo": "int8wo", "int8_weight_only": "int8wo", "Int8WeightOnlyConfig": "int8wo",
    "int8dq": "int8dq", "int8_dynamic_activation_int8_weight": "int8dq",
    "Int8DynamicActivationInt8WeightConfig": "int8dq",
    "float8wo": "fp8wo", "float8wo_e4m3": "fp8wo", "float8_weight_only": "fp8wo", "Float8WeightOnlyConfig": "fp8wo",
    "float8dq": "fp8dq", "float8dq_e4m3": "fp8dq", "float8_dynamic_activation_float8_weight": "fp8dq",
    "Float8DynamicActivationFloat8WeightConfig": "fp8dq", "float8dq_e4m3_row": "fp8dq-row",
}
_QUANTO = {"int8": "quanto-int8", "float8": "quanto-fp8"}


class TorchAoConfig:
    """diffusers' ``TorchAoConfig(quant_type)``: a string ("int8wo", "int8dq", "float8wo", "float8dq", ...) or
    a torchao config object (``Int8WeightOnlyConfig()``, ...)."""

    def __init__(self, quant_type, modules_to_not_convert=None, **kwargs):
        if kwargs:
            raise ValueError(f"TorchAoConfig: cogvx's recipes take no options {sorted(kwargs)}; drop them (the "
                             "recipe's granularity is fixed: `cogvx recipes` describes each)")
        if modules_to_not_convert:
            raise ValueError("TorchAoConfig(modules_to_not_convert=...): cogvx's recipes carry their own module "
                             "filter; leave it out")
        self.quant_type = quant_type
        self.modules_to_not_convert = modules_to_not_convert


class PipelineQuantizationConfig:
    """diffusers' ``PipelineQuantizationConfig``: one backend for ``components_to_quantize`` (default: the
    transformer), or ``quant_mapping`` {component: config}."""

    def __init__(self, quant_backend: str | None = None, quant_kwargs: dict | None = None,
                 components_to_quantize: list[str] | str | None = None, quant_mapping: dict | None = None):
        if (quant_backend is None) == (quant_mapping is None):
            raise ValueError("PipelineQuantizationConfig: pass quant_backend (with quant_kwargs) or quant_mapping")
        self.quant_backend, self.quant_kwargs = quant_backend, dict(quant_kwargs or {})
        comps = components_to_quantize or ["transformer"]
        self.components_to_quantize = [comps] if isinstance(comps, str) else list(comps)
        self.quant_mapping = quant_mapping


def _backend_recipe(backend: str, kwargs: dict) -> str:
    if backend == "torchao":
        return recipe_of(TorchAoConfig(**kwargs))
    if backend in ("quanto", "optimum_quanto"):
        w = kwargs.get("weights_dtype")
        if w not in _QUANTO or set(kwargs) - {"weights_dtype"}:
            raise ValueError(f"quanto: cogvx has recipes for weights_dtype {sorted(_QUANTO)} (got {kwargs})")
        return _QUANTO[w]
    if backend == "bitsandbytes_8bit":
        return "bnb-int8"
    if backend == "bitsandbytes_4bit" and kwargs.get("bnb_4bit_quant_type", "nf4") == "nf4":
        return "bnb-nf4"
    raise ValueError(f"quant_backend={backend!r} {kwargs}: cogvx maps 'torchao', 'quanto', 'bitsandbytes_8bit' and "
                     "'bitsandbytes_4bit' (nf4) onto its recipes")


def recipe_of(config) -> str:
    """The cogvx recipe name of a diffusers/transformers quantization config (TorchAoConfig, QuantoConfig,
    BitsAndBytesConfig), or a ValueError naming what is accepted."""
    name = type(config).__name__
    if name == "TorchAoConfig":
        q = config.quant_type
        key = q if isinstance(q, str) else type(q).__name__
        if key not in _TORCHAO:
            raise ValueError(f"TorchAoConfig({key!r}): cogvx has a recipe for {sorted(set(_TORCHAO))}")
        return _TORCHAO[key]
    if name == "QuantoConfig":
        return _backend_recipe("quanto", {"weights_dtype": config.weights_dtype})
    if name == "BitsAndBytesConfig":
        if getattr(config, "load_in_8bit", False):
            return "bnb-int8"
        return _backend_recipe("bitsandbytes_4bit", {"bnb_4bit_quant_type": config.bnb_4bit_quant_type})
    raise TypeError(f"quantization_config: expected TorchAoConfig, QuantoConfig or BitsAndBytesConfig (got {name})")


def pipeline_recipes(config) -> dict[str, str]:
    """{component: recipe name} of a PipelineQuantizationConfig."""
    if type(config).__name__ != "PipelineQuantizationConfig":
        raise TypeError(f"quantization_config: expected a PipelineQuantizationConfig (got {type(config).__name__})")
    if config.quant_mapping is not None:
        out = {c: recipe_of(cfg) for c, cfg in config.quant_mapping.items()}
    else:
        recipe = _backend_recipe(config.quant_backend, config.quant_kwargs)
        out = dict.fromkeys(config.components_to_quantize, recipe)
    bad = sorted(set(out) - {"transformer", "text_encoder"})
    if bad:
        raise ValueError(f"quantization_config: cogvx quantizes the transformer and the text encoder (got {bad})")
    return out
