"""What a person sees on the terminal: a rich panel with the answer, the page and the numbers.

Everything here writes to a stderr console; stdout carries only results.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from rich.color import Color
from rich.console import Group
from rich.panel import Panel
from rich.style import Style
from rich.table import Table
from rich.text import Text

from .documents import format_pages
from .results import Result

BOX_COLOR = (220, 30, 30)


def printable(text: str) -> str:
    """`text` safe for a terminal: control characters (escape sequences, bells, C1 codes) shown as
    `\\xNN` instead of acting on the terminal; whitespace folded to single spaces."""
    folded = " ".join(text.split())
    return "".join(f"\\x{ord(ch):02x}" if unicodedata.category(ch) == "Cc" else ch for ch in folded)


def page_thumbnail_text(image: Image.Image, box_norm: list[float] | None = None, width: int = 28) -> Text:
    """The page as terminal art: one character cell shows two pixel rows with the upper half block.

    `box_norm` ([x1, y1, x2, y2] in 0..1 of the page) is outlined in red when given.
    """
    height = max(2, round(image.height / image.width * width / 2) * 2)  # square pixels, even rows
    small = image.convert("RGB").resize((width, height), Image.Resampling.BOX)
    if box_norm is not None:
        x1, y1, x2, y2 = box_norm
        ImageDraw.Draw(small).rectangle(
            [x1 * (width - 1), y1 * (height - 1), x2 * (width - 1), y2 * (height - 1)], outline=BOX_COLOR
        )
    pixels = small.load()
    text = Text()
    for y in range(0, height, 2):
        for x in range(width):
            top, bottom = Color.from_rgb(*pixels[x, y]), Color.from_rgb(*pixels[x, y + 1])
            text.append("▀", style=Style(color=top, bgcolor=bottom))
        if y + 2 < height:
            text.append("\n")
    return text


def _stats_table(result: Result) -> Table:
    table = Table.grid(padding=(0, 1))
    table.add_column(style="dim")
    table.add_column()
    stats, timings = result.stats, result.stats.time
    candidates = ", ".join(f"p{c.page} {c.score:.2f}" for c in result.candidates)
    rows = [
        ("page", _page_line(result)),
        ("scores", candidates),
        ("zoom", _zoom_line(result)),
        ("visual tokens", f"{stats.visual_tokens} = page {stats.coarse_visual_tokens} + region "
                          f"{stats.region_visual_tokens} (one page at this detail: {stats.baseline_visual_tokens}; "
                          f"all pages {stats.total_visual_tokens})"),
        ("prompt / output", f"{stats.prompt_tokens} / {stats.output_tokens} tokens"),
        ("latency", f"{stats.latency_s:.3f} s"),
        ("time split", "  ".join(f"{name.removesuffix('_s').replace('_', ' ')} {value:.3f}"
                                 for name, value in vars(timings).items() if value)),
        ("decode speed", f"{stats.tokens_per_s:.1f} tokens/s"),
        ("peak memory", f"{stats.peak_mem_gib:.2f} GiB ({stats.peak_mem_source})"),
        ("model", f"{result.model.id} on {result.model.device} ({result.model.dtype}, {result.model.attn})"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _page_line(result: Result) -> str:
    pages = result.input.pages
    return str(result.page) if len(pages) == 1 else f"{result.page} (the surest of pages {format_pages(pages)})"


def _zoom_line(result: Result) -> str:
    zoom = result.zoom
    gate = f", {zoom.gate['kind']} gate {zoom.gate['score']:.3f} vs {zoom.gate['threshold']}" if zoom.gate else ""
    if zoom.zoomed:
        roi = zoom.roi
        return f"read region {roi['bbox_xyxy']} ({roi['coord_space']}){gate}"
    if zoom.mode == "never":
        return "off (--zoom never)"
    return f"skipped: {zoom.skipped_reason}{gate}"


def write_overlay(path: Path, page: Image.Image, region_map: torch.Tensor | None, box: list[int] | None) -> Path:
    """The page with the region map blended in red (when there is one) and the read box outlined."""
    image = page.convert("RGB")
    if region_map is not None:
        heat = region_map.float()
        spread = float(heat.max() - heat.min())
        heat = (heat - heat.min()) / spread if spread > 0 else torch.zeros_like(heat)
        alpha = Image.fromarray((heat.numpy() * 160).astype("uint8")).resize(image.size, Image.Resampling.BILINEAR)
        image = Image.composite(Image.new("RGB", image.size, (255, 0, 0)), image, alpha)
    if box is not None:
        width = max(2, round(max(image.size) / 300))
        ImageDraw.Draw(image).rectangle(box, outline=(0, 90, 255), width=width)
    image.save(path)
    return path


def answer_panel(result: Result, thumbnail: Image.Image | None) -> Panel:
    """The answer in bold, the page it came from (box outlined once zoom reports one), the stats."""
    roi = result.zoom.roi or {}
    body = Table.grid(padding=(0, 2))
    if thumbnail is not None:
        body.add_column()
    body.add_column()
    cells = [page_thumbnail_text(thumbnail, roi.get("bbox_norm"))] if thumbnail is not None else []
    body.add_row(*cells, _stats_table(result))
    title = Text(result.question, style="bold cyan")
    answer = Text(printable(result.answer or ""), style="bold")
    subtitle = f"{result.id} · {result.status}"
    return Panel(Group(answer, Text(""), body), title=title, subtitle=subtitle, title_align="left")


def eval_table(summaries) -> Table:
    """`qzoom eval --compare`: one row per zoom mode."""
    table = Table(title="qzoom eval", title_justify="left")
    for name in ("zoom", "accuracy", "zoom rate", "visual tokens", "samples/s", "p50 s", "p95 s", "TTFT s",
                 "ms/token", "peak GiB", "failed"):
        table.add_column(name, justify="left" if name == "zoom" else "right")
    for s in summaries:
        accuracy = f"{s.accuracy * 100:.1f}% ({s.scored})" if s.accuracy is not None else "-"
        table.add_row(s.mode, accuracy, f"{s.zoom_rate:.0%}", f"{s.mean_visual_tokens:.0f}", f"{s.samples_per_s:.3f}",
                      f"{s.p50_latency_s:.3f}", f"{s.p95_latency_s:.3f}", f"{s.mean_ttft_s:.3f}",
                      f"{s.mean_decode_per_token_s * 1e3:.1f}", f"{s.peak_mem_gib:.2f}", str(s.failed))
    return table
