"""Where results go: checked before any model work, and owned by one writer at a time.

A run that fails to write only after hours of answering loses them, so every command checks
its output locations first; and two runs appending to one file interleave and orphan each
other's atomic rewrites, so a batch holds a lock on its output for as long as it writes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import UsageError


def check_output_file(path: Path, *, inputs: tuple[str | Path, ...] = ()) -> None:
    """A file qzoom may create or replace: in an existing writable folder, not a folder itself,
    and none of the command's inputs (results must never replace what they were made from)."""
    if path.is_dir():
        raise UsageError(f"output {path} is a folder; name a file")
    for source in inputs:
        if str(source) != "-" and Path(source).exists() and Path(source).resolve() == path.resolve():
            raise UsageError(f"output {path} is also an input of this command; write the results elsewhere")
    check_output_folder(path.parent, create=False)
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"output {path} is read-only")


def check_output_folder(path: Path, *, create: bool = True) -> None:
    """A folder qzoom writes into (made when `create` and missing): it must end up writable."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"output folder {path} is a file")
    if not path.exists():
        if not create:
            raise UsageError(f"output folder {path} does not exist")
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise UsageError(f"cannot create output folder {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"output folder {path} is not writable")


@contextmanager
def sole_writer(path: Path) -> Iterator[None]:
    """Hold `path`'s lock file while writing it; a second writer is refused at once."""
    lock_path = path.with_name(path.name + ".lock")
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UsageError(f"{path} is being written by another qzoom run (lock {lock_path}); wait for it to "
                         "finish or choose another output") from None
    try:
        yield
    finally:
        lock.release()
        lock_path.unlink(missing_ok=True)
