"""Batch manifests: rows of (id, file, question, pages?, password?, answers?).

Accepted layouts, told apart by content:
- qzoom JSONL, one object per line, with the aliases other tools use:
  `file|path|image|images` (a one-element list is fine), `question|query`, `id|question_id|questionId`,
  `answers|answer|labels` (a string or a list), optional `pages`, `password`, `metric`, `dataset`;
- DocVQA / InfoVQA annotation JSON: `{"data": [{"questionId", "question", "image", "answers"}, ...]}`;
- lmms-eval sample logs (`--log_samples`, JSON list or JSONL): `{"doc_id", "doc": {...}, "target"}`,
  the row's fields read from `doc` with the aliases above and `target` as the answer.

Relative file paths resolve against the manifest's folder (or `root`). A row that cannot be
used becomes a `RowError` that keeps its place, so the batch reports it instead of crashing.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

FILE_KEYS = ("file", "path", "image", "images", "image_path")
QUESTION_KEYS = ("question", "query")
ID_KEYS = ("id", "question_id", "questionId")
ANSWER_KEYS = ("answers", "answer", "labels")


@dataclass
class ManifestRow:
    index: int
    id: str
    file: str
    question: str
    pages: str | None = None
    password: str | None = None
    answers: list[str] = field(default_factory=list)
    metric: str | None = None
    dataset: str | None = None

    @property
    def document_key(self) -> tuple[str, str | None]:
        """Rows with the same key share one opened, rendered document."""
        return self.file, self.password


@dataclass
class RowError:
    index: int
    id: str
    code: str
    message: str
    question: str = ""


def _first(row: dict, keys: tuple[str, ...]):
    for key in keys:
        if row.get(key) not in (None, "", []):
            return row[key]
    return None


def _answers(value) -> list[str]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [str(v) for v in values]


def parse_row(index: int, row, root: Path) -> ManifestRow | RowError:
    """One manifest object as a row, or the reason it cannot be one."""
    if not isinstance(row, dict):
        return RowError(index, f"row{index + 1}", "bad_row", f"row {index + 1} is not a JSON object")
    if isinstance(row.get("doc"), dict):  # lmms-eval sample log
        doc = row["doc"]
        merged = {**doc, "id": _first(doc, ID_KEYS) or row.get("doc_id"), "answers": _first(doc, ANSWER_KEYS)
                  or row.get("target")}
        row = {**merged, **{k: row[k] for k in ("pages", "password", "metric", "dataset") if k in row}}
    raw_id = _first(row, ID_KEYS)
    row_id = str(raw_id) if raw_id is not None else f"row{index + 1}"
    question = _first(row, QUESTION_KEYS)
    file = _first(row, FILE_KEYS)
    if isinstance(file, list):
        if len(file) != 1:
            return RowError(index, row_id, "bad_row", f"row {index + 1}: exactly one file per row, got {len(file)}")
        file = file[0]
    if not isinstance(question, str) or not question.strip():
        return RowError(index, row_id, "bad_row", f"row {index + 1}: no question (keys: question, query)")
    if not isinstance(file, str) or not file.strip():
        return RowError(index, row_id, "bad_row", f"row {index + 1}: no document (keys: {', '.join(FILE_KEYS)})",
                        question)
    password = row.get("password")
    if password is not None and not isinstance(password, str):
        return RowError(index, row_id, "bad_row", f"row {index + 1}: password must be a string, not "
                        f"{type(password).__name__}", question)
    path = Path(file).expanduser()
    pages = row.get("pages")
    return ManifestRow(index=index, id=row_id, file=str(root / path),  # an absolute path stays as it is
                       question=question.strip(), pages=str(pages) if pages is not None else None,
                       password=password, answers=_answers(_first(row, ANSWER_KEYS)),
                       metric=row.get("metric"), dataset=row.get("dataset") or row.get("task"))


def _undecodable(text: str) -> bool:
    """Whether `text` (decoded with surrogateescape) held bytes that are not UTF-8."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _objects(text: str, name: str) -> list:
    """The manifest's objects: a JSON document (a list, DocVQA's {"data": [...]}) or JSONL lines;
    a line whose bytes are not UTF-8 becomes a bad row of its own."""
    try:
        document = None if _undecodable(text) else json.loads(text)
    except json.JSONDecodeError:
        document = None  # pragma: no mutate (any value but a list or an object reads as lines)
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        return document["data"] if isinstance(document.get("data"), list) else [document]
    objects = []
    for number, line in enumerate(text.split("\n"), start=1):  # JSON strings may hold other line breaks
        if _undecodable(line):
            objects.append(_BadLine(f"{name} line {number} is not UTF-8 text"))
        elif line.strip():
            try:
                objects.append(json.loads(line))
            except json.JSONDecodeError as exc:
                objects.append(_BadLine(f"{name} line {number} is not JSON: {exc.msg}"))
    return objects


@dataclass
class _BadLine:
    message: str


def document_files(rows: list[ManifestRow | RowError]) -> tuple[str, ...]:
    """The documents the rows name (each once): inputs a command's output must never replace."""
    return tuple(dict.fromkeys(row.file for row in rows if isinstance(row, ManifestRow)))


def read_manifest(source: str | Path, root: str | Path | None = None) -> list[ManifestRow | RowError]:
    """All rows of a manifest file ('-' for stdin), bad ones as RowError, in order; ids made unique."""
    name = str(source)
    if name == "-":
        data, folder = sys.stdin.buffer.read(), Path.cwd()
    else:
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"no such manifest: {name}")
        data, folder = path.read_bytes(), path.parent
    # a byte-order mark is not part of row 1; bytes that are not UTF-8 are kept to name their line
    text = data.decode("utf-8-sig", errors="surrogateescape")  # pragma: no mutate (codec names: any case)
    rows: list[ManifestRow | RowError] = []
    seen: set[str] = set()
    for index, obj in enumerate(_objects(text, name)):
        row = RowError(index, f"row{index + 1}", "bad_row", obj.message) if isinstance(obj, _BadLine) \
            else parse_row(index, obj, Path(root) if root else folder)
        if row.id in seen:  # its record gets an id of its own, so the first row's record stays
            row = RowError(index, f"{row.id}@row{index + 1}", "duplicate_id",
                           f"row {index + 1}: id {row.id!r} is used by an earlier row", row.question)
        seen.add(row.id)
        rows.append(row)
    if not rows:
        raise UsageError(f"manifest {name} has no rows")
    return rows
