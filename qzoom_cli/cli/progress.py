"""Progress of a batch of rows on stderr: done of total, rows/s, time left, zoom rate, failures."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .common import err_console


@dataclass
class Throughput:
    """Rows per second and the time left, both from one clock: counted from the first row finished
    (the model's loading and warm-up are not rows), so the time left is what the rate says it is."""

    total: int | None = None
    done: int = 0
    first_at: float | None = None

    def finished(self, now: float) -> None:
        self.done += 1
        if self.first_at is None:
            self.first_at = now

    def rate(self, now: float) -> float | None:
        if self.first_at is None or self.done < 2 or now <= self.first_at:
            return None
        return (self.done - 1) / (now - self.first_at)

    def left_s(self, now: float) -> float | None:
        rate = self.rate(now)
        return None if rate is None or self.total is None else max(0, self.total - self.done) / rate


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


@contextmanager
def row_progress(show: bool, label: str) -> Iterator[tuple[Callable, Callable[[int], None]]]:
    """(on_result, on_start(total)) callbacks feeding a progress bar on stderr, or doing nothing."""
    if not show:
        yield (lambda result: None), (lambda total: None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} rows/s"), TextColumn("left {task.fields[left]}"),
               TextColumn("zoom {task.fields[zoom]}"), TextColumn("[red]failed {task.fields[failed]}"))
    counts, pace = {"zoomed": 0, "failed": 0}, Throughput()
    with Progress(*columns, console=err_console, transient=False) as bar:
        task = bar.add_task(label, total=None, rate="-", left=clock(None), zoom="-", failed=0)

        def start(total: int) -> None:
            pace.total = total
            bar.update(task, total=total)

        def track(result) -> None:
            now = time.monotonic()
            pace.finished(now)
            counts["zoomed"] += bool(result.zoom.zoomed)
            counts["failed"] += result.status == "error"
            rate = pace.rate(now)
            bar.update(task, advance=1, failed=counts["failed"], rate="-" if rate is None else f"{rate:.2f}",
                       left=clock(pace.left_s(now)), zoom=f"{counts['zoomed'] / pace.done:.0%}")

        yield track, start
