"""Visual-token budgets and the resize that enforces them.

A vision-language model turns every `factor x factor` pixel cell into one LLM token (28 for
Qwen2.5-VL: 14 px patches merged 2x2; 32 for Qwen3-VL). Processors are known to ignore a
requested `max_pixels`, so qzoom resizes pages itself to a size whose token count is exact and
hands the processor an image it has no reason to touch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from .errors import UsageError

MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class VisualBudget:
    """Bounds on the number of visual tokens of one image, inclusive."""

    min_tokens: int
    max_tokens: int

    def __post_init__(self):
        if self.min_tokens < 1 or self.max_tokens < 1:
            raise UsageError("visual-token budgets must be positive")
        if self.min_tokens > self.max_tokens:
            raise UsageError(
                f"--min-visual-tokens ({self.min_tokens}) is larger than --max-visual-tokens ({self.max_tokens})"
            )

    def pixel_bounds(self, factor: int) -> tuple[int, int]:
        """(min_pixels, max_pixels) for a family whose token covers `factor x factor` pixels."""
        return self.min_tokens * factor * factor, self.max_tokens * factor * factor


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Closest (height, width) that are multiples of `factor` with area in [min_pixels, max_pixels].

    Same rule as Qwen's `smart_resize`: round each side to the grid, then scale both sides by one
    factor (floor when shrinking, ceil when growing) so the aspect ratio is kept. One deviation:
    when growing to reach `min_pixels` would overshoot `max_pixels` (min close to max, extreme
    aspect ratio), the maximum wins, so a budget is never exceeded.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio of {width}x{height} exceeds {MAX_ASPECT_RATIO}:1")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
        if h_bar * w_bar > max_pixels:
            h_bar = max(factor, math.floor(height * beta / factor) * factor)
            w_bar = max(factor, math.floor(width * beta / factor) * factor)
    return h_bar, w_bar


def token_grid(height: int, width: int, factor: int, budget: VisualBudget) -> tuple[int, int]:
    """(rows, cols) of LLM tokens an image of this size gets under `budget`."""
    h, w = smart_resize(height, width, factor, *budget.pixel_bounds(factor))
    return h // factor, w // factor


def visual_tokens(height: int, width: int, factor: int, budget: VisualBudget) -> int:
    rows, cols = token_grid(height, width, factor, budget)
    return rows * cols


def resize_to_budget(image: Image.Image, factor: int, budget: VisualBudget) -> Image.Image:
    """The image resized (bicubic) to the exact size its budget allows; RGB."""
    rows, cols = token_grid(image.height, image.width, factor, budget)
    size = (cols * factor, rows * factor)
    image = image.convert("RGB")
    if image.size == size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC)
