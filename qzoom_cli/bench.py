"""Timed, scored runs of manifest rows: `qzoom eval --compare` and the `qzoom bench` budget sweep.

Each run answers the rows under one zoom mode and one visual-token budget, timed by the wall
clock with the device synchronised (the model is loaded and warmed up first), and scores the
answers against the rows' references. The sweep draws the speed/accuracy trade-off the way the
Q-Zoom paper does: samples per second across, accuracy up, one line per mode, a point per budget.
Its `stock` mode answers the same rows with transformers' `generate()` (stock.py), the yardstick
every point's time is compared with.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .api import QZoom
from .batch import RunOptions, answer_rows
from .budget import VisualBudget
from .evaluate import ModeSummary, choose_metric, score, summarize
from .manifest import ManifestRow, RowError
from .options import STOCK, ZoomSettings
from .refs import display_name
from .results import Result, json_text
from .runtime import synchronize
from .stock import stock_rows

log = logging.getLogger("qzoom")

DEFAULT_BUDGETS = (256, 576, 1024, 2048, 4096)


@dataclass
class ScoredRow:
    id: str
    metric: str | None
    references: list[str]
    answer: str | None
    score: float | None
    zoomed: bool
    visual_tokens: int | None


def sweep_budget(max_tokens: int) -> VisualBudget:
    """The paper's sweep: at least 256 tokens, 128 when the maximum is 256 or less."""
    return VisualBudget(min(128 if max_tokens <= 256 else 256, max_tokens), max_tokens)


def warm_up(qz: QZoom, rows: list[ManifestRow | RowError], options: RunOptions, stock: bool = False) -> None:
    """Answer the first answerable row once, untimed (with stock `generate()` when `stock`):
    kernels, allocator and caches get ready."""
    first = next((r for r in rows if isinstance(r, ManifestRow)), None)
    if first is not None:
        (stock_rows if stock else answer_rows)(qz, [first], options, lambda index, result: None)


def run_scored(qz: QZoom, rows: list[ManifestRow | RowError], options: RunOptions, metric: str = "auto",
               stock: bool = False, on_result: Callable[[Result], None] = lambda result: None,
               ) -> tuple[ModeSummary, list[ScoredRow]]:
    """Answer every row under `options` (with stock `generate()` when `stock`), timed, and score
    the rows that have references; `on_result` sees each answer as it comes (progress)."""
    results: dict[int, Result] = {}

    def keep(index: int, result: Result) -> None:
        results[index] = result
        on_result(result)

    start = time.perf_counter()
    (stock_rows if stock else answer_rows)(qz, rows, options, keep)
    synchronize(qz.runtime.device)
    wall = time.perf_counter() - start
    scored = []
    for row in rows:
        result = results[row.index]
        references = getattr(row, "answers", [])
        chosen = choose_metric(metric, row.metric, row.dataset, references) if references else None
        scored.append(ScoredRow(
            id=row.id, metric=chosen, references=references, answer=result.answer,
            score=score(chosen, result.answer, references) if chosen else None, zoomed=result.zoom.zoomed,
            visual_tokens=result.stats.visual_tokens if result.stats else None))
    ordered = [results[row.index] for row in rows]
    return summarize(STOCK if stock else options.zoom.mode, ordered, [s.score for s in scored], wall), scored


def compare_modes(qz: QZoom, rows: list[ManifestRow | RowError], options: dict[str, RunOptions], metric: str = "auto",
                  progress: Callable[[str], AbstractContextManager] | None = None,
                  ) -> tuple[list[ModeSummary], dict[str, list[ScoredRow]]]:
    """`qzoom eval --compare`: the same rows under each mode's options, after one warm-up.
    `progress(mode)` gives the (on_result, on_start(total)) callbacks of a mode's run."""
    summaries, per_mode = [], {}
    for mode, run in options.items():
        if not summaries:
            warm_up(qz, rows, run)
        with progress(mode) if progress else nullcontext((lambda result: None, lambda total: None)) as (track, start):
            start(len(rows))
            summary, per_mode[mode] = run_scored(qz, rows, run, metric, on_result=track)
        summaries.append(summary)
    return summaries, per_mode


@dataclass
class BenchPoint:
    mode: str
    min_tokens: int
    max_tokens: int
    summary: ModeSummary

    time_vs_stock: float | None = None  # time per row over stock generate()'s at the sweep's largest budget

    def to_dict(self) -> dict:
        return {"mode": self.mode, "min_tokens": self.min_tokens, "max_tokens": self.max_tokens,
                **asdict(self.summary), "time_vs_stock": self.time_vs_stock}


def mode_label(mode: str) -> str:
    return "stock generate()" if mode == STOCK else f"zoom {mode}"


def sweep(qz: QZoom, rows: list[ManifestRow | RowError], modes: list[str], budgets: list[int],
          options: RunOptions, metric: str = "auto", on_point=lambda point: None) -> list[BenchPoint]:
    """Every (mode, budget) pair over the same rows, after one warm-up of each engine. With the
    `stock` mode (run first, largest budget first), each point reports its time against stock's
    at the largest budget."""
    grid = qz.backbone.layout.fixed_grid
    if grid is not None and budgets != [grid[0] * grid[1]]:  # one read per mode is all there is to time
        log.warning(qz.fixed_grid_note("--budgets"))
        budgets = [grid[0] * grid[1]]
    warm_up(qz, rows, options)
    if STOCK in modes:
        warm_up(qz, rows, options, stock=True)
    modes = sorted(modes, key=lambda mode: mode != STOCK)  # the yardstick first
    points, yardstick = [], None
    for mode in modes:
        for max_tokens in sorted(budgets, reverse=mode == STOCK):
            budget = qz.backbone.read_budget(sweep_budget(max_tokens))
            zoom = ZoomSettings(**{**vars(options.zoom), "mode": "never" if mode == STOCK else mode})
            run = RunOptions(**{**vars(options), "zoom": zoom, "budget": budget})
            summary, _ = run_scored(qz, rows, run, metric, stock=mode == STOCK)
            yardstick = yardstick or (summary.samples_per_s if mode == STOCK else None)
            ratio = yardstick / summary.samples_per_s if yardstick and summary.samples_per_s else None
            points.append(BenchPoint(mode, budget.min_tokens, budget.max_tokens, summary, ratio))
            on_point(points[-1])
    return points


def score_lines(per_mode: dict[str, list[ScoredRow]]) -> str:
    """`qzoom eval -o`: one JSON line per (mode, row) with its metric, references, answer and score."""
    return "".join(json_text({"mode": mode, **asdict(row)}) + "\n"
                   for mode, scored in per_mode.items() for row in scored)


def bench_report(qz: QZoom, points: list[BenchPoint], rows: list, manifest: str) -> dict:
    """`bench.json`: the sweep's points and what they were measured on (model, device, versions)."""
    import torch
    import transformers

    info = qz.model_info()
    device = qz.runtime.device
    meta = {"model": info.id, "device": info.device, "dtype": info.dtype, "attn": info.attn,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "rows": len(rows), "manifest": str(manifest), "warmup_rows": 1}
    return {"meta": meta, "points": [p.to_dict() for p in points]}


def pareto_title(report: dict) -> str:
    meta = report["meta"]
    return f"{display_name(meta['model'])} on {meta['device_name']} ({meta['dtype']}, {meta['attn']})"


PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
MARKER_SIDES = [32, 4, 3, 5, 6]  # circle-ish, square, triangle, pentagon, hexagon
MIN_ACCURACY_SPAN = 10.0  # percentage points: equal accuracies still read as percentages


def y_range(values: list[float], accuracy: bool) -> tuple[float, float]:
    """The plot's vertical span: the values with a margin; accuracy (in %) within 0..100 and at
    least MIN_ACCURACY_SPAN points high."""
    pad = (max(values) - min(values)) * 0.1 or 1.0
    low, high = min(values) - pad, max(values) + pad
    if not accuracy:
        return low, high
    low, high = max(0.0, low), min(100.0, high)
    if high - low < MIN_ACCURACY_SPAN:
        low = max(0.0, min(low, 100.0 - MIN_ACCURACY_SPAN))
        high = low + MIN_ACCURACY_SPAN
    return low, high


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    span = (high - low) or 1.0
    raw = span / count
    magnitude = 10 ** int(f"{raw:e}".split("e")[1])
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = (low // step) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        if value >= low - step * 1e-9:
            ticks.append(round(value, 10))
        value += step
    return ticks


def pareto_png(points: list[BenchPoint], path: Path, title: str) -> Path:
    """Samples/s across; accuracy up (mean visual tokens when no row has references)."""
    has_accuracy = any(p.summary.accuracy is not None for p in points)
    y_name = "accuracy" if has_accuracy else "mean visual tokens"

    def y_of(point: BenchPoint) -> float:
        return (point.summary.accuracy or 0.0) * 100 if has_accuracy else point.summary.mean_visual_tokens

    width, height, left, right, top, bottom = 960, 620, 90, 40, 60, 80
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = ImageFont.load_default(size=16), ImageFont.load_default(size=12)
    xs = [p.summary.samples_per_s for p in points]
    pad_x = (max(xs) - min(xs)) * 0.08 or 0.1
    x0, x1 = max(0.0, min(xs) - pad_x), max(xs) + pad_x
    y0, y1 = y_range([y_of(p) for p in points], has_accuracy)

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline=(80, 80, 80))
    for tick in _nice_ticks(x0, x1):
        px, _ = to_px(tick, y0)
        draw.line([px, height - bottom, px, height - bottom + 5], fill=(80, 80, 80))
        draw.line([px, top, px, height - bottom], fill=(235, 235, 235))
        draw.text((px, height - bottom + 8), f"{tick:g}", fill="black", font=small, anchor="mt")
    for tick in _nice_ticks(y0, y1):
        _, py = to_px(x0, tick)
        draw.line([left - 5, py, left, py], fill=(80, 80, 80))
        draw.line([left, py, width - right, py], fill=(235, 235, 235))
        draw.text((left - 8, py), f"{tick:g}", fill="black", font=small, anchor="rm")
    draw.text((width / 2, height - 30), "samples / s", fill="black", font=font, anchor="mm")
    draw.text((20, top - 30), y_name + (" (%)" if has_accuracy else ""), fill="black", font=font)
    draw.text((width / 2, 22), title, fill="black", font=font, anchor="mm")
    modes = list(dict.fromkeys(p.mode for p in points))
    for index, mode in enumerate(modes):  # each later mode thinner and smaller: one drawn over another shows both
        color, size = PALETTE[index % len(PALETTE)], max(2, 8 - 2 * index)
        series = sorted((p for p in points if p.mode == mode), key=lambda p: p.max_tokens)
        pixels = [to_px(p.summary.samples_per_s, y_of(p)) for p in series]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=max(1, 6 - 2 * index))
        for point, (px, py) in zip(series, pixels, strict=True):
            draw.regular_polygon((px, py, size), MARKER_SIDES[index % len(MARKER_SIDES)], fill=color)
            draw.text((px + 9, py - 9 - 12 * index), str(point.max_tokens), fill=color, font=small, anchor="ld")
        legend_y = top + 12 + 22 * index
        draw.line([width - right - 170, legend_y, width - right - 140, legend_y], fill=color, width=3)
        draw.text((width - right - 132, legend_y), mode_label(mode), fill="black", font=small, anchor="lm")
    image.save(path)
    return path
