"""One engine thread answering queued requests, several at a time.

Requests with the same engine options wait at most `wait_s` for company and are answered
together through `QZoom.ask_many` (their (page, question) pairs batched `batch_size` at a time);
a full queue refuses new requests at once; `close()` answers what is queued, then stops.
"""

from __future__ import annotations

import base64
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ..api import AskRequest, QZoom
from ..documents import Document
from ..errors import Busy
from ..results import Result
from .options import AskOptions


@dataclass
class Job:
    """Questions about an open document; the scheduler closes the document when it is answered.
    With `overlay`, `overlays` gets each answer's page with its region map and box, as a PNG data URL
    (None where it could not be drawn)."""

    doc: Document
    questions: list[str]
    options: AskOptions
    overlay: bool = False
    future: Future = field(default_factory=Future)
    overlays: list[str | None] = field(default_factory=list)

    @cached_property
    def engine_key(self) -> tuple:
        """Jobs with equal keys can share engine batches (pages, dpi and password are the document's);
        one that draws overlays is answered alone, into its own folder."""
        o = self.options
        alone = id(self) if self.overlay else None
        return (o.zoom_settings(), o.min_visual_tokens, o.max_visual_tokens, o.max_new_tokens, o.instruction, alone)


class Scheduler:
    def __init__(self, qz: QZoom, batch_size: int, max_queue: int, wait_s: float,
                 on_batch: Callable[[int], None] = lambda size: None):
        self.qz, self.batch_size, self.max_queue, self.wait_s = qz, batch_size, max_queue, wait_s
        self.on_batch = on_batch
        self._queue: deque[Job] = deque()
        self._changed = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="qzoom-engine", daemon=True)
        self._thread.start()

    def __len__(self) -> int:
        return len(self._queue)

    def submit(self, job: Job) -> Future:
        with self._changed:
            if self._closing:
                job.doc.close()
                raise Busy("the service is shutting down")
            if len(self._queue) >= self.max_queue:
                job.doc.close()
                raise Busy(f"the queue is full ({self.max_queue} requests waiting); retry shortly")
            self._queue.append(job)
            self._changed.notify_all()
        return job.future

    def withdraw(self, job: Job) -> bool:
        """Take a job whose client has gone out of the queue; False once the engine has it."""
        with self._changed:
            if job not in self._queue:
                return False
            self._queue.remove(job)
        job.doc.close()
        job.future.cancel()
        return True

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, answer the queued ones, stop the engine thread."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while (group := self._next_group()) is not None:
            self.on_batch(len(group))
            self._answer(group)

    def _next_group(self) -> list[Job] | None:
        """The oldest job and, within `wait_s`, up to `batch_size - 1` more with its options."""
        with self._changed:
            while not self._queue:
                if self._closing:
                    return None
                self._changed.wait()
            first = self._queue.popleft()
            group, key, deadline = [first], first.engine_key, time.monotonic() + self.wait_s
            while len(group) < self.batch_size:
                same = next((job for job in self._queue if job.engine_key == key), None)
                if same is not None:
                    self._queue.remove(same)
                    group.append(same)
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._closing:
                    break
                self._changed.wait(left)
            return group

    def _answer(self, group: list[Job]) -> None:
        options = group[0].options
        requests = [AskRequest(job.doc, job.questions, pages=job.options.pages, handle=job) for job in group]
        try:
            with tempfile.TemporaryDirectory(prefix="qzoom-overlays-") as folder:
                budget = self.qz.resolve_budget(options.min_visual_tokens, options.max_visual_tokens,
                                                zoom_mode=options.zoom)
                for request, outcome in self.qz.ask_many(
                        requests, budget=budget, zoom=options.zoom_settings(), max_new_tokens=options.max_new_tokens,
                        instruction=options.instruction, batch_size=self.batch_size,
                        overlay_dir=folder if group[0].overlay else None):
                    _settle(request.handle, outcome)
        except Exception as exc:  # a bug in the engine fails this group's requests, not the service
            for job in group:
                if not job.future.done():
                    job.future.set_exception(exc)
        finally:
            for job in group:
                job.doc.close()


def _settle(job: Job, outcome: list[Result] | Exception) -> None:
    if isinstance(outcome, BaseException):
        job.future.set_exception(outcome)
        return
    for result in outcome:  # the overlay's file lives only as long as this batch: hand its bytes over
        drawn = result.zoom.overlay  # None when not drawn: the record's warnings say why
        job.overlays.append(png_data_url(Path(drawn).read_bytes()) if drawn is not None else None)
        result.zoom.overlay = None
    job.future.set_result(outcome)


def png_data_url(png: bytes) -> str:
    return f"data:image/png;base64,{base64.b64encode(png).decode()}"
