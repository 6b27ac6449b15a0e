"""Tri-state pseudo labels for the region head: foreground 1, background 0, ignore -100.

From the teacher's grounding map A (its attention from answer tokens to image cells, averaged
over grounding heads and steps) and sink map S (the same from sink heads), on the square view:

    sink  = S >= sink_threshold, plus the cells that are only square padding
    G     = A with sink cells zeroed, then cells at or below fg_ratio * max(G) zeroed; FG = G > 0
    box   = the tight box of blur3x3(G) > 0            (the blur grows it by about one cell)
    BG    = cells outside the box whose sink-free attention is below bg_ratio * max(G),
            plus every padding cell
    other cells (inside the box but not FG, or too bright to call background) are ignored.

A sample whose box covers max_area of the grid or more, or whose peak max(G) is below
peak_floor, is skipped: every cell ignored. Thresholds are relative to the peak except the
absolute sink threshold and peak floor, as in the reference (spec: training.md 2.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import Canvas
from ..zoom.geometry import Box, gaussian_blur3, page_cells
from .settings import LabelSettings

IGNORE = -100


@dataclass
class PseudoLabels:
    labels: torch.Tensor          # [rows, cols] long: 1, 0 or IGNORE
    box: Box                      # the (blurred) foreground box on the grid
    skipped: str | None = None    # why every cell is ignored, if so

    @property
    def valid(self) -> bool:
        return self.skipped is None


def padding_cells(grid: int, width: int, height: int) -> torch.Tensor:
    """Cells of a grid x grid square view that show only padding, for an image of (width, height)
    centred on the square (the teacher's view, LLaVA's expand2square)."""
    return ~page_cells((grid, grid), (width, height), Canvas(square=True, centred=True))


def pseudo_labels(grounding: torch.Tensor, sink: torch.Tensor, padding: torch.Tensor | None = None,
                  settings: LabelSettings = LabelSettings()) -> PseudoLabels:
    a = grounding.double()
    rows, cols = a.shape
    pad = padding if padding is not None else torch.zeros_like(a, dtype=torch.bool)
    sinks = (sink.double() >= settings.sink_threshold) | pad
    g = a * ~sinks
    peak = float(g.max())
    g = g * (g > settings.fg_ratio * peak)
    foreground = g > 0
    spread = torch.nonzero(gaussian_blur3(g) > 0)
    if spread.numel():
        (y0, x0), (y1, x1) = spread.min(dim=0).values.tolist(), spread.max(dim=0).values.tolist()
        box = Box(x0, y0, x1 + 1, y1 + 1)
    else:
        box = Box(0, 0, cols, rows)
    outside = torch.ones(rows, cols, dtype=torch.bool)
    outside[box.y0:box.y1, box.x0:box.x1] = False
    sink_free = a * (sink.double() < settings.sink_threshold)
    background = (outside & (sink_free < settings.bg_ratio * peak)) | pad
    labels = torch.full((rows, cols), IGNORE)  # an int fill: long
    if box.area >= settings.max_area * rows * cols:
        return PseudoLabels(labels, box, "region covers too much of the page")
    if peak < settings.peak_floor:
        return PseudoLabels(labels, box, "attention peak below the floor")
    labels[background] = 0
    labels[foreground] = 1
    return PseudoLabels(labels, box)
