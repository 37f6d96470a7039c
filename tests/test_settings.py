"""Typed recipe settings (``cogvx.quantize.settings``): each backend's options and the engine's runtime knobs
are dataclasses; the flat ``settings`` object a quantized checkpoint saves reads back to the same ones, and a
tampered setting in a quantization.json is refused before anything is built."""

from __future__ import annotations

import pytest
import torch

from cogvx.quantize import RECIPES
from cogvx.quantize.format import QuantizedFormatError, check_info, component_info
from cogvx.quantize.settings import (NativeOptions, Runtime, SettingsError, TorchaoOptions, options_from_dict)


@pytest.mark.parametrize("name", list(RECIPES))
def test_saved_settings_read_back_to_the_recipes_types(name):
    r = RECIPES[name]
    assert options_from_dict(r.backend, r.settings) == r.options
    assert Runtime.from_dict(r.settings) == r.runtime


def test_runtime_knobs_are_typed_not_a_string_bag():
    assert RECIPES["int8dq-cpu-int8attn"].runtime == Runtime(attention_kernel="int8-cpu", fused_gelu_quant=True)
    assert RECIPES["int8wo"].runtime == Runtime() and RECIPES["int8wo"].options == TorchaoOptions("Int8WeightOnlyConfig")
    with pytest.raises(SettingsError, match="attention_kernel 'int4' is not one of 'int8-cpu'"):
        Runtime(attention_kernel="int4")
    with pytest.raises(SettingsError, match="fused_gelu_quant must be true or false"):
        Runtime(fused_gelu_quant="yes")
    with pytest.raises(SettingsError, match="torchao config 'Int4Config' is not one of"):
        TorchaoOptions("Int4Config")
    with pytest.raises(SettingsError, match="gemm_out 'int8' is not one of"):
        NativeOptions("int8")


@pytest.mark.parametrize("settings, message", [
    ({"gemm_out": "bfloat16", "fused_gelu_quant": True, "turbo": 1}, r"unknown native setting\(s\) \['turbo'\]"),
    ({"gemm_out": "int4"}, "gemm_out 'int4' is not one of"),
    ({"gemm_out": "bfloat16", "attention_kernel": "rm -rf"}, "attention_kernel 'rm -rf' is not one of"),
    ([1, 2], "settings must be a JSON object"),
])
def test_a_tampered_saved_setting_is_refused(settings, message):
    info = {**component_info("transformer", "int8dq-cpu", torch.float32, False, {}), "files": []}
    info["recipe"]["settings"] = settings
    with pytest.raises(QuantizedFormatError, match=f"quantization.json: recipe 'int8dq-cpu': {message}"):
        check_info(info, "quantization.json")
