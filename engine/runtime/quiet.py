"""Keep the quantization libraries' import-time noise off the user's terminal.

Importing transformers' T5 imports torchao, which logs one "Failed to load .../_C_*.so" line per
CUDA-only kernel library it cannot load, and makes torch log a deprecation line per Enum it
registers ("... is an Enum subclass and is now natively supported by torch.compile ..."); every cogvx
command printed four such lines before its own output. bitsandbytes logs "MatMul8bitLt: inputs will be
cast from ... to float16" on every int8 matmul (every layer of every step) and, on the CPU, that an
optional kernel package is missing.

Each line is dropped (or let through once) by a ``logging.Filter`` on the logger that emits it: the
libraries' loggers and classes are otherwise untouched, and every other record they log still shows.
The torchao library-load failures are dropped only where no CUDA device is present (those libraries hold
CUDA kernels only); on a GPU machine they stay visible, since there they mean a broken install.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["quiet_library_logs", "DropRecords"]


class DropRecords(logging.Filter):
    """Drops records whose message contains every one of ``needles``; ``keep_first`` lets the first through."""

    def __init__(self, *needles: str, keep_first: bool = False):
        super().__init__()
        self.needles = needles
        self.keep_first = keep_first
        self.seen = 0

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else str(record.msg)
        if not all(n in msg for n in self.needles):
            return True
        self.seen += 1
        return self.keep_first and self.seen == 1


# logger name -> filter; messages matched on the unformatted text (cheap: no argument formatting)
_FILTERS = {
    "torch.utils._pytree": DropRecords("is an Enum subclass and is now natively supported by torch.compile"),
    "bitsandbytes.autograd._functions": DropRecords("MatMul8bitLt: inputs will be cast from", keep_first=True),
    "bitsandbytes.backends.cpu.ops": DropRecords("Failed to load CPU gemm_4bit_forward from kernels-community"),
}
_done = False


def quiet_library_logs() -> None:
    """Install the filters (once per process). Call before transformers, torchao or bitsandbytes is imported (``cogvx.engine`` does, on import)."""
    global _done
    if _done:
        return
    _done = True
    for name, flt in _FILTERS.items():
        logging.getLogger(name).addFilter(flt)
    logging.getLogger("torchao").addFilter(_CudaOnlyLibraryFailures("Failed to load", ".so"))


class _CudaOnlyLibraryFailures(DropRecords):
    """torchao's CUDA-kernel library failures, dropped only where no CUDA device is present (decided at the
    first record: torch is imported by then, since torchao imports it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            return True
        return super().filter(record)
