"""Where cogvx keeps what it builds once and reuses: the demo model, the compile cache."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """$COGVX_CACHE, else $XDG_CACHE_HOME/cogvx, else ~/.cache/cogvx."""
    root = os.environ.get("COGVX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cogvx")
    return Path(root)
