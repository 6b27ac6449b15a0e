"""Pure functions from a region score map to page pixels and back to position ids.

    logits [rows, cols] + kept cells -> probabilities (sink cells off, 3x3 blur) -> one grid box
    -> page-pixel box (min side, kept inside the page) -> region token grid
    -> fractional M-RoPE rows/cols of the region tokens inside the source grid

Boxes are (x0, y0, x1, y1) with exclusive ends, in grid cells or page pixels. No state, no
modules: every function here is deterministic and cheap, so the tests can cover it exhaustively.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..budget import Canvas

# Separable 3-tap Gaussian with sigma 1 (torchvision's kernel for kernel_size=3, sigma=1.0).
_GAUSS_3 = (0.27406862, 0.45186276, 0.27406862)
SINK_MIN_TOKENS = 256


@dataclass(frozen=True)
class Box:
    """Axis-aligned box (x0, y0, x1, y1), exclusive ends."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return self.width * self.height

    def as_list(self) -> list:
        return [self.x0, self.y0, self.x1, self.y1]


def sink_mask(rows: int, cols: int) -> torch.Tensor:
    """Cells to keep (True) after removing the attention-sink corner of large grids.

    On grids of more than 256 tokens the first column over the top quarter of rows and the
    first row over the left quarter of columns attract attention regardless of the question.
    """
    keep = torch.ones(rows, cols, dtype=torch.bool)
    if rows * cols > SINK_MIN_TOKENS:
        keep[: max(1, rows // 4), 0] = False
        keep[0, : max(1, cols // 4)] = False
    return keep


def gaussian_blur3(grid: torch.Tensor) -> torch.Tensor:
    """3x3 Gaussian blur (sigma 1) with reflect padding; grids of one row or column pass through."""
    rows, cols = grid.shape
    kernel = grid.new_tensor(_GAUSS_3)  # the map's dtype (bf16 in practice) and device
    out = grid[None, None]
    if cols > 1:
        out = F.conv2d(F.pad(out, (1, 1, 0, 0), mode="reflect"), kernel.view(1, 1, 1, 3))
    if rows > 1:
        out = F.conv2d(F.pad(out, (0, 0, 1, 1), mode="reflect"), kernel.view(1, 1, 3, 1))
    return out[0, 0]


def sigmoid_region_map(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Trained region heads: per-cell probability, cells not kept (sinks) zeroed, then blurred
    (`keep` on the logits' device, as a `RegionMap` holds it)."""
    return gaussian_blur3(torch.sigmoid(logits) * keep)


def relative_region_map(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Training-free heads (raw attention logits): attention share per cell relative to the peak.

    Softmax over the kept image cells (sinks excluded) turns logits into where the query looks;
    after the blur, dividing by the maximum puts the peak at 1 so one threshold (a fraction of
    the peak) fits every page size.
    """
    if not bool(keep.any()):
        return torch.zeros_like(logits, dtype=torch.float32)
    share = torch.softmax(logits.float().masked_fill(~keep, -torch.inf).flatten(), dim=0).view_as(logits)
    blurred = gaussian_blur3(share)
    return blurred / blurred.max()


def foreground_box(prob: torch.Tensor, threshold: float) -> Box | None:
    """The one box enclosing every cell strictly above `threshold`; None when no cell is."""
    cells = torch.nonzero(prob > threshold)
    if cells.numel() == 0:
        return None
    (y0, x0), (y1, x1) = cells.min(dim=0).values.tolist(), cells.max(dim=0).values.tolist()
    return Box(x0, y0, x1 + 1, y1 + 1)


def attention_lift(prob: torch.Tensor, box: Box, on_page: torch.Tensor) -> float:
    """Share of the map's mass inside `box` divided by the box's share of the page's cells
    (`on_page`; 1 = uniform over the page)."""
    total = float(prob.sum())
    if total <= 0:
        return 0.0
    window = (slice(int(box.y0), int(box.y1)), slice(int(box.x0), int(box.x1)))
    return (float(prob[window].sum()) / total) / (int(on_page[window].sum()) / int(on_page.sum()))


def page_cells(grid: tuple[int, int], page_size: tuple[int, int], canvas: Canvas) -> torch.Tensor:
    """[rows, cols] True on the grid cells that show some of the page, False on those wholly in its
    canvas's padding (a region there would read nothing)."""
    rows, cols = grid
    (canvas_w, canvas_h), (dx, dy) = canvas.size(*page_size), canvas.offset(*page_size)

    def covered(cells: int, extent: int, start: int, length: int) -> torch.Tensor:
        edges = torch.arange(cells + 1, dtype=torch.float64)  # pragma: no mutate (float32 is as exact for pages)
        edges = edges * extent / cells
        return (edges[1:] > start) & (edges[:-1] < start + length)

    return covered(rows, canvas_h, dy, page_size[1])[:, None] & covered(cols, canvas_w, dx, page_size[0])[None, :]


def grid_box_to_pixels(box: Box, grid: tuple[int, int], size: tuple[int, int], min_side: int) -> Box:
    """A grid box on a (rows, cols) token grid as integer pixels of an image of `size` (w, h).

    Each side is grown symmetrically to at least `min_side` pixels (or the whole image side if
    smaller) and slid back inside the image; coordinates are truncated to integers.
    """
    rows, cols = grid
    width, height = size

    def axis(lo_cell: float, hi_cell: float, cells: int, extent: int) -> tuple[int, int]:
        lo, hi = lo_cell * extent / cells, hi_cell * extent / cells
        need = min(min_side, extent)
        if hi - lo < need:  # pragma: no mutate (`<=` regrows a side of exactly `need` to itself)
            centre = (lo + hi) / 2
            lo, hi = centre - need / 2, centre + need / 2
            shift = max(0.0, -lo) - max(0.0, hi - extent)
            lo, hi = lo + shift, hi + shift
        return int(lo), int(hi)  # inside [0, extent]: the slide lands on its bounds exactly

    x0, x1 = axis(box.x0, box.x1, cols, width)
    y0, y1 = axis(box.y0, box.y1, rows, height)
    return Box(x0, y0, x1, y1)


def region_on_page(box: Box, grid: tuple[int, int], page_size: tuple[int, int], min_side: int,
                   canvas: Canvas) -> Box | None:
    """A grid box in page pixels: mapped on the canvas the page was read on (a very thin page's
    aspect canvas, LLaVA's centred square), moved by where the page sits on it, then cut to the
    page itself; None when nothing of it is on the page."""
    on_canvas = grid_box_to_pixels(box, grid, canvas.size(*page_size), min_side)
    dx, dy = canvas.offset(*page_size)
    inside = Box(max(0, on_canvas.x0 - dx), max(0, on_canvas.y0 - dy), min(on_canvas.x1 - dx, page_size[0]),
                 min(on_canvas.y1 - dy, page_size[1]))
    return inside if inside.width > 0 and inside.height > 0 else None


def normalized(box: Box, size: tuple[int, int]) -> list[float]:
    """[x0, y0, x1, y1] as fractions of an image of `size` (w, h), rounded to 1e-4."""
    width, height = size
    return [round(box.x0 / width, 4), round(box.y0 / height, 4), round(box.x1 / width, 4), round(box.y1 / height, 4)]


def aligned_region_positions(source_rows: torch.Tensor, source_cols: torch.Tensor, box: Box,
                             region_rows: int, region_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column rotary positions of a region's tokens, inside the source image's grid.

    `source_rows`/`source_cols` are the source image tokens' height/width positions as
    [rows, cols] maps; the region's r x c tokens get evenly spaced (fractional) positions from the
    box's first to last cell, so its rotary phases line up with the part of the page it shows.
    Flattened row-major, like the tokens.
    """
    y0, x0, y1, x1 = int(box.y0), int(box.x0), int(box.y1), int(box.x1)
    h = torch.linspace(float(source_rows[y0, x0]), float(source_rows[y1 - 1, x0]), region_rows)
    w = torch.linspace(float(source_cols[y0, x0]), float(source_cols[y0, x1 - 1]), region_cols)
    cells = torch.cartesian_prod(h, w)
    return cells[:, 0], cells[:, 1]


def equivalent_page_tokens(region_tokens: int, region_px: Box, page_size: tuple[int, int]) -> int:
    """Visual tokens the whole page would cost if read at the region's resolution."""
    return math.ceil(region_tokens * page_size[0] * page_size[1] / region_px.area)
