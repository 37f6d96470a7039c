"""Command-line pieces for the ``cogvx`` entry point: ``cogvx recipes``, ``cogvx quantize`` and the
``--recipe`` option of ``cogvx generate``. ``engine/cli.py`` wires them in::

    sub = parser.add_subparsers(dest="command")
    add_recipes_parser(sub); add_quantize_parser(sub)
    add_recipe_argument(generate_parser)   # then Engine.load(..., recipe=args.recipe)

Standalone: ``python -m cogvx.quantize.cli recipes``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .recipes import RECIPES, RecipeError, availability, parse_recipe_spec

__all__ = [
    "parse_recipe_arg", "add_recipe_argument", "add_recipes_parser", "add_quantize_parser", "recipes_table",
    "cmd_recipes", "cmd_quantize", "main",
]


def parse_recipe_arg(text: str) -> dict[str, str]:
    """argparse ``type=`` for ``--recipe``: ``int8wo`` (the transformer) or
    ``transformer=fp8dq-row,text_encoder=int8wo`` -> {component: recipe name}."""
    try:
        return parse_recipe_spec(text)
    except RecipeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_recipe_argument(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument(
        "--recipe", type=parse_recipe_arg, required=required, default=None, metavar="NAME|COMP=NAME,...",
        help="quantization recipe for the transformer, or component=recipe pairs "
             f"(transformer=fp8dq-row,text_encoder=int8wo); one of: {', '.join(RECIPES)}. See `cogvx recipes`.",
    )


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def recipes_table(device: str | torch.device | None = None) -> list[dict]:
    """One row per recipe: name, backend, description, runs_here, reason."""
    dev = torch.device(device or _default_device())
    rows = []
    for r in RECIPES.values():
        ok, why = availability(r, dev)
        rows.append({"name": r.name, "backend": r.backend, "description": r.description, "runs_here": ok,
                     "reason": why})
    return rows


def cmd_recipes(args: argparse.Namespace) -> int:
    device = args.device or _default_device()
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


def cmd_quantize(args: argparse.Namespace) -> int:
    from .serialization import export_quantized

    out = export_quantized(args.model, args.recipe, args.out, device=args.device or _default_device(),
                           dtype=args.dtype, fuse_qkv=args.fuse_qkv, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def add_recipes_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("recipes", help="list quantization recipes and whether this machine runs them")
    p.add_argument("--device", default=None, help="device to check (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_recipes)
    return p


def add_quantize_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("quantize", help="write a quantized copy of a checkpoint (diffusers layout)")
    p.add_argument("--model", required=True, help="full-precision checkpoint directory or cached hub id")
    add_recipe_argument(p, required=True)
    p.add_argument("--out", required=True, help="output directory (written atomically; must not exist)")
    p.add_argument("--device", default=None, help="device to quantize on (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16: the dtype the quantized "
                   "checkpoint runs in (load it with the same dtype)")
    p.add_argument("--fuse-qkv", action="store_true", help="fuse q/k/v into one GEMM before quantizing")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_quantize)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cogvx")
    sub = parser.add_subparsers(dest="command", required=True)
    add_recipes_parser(sub)
    add_quantize_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (RecipeError, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
