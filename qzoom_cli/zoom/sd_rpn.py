"""SD-RPN's region rule, as its LLaVA-1.5 heads are evaluated (lmms-eval `two_stage_roi`, the model's
`upscale_method = 'mask'`): pure functions from the head's score map to the region read.

    logits [24, 24] -> sigmoid -> 3x3 blur -> cells above the threshold
    -> 8-connected components: single cells dropped, under 4 cells grown to 3x3, over 225 dropped
    -> none: no zoom; one: its box, read whole; two or more: the box around every cell above the
       threshold, and only the region tokens under that mask enter the prompt
    -> the box in source pixels (the square's padding taken off) -> the crop stretched to the tower

No attention-sink cells are removed, and boxes may reach into the square's padding (they are cut
to the image). Sources: SD-RPN `LLaVA/llava/ana_utils.py` (`get_bbox_from_noisy_map`, `get_bbox4src`),
`LLaVA/llava/mm_utils.py` (`get_batched_sub_images`, `get_foreground_bbox_torch`),
`LLaVA/lmms-eval/lmms_eval/models/llava.py` (the evaluated settings), commit 00876ac.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .geometry import Box, gaussian_blur3

MIN_AREA = 4            # components of fewer cells are grown to at least 3 x 3
MAX_AREA = 15 * 15      # components of more cells are dropped
MASKED_FROM = 2         # from this many components on, the mask path: tokens under the mask only


@dataclass(frozen=True)
class SdRpnRegion:
    """What the rule reads: a box on the score grid, the same in source pixels, and which of the
    region's own grid tokens enter the prompt (None: all of them)."""

    grid_box: Box
    page_box: Box
    keep: torch.Tensor | None  # [rows, cols] bool over the region's token grid, row-major


def components(binary: torch.Tensor) -> list[list[tuple[int, int]]]:
    """8-connected components of the True cells of a 2-D bool map, each a list of (row, col), in
    the order a raster scan meets their first cell (scikit-image's `label` numbering)."""
    rows, cols = binary.shape
    cells = binary.tolist()
    seen = [[False] * cols for _ in range(rows)]
    found = []
    for r0 in range(rows):
        for c0 in range(cols):
            if not cells[r0][c0] or seen[r0][c0]:
                continue
            seen[r0][c0] = True
            stack, members = [(r0, c0)], []
            while stack:
                r, c = stack.pop()
                members.append((r, c))
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < rows and 0 <= cc < cols and cells[rr][cc] and not seen[rr][cc]:
                            seen[rr][cc] = True
                            stack.append((rr, cc))
            found.append(members)
    return found


def component_boxes(blurred: torch.Tensor, threshold: float) -> list[Box]:
    """SD-RPN's boxes of the components of `blurred > threshold`: a one-cell component is dropped
    (a sink or noise); one under `MIN_AREA` cells is grown around its centre to 3 cells a side
    (its far edge capped at the last cell, as SD-RPN caps it); one over `MAX_AREA` is dropped."""
    rows, cols = blurred.shape
    boxes = []
    for members in components(blurred > threshold):
        ys, xs = [r for r, _ in members], [c for _, c in members]
        x0, y0, x1, y1 = min(xs), min(ys), max(xs) + 1, max(ys) + 1
        area = len(members)
        if area == 1 or area > MAX_AREA:
            continue
        if area < MIN_AREA:
            xc, yc = (x0 + x1) / 2, (y0 + y1) / 2
            width, height = max(3, x1 - x0 + 1), max(3, y1 - y0 + 1)
            x0, y0 = max(0, int(xc - width / 2)), max(0, int(yc - height / 2))
            x1, y1 = min(cols - 1, int(xc + width / 2)), min(rows - 1, int(yc + height / 2))
        boxes.append(Box(x0, y0, x1, y1))
    return boxes


def source_box(box: Box, grid: tuple[int, int], side: int, size: tuple[int, int]) -> Box:
    """A grid box on the `side`-pixel square the image of `size` (w, h) was read on, in that
    image's pixels: SD-RPN's mapping, in its float32 arithmetic (the image fitted into the square,
    centred; the padding taken off; the ends cut to the image and truncated to integers)."""
    rows, cols = grid
    width, height = size
    ratio = min(side / width, side / height)
    corners = torch.tensor([box.as_list()], dtype=torch.float32)
    corners[:, 0::2] *= side / cols
    corners[:, 1::2] *= side / rows
    corners[:, 0::2] -= (side - int(width * ratio)) / 2
    corners[:, 1::2] -= (side - int(height * ratio)) / 2
    corners = corners / ratio
    corners[:, 0::2] = corners[:, 0::2].clamp(min=0, max=width)
    corners[:, 1::2] = corners[:, 1::2].clamp(min=0, max=height)
    return Box(*corners.long()[0].tolist())


def token_mask(mask: torch.Tensor, box: Box, grid: tuple[int, int]) -> torch.Tensor:
    """Which tokens of the region's `grid` lie under the mask: the mask's `box` part resized to the
    grid (bilinear, half-pixel centres) and kept above one half."""
    part = mask[int(box.y0):int(box.y1), int(box.x0):int(box.x1)].float()
    return F.interpolate(part[None, None], size=grid, mode="bilinear", align_corners=False)[0, 0] > 0.5


def sd_rpn_region(logits: torch.Tensor, threshold: float, size: tuple[int, int], side: int,
                  region_grid: tuple[int, int]) -> tuple[SdRpnRegion | None, torch.Tensor]:
    """SD-RPN's region for a score map over a `side`-pixel square holding an image of `size`, read
    again as `region_grid` tokens; None when it reads none. Also returns the blurred map."""
    blurred = gaussian_blur3(torch.sigmoid(logits.float()))
    boxes = component_boxes(blurred, threshold)
    if not boxes:
        return None, blurred
    if len(boxes) < MASKED_FROM:
        return SdRpnRegion(boxes[0], source_box(boxes[0], logits.shape, side, size), None), blurred
    mask = blurred > threshold
    cells = torch.nonzero(mask)
    (y0, x0), (y1, x1) = cells.min(dim=0).values.tolist(), cells.max(dim=0).values.tolist()
    around = Box(x0, y0, x1 + 1, y1 + 1)
    return SdRpnRegion(around, source_box(around, logits.shape, side, size),
                       token_mask(mask, around, region_grid)), blurred
