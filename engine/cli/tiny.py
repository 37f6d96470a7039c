"""``cogvx make-tiny``: write the tiny random-weight checkpoint to a directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..dev.tiny import make_tiny_checkpoint

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    out = make_tiny_checkpoint(Path(args.out), seed=args.seed, task=args.task)
    print(f"wrote a tiny random-weight CogVideoX checkpoint ({args.task}) to {out}")
    return 0
