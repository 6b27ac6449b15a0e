"""Running a manifest: grouped by document, ordered output, resumable, shardable.

- Rows about the same document (file + password) are answered together: the document is
  opened once and each page rendered and encoded once for all their questions, then closed,
  so memory stays flat over any number of rows. (page, question) pairs are batched across
  documents, `--batch-size` at a time.
- Records are written in manifest order as soon as every earlier row is done, one JSON line
  each, flushed; an interrupted run leaves a valid JSONL file.
- `--resume` keeps the records already `ok` (or `truncated`), drops error records and a torn
  last line, and runs the rest; a completed run rewrites the file in manifest order.
- Under several processes (accelerate) each takes whole documents round-robin, writes its
  own shard file, and the main process merges them into one ordered file.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from .api import AskRequest, QZoom
from .budget import VisualBudget
from .documents import open_document
from .errors import OutputError, QZoomError, ResumeMismatch, UsageError
from .manifest import ManifestRow, RowError
from .options import SHORT_ANSWER_INSTRUCTION, ZoomSettings, changed_settings
from .outputs import check_results_kept, file_target, is_stream, sole_writer
from .results import ErrorInfo, Result, json_text

DONE_STATUSES = ("ok", "truncated")


@dataclass
class RunOptions:
    zoom: ZoomSettings
    budget: VisualBudget | None = None
    dpi: int = 200
    max_new_tokens: int | None = None  # None: the model's default
    instruction: str = SHORT_ANSWER_INSTRUCTION
    batch_size: int | str = 1
    verbose: bool = False
    settings: dict | None = None  # what the answers depend on, written into each record as `run`


def error_result(row: ManifestRow | RowError, code: str, message: str) -> Result:
    return Result(id=row.id, status="error", input=None, question=row.question,
                  error=ErrorInfo(code=code, message=message))


def document_groups(rows: Iterable[ManifestRow]) -> list[list[ManifestRow]]:
    """Rows grouped by document, groups in order of first appearance, rows in manifest order."""
    groups: dict[tuple, list[ManifestRow]] = {}
    for row in rows:
        groups.setdefault(row.document_key, []).append(row)
    return list(groups.values())


def shard(groups: list[list[ManifestRow]], rank: int, world: int) -> list[list[ManifestRow]]:
    """This process's share: whole documents, dealt round-robin."""
    return groups[rank::world]


def answer_rows(qz: QZoom | None, rows: list[ManifestRow | RowError], options: RunOptions,
                emit: Callable[[int, Result], None]) -> None:
    """Answer every row, calling `emit(row.index, result)` as each finishes (bad rows included).

    Questions are batched across documents (`options.batch_size` (page, question) pairs at a
    time); each document is opened when its first rows come up and closed once they are done.
    """
    for row in rows:
        if isinstance(row, RowError):
            emit(row.index, error_result(row, row.code, row.message))
    if all(isinstance(row, RowError) for row in rows):
        return  # nothing to ask (and no model was loaded to ask it)
    open_asks: dict[int, int] = {}  # id(document) -> its requests not yet answered

    def requests() -> Iterator[AskRequest]:
        for group in document_groups(r for r in rows if isinstance(r, ManifestRow)):
            first = group[0]
            try:
                doc = open_document(first.file, password=first.password, dpi=options.dpi)
            except QZoomError as exc:
                for row in group:
                    emit(row.index, error_result(row, exc.code, exc.message))
                continue
            by_pages: dict[str | None, list[ManifestRow]] = {}
            for row in group:
                by_pages.setdefault(row.pages, []).append(row)
            open_asks[id(doc)] = len(by_pages)
            for pages, page_rows in by_pages.items():
                yield AskRequest(doc, [r.question for r in page_rows], [r.id for r in page_rows], pages,
                                 handle=page_rows)

    answers = qz.ask_many(requests(), budget=options.budget, zoom=options.zoom, max_new_tokens=options.max_new_tokens,
                          batch_size=options.batch_size, instruction=options.instruction)
    for request, outcome in answers:
        page_rows = request.handle
        results = outcome if isinstance(outcome, list) else \
            [error_result(r, *error_fields(outcome, options.verbose)) for r in page_rows]
        for row, result in zip(page_rows, results, strict=True):  # pragma: no mutate (one result per row, always)
            emit(row.index, result)
        open_asks[id(request.doc)] -= 1
        if open_asks[id(request.doc)] == 0:
            request.doc.close()


def error_fields(exc: BaseException, verbose: bool) -> tuple[str, str]:
    """(code, message) of a request's failure; a bug on one document must not lose the rest of the batch."""
    if isinstance(exc, QZoomError):
        return exc.code, exc.message
    if verbose:
        traceback.print_exception(exc)
    if isinstance(exc, torch.OutOfMemoryError):
        return "oom", "out of GPU memory"
    return "internal", f"{type(exc).__name__}: {exc}"


class OrderedWriter:
    """Writes records in the order of `indices`, each as soon as all earlier ones are written (a
    stream that cannot be rewritten: stdout, a device, a pipe). When the stream fails (disk full),
    the rest go to `fallback` instead and `write_error` says why; `finish` writes the ones still
    waiting when a run stops early. Nothing answered is lost."""

    vanished = False  # a stream has no name to vanish from

    def __init__(self, stream: TextIO, indices: list[int], fallback: TextIO | None = None):
        self.stream = stream
        self.fallback = fallback
        self.write_error: OSError | None = None
        self.order = sorted(indices)
        self.pending: dict[int, str] = {}
        self.next = 0

    def add(self, index: int, line: str) -> None:
        self.pending[index] = line
        while self.next < len(self.order) and self.order[self.next] in self.pending:
            self._write(self.pending.pop(self.order[self.next]) + "\n")
            self.next += 1

    def finish(self) -> None:
        """The records finished out of order, ahead of earlier ones that never came (a run stopped early)."""
        for index in sorted(self.pending):
            self._write(self.pending.pop(index) + "\n")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError as exc:
            if self.fallback is None or self.stream is self.fallback:
                raise
            self.write_error, self.stream = exc, self.fallback
            self.stream.write(text)
            self.stream.flush()

    @property
    def complete(self) -> bool:
        return self.next == len(self.order)


class AppendingWriter:
    """Appends each record to a result file as it finishes, so a run stopped at any point keeps every
    finished answer (the file is put in manifest order at the end). A failing write (disk full)
    sends that record and every later one to `fallback`; before each write it also checks the file
    is still the one it opened: deleted, or its folder moved, every record it held (`carried` ones
    included) goes to `fallback` too (`vanished`). `write_error` says why."""

    def __init__(self, path: Path, fallback: TextIO, carried: list[str] = ()):
        self.path = path
        self.fallback = fallback
        self.write_error: OSError | None = None
        self.vanished = False
        self.lines = list(carried)
        self.stream: TextIO = open(path, "a", encoding="utf-8")
        self.identity = self._identity()

    def _identity(self) -> tuple[int, int] | None:
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return info.st_dev, info.st_ino

    def intact(self) -> bool:
        """Whether the path still names the file being written."""
        return self._identity() == self.identity

    def add(self, index: int, line: str) -> None:
        if self.stream is not self.fallback and not self.intact():
            self.lose_file()
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except OSError as exc:
            if self.stream is self.fallback:
                raise
            self.write_error = exc
            self.close()
            self.stream = self.fallback
            self.stream.write(line + "\n")
            self.stream.flush()
        self.lines.append(line)

    def lose_file(self) -> None:
        """The file is gone: what it held goes to the fallback, and so does the rest."""
        self.write_error = self.write_error or OSError(errno.ENOENT, "deleted or moved while the run wrote it")
        self.vanished = True
        self.close()
        self.stream = self.fallback
        for line in self.lines:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not self.fallback:
            try:
                self.stream.close()
            except OSError as exc:  # the last buffered records: on the file's disk, or lost to it
                self.write_error = self.write_error or exc

    def finish(self) -> None:
        """Closed, the file checked once more: gone since the last record, what it held goes to the fallback."""
        self.close()
        if self.write_error is None and not self.intact():
            self.lose_file()


def read_records(path: Path) -> list[dict]:
    """The parsable records of a JSONL result file, line by line on "\\n" only (a record's text may
    hold other line separators); a torn last line (crash mid-write) and lines that are not records
    are skipped. A file that is not UTF-8 text is no result file: refused, never rewritten."""
    if not path.exists():
        return []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a qzoom result file (not UTF-8 text); --force to overwrite it, or -o "
                         "another file") from None
    except OSError as exc:
        raise OutputError(f"cannot read {path} ({exc.strerror or exc})") from None
    records = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            records.append(record)
    return records


def write_records(path: Path, records: list[dict]) -> None:
    """Replace `path` with these records, atomically (a crash leaves the old file or the new one)."""
    temporary = path.with_name(path.name + ".tmp")  # pragma: no mutate (its name is never seen)
    with open(temporary, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json_text(record) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


def kept_for_resume(path: Path, ids: set[str]) -> dict[str, dict]:
    """Finished records of this manifest found in `path`, by id (errors are retried)."""
    kept = {}
    for record in read_records(path):
        if record.get("id") in ids and record.get("status") in DONE_STATUSES:
            kept[record["id"]] = record
    return kept


def check_same_settings(records: Iterable[dict], settings: dict | None, output: Path) -> None:
    """Refuse to resume records made with other settings: one file, one model and one set of options."""
    now = settings or {}
    for record in records:
        before = record.get("run")
        if before != settings:
            changed = changed_settings(before, now) if before else ["(not recorded)"]
            raise ResumeMismatch(f"{output} holds answers made with other settings ({', '.join(changed)}); resume with "
                             "the same options, or --force to start afresh, or -o another file")


def ordered(records: Iterable[dict], order: dict[str, int]) -> list[dict]:
    """One record per manifest id (the last seen wins), in manifest order."""
    latest = {r["id"]: r for r in records if r.get("id") in order}
    return sorted(latest.values(), key=lambda r: order[r["id"]])


@dataclass
class RunSummary:
    """Rows of this run: `done` of `total` (`failed` among them, `zoomed` of the answered ones), and
    `kept`, finished by an earlier run."""

    total: int = 0
    done: int = 0
    failed: int = 0
    zoomed: int = 0
    kept: int = 0

    def line(self) -> str:
        kept = f", {self.kept} kept from before" if self.kept else ""
        return f"{self.done - self.failed} rows answered ({self.zoomed} zoomed), {self.failed} failed{kept}"


def shard_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.rank{rank}")


def run_manifest(load: Callable[[], QZoom], rows: list[ManifestRow | RowError], options: RunOptions, *,
                 output: Path | None, stdout: TextIO, resume: bool = False, force: bool = False,
                 rank: int = 0, world: int = 1, barrier: Callable[[], None] = lambda: None,
                 on_result: Callable[[Result], None] = lambda result: None,
                 on_start: Callable[[int], None] = lambda total: None) -> RunSummary:
    """Answer the rows not already finished, writing records to `output` (or `stdout`).

    `load` builds the model only if some row needs it. A result file gets each record as it
    finishes and is put in manifest order at the end; a device or pipe (`-o /dev/stdout`, a FIFO)
    is written in place, in manifest order, like stdout. With `world` > 1 this is one of several
    processes (`barrier` waits for all of them); rank 0 merges their shard files at the end and
    holds the output's lock throughout, so a second run on the same file is refused.
    """
    if output is not None and is_stream(output):
        if resume or world > 1:
            raise UsageError(f"{output} is a device or a pipe, written in place: --resume and several processes "
                             "need a result file")
        stream = open_stream(output)
        try:
            return _run_manifest(load, rows, options, None, (stream, str(output)), stdout, resume, force, rank,
                                 world, barrier, on_result, on_start)
        finally:
            try:
                stream.close()
            except OSError as exc:  # with a failure already being reported, the same failure again
                if sys.exc_info()[0] is None:
                    raise OutputError(f"could not write {output} ({exc.strerror or exc})") from None
    target = file_target(output) if output is not None else None
    with sole_writer(target) if target is not None and rank == 0 else nullcontext():
        return _run_manifest(load, rows, options, target, (stdout, "stdout"), stdout, resume, force, rank, world,
                             barrier, on_result, on_start)


def _run_manifest(load: Callable[[], QZoom], rows: list[ManifestRow | RowError], options: RunOptions,
                  output: Path | None, sink: tuple[TextIO, str], stdout: TextIO, resume: bool, force: bool, rank: int,
                  world: int, barrier: Callable[[], None], on_result: Callable[[Result], None],
                  on_start: Callable[[int], None]) -> RunSummary:
    order = {row.id: row.index for row in rows}
    kept: dict[str, dict] = {}
    if output is not None:
        check_results_kept(output, resume, force)
        if rank == 0:  # fold an interrupted run's shards in (or start afresh), before anyone reads
            stale = sorted(output.parent.glob(f"{output.name}.rank*"))
            carried = {}
            if resume:
                for path in [output, *stale]:
                    carried.update(kept_for_resume(path, set(order)))
                check_same_settings(carried.values(), options.settings, output)
            write_records(output, ordered(carried.values(), order))
            for path in stale:
                path.unlink()
        barrier()
        if resume:
            kept = kept_for_resume(output, set(order))
    elif resume or world > 1:
        raise UsageError("--resume and several processes need an output file (-o)")

    todo = [row for row in rows if row.id not in kept]
    groups = document_groups(r for r in todo if isinstance(r, ManifestRow))
    mine = [row for group in shard(groups, rank, world) for row in group]  # one process: every row
    records_bad_rows = rank == 0  # pragma: no mutate (any one rank would do; rank 0 is in every run)
    todo = sorted(mine + [r for r in todo if records_bad_rows and isinstance(r, RowError)], key=lambda r: r.index)
    summary = RunSummary(total=len(todo), kept=len(kept))
    on_start(summary.total)

    if output is None:
        writer = OrderedWriter(sink[0], [row.index for row in todo], fallback=stdout)
    elif world > 1:
        writer = AppendingWriter(shard_path(output, rank), stdout)
    else:
        writer = AppendingWriter(output, stdout, [json_text(r) for r in ordered(kept.values(), order)])

    def emit(index: int, result: Result) -> None:
        result.run = options.settings
        writer.add(index, result.to_json())
        summary.done += 1
        summary.failed += result.status == "error"
        summary.zoomed += bool(result.zoom.zoomed)
        on_result(result)

    try:
        if todo:
            qz = load() if any(isinstance(r, ManifestRow) for r in todo) else None
            answer_rows(qz, todo, options, emit)
    finally:
        writer.finish()
    if writer.vanished:
        raise OutputError(f"{writer.path} was deleted or moved while the run wrote it; every record it held and the "
                          "rest went to stdout")
    if writer.write_error is not None:
        resume = "; --resume redoes the ones missing from the file" if output is not None else ""
        raise OutputError(f"could not write {output or sink[1]} ({writer.write_error.strerror or writer.write_error});"
                          f" the records from there on went to stdout{resume}")
    if output is not None:
        barrier()
        if rank == 0:
            shards = [shard_path(output, r) for r in range(world)]  # a single process wrote none
            records = ordered([*read_records(output), *(r for path in shards for r in read_records(path))], order)
            try:
                write_records(output, records)
            except OSError as exc:
                raise OutputError(f"could not put {output} in manifest order ({exc.strerror or exc}); it holds every "
                                  "record, in the order they finished") from None
            for path in shards:
                path.unlink(missing_ok=True)
            fresh = [r for r in records if r["id"] not in kept]  # every process's rows of this run
            summary.done, summary.failed = len(fresh), sum(r.get("status") == "error" for r in fresh)
            summary.zoomed = sum(bool((r.get("zoom") or {}).get("zoomed")) for r in fresh)
    return summary


def open_stream(path: Path) -> TextIO:
    """A device or pipe opened for writing in place; a pipe nobody reads is refused, not waited on."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        reason = "no program is reading it" if exc.errno == errno.ENXIO else exc.strerror or str(exc)
        raise UsageError(f"cannot write {path} ({reason})") from None
    os.set_blocking(fd, True)
    return open(fd, "w", encoding="utf-8")
