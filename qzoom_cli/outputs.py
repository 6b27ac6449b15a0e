"""Where results go: checked before any model work, and owned by one writer at a time.

A run that fails to write only after hours of answering loses them, so every command checks
its output locations first; and two runs appending to one file interleave and orphan each
other's atomic rewrites, so a batch holds a lock on its output for as long as it writes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import UsageError


def is_stream(path: Path) -> bool:
    """Whether `path` (through links) is a character device or a pipe: written in place, as they come
    (`-o /dev/null`, `/dev/stdout`, a FIFO), never replaced by a file."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def file_target(path: Path) -> Path:
    """Where a result file really is: a link's target (replaced there, the link kept)."""
    return Path(os.path.realpath(path))


def check_output_file(path: Path, *, inputs: tuple[str | Path, ...] = ()) -> None:
    """A file qzoom may create or replace (or a device or pipe it writes in place): in an existing
    writable folder, not a folder, a block device or a socket, and none of the command's inputs,
    however linked (results must never replace what they were made from)."""
    if path.is_dir():
        raise UsageError(f"output {path} is a folder; name a file")
    for source in inputs:
        if str(source) != "-" and _same_file(path, Path(source)):
            raise UsageError(f"output {path} is also an input of this command ({source}); write the results "
                             "elsewhere")
    if is_stream(path):
        return
    if path.exists() and not path.is_file():
        raise UsageError(f"output {path} is not a regular file, a device or a pipe; name a file")
    check_output_folder(file_target(path).parent, create=False)
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"output {path} is read-only")


def check_results_kept(path: Path, resume: bool, force: bool) -> None:
    """A result file holding results is continued (--resume) or replaced (--force), never mixed
    with a new run's or overwritten unasked."""
    if not (resume or force) and path.is_file() and path.stat().st_size > 0:
        raise UsageError(f"{path} already has results: --resume to continue it or --force to overwrite it")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is missing (or unreadable): not the same existing file
        return False


def check_output_folder(path: Path, *, create: bool = True) -> None:
    """A folder qzoom writes into: it must end up writable. When `create`, a missing one is made in
    a folder that exists (one level, as `mkdir` makes it: a mistyped path is refused, not built)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"output folder {path} is a file")
    if not path.exists():
        if not create or not path.absolute().parent.is_dir():
            raise UsageError(f"output folder {path} does not exist" +
                             (f" (nor does {path.absolute().parent})" if create else ""))
        try:
            path.mkdir()
        except OSError as exc:
            raise UsageError(f"cannot create output folder {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"output folder {path} is not writable")


@contextmanager
def sole_writer(path: Path) -> Iterator[None]:
    """Hold the lock of `path` (its real location, so links to one file share it) while writing it;
    a second writer is refused at once. The lock file stays: removed on release, a writer that had
    opened it just before would lock the removed file while a third locked a new one."""
    path = file_target(path)
    lock_path = path.with_name(path.name + ".lock")
    try:  # the lock file must be creatable: filelock would wait on a folder that refuses it
        os.close(os.open(lock_path, os.O_WRONLY | os.O_CREAT, 0o644))
    except OSError as exc:
        raise UsageError(f"cannot write next to {path} ({exc.strerror or exc}); choose another output") from None
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
