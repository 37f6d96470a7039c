"""``cogvx quantize``: write a quantized copy of a checkpoint."""

from __future__ import annotations

import argparse

from cogvx.quantize import parse_recipe_spec

from ..pipelines.quantized_export import export_quantized
from ..runtime.devices import default_device

__all__ = ["run"]


def _quantize(args: argparse.Namespace) -> int:
    out = export_quantized(args.model, parse_recipe_spec(args.recipe), args.out,
                           device=args.device or default_device(), dtype=args.dtype, fuse_qkv=args.fuse_qkv,
                           overwrite=args.overwrite)
    print(f"wrote {out} (unquantized weight files hard-linked from {args.model} where the filesystem allows; "
          "everything else copied)")
    return 0


def run(args: argparse.Namespace) -> int:
    return _quantize(args)
