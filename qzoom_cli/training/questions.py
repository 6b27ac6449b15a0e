"""Questions about a collection's details, written by the model itself, for users without any.

Each page of each document under a folder is shown to the model with a request for short
questions about specific details on it; the lines it writes become manifest rows
`{id, file, pages, question}` (paths relative to the manifest), ready for `qzoom train rpn`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from ..api import QZoom
from ..budget import VisualBudget
from ..documents import open_document
from ..errors import InputError
from .saved import writing
from .settings import QUESTION_MAX_TOKENS, QUESTIONS_PER_PAGE

DOCUMENT_SUFFIXES = {".pdf", ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
REQUEST = ("Write {count} different short questions that can each be answered from one specific detail on this "
           "page (a number, a name, a date, a label). Write one question per line and nothing else.")
_NUMBERING = re.compile(r"^\s*(?:[-*•]|\(?\d+[.)]|q\d+[.:)])\s*", re.IGNORECASE)


def parse_questions(text: str, limit: int) -> list[str]:
    """Question lines of the model's output: numbering and bullets removed, duplicates dropped."""
    questions: list[str] = []
    for line in text.splitlines():
        question = _NUMBERING.sub("", line).strip().strip('"')
        if len(question) >= 8 and any(c.isalpha() for c in question) and question not in questions:
            questions.append(question)
    return questions[:limit]


def documents(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in DOCUMENT_SUFFIXES:
            yield path


def write_questions(qz: QZoom, folder: Path, manifest: Path, *, dpi: int, per_page: int = QUESTIONS_PER_PAGE,
                    budget: VisualBudget | None = None, max_new_tokens: int = QUESTION_MAX_TOKENS,
                    on_page: Callable[[Path, int, int], None] = lambda path, page, count: None) -> tuple[int, dict]:
    """Write the manifest; returns (rows written, {skipped document: reason})."""
    rows, skipped = 0, {}
    base = manifest.parent.resolve()
    with writing(manifest):  # line-buffered: a full disk shows at the row that did not fit
        out = open(manifest, "w", encoding="utf-8", buffering=1)  # noqa: SIM115 (closed by the with below)
    with out:
        for path in documents(folder):
            resolved = path.resolve()
            relative = resolved.relative_to(base) if resolved.is_relative_to(base) else resolved
            name = path.relative_to(folder).as_posix()  # unique, unlike the file's stem
            try:
                with open_document(path, dpi=dpi) as doc:
                    for page in range(1, doc.page_count + 1):
                        [result] = qz.ask(doc, REQUEST.format(count=per_page), pages=str(page), instruction="",
                                          zoom="never", budget=budget, max_new_tokens=max_new_tokens)
                        questions = parse_questions(result.answer, per_page)
                        for i, question in enumerate(questions, start=1):
                            row = json.dumps({"id": f"{name}-p{page}-q{i}", "file": str(relative),
                                              "pages": str(page), "question": question})
                            with writing(manifest):
                                out.write(row + "\n")
                            rows += 1
                        on_page(path, page, len(questions))
            except InputError as exc:  # the document is skipped; a model or output failure stops the run
                skipped[str(path)] = exc.message
    return rows, skipped
