"""Quantized checkpoints on the real CogVideoX-2b transformer shape (random bf16 weights, 1.69 G
parameters): weight bytes per recipe against bf16, and peak resident memory (over the process
baseline) and wall time of loading the quantized checkpoint against loading full precision and
quantizing. Every measurement runs in its own subprocess so each peak RSS is clean.

    python benchmarks/bench_quantize.py                        # int8wo, quanto-int8, bnb-int8, bnb-nf4
    python benchmarks/bench_quantize.py --recipes int8wo,fp8wo,bnb-nf4
    python benchmarks/bench_quantize.py --per-layer            # the module-filter measurement

Results: benchmarks/results/quantize-<commit>.json (device, dtype, shapes, commit, versions) and a
printed table. quanto-w8a8 is not run here: its calibration forwards at the 2b sample size
(17,550 video tokens) take minutes per step on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _util import child_result, cpu_model, current_rss, peak_rss, run_child, sqnr_db  # benchmarks/ is sys.path[0]

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_RECIPES = "int8wo,quanto-int8,bnb-int8,bnb-nf4"
GB = 1e9


def _touch(model) -> None:
    """Read every byte of every stored tensor. safetensors tensors are memory-mapped and fault in on
    first use, so without this a "load" would measure almost nothing; after it, RSS holds it all."""
    import torch

    def leaves(t):
        if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
            for name in t.__tensor_flatten__()[0]:
                yield from leaves(getattr(t, name))
        else:
            yield t.data if isinstance(t, torch.nn.Parameter) else t

    for t in [*model.parameters(), *model.buffers()]:
        for x in leaves(t):
            x.detach().reshape(-1).view(torch.uint8).sum()


# ------------------------------------------------------------------------------- child steps
def child_make(work: Path) -> dict:
    """Write a full-precision bf16 ``transformer/`` folder of the 2b shape with random weights."""
    import torch
    from cogvx.engine.models.presets import PRESETS
    from cogvx.engine.models.transformer import build_transformer
    from safetensors.torch import save_file

    cfg = PRESETS["2b"].transformer
    d = work / "fp" / "transformer"
    d.mkdir(parents=True, exist_ok=True)
    model = build_transformer(cfg)
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, t in model.state_dict().items():
        x = torch.empty(t.shape, dtype=torch.bfloat16)
        if name.endswith("norm.weight") or name.startswith("norm_final.weight") or "norm_q.weight" in name \
                or "norm_k.weight" in name:
            x.fill_(1.0)
        else:
            x.normal_(0.0, 0.02, generator=g)
        state[name] = x
    save_file(state, str(d / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    return {"params": sum(t.numel() for t in state.values())}


def child_load_fp(work: Path, recipe: str | None, out: Path | None) -> dict:
    """Load the bf16 checkpoint (and quantize it with ``recipe``; then export to ``out``)."""
    import torch
    from cogvx.engine.loading import load_transformer
    from cogvx.quantize import get_recipe, quantize_

    if recipe:
        from cogvx.quantize.backends import get_backend

        get_backend(get_recipe(recipe).backend)  # import the library before the baseline
    torch.set_num_threads(2)
    base = current_rss()
    t0 = time.perf_counter()
    model = load_transformer(work / "fp" / "transformer", device="cpu", dtype=torch.bfloat16)
    _touch(model)
    t_load = time.perf_counter() - t0
    res = {"baseline_rss": base, "load_s": t_load}
    if recipe:
        t1 = time.perf_counter()
        quantize_(model, recipe)
        res["quantize_s"] = time.perf_counter() - t1
    res["total_s"] = time.perf_counter() - t0
    res["peak_over_baseline"] = peak_rss() - base
    res["rss_after"] = current_rss() - base
    if recipe and out is not None:
        from cogvx.engine.io.atomic import atomic_directory
        from cogvx.engine.pipelines.quantized_export import write_component

        t2 = time.perf_counter()
        with atomic_directory(out, overwrite=True) as tmp:
            write_component(model, "transformer", recipe, tmp / "transformer",
                            config_src=work / "fp" / "transformer" / "config.json")
        res["export_s"] = time.perf_counter() - t2
    return res


def child_load_q(work: Path, recipe: str) -> dict:
    """Load the quantized checkpoint: meta model, quantized modules, stored tensors assigned."""
    import torch
    from cogvx.quantize import get_recipe
    from cogvx.quantize.backends import get_backend
    from cogvx.engine.loading import load_transformer
    from safetensors import safe_open

    get_backend(get_recipe(recipe).backend)
    torch.set_num_threads(2)
    d = work / recipe / "transformer"
    nbytes = 0
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                s = sf.get_slice(k)
                n = 1
                for x in s.get_shape():
                    n *= x
                nbytes += n * _itemsize(s.get_dtype())
    base = current_rss()
    t0 = time.perf_counter()
    model = load_transformer(d, torch.device("cpu"), torch.bfloat16)
    _touch(model)
    t = time.perf_counter() - t0
    peak = peak_rss() - base
    n_q = sum(1 for m in model.modules() if type(m).__name__ != "Linear" and hasattr(m, "in_features"))
    n_q += sum(1 for m in model.modules() if type(m).__name__ == "Linear" and type(m.weight.data) is not torch.Tensor)
    return {"baseline_rss": base, "load_s": t, "peak_over_baseline": peak, "rss_after": current_rss() - base,
            "weight_bytes": nbytes, "file_bytes": sum(f.stat().st_size for f in d.glob("*.safetensors")),
            "quantized_layers": n_q}


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}[dtype]


# ------------------------------------------------------------------------------- per-layer SQNR
def per_layer(out: Path) -> dict:
    """SQNR of the transformer output with one layer family quantized at a time (filters.py table)."""
    import copy
    import tempfile
    from fnmatch import fnmatchcase

    import torch

    sys.path.insert(0, str(HERE.parent / "tests"))
    from checkpoints import write_checkpoint
    from cogvx.engine.models.config import TransformerConfig
    from cogvx.engine.models.presets import PRESETS
    from cogvx.engine.loading import load_transformer
    from cogvx.engine.models.transformer import build_transformer
    from cogvx.engine.models.positions import make_positions
    from cogvx.quantize import ModuleFilter, quantize_

    families = {
        "patch_embed": ("patch_embed.*",), "time_embedding": ("time_embedding.*",),
        "adaLN (norm1/norm2.linear)": ("*.norm1.linear", "*.norm2.linear"),
        "attn to_q/k/v": ("*.attn1.to_q", "*.attn1.to_k", "*.attn1.to_v"), "attn to_out": ("*.attn1.to_out.0",),
        "ff": ("*.ff.net.*",), "norm_out.linear": ("norm_out.linear",), "proj_out": ("proj_out",),
    }

    class Only(ModuleFilter):
        def __call__(self, m, fqn):  # quantize the family, nothing else
            return isinstance(m, torch.nn.Linear) and any(fnmatchcase(fqn, p) for p in self.exclude)

    torch.set_num_threads(2)
    models = {}
    ckpt = write_checkpoint(Path(tempfile.mkdtemp()) / "ckpt", "rope", seed=0)
    tiny = load_transformer(ckpt / "transformer")
    g = torch.Generator().manual_seed(1)
    models["tiny"] = (tiny, (torch.randn(2, 3, 4, 6, 10, generator=g), torch.randn(2, 7, 20, generator=g),
                             torch.tensor([900, 300]), make_positions(tiny.config, 3, 6, 10)))
    cfg = TransformerConfig(**{**PRESETS["2b"].transformer.__dict__, "num_layers": 1})
    torch.manual_seed(0)
    block = build_transformer(cfg, device="cpu")  # PyTorch default init
    g = torch.Generator().manual_seed(1)
    models["2b block"] = (block, (torch.randn(2, 2, 16, 16, 16, generator=g),
                                  torch.randn(2, 226, 4096, generator=g) * 0.1, torch.tensor([900, 300]),
                                  make_positions(cfg, 2, 16, 16)))
    table = {}
    for mname, (model, inputs) in models.items():
        with torch.no_grad():
            ref = model(*inputs)
        for fam, pats in families.items():
            for recipe in ("int8wo", "fp8wo"):
                m = copy.deepcopy(model)
                names = quantize_(m, recipe, module_filter=Only(pats))
                with torch.no_grad():
                    got = sqnr_db(ref, m(*inputs))
                table.setdefault(fam, {})[f"{mname} {recipe}"] = round(got, 1)
                table[fam][f"{mname} layers"] = len(names)
            print(mname, fam, table[fam], flush=True)
    doc = {"what": "SQNR (dB) of the transformer output vs fp32 with one layer family quantized",
           "models": {"tiny": "tests/checkpoints.py 'rope' seed 0", "2b block": "2b shape, 1 block, default init"},
           **_env("cpu", "float32"), "sqnr_db": table}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


# ------------------------------------------------------------------------------- driver
def _env(device: str, dtype: str) -> dict:
    import importlib.metadata as md

    def v(d):
        try:
            return md.version(d)
        except md.PackageNotFoundError:
            return None

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=HERE).stdout)
    cpu = cpu_model()
    return {"device": device, "cpu": cpu, "cores": os.cpu_count(), "dtype": dtype, "commit": commit,
            "dirty_tree": dirty, "python": platform.python_version(),
            "versions": {d: v(d) for d in ("torch", "torchao", "optimum-quanto", "bitsandbytes", "safetensors")}}


def _run_child(*args: str) -> dict:
    return run_child(__file__, *args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default=DEFAULT_RECIPES)
    ap.add_argument("--workdir", default="/tmp/cogvx-bench-quantize")
    ap.add_argument("--per-layer", action="store_true")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.workdir)
    if args.child:
        mode, rest = args.child[0], args.child[1:]
        res = {"make": lambda: child_make(work),
               "fp": lambda: child_load_fp(work, rest[0] if rest else None, work / rest[0] if rest else None),
               "q": lambda: child_load_q(work, rest[0])}[mode]()
        child_result(res)
        return
    RESULTS.mkdir(exist_ok=True)
    if args.per_layer:
        per_layer(RESULTS / "per_layer_sqnr.json")
        return

    from cogvx.engine.models.presets import PRESETS

    cfg = PRESETS["2b"].transformer
    if not (work / "fp" / "transformer" / "config.json").is_file():
        t = time.perf_counter()
        made = _run_child("make")
        print(f"wrote random bf16 2b transformer ({made['params'] / 1e9:.3f} G params) in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
    fp_file = work / "fp" / "transformer" / "diffusion_pytorch_model.safetensors"
    bf16_bytes = fp_file.stat().st_size
    rows = {"bf16 (load only)": {**_run_child("fp"), "weight_bytes": bf16_bytes}}
    print("bf16", rows["bf16 (load only)"], flush=True)
    for r in args.recipes.split(","):
        a = _run_child("fp", r)
        b = _run_child("q", r)
        rows[r] = {"load_fp_and_quantize": a, "load_quantized": b, "weight_bytes": b["weight_bytes"],
                   "bytes_vs_bf16": b["weight_bytes"] / bf16_bytes,
                   "peak_over_weight_bytes": b["peak_over_baseline"] / b["weight_bytes"]}
        # The bar for a quantized load: peak RSS over the baseline below 1.3x the checkpoint's own bytes.
        rows[r]["peak_below_1.3x_weights"] = rows[r]["peak_over_weight_bytes"] < 1.3
        print(r, json.dumps(rows[r]), flush=True)
    doc = {"what": "2b transformer, random bf16 weights: weight bytes, and peak RSS over the process baseline and "
                   "wall time of (a) loading bf16 + quantizing vs (b) loading the quantized checkpoint",
           **_env("cpu", "bfloat16"),
           "shapes": {"preset": "2b", "num_layers": cfg.num_layers, "inner_dim": cfg.inner_dim,
                      "text_embed_dim": cfg.text_embed_dim, "time_embed_dim": cfg.time_embed_dim},
           "notes": "safetensors tensors are memory-mapped: every stored byte is read once after loading (touch) "
                    "so the RSS holds the whole model; the page cache may be warm (files just written)",
           "results": rows}
    out = RESULTS / f"quantize-{doc['commit'][:10]}.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\n2b transformer, CPU ({doc['cpu']}, {doc['cores']} cores), bf16, commit {doc['commit'][:10]}")
    print(f"{'recipe':<12} {'weights GB':>10} {'vs bf16':>8} | {'load q: s':>9} {'peak GB':>8} {'peak/w':>7} | "
          f"{'bf16+quantize: s':>16} {'peak GB':>8}")
    b0 = rows["bf16 (load only)"]
    print(f"{'bf16':<12} {bf16_bytes / GB:>10.3f} {1:>8.3f} | {b0['load_s']:>9.1f} "
          f"{b0['peak_over_baseline'] / GB:>8.2f} {b0['peak_over_baseline'] / bf16_bytes:>7.2f} | {'-':>16} {'-':>8}")
    for r in args.recipes.split(","):
        x = rows[r]
        a, b = x["load_fp_and_quantize"], x["load_quantized"]
        print(f"{r:<12} {x['weight_bytes'] / GB:>10.3f} {x['bytes_vs_bf16']:>8.3f} | {b['load_s']:>9.1f} "
              f"{b['peak_over_baseline'] / GB:>8.2f} {x['peak_over_weight_bytes']:>7.2f} | {a['total_s']:>16.1f} "
              f"{a['peak_over_baseline'] / GB:>8.2f}")
    bad = [r for r in args.recipes.split(",") if not rows[r]["peak_below_1.3x_weights"]]
    print("quantized loads peak below 1.3x their weight bytes: " + ("yes" if not bad else f"NO for {bad}"))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
