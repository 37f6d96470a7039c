"""``cogvx recipes``: which quantization recipes this machine runs, and why not. Imports only
cogvx.quantize's registry and torch (not the backends, not transformers): it answers in a few seconds."""

from __future__ import annotations

import argparse
import json

import torch

from cogvx.kernels import cpu_kernel_variant, cpu_kernels_unavailable
from cogvx.quantize import RECIPES, availability

from ..runtime.devices import default_device, resolve_device

__all__ = ["run", "recipes_table"]


def recipes_table(device: str | torch.device | None = None) -> list[dict]:
    """One row per recipe: name, backend, description, runs_here, reason. Backends are looked up, not
    imported (importing all three takes seconds)."""
    try:
        dev = torch.device(device or default_device())
    except (RuntimeError, TypeError):
        dev = resolve_device(device)  # raises the clear error
    rows = []
    for r in RECIPES.values():
        ok, why = availability(r, dev, import_backend=False)
        if ok and dev.type == "cpu":  # what its C kernels do here first, then the recipe's CPU note
            why = "; ".join(x for x in (_cpu_kernels_note(r.runtime), why) if x)
        rows.append({"name": r.name, "backend": r.backend, "description": r.description, "runs_here": ok,
                     "reason": why})
    return rows


def _cpu_kernels_note(runtime) -> str:
    """What a recipe's C kernels do on this CPU (which build runs, or what runs instead): "" for none."""
    notes = []
    for kernel, wanted, name, instead in (
            ("attention", runtime.attention_kernel == "int8-cpu", "int8 attention", "runs with SDPA attention"),
            ("gelu_quant", runtime.fused_gelu_quant, "GELU + quantization", "runs the GELU unfused")):
        if not wanted:
            continue
        missing = cpu_kernels_unavailable(build=False, kernel=kernel)
        if missing:  # the recipe still runs: its int8 linears, with the PyTorch path for this part
            notes.append(f"{instead}: its {name} kernel cannot run here ({missing})")
        else:
            notes.append(f"{name} kernel: {cpu_kernel_variant(kernel)}")
    return "; ".join(notes)


def run(args: argparse.Namespace) -> int:
    device = args.device or default_device()
    rows = recipes_table(device)
    if args.json:
        print(json.dumps({"device": str(device), "recipes": rows}, indent=1))
        return 0
    w = max(len(r["name"]) for r in rows)
    print(f"quantization recipes on {device} (torch {torch.__version__})")
    print(f"{'recipe':<{w}}  {'backend':<7}  {'runs here':<9}  description / why not")
    for r in rows:
        note = r["description"] if r["runs_here"] else r["reason"]
        if r["runs_here"] and r["reason"]:
            note += f" [{r['reason']}]"
        print(f"{r['name']:<{w}}  {r['backend']:<7}  {'yes' if r['runs_here'] else 'no':<9}  {note}")
    return 0
