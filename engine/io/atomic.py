"""Writes that never leave half a result behind: a directory or a file is built under a unique
temporary sibling name and renamed into place at the end; a failure removes the temporary.

Renaming a finished directory onto a path that another process has meanwhile filled fails, so two
writers of one new directory cannot both succeed. Temporaries of a process that died are removed
by the next writer to the same place. New files and directories get the user's umask.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

__all__ = ["atomic_directory", "atomic_file", "umask_mode", "apply_umask", "temporary_sibling"]


def umask_mode(base: int = 0o777) -> int:
    """``base`` with the process umask applied (mkstemp/mkdtemp create 0600/0700 regardless of it)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def apply_umask(*paths: Path) -> None:
    """Give files written by libraries that create them 0600 (safetensors' ``save_file``) the mode the
    user's umask gives any new file."""
    mode = umask_mode(0o666)
    for p in paths:
        os.chmod(p, mode)


def temporary_sibling(path: Path, kind: str = "partial") -> Path:
    """A unique hidden name next to ``path``: ``.<name>.<kind>-<pid>-<random>``."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove_stale(out: Path) -> None:
    """Remove ``.<name>.partial-<pid>-*`` siblings whose writing process no longer runs."""
    for p in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(p.name.rsplit(".partial-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        except PermissionError:  # another user's live process
            pass


class atomic_directory:
    """``with atomic_directory(out) as tmp:`` write into ``tmp``; on success ``tmp`` becomes ``out``
    (one rename), on any error (or KeyboardInterrupt) ``tmp`` is removed and ``out`` is untouched.

    Without ``overwrite`` an existing non-empty ``out`` is refused up front, and again atomically at
    the rename (another writer may have finished first)."""

    def __init__(self, out: Path, overwrite: bool = False, replaceable: Callable[[Path], str | None] | None = None):
        self.out = Path(out)
        self.overwrite = overwrite
        self.replaceable = replaceable
        here = Path.cwd().resolve()
        if self.out.resolve() == here or self.out.resolve() in here.parents:
            raise ValueError(f"{self.out} is the current directory{' or above it' if self.out.resolve() != here else ''}, "
                             f"which cannot be replaced; name a new directory such as {self.out / 'checkpoint'}")
        if self.out.exists() and not self.out.is_dir():
            raise FileExistsError(f"{self.out} exists and is a file; choose a directory path")
        if self.out.exists() and any(self.out.iterdir()) and not overwrite:
            how = " or pass overwrite=True (--overwrite)" if replaceable is not None else " (or remove this one)"
            raise FileExistsError(f"{self.out} already exists and is not empty; choose a new directory{how}")
        self._check_replaceable()
        self.tmp = temporary_sibling(self.out)

    def _check_replaceable(self) -> None:
        """overwrite replaces only an empty folder or one that ``replaceable`` recognises as this tool's."""
        if not (self.overwrite and self.replaceable is not None and self.out.is_dir() and any(self.out.iterdir())):
            return
        why = self.replaceable(self.out)
        if why is not None:
            raise FileExistsError(f"{self.out} is not empty and not what this command writes ({why}); overwrite "
                                  "replaces only an empty folder or one this command wrote, so nothing was changed: "
                                  "choose a new directory, or empty or remove this one yourself")

    def __enter__(self) -> Path:
        parent = self.out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(self.out)
            self.tmp.mkdir(mode=umask_mode())
        except OSError as e:
            raise OSError(e.errno, f"cannot write in {parent}: {e.strerror}; choose a writable output directory") from e
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        try:
            self._check_replaceable()  # again: the folder may have been filled while this one was written
        except FileExistsError:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        old = None
        try:
            if self.overwrite and self.out.exists():
                old = temporary_sibling(self.out, "old")
                os.replace(self.out, old)
            os.rename(self.tmp, self.out)  # fails if another writer filled `out` meanwhile
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if old is not None and not self.out.exists():
                os.replace(old, self.out)
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FileExistsError(f"{self.out} was written by another process while this one worked; "
                                      "nothing was changed: choose a new directory") from None
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


@contextlib.contextmanager
def atomic_file(path: Path):
    """``with atomic_file(p) as tmp:`` write ``tmp`` (a unique sibling name with p's suffix); on success
    it replaces ``p``, on failure it is removed. Two writers never share a temporary."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
