"""Which Linear layers a recipe quantizes: a module filter is data (fnmatch patterns on the
module's qualified name), so it can be saved next to a quantized checkpoint and compared.

Default filters (the layers kept in full precision), per component:

transformer: ``time_embedding.*``, ``ofs_embedding.*``, ``norm_out.linear``, ``proj_out`` — the
timestep MLP, the output modulation and the output projection: 3.3 M of CogVideoX-2b's 1.69 G
parameters (0.2 %). Measured by quantizing one layer family at a time (the rest fp32) and taking
the SQNR (dB) of the transformer output against the fp32 model (``python benchmarks/bench_quantize.py
--per-layer``, written to ``benchmarks/results/per_layer_sqnr.json``). "tiny": the test checkpoint
(tests/checkpoints.py, variant "rope", seed 0: D=48, 2 blocks); "2b block": the 2b shape (D=1920,
30 heads, text 4096, temb 512) with one block and PyTorch's default random init; both batch 2 at
t = 900 and 300.

    family (layers)           params in 2b   tiny int8wo / fp8wo   2b block int8wo / fp8wo
    patch_embed.text_proj        7.9 M          80.7 / 67.8          102.2 / 86.3
    time_embedding (2)           1.2 M          66.7 / 51.4           69.4 / 53.5   kept
    norm1/norm2.linear (adaLN)   354 M          65.2 / 53.7           87.8 / 71.4
    attn1.to_q/k/v               332 M          65.9 / 53.3           93.2 / 76.6
    attn1.to_out.0               111 M          70.0 / 57.5           94.5 / 78.0
    ff.net.0.proj, ff.net.2      885 M          54.0 / 41.7           83.7 / 67.3
    norm_out.linear              2.0 M          70.4 / 57.8           73.1 / 57.5   kept
    proj_out                     0.12 M         45.1 / 31.4           48.5 / 31.6   kept

``proj_out`` alone (0.007 % of the weights) costs more than any other family, the whole
feed-forward stack included: its error lands on the output with nothing after it to average it
out. The timestep MLP and the output modulation come next on the 2b shape: their error scales
every token (the timestep embedding feeds every adaLN). All three are tiny, so they stay in full
precision. The text projection is insensitive and is quantized; so are the adaLN modulations
(21 % of 2b's weights, mid-pack). Random-weight models are a weak proxy for trained ones (trained
weights and activations have outlier channels): re-measure on the real checkpoint on a GPU before
moving this line.

text_encoder: ``*.DenseReluDense.wo`` — T5's feed-forward output projection, which transformers
keeps in fp32 (``T5EncoderModel._keep_in_fp32_modules``) because its activations overflow; T5's
forward also casts its input to that layer's weight dtype, which a 4-bit packed weight would break.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

__all__ = ["ModuleFilter", "DEFAULT_FILTERS", "default_filter", "COMPONENTS"]

# Components a recipe may quantize (the VAE is convolutions; the tokenizer/scheduler have no weights).
COMPONENTS = ("transformer", "text_encoder")


@dataclass(frozen=True)
class ModuleFilter:
    """Selects the ``nn.Linear`` layers to quantize.

    exclude: fnmatch patterns on the qualified name (``transformer_blocks.3.attn1.to_q``); a match
        keeps the layer in full precision.
    dims_multiple_of: keep layers whose in/out features are not multiples of this in full precision
        (fp8 GEMMs need multiples of 16).
    """

    exclude: tuple[str, ...] = ()
    dims_multiple_of: int = 1

    def __call__(self, module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if any(fnmatchcase(fqn, p) for p in self.exclude):
            return False
        n = self.dims_multiple_of
        return module.in_features % n == 0 and module.out_features % n == 0

    def with_dims_multiple_of(self, n: int) -> ModuleFilter:
        return ModuleFilter(self.exclude, n)

    def to_dict(self) -> dict[str, Any]:
        return {"exclude": list(self.exclude), "dims_multiple_of": self.dims_multiple_of}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModuleFilter:
        return cls(tuple(d.get("exclude", ())), int(d.get("dims_multiple_of", 1)))


TRANSFORMER_KEEP = ("time_embedding.*", "ofs_embedding.*", "norm_out.linear", "proj_out")
TEXT_ENCODER_KEEP = ("*.DenseReluDense.wo",)

DEFAULT_FILTERS: dict[str, ModuleFilter] = {
    "transformer": ModuleFilter(TRANSFORMER_KEEP),
    "text_encoder": ModuleFilter(TEXT_ENCODER_KEEP),
}


def default_filter(component: str) -> ModuleFilter:
    """The default filter of a component (see the module docstring for the measurement)."""
    try:
        return DEFAULT_FILTERS[component]
    except KeyError:
        raise ValueError(f"cannot quantize component {component!r}; quantizable: {', '.join(COMPONENTS)}") from None
