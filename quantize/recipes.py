"""The registry of named quantization recipes: recipes are data, never inferred from a file name.

A recipe is a frozen dataclass: its name, the backend library that runs it, the backend's settings,
the module filter per component, and what hardware it needs. ``RECIPES[name]`` is the only way a
recipe is chosen; nothing is inferred from file names. ``availability(recipe, device)`` says
whether this machine can run it and, if not, why.

Accuracy on the fixed tiny checkpoint (tests/test_quantize_accuracy.py; fp32, CPU): SQNR of one
transformer forward and PSNR of decoded frames after a 4-step seeded generation, both against the
unquantized fp32 model. The floors are what the tests assert (a few dB below the measured value;
measured values in tests/quantize_accuracy.json).

    recipe               backend  SQNR dB (floor)   PSNR dB (floor)   runs on this CPU
    int8dq-cpu-int8attn  native   49.3 (46)         52.5 (48)         yes: the fastest here
    int8dq-cpu           native   49.4 (46)         52.7 (48)         yes
    int8dq-cpu-bf16attn  native   49.2 (45)         51.2 (47)         yes
    int8wo        torchao  53.6 (50)         67.0 (63)         yes
    int8dq        torchao  49.1 (46)         51.9 (48)         yes
    fp8wo         torchao  41.5 (38)         53.2 (50)         yes
    fp8dq         torchao  -                 -                 needs CUDA SM 8.9+
    fp8dq-row     torchao  -                 -                 needs CUDA SM 8.9+
    fp8dq-row-int8attn torchao -             -                 needs CUDA SM 8.9+; not yet measured
    quanto-int8   quanto   53.7 (50)         67.4 (63)         yes
    quanto-fp8    quanto   41.5 (38)         53.2 (50)         yes
    quanto-w8a8   quanto   36.9 (33)         41.8 (38)         yes
    bnb-int8      bnb      49.3 (46)         52.0 (48)         yes
    bnb-nf4       bnb      23.8 (20)         37.2 (33)         yes

int8 weight-only sits 12 dB above fp8 weight-only (per-channel int8 keeps ~8 bits per weight where
e4m3 keeps 4). Recipes that also quantize activations (int8dq, quanto-w8a8, and bnb-int8, whose
LLM.int8 matmul quantizes activations row-wise) lose more end to end than their single-forward SQNR
suggests: the error compounds over the denoising steps.

Speed on the CPU (AMD EPYC, 2 cores, AVX-512 with VNNI and BF16, no AMX; for a Sapphire Rapids Xeon with
AMX, where OpenVINO int8 is faster, see the README's benchmark section; benchmarks/sweep.py, rows
alternated in one process, compiled, fp32 activations). int8 dynamic quantization is *faster* than
fp32 on such a CPU (VNNI int8 GEMMs run at 4-5x the fp32 rate), not slower. int8dq-cpu-int8attn is
the fastest here: its step takes 0.16x (cpu-bench, commit d9a1300) and 0.23x (cpu-long, fdfc26b) the
time of diffusers fp32, and 0.65x / 0.38x that of diffusers + torchao int8dq, at 69.9 / 72.5 dB
against the fp32 step. Its attention is one C kernel (int8 q k^T, bf16 p v; cogvx.kernels.cpu_kernels),
3-4x faster than PyTorch's CPU flash kernel, which int8dq-cpu and the diffusers rows run (76 % of their
cpu-long step); what is left is mostly the int8 GEMMs, at about the VNNI peak (66 % of the cpu-bench
step). int8dq-cpu (SDPA attention) measures 0.24x diffusers fp32 and 0.98x diffusers + torchao
int8dq at cpu-bench; int8dq-cpu-bf16attn (blocked bf16 attention at short sequences) 0.22x / 0.92x.
Every int8dq-cpu recipe runs the feed-forward's GELU and int8 quantization as one C kernel (inductor's
loop for the same ops took a sixth of the cpu-bench step). Weight-only recipes dequantize to the
activation dtype for the GEMM: no speedup over fp32 here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .backends import backend_installed, backend_status
from .filters import COMPONENTS, DEFAULT_FILTERS, ModuleFilter, default_filter
from .settings import OPTION_TYPES, BackendOptions, BnbOptions, NativeOptions, QuantoOptions, Runtime, TorchaoOptions

__all__ = [
    "Recipe", "RecipeError", "RECIPES", "get_recipe", "availability", "runnable_recipes", "check_runnable",
    "resolve_recipes", "parse_recipe_spec",
]


class RecipeError(ValueError):
    """An unknown recipe, a recipe this machine cannot run, or a malformed recipe argument."""


@dataclass(frozen=True)
class Recipe:
    """One quantization recipe.

    name: registry key (``int8wo``). options: the backend's typed options (``TorchaoOptions``,
        ``QuantoOptions``, ``BnbOptions``, ``NativeOptions``); their type names the backend.
    runtime: the engine's runtime knobs the recipe switches on (``Runtime``: attention kernel and dtype,
        fused GELU + quantization, fp8 activations).
    filters: (component, ModuleFilter) pairs; components not listed use the default filter.
    needs_cuda_capability: minimum CUDA compute capability, or None when the CPU can run it.
    needs_calibration: activation scales are static and are measured on sample inputs at quantization time.
    cpu_note / gpu_note: a caveat said with the recipe's availability on a CPU / on a CUDA device (the
        gpu_note also where a CPU cannot run it).
    """

    name: str
    description: str
    options: BackendOptions
    runtime: Runtime = Runtime()
    filters: tuple[tuple[str, ModuleFilter], ...] = ()
    needs_cuda_capability: tuple[int, int] | None = None
    needs_calibration: bool = False
    cpu_note: str = ""
    gpu_note: str = ""

    @property
    def backend(self) -> str:
        """"torchao", "quanto", "bnb" or "native"."""
        return next(b for b, t in OPTION_TYPES.items() if isinstance(self.options, t))

    @property
    def settings(self) -> dict[str, Any]:
        """The backend's options and the runtime knobs as one flat JSON object (saved with a checkpoint)."""
        return {**asdict(self.options), **self.runtime.to_dict()}

    def filter_for(self, component: str) -> ModuleFilter:
        return dict(self.filters).get(component) or default_filter(component)

    def to_dict(self) -> dict[str, Any]:
        """JSON form, saved next to a quantized checkpoint."""
        return {
            "name": self.name, "backend": self.backend, "settings": self.settings,
            "filters": {c: self.filter_for(c).to_dict() for c in COMPONENTS},
        }


def _fp8_filters() -> tuple[tuple[str, ModuleFilter], ...]:
    # torch._scaled_mm needs both GEMM dims to be multiples of 16.
    return tuple((c, f.with_dims_multiple_of(16)) for c, f in DEFAULT_FILTERS.items())


_SM89 = (8, 9)
CPU_FAST_NOTE = ("runs; int8 GEMMs at the VNNI peak (oneDNN u8 x s8 on prepacked weights), GELU + quantization in one "
                 "C kernel; attention in SDPA: cpu-bench step 0.24x diffusers fp32, as fast as diffusers + torchao int8dq")
CPU_BF16_ATTN_NOTE = ("runs; int8dq-cpu with, compiled, short-sequence attention as blocked bf16 GEMMs: cpu-bench step "
                      "0.92x diffusers + torchao int8dq; long sequences keep SDPA")
CPU_INT8_ATTN_NOTE = ("runs; cogvx's fastest on a CPU: attention as int8 q k^T in one C kernel; AMD EPYC (AVX-512 "
                      "VNNI + BF16): step 0.16x (cpu-bench) / 0.23x (cpu-long) diffusers fp32, 0.65x / 0.38x diffusers "
                      "+ torchao int8dq; Sapphire Rapids Xeon (AMX): 0.66x / 0.45x torchao int8dq, 1.19x / 0.72x "
                      "OpenVINO int8")
INT8_CUDA_ATTN_NOTE = ("GPU-only; not yet measured on a GPU (speed and end-to-end accuracy unknown; the attention "
                       "kernel is tested under the Triton interpreter: 41 dB against float64 attention)")
_INT8DQ_NOTE = "runs; VNNI makes it faster than fp32 here (cpu-bench step ~0.28x fp32 compiled)"
_WO_NOTE = "runs; weight-only: the GEMM runs in the activation dtype, no faster than fp32 on a CPU"
_NATIVE = NativeOptions(gemm_out="bfloat16")
_FUSED = Runtime(fused_gelu_quant=True)
_RECIPES = [
    Recipe("int8wo", "int8 weight-only, per-channel scales", TorchaoOptions("Int8WeightOnlyConfig"), cpu_note=_WO_NOTE),
    Recipe("int8dq", "int8 dynamic per-token activations + int8 per-channel weights",
           TorchaoOptions("Int8DynamicActivationInt8WeightConfig"), cpu_note=_INT8DQ_NOTE),
    Recipe("fp8wo", "float8 e4m3 weight-only, per-channel scales", TorchaoOptions("Float8WeightOnlyConfig")),
    Recipe("fp8dq", "float8 e4m3 dynamic activations + weights, per-tensor scales",
           TorchaoOptions("Float8DynamicActivationFloat8WeightConfig", "PerTensor"),
           filters=_fp8_filters(), needs_cuda_capability=_SM89),
    Recipe("fp8dq-row", "float8 e4m3 dynamic activations + weights, per-row scales; the adaLN kernel "
           "quantizes the q/k/v and feed-forward-up inputs",
           TorchaoOptions("Float8DynamicActivationFloat8WeightConfig", "PerRow"), Runtime(fp8_activations=True),
           filters=_fp8_filters(), needs_cuda_capability=_SM89),
    Recipe("fp8dq-row-int8attn", "fp8dq-row with 8-bit attention: k smoothed by its mean, q and k int8 per token, "
           "int8 q k^T and fp16 p v (SageAttention-style Triton kernel, cogvx.kernels.sage_attention)",
           TorchaoOptions("Float8DynamicActivationFloat8WeightConfig", "PerRow"),
           Runtime(fp8_activations=True, attention_kernel="int8-cuda"),
           filters=_fp8_filters(), needs_cuda_capability=_SM89, gpu_note=INT8_CUDA_ATTN_NOTE),
    Recipe("quanto-int8", "optimum-quanto int8 weights, per-channel scales", QuantoOptions("qint8")),
    Recipe("quanto-fp8", "optimum-quanto float8 e4m3 weights, per-channel scales", QuantoOptions("qfloat8")),
    Recipe("quanto-w8a8", "optimum-quanto int8 weights + int8 activations (static scales, calibrated)",
           QuantoOptions("qint8", "qint8"), needs_calibration=True),
    Recipe("bnb-int8", "bitsandbytes LLM.int8 (int8 weights, fp16 outlier columns above 6.0)",
           BnbOptions("int8", threshold=6.0)),
    Recipe("int8dq-cpu", "int8 dynamic per-token activations + int8 per-channel weights, oneDNN u8 x s8 VNNI GEMM "
           "writing bf16", _NATIVE, _FUSED, cpu_note=CPU_FAST_NOTE),
    Recipe("int8dq-cpu-bf16attn", "int8dq-cpu with attention in bf16", _NATIVE,
           Runtime(fused_gelu_quant=True, attention_dtype="bfloat16"), cpu_note=CPU_BF16_ATTN_NOTE),
    Recipe("int8dq-cpu-int8attn", "int8dq-cpu with int8 q k^T attention (SageAttention-style C kernel for "
           "AMX, AVX-512 VNNI or AVX2 CPUs; SDPA elsewhere)", _NATIVE,
           Runtime(fused_gelu_quant=True, attention_kernel="int8-cpu"), cpu_note=CPU_INT8_ATTN_NOTE),
    Recipe("bnb-nf4", "bitsandbytes 4-bit NormalFloat, blocks of 64, double-quantized scales",
           BnbOptions("nf4", blocksize=64, compress_statistics=True)),
]
RECIPES: dict[str, Recipe] = {r.name: r for r in _RECIPES}


def get_recipe(name: str | Recipe) -> Recipe:
    if isinstance(name, Recipe):
        return name
    try:
        return RECIPES[name]
    except (KeyError, TypeError):
        raise RecipeError(f"unknown quantization recipe {name!r}; known recipes: {', '.join(RECIPES)}") from None


def availability(recipe: str | Recipe, device: str | torch.device = "cpu", *,
                 import_backend: bool = True) -> tuple[bool, str]:
    """(runs here, reason). The reason names what is missing, or notes a caveat when it runs.
    ``import_backend=False`` only checks that the backend library is installed (fast, for listings)."""
    r = get_recipe(recipe)
    dev = torch.device(device)
    ok, why = backend_status(r.backend) if import_backend else backend_installed(r.backend)
    if not ok:
        return False, why
    if dev.type == "cuda" and not torch.cuda.is_available():
        return False, "no CUDA device on this machine"
    if r.needs_cuda_capability is not None:
        need = "%d.%d" % r.needs_cuda_capability
        if dev.type != "cuda":
            note = f"; {r.gpu_note}" if r.gpu_note else ""
            return False, f"needs a CUDA GPU with compute capability >= {need} (device is {dev}){note}"
        cap = torch.cuda.get_device_capability(dev)
        if cap < r.needs_cuda_capability:
            return False, (f"needs CUDA compute capability >= {need}; {torch.cuda.get_device_name(dev)} "
                           f"is {cap[0]}.{cap[1]}")
    return True, (r.cpu_note if dev.type == "cpu" else r.gpu_note)


def runnable_recipes(device: str | torch.device = "cpu") -> list[str]:
    return [n for n in RECIPES if availability(n, device)[0]]


def check_runnable(recipe: str | Recipe, device: str | torch.device = "cpu") -> Recipe:
    """The recipe, or a RecipeError saying why it cannot run here and which recipes would."""
    r = get_recipe(recipe)
    ok, why = availability(r, device)
    if not ok:
        raise RecipeError(
            f"recipe {r.name!r} cannot run on {torch.device(device)}: {why}. Recipes that run here: "
            f"{', '.join(runnable_recipes(device)) or 'none'} (see `cogvx recipes`)"
        )
    return r


def parse_recipe_spec(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """{component: recipe name} from ``"int8wo"`` (the transformer), ``"transformer=fp8dq-row,text_encoder=int8wo"``
    or a mapping; names and components are checked, availability is not."""
    if spec is None:
        return {}
    if isinstance(spec, Recipe):
        return {"transformer": spec.name}
    if isinstance(spec, str):
        s = spec.strip()
        if not s:
            raise RecipeError("empty recipe; give a name (int8wo) or component=name pairs "
                              "(transformer=fp8dq-row,text_encoder=int8wo)")
        if "=" not in s and "," not in s:
            spec = {"transformer": s}
        else:
            pairs = {}
            for part in s.split(","):
                comp, eq, name = (x.strip() for x in part.partition("="))
                if not eq or not comp or not name:
                    raise RecipeError(f"bad recipe item {part.strip()!r} in {spec!r}; expected component=name, "
                                      "e.g. transformer=int8wo,text_encoder=int8wo")
                if comp in pairs:
                    raise RecipeError(f"component {comp!r} is given twice in {spec!r}")
                pairs[comp] = name
            spec = pairs
    if not isinstance(spec, Mapping):
        raise RecipeError(f"recipe must be a name or a {{component: name}} mapping (got {type(spec).__name__})")
    out = {}
    for comp, name in spec.items():
        if comp not in COMPONENTS:
            raise RecipeError(f"cannot quantize component {comp!r}; quantizable components: {', '.join(COMPONENTS)}")
        out[comp] = get_recipe(name).name
    return out


def resolve_recipes(spec, device: str | torch.device = "cpu") -> dict[str, Recipe]:
    """Parse ``spec`` and check that every recipe runs on ``device`` (before any weight is read)."""
    return {c: check_runnable(n, device) for c, n in parse_recipe_spec(spec).items()}
