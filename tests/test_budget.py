import itertools
import math

import pytest
from PIL import Image

from qzoom_cli.budget import (
    ASPECT_CANVAS,
    MAX_ASPECT_RATIO,
    MAX_VISUAL_TOKENS,
    Canvas,
    VisualBudget,
    aspect_canvas,
    resize_to_budget,
    smart_resize,
    token_grid,
    visual_tokens,
)
from qzoom_cli.errors import EXIT_INPUT, PageShape, UsageError
from qzoom_cli.zoom.pipeline import ZoomSettings

# performance.md: an A4 page at several DPIs under several budgets (Qwen2.5-VL, factor 28).
A4_TABLE = {
    (595, 842): (630, 560, 630, 630),
    (827, 1169): (1260, 560, 988, 1260),
    (1191, 1683): (2580, 560, 988, 2580),
    (1654, 2338): (4956, 560, 988, 4028),
    (2481, 3507): (11125, 560, 988, 4028),
}


@pytest.mark.parametrize("size", A4_TABLE)
def test_a4_token_counts_match_the_published_table(size):
    width, height = size
    got = tuple(visual_tokens(height, width, 28, VisualBudget(4, cap)) for cap in (MAX_VISUAL_TOKENS, 576, 1024, 4096))
    assert got == A4_TABLE[size]


SIZES = [1, 13, 27, 28, 29, 100, 333, 595, 1000, 2339, 4001]


@pytest.mark.parametrize("factor", [28, 32])
@pytest.mark.parametrize("budget", [VisualBudget(4, 16), VisualBudget(256, 576), VisualBudget(256, 4096),
                                    VisualBudget(1024, 1024)])
def test_smart_resize_properties(factor, budget):
    min_px, max_px = budget.pixel_bounds(factor)
    for height, width in itertools.product(SIZES, SIZES):
        if max(height, width) / min(height, width) > 200:
            continue
        h, w = smart_resize(height, width, factor, min_px, max_px)
        assert h % factor == 0 and w % factor == 0 and h >= factor and w >= factor
        assert h * w <= max_px or min(h, w) == factor  # only a side clamped to one token can overshoot
        if budget.max_tokens >= 4 * budget.min_tokens:
            assert h * w >= min_px
        if min(h, w) > 2 * factor:  # aspect kept up to one grid cell of rounding per side
            assert abs(math.log((h / w) / (height / width))) <= 2 * factor / (min(h, w) - factor)


@pytest.mark.parametrize(("size", "message"), [
    ((10, 3000), "aspect ratio of 3000x10 exceeds 200:1"), ((3000, 10), "aspect ratio of 10x3000 exceeds 200:1"),
    ((0, 50), "image size must be positive, got 50x0"), ((50, 0), "image size must be positive, got 0x50"),
])
def test_unreadable_shapes_are_input_errors(size, message):
    """Past the aspect limit, or empty: a named input error (exit 3), not an internal one."""
    with pytest.raises(PageShape, match=f"^{message}$") as caught:
        smart_resize(*size, 28, 4 * 784, 576 * 784)
    assert caught.value.exit_code == EXIT_INPUT


def test_a_rounded_area_exactly_at_a_bound_is_kept():
    """Bounds are inclusive: rounding to the grid landing exactly on the budget's maximum (2048
    tokens) or minimum (4) is the answer, not rescaled past it."""
    assert smart_resize(890, 1800, 28, 4 * 784, 2048 * 784) == (896, 1792)
    assert smart_resize(30, 100, 28, 4 * 784, 16 * 784) == (28, 112)
    assert smart_resize(41, 41, 28, 16 * 784, 16 * 784) == (112, 112)  # grown exactly onto min == max


@pytest.mark.parametrize("size", [(6000, 20), (15, 4000), (201, 1), (200, 1)])
def test_thin_images_are_padded_into_the_aspect_limit(size):
    """Beyond 200:1 the image is read on a white canvas within the limit, content at the top left."""
    budget = VisualBudget(16, 256)
    image = Image.new("RGB", size, (200, 10, 10))
    canvas = aspect_canvas(*size)
    assert max(canvas) / min(canvas) <= MAX_ASPECT_RATIO and canvas[0] >= size[0] and canvas[1] >= size[1]
    assert (canvas == size) == (max(size) / min(size) <= MAX_ASPECT_RATIO)
    rows, cols = token_grid(size[1], size[0], 28, budget)
    resized = resize_to_budget(image, 28, budget)
    assert resized.size == (cols * 28, rows * 28) and rows * cols <= 256
    assert resized.getpixel((0, 0)) == (200, 10, 10)
    inside = ASPECT_CANVAS.content_size(size, resized.size)
    if canvas != size:
        far = (resized.width - 1, resized.height - 1)
        assert resized.getpixel(far) == (255, 255, 255)
        assert inside[0] < resized.width or inside[1] < resized.height


@pytest.mark.parametrize("size", [(7000, 24), (24, 7000)])
def test_a_thin_page_is_answered_with_its_region_on_the_page(qz, tmp_path, size):
    from PIL import ImageDraw

    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((5, 5), "TOTAL 42.00", fill="black")
    image.save(tmp_path / "strip.png")
    [result] = qz.ask(tmp_path / "strip.png", "total?", zoom=ZoomSettings("always", roi_threshold=0.0),
                      max_new_tokens=2, budget=VisualBudget(16, 64))
    assert result.status in ("ok", "truncated") and result.zoom.zoomed
    x0, y0, x1, y1 = result.zoom.roi["bbox_xyxy"]
    assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]


@pytest.mark.parametrize("size", [(1654, 2338), (333, 100), (28, 28), (5000, 400)])
def test_resize_gives_exactly_the_counted_tokens(size):
    budget = VisualBudget(64, 576)
    image = Image.new("RGBA", size, (10, 20, 30, 255))
    resized = resize_to_budget(image, 28, budget)
    rows, cols = token_grid(size[1], size[0], 28, budget)
    assert resized.mode == "RGB"
    assert resized.size == (cols * 28, rows * 28)
    assert rows * cols <= budget.max_tokens


def test_budget_validation():
    with pytest.raises(UsageError, match=r"^--min-visual-tokens \(600\) is larger than --max-visual-tokens \(576\)$"):
        VisualBudget(600, 576)
    for bounds in ((0, 576), (4, 0)):
        with pytest.raises(UsageError, match="^visual-token budgets must be positive$"):
            VisualBudget(*bounds)
    assert VisualBudget(256, 576).pixel_bounds(32) == (256 * 1024, 576 * 1024)


def test_resolve_budget_fills_missing_bound(qz):
    assert qz.default_budget("auto") == VisualBudget(256, 576)  # zoom: a cheap coarse pass
    assert qz.default_budget("never") == VisualBudget(256, 1280)  # one pass must see enough
    default = qz.default_budget()
    assert qz.resolve_budget() == default
    assert qz.resolve_budget(max_tokens=64) == VisualBudget(min(default.min_tokens, 64), 64)
    assert qz.resolve_budget(min_tokens=5000) == VisualBudget(5000, 5000)
    assert qz.resolve_budget(100, 200) == VisualBudget(100, 200)
    assert qz.backbone.layout.patch_factor == 28


@pytest.mark.parametrize(("canvas", "size", "out", "inside"), [
    (ASPECT_CANVAS, (6000, 20), (2800, 28), (2800, 19)),  # aspect canvas 6000 x 30: both sides scale apart
    (ASPECT_CANVAS, (20, 6000), (28, 2800), (19, 2800)),
    (ASPECT_CANVAS, (300, 200), (336, 224), (336, 224)),  # no padding: the whole output
    (Canvas(square=True, centred=True), (1000, 2), (336, 336), (336, 1)),  # under a pixel: still one row
    (Canvas(square=True, centred=True), (2, 1000), (336, 336), (1, 336)),
    (Canvas(square=True, centred=True), (400, 100), (336, 336), (336, 84)),
])
def test_content_size_is_the_image_share_of_its_scaled_canvas(canvas, size, out, inside):
    assert canvas.content_size(size, out) == inside


@pytest.mark.parametrize(("canvas", "corner"), [(ASPECT_CANVAS, (0, 0)),
                                                (Canvas(centred=True, fill=(1, 2, 3)), (7, 2))])
def test_place_puts_the_content_at_its_corner_on_the_fill(canvas, corner):
    """Qwen: content at the top left; LLaVA: centred (floored) — the offset page boxes are shifted by."""
    content = Image.new("L", (5, 3), 40)
    placed = canvas.place(content, (20, 8))
    assert placed.mode == "RGB" and placed.size == (20, 8)
    x, y = corner
    inside = [(px, py) for px in range(20) for py in range(8) if placed.getpixel((px, py)) == (40, 40, 40)]
    assert (min(inside), max(inside)) == ((x, y), (x + 4, y + 2)) and len(inside) == 15
    assert placed.getpixel((19, 7)) == canvas.fill
    assert canvas.place(Image.new("RGBA", (20, 8)), (20, 8)).mode == "RGB"
    assert canvas.pad(Image.new("L", (20, 8))).mode == "RGB"  # already on its canvas: still converted


def test_resize_scales_the_whole_image_in_colour():
    """The content is scaled, not cropped, onto the budget's size; palette and bilevel images are
    resized in colour (bicubic), as their RGB copies are, not by nearest index."""
    image = Image.new("RGB", (600, 400), "white")
    image.paste((0, 0, 0), (300, 0, 600, 400))  # right half black
    resized = resize_to_budget(image, 28, VisualBudget(4, 16))
    assert resized.size != image.size
    assert resized.getpixel((resized.width - 1, 0)) == (0, 0, 0) and resized.getpixel((0, 0)) == (255, 255, 255)
    for indexed in (image.quantize(2), image.convert("1")):  # a palette PNG, a bilevel (fax) scan
        assert resize_to_budget(indexed, 28, VisualBudget(4, 16)).tobytes() == resized.tobytes()
