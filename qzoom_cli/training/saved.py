"""Files a training run leaves for its rerun: written whole or not at all, and read back with any
damage (a truncation, a half-written file from a full disk, an edit) named along with what to do."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from ..errors import DamagedFile, ModelError, OutputError, UsageError, first_line

# what loading a damaged JSON, safetensors or torch file raises (a damaged adapter: ModelError)
_DAMAGE = (OSError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError, RuntimeError,
           pickle.UnpicklingError, SafetensorError, ModelError)


@contextmanager
def reading_back(path: Path, remedy: str) -> Iterator[None]:
    """Run the reading (and unpacking) of `path`; a failure becomes one line naming it and `remedy`."""
    try:
        yield
    except FileNotFoundError:
        raise DamagedFile(f"{path} is missing: {remedy}") from None
    except _DAMAGE as exc:
        reason = exc.message if isinstance(exc, ModelError) else f"{type(exc).__name__}: {exc}"
        raise DamagedFile(f"{path} cannot be read back ({reason}): {remedy}") from None


def read_json(path: Path, remedy: str) -> dict[str, Any]:
    """A JSON object this package wrote."""
    with reading_back(path, remedy):
        data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise DamagedFile(f"{path} holds {type(data).__name__}, not the object qzoom wrote: {remedy}")
    return data


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Run a write of `path`: one that fails (a full disk, a read-only or vanished folder) stops the
    run with one line; what was already written whole stays, and the same command resumes from it."""
    try:
        yield
    except (OSError, SafetensorError, RuntimeError) as exc:  # torch.save's failed write: a RuntimeError
        raise OutputError(f"could not write {path} ({_write_failure(path, exc)}): make room or fix the folder, then "
                          "rerun the same command; it resumes from the work already saved") from None


def _write_failure(path: Path, exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    folder = next((f for f in path.absolute().parents if f.is_dir()), None)
    if folder is not None and shutil.disk_usage(folder).free < 1 << 20:  # torch says only "unexpected pos"
        return "no space left on device"
    return first_line(exc)


def write_whole(path: Path, text: str) -> None:
    """Write `text` beside `path`, then rename it over: a crash or a full disk leaves the old file or none
    (each process of a multi-GPU run through its own temporary file)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with writing(path):
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)


def check_out_folder(out: Path, model: str | None) -> None:
    """Refuse, before any work, an --output that training could not write its folder into, or the
    model's own folder (the adapter's files would mix with the checkpoint's)."""
    existing = next(folder for folder in (out, *out.absolute().parents) if folder.exists())
    if not existing.is_dir():
        raise UsageError(f"--output {out}: {existing} is a file; name a folder for the adapter")
    if model is not None and out.is_dir() and Path(model).expanduser().is_dir() \
            and os.path.samefile(out, Path(model).expanduser()):
        raise UsageError(f"--output {out} is the model's own folder; write the adapter to a folder of its own")
    try:
        with tempfile.TemporaryFile(dir=existing):  # the kernel's answer: permissions, read-only mounts, root
            pass
    except OSError as exc:
        raise UsageError(f"--output {out}: cannot write in {existing} ({exc.strerror}); name a folder you can "
                         "write") from None
