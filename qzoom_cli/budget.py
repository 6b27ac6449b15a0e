"""Visual-token budgets and the resize that enforces them.

A vision-language model turns every `factor x factor` pixel cell into one LLM token (28 for
Qwen2.5-VL: 14 px patches merged 2x2; 32 for Qwen3-VL). Processors are known to ignore a
requested `max_pixels`, so qzoom resizes pages itself to a size whose token count is exact and
hands the processor an image it has no reason to touch. Images thinner than the models' 200:1
limit (a receipt roll, one line of text) are padded with white at the right or bottom into the
limit: the content keeps its top-left origin, so page coordinates stay what they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from .errors import PageShape, UsageError

MAX_ASPECT_RATIO = 200
MAX_VISUAL_TOKENS = 16384  # the most any family's processor reads an image at; more would hold a model for minutes


@dataclass(frozen=True)
class VisualBudget:
    """Bounds on the number of visual tokens of one image, inclusive."""

    min_tokens: int
    max_tokens: int

    def __post_init__(self):
        if self.min_tokens < 1 or self.max_tokens < 1:
            raise UsageError("visual-token budgets must be positive")
        if self.max_tokens > MAX_VISUAL_TOKENS:
            raise UsageError(f"visual-token budgets are at most {MAX_VISUAL_TOKENS} tokens, not {self.max_tokens}")
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
        raise PageShape(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise PageShape(f"aspect ratio of {width}x{height} exceeds {MAX_ASPECT_RATIO}:1")
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


def aspect_canvas(width: int, height: int) -> tuple[int, int]:
    """(w, h) of the canvas an image is read on: itself, or for one beyond the aspect-ratio limit
    the smallest canvas within it that holds the image at its top-left corner."""
    return max(width, math.ceil(height / MAX_ASPECT_RATIO)), max(height, math.ceil(width / MAX_ASPECT_RATIO))


def token_grid(height: int, width: int, factor: int, budget: VisualBudget) -> tuple[int, int]:
    """(rows, cols) of LLM tokens an image of this size (on its `aspect_canvas`) gets under `budget`."""
    width, height = aspect_canvas(width, height)
    h, w = smart_resize(height, width, factor, *budget.pixel_bounds(factor))
    return h // factor, w // factor


def visual_tokens(height: int, width: int, factor: int, budget: VisualBudget) -> int:
    rows, cols = token_grid(height, width, factor, budget)
    return rows * cols


@dataclass(frozen=True)
class Canvas:
    """How an image is laid on the canvas a model reads it on.

    Qwen-VL (the default): the image itself or, beyond the aspect-ratio limit, the smallest canvas
    within it; content at the top-left, padding white, so page coordinates need no shift. LLaVA:
    a square around the image, content centred, padding in the image processor's mean colour
    (the published pad-to-square)."""

    square: bool = False
    centred: bool = False
    fill: tuple[int, int, int] = (255, 255, 255)

    def size(self, width: int, height: int) -> tuple[int, int]:
        """(w, h) of the canvas an image of this size is read on."""
        if self.square:
            side = max(width, height)
            return side, side
        return aspect_canvas(width, height)

    def offset(self, width: int, height: int) -> tuple[int, int]:
        """Where an image of this size sits on its canvas: its top-left corner, in canvas pixels."""
        if not self.centred:
            return 0, 0
        canvas_w, canvas_h = self.size(width, height)
        return (canvas_w - width) // 2, (canvas_h - height) // 2

    def content_size(self, size: tuple[int, int], out: tuple[int, int]) -> tuple[int, int]:
        """(w, h) an image of `size` takes inside `out` pixels when its canvas is scaled to `out`."""
        canvas = self.size(*size)
        return (max(1, round(size[0] * out[0] / canvas[0])), max(1, round(size[1] * out[1] / canvas[1])))

    def place(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        """`image` (already at its content size) on an RGB canvas of `size` pixels."""
        image = image.convert("RGB")
        if image.size == size:
            return image
        canvas = Image.new("RGB", size, self.fill)
        at = ((size[0] - image.width) // 2, (size[1] - image.height) // 2) if self.centred else (0, 0)
        canvas.paste(image, at)
        return canvas

    def pad(self, image: Image.Image) -> Image.Image:
        """`image` on its canvas at its own resolution."""
        image = image.convert("RGB")
        size = self.size(*image.size)
        if size == image.size:
            return image
        canvas = Image.new("RGB", size, self.fill)
        canvas.paste(image, self.offset(*image.size))
        return canvas


ASPECT_CANVAS = Canvas()


def resize_to_budget(image: Image.Image, factor: int, budget: VisualBudget) -> Image.Image:
    """The image resized (bicubic) to the exact size its budget allows, on its aspect canvas; RGB."""
    rows, cols = token_grid(image.height, image.width, factor, budget)
    size = (cols * factor, rows * factor)
    content = ASPECT_CANVAS.content_size(image.size, size)
    return ASPECT_CANVAS.place(bicubic(image.convert("RGB"), content), size)  # RGB first: a palette resizes by index


def resize_canvas(image: Image.Image, size: tuple[int, int], canvas: Canvas) -> Image.Image:
    """The image padded onto its canvas at its own resolution, then the whole canvas resized
    (bicubic) to `size`: a fixed-grid family's read (LLaVA's pad-to-square, then the resize)."""
    return bicubic(canvas.pad(image), size)


def bicubic(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` resized (bicubic, as the models' processors resample) to `size` (w, h); the same size: a copy."""
    return image.resize(size, Image.Resampling.BICUBIC)  # pragma: no mutate (None: Pillow's default, bicubic)
