"""Heatmap -> box -> page pixels -> crop -> positions: the pure geometry, exhaustively."""

import itertools
import random

import numpy as np
import pytest
import torch
from docmaker import make_image, make_pdf
from PIL import ImageOps

from qzoom_cli.backbones import ImageBlock
from qzoom_cli.backbones.qwen2_5_vl import mrope_position_ids
from qzoom_cli.documents import open_document
from qzoom_cli.zoom.fuse import align_positions
from qzoom_cli.zoom.geometry import (
    Box,
    aligned_region_positions,
    attention_lift,
    equivalent_page_tokens,
    foreground_box,
    gaussian_blur3,
    grid_box_to_pixels,
    normalized,
    relative_region_map,
    sigmoid_region_map,
    sink_mask,
)

G = (0.27406862, 0.45186276, 0.27406862)


def test_sink_mask_only_on_large_grids():
    assert sink_mask(16, 16).all()  # 256 tokens: nothing masked
    keep = sink_mask(20, 24)
    masked = {tuple(c) for c in torch.nonzero(~keep).tolist()}
    assert masked == {(r, 0) for r in range(5)} | {(0, c) for c in range(6)}
    assert not sink_mask(300, 1)[0, 0] and sink_mask(300, 1)[75, 0]
    wide, tall = sink_mask(3, 100), sink_mask(100, 3)  # under four rows (columns): the corner cell alone
    assert {tuple(c) for c in torch.nonzero(~wide).tolist()} == {(0, c) for c in range(25)}
    assert {tuple(c) for c in torch.nonzero(~tall).tolist()} == {(r, 0) for r in range(25)}


def test_blur_by_hand():
    delta = torch.zeros(5, 5)
    delta[2, 2] = 1
    out = gaussian_blur3(delta)
    assert out[2, 2] == pytest.approx(G[1] ** 2) and out[1, 2] == pytest.approx(G[0] * G[1])
    assert out[1, 1] == pytest.approx(G[0] ** 2) and out[0].sum() == 0
    corner = torch.zeros(4, 4)
    corner[0, 0] = 1
    out = gaussian_blur3(corner)  # reflect padding mirrors the row/column next to the edge
    assert out[0, 0] == pytest.approx(G[1] ** 2) and out[0, 1] == pytest.approx(G[1] * G[0])
    row = torch.tensor([[0.0, 1.0, 0.0]])
    assert gaussian_blur3(row).tolist()[0] == pytest.approx([2 * G[0], G[1], 2 * G[0]])
    assert torch.equal(gaussian_blur3(torch.ones(1, 1)), torch.ones(1, 1))
    near = torch.zeros(4, 4)
    near[1, 1] = 1
    assert gaussian_blur3(near)[0, 1] == pytest.approx(2 * G[0] * G[1])  # mirrored across the top edge
    assert gaussian_blur3(torch.tensor([[1.0, 0.0]])).tolist()[0] == pytest.approx([G[1], 2 * G[0]])  # two cells too
    assert gaussian_blur3(torch.tensor([[1.0], [0.0]])).flatten().tolist() == pytest.approx([G[1], 2 * G[0]])


def test_foreground_box_cases():
    prob = torch.zeros(6, 9)
    assert foreground_box(prob, 0.1) is None
    prob[2, 3] = 0.5
    assert foreground_box(prob, 0.1) == Box(3, 2, 4, 3)
    prob[5, 8] = 0.2  # far corner cell: one box encloses both, no components
    assert foreground_box(prob, 0.1) == Box(3, 2, 9, 6)
    assert foreground_box(prob, 0.2) == Box(3, 2, 4, 3)  # strictly above the threshold
    prob[0, 0] = 0.9
    assert foreground_box(prob, 0.1) == Box(0, 0, 9, 6)


def test_region_maps():
    logits = torch.full((20, 20), -4.0)
    logits[0, 0] = 50.0  # an attention sink: ignored
    logits[10:12, 5:8] = 3.0
    keep = sink_mask(20, 20)
    for prob in (sigmoid_region_map(logits, keep), relative_region_map(logits, keep)):
        box = foreground_box(prob, 0.3 * float(prob.max()))
        assert box is not None and box.x0 >= 4 and box.y0 >= 9 and box.x1 <= 9 and box.y1 <= 13
    rel = relative_region_map(logits, keep)
    nothing = torch.zeros(20, 20, dtype=torch.bool)
    assert not relative_region_map(logits, nothing).any()  # all sinks: no region
    half = logits.to(torch.bfloat16)  # a GPU's logits: a float32 map either way
    assert relative_region_map(half, keep).dtype == relative_region_map(half, nothing).dtype == torch.float32
    assert float(rel.max()) == pytest.approx(1.0)
    everywhere = torch.ones(8, 8, dtype=torch.bool)
    assert attention_lift(torch.ones(8, 8), Box(0, 0, 4, 4), everywhere) == pytest.approx(1.0)
    peaked = torch.zeros(8, 8)
    peaked[1, 1] = 1
    assert attention_lift(peaked, Box(0, 0, 2, 2), everywhere) == pytest.approx(16.0)
    assert attention_lift(torch.zeros(3, 3), Box(0, 0, 1, 1), torch.ones(3, 3, dtype=torch.bool)) == 0.0
    half = everywhere.clone()
    half[:, 4:] = False  # the page covers the left half of the grid: uniform over it is lift 1
    on_page = torch.zeros(8, 8)
    on_page[:, :4] = 1
    assert attention_lift(on_page, Box(0, 0, 2, 4), half) == pytest.approx(1.0)
    assert attention_lift(peaked, Box(0, 0, 2, 2), half) == pytest.approx(8.0)
    away = torch.zeros(8, 8)
    away[5, 5] = 1
    assert attention_lift(away, Box(4, 4, 6, 6), everywhere) == pytest.approx(16.0)  # a box off the origin
    edge = torch.zeros(8, 8)
    edge[5, 3] = 1
    assert attention_lift(edge, Box(3, 4, 5, 6), half) == pytest.approx(16.0)  # only its left column on the page


@pytest.mark.parametrize("size, rows_on, cols_on", [
    ((1000, 500), range(6, 18), range(24)),       # wide: 250 px of padding above and below = 6 cells
    ((500, 1000), range(24), range(6, 18)),
    ((700, 700), range(24), range(24)),
    ((1000, 510), range(5, 19), range(24)),       # 245 px: the 6th cell row shows 5 px of page
])
def test_page_cells_are_the_cells_showing_some_of_the_page(size, rows_on, cols_on):
    from qzoom_cli.budget import ASPECT_CANVAS, MAX_ASPECT_RATIO, Canvas
    from qzoom_cli.zoom.geometry import page_cells

    cells = page_cells((24, 24), size, Canvas(square=True, centred=True))
    expected = torch.zeros(24, 24, dtype=torch.bool)
    expected[rows_on.start:rows_on.stop, cols_on.start:cols_on.stop] = True
    assert torch.equal(cells, expected)
    assert page_cells((5, 7), size, ASPECT_CANVAS).all()
    thin = page_cells((20, 2), (100, 100 * MAX_ASPECT_RATIO * 2), ASPECT_CANVAS)  # the aspect canvas's padding
    assert thin[:, 0].all() and not thin[:, 1].any()


def _random_cases(count=400, seed=0):
    rng = random.Random(seed)
    for _ in range(count):
        rows, cols = rng.randint(1, 40), rng.randint(1, 40)
        width, height = rng.choice([rng.randint(1, 60), rng.randint(60, 5000)]), rng.randint(1, 5000)
        y0, x0 = rng.randrange(rows), rng.randrange(cols)
        yield Box(x0, y0, rng.randint(x0 + 1, cols), rng.randint(y0 + 1, rows)), (rows, cols), (width, height)


def test_grid_box_to_pixels_properties():
    for box, grid, (width, height) in _random_cases():
        px = grid_box_to_pixels(box, grid, (width, height), 28)
        rows, cols = grid
        assert all(isinstance(v, int) for v in px.as_list())
        assert 0 <= px.x0 < px.x1 <= width and 0 <= px.y0 < px.y1 <= height
        assert px.width >= min(28, width) and px.height >= min(28, height)
        exact = (box.x0 * width / cols, box.y0 * height / rows, box.x1 * width / cols, box.y1 * height / rows)
        if exact[2] - exact[0] >= 28:  # large enough: the box covers its cells up to truncation
            assert px.x0 <= exact[0] + 1e-6 and px.x1 >= int(exact[2]) - 1
        else:  # grown around the centre, slid inside
            centre = (exact[0] + exact[2]) / 2
            assert px.x0 - 1 <= centre <= px.x1 + 1


@pytest.mark.parametrize("box,grid,expected", [
    (Box(0, 0, 1, 1), (100, 100), Box(0, 0, 28, 28)),              # 10 px corner cell: grown, clamped at 0
    (Box(99, 99, 100, 100), (100, 100), Box(972, 972, 1000, 1000)),  # far corner: slid back inside
    (Box(50, 50, 51, 51), (100, 100), Box(491, 491, 519, 519)),      # grown around its centre
    (Box(0, 0, 10, 10), (10, 10), Box(0, 0, 1000, 1000)),            # whole page
    (Box(4, 2, 6, 3), (10, 10), Box(400, 200, 600, 300)),            # plain scaling
])
def test_grid_box_to_pixels_edges(box, grid, expected):
    assert grid_box_to_pixels(box, grid, (1000, 1000), 28) == expected
    grown = grid_box_to_pixels(box, grid, (1000, 1000), 40)
    assert grown.width >= 40 and grown.height >= 40


def test_tiny_page_gets_whole_sides():
    assert grid_box_to_pixels(Box(0, 0, 1, 1), (2, 2), (20, 10), 28) == Box(0, 0, 20, 10)


def test_normalized_and_equivalent_tokens():
    assert normalized(Box(100, 50, 300, 150), (400, 200)) == [0.25, 0.25, 0.75, 0.75]
    assert normalized(Box(1, 1, 2, 2), (3, 3)) == [0.3333, 0.3333, 0.6667, 0.6667]  # to 1e-4
    assert equivalent_page_tokens(500, Box(0, 0, 100, 100), (200, 400)) == 4000


def test_aligned_positions_span_the_box():
    rows_map = torch.arange(5).view(5, 1).expand(5, 7).float() + 10
    cols_map = torch.arange(7).view(1, 7).expand(5, 7).float() + 10
    h, w = aligned_region_positions(rows_map, cols_map, Box(2, 1, 6, 4), 4, 9)
    assert h.shape == w.shape == (36,)
    assert (h[0], w[0]) == (11.0, 12.0) and (h[-1], w[-1]) == (13.0, 15.0)
    assert torch.all(torch.diff(w[:9]) > 0) and torch.all(h.view(4, 9)[:, 0].diff() > 0)
    one_h, one_w = aligned_region_positions(rows_map, cols_map, Box(3, 2, 4, 3), 1, 1)
    assert (float(one_h[0]), float(one_w[0])) == (12.0, 13.0)


@pytest.mark.parametrize("src,region", [((5, 7), (4, 9)), ((3, 3), (1, 1)), ((6, 2), (8, 3))])
def test_fused_positions_both_schemes(src, region):
    source = ImageBlock(4, *src)
    roi = ImageBlock(source.stop + 2, *region)
    length = roi.stop + 6
    plain = mrope_position_ids(length, [source, roi])
    start = 4 + max(src)  # the source's <|vision_end|> position, p_e
    assert plain[0, 0, roi.start] == start + 2 and plain[1, 0, roi.start] == start + 2
    assert plain[0, 0, roi.stop] == start + 2 + max(region)  # region <|vision_end|>
    box = Box(0, 1, src[1], src[0])
    aligned = align_positions(plain, (1, 2), source, roi, box)
    assert aligned.dtype == torch.float32
    assert torch.equal(aligned[0], plain[0].float())  # temporal row untouched
    mask = torch.ones(length, dtype=torch.bool)
    mask[roi.start:roi.stop] = False
    assert torch.equal(aligned[:, 0, mask], plain[:, 0, mask].float())  # everything else untouched
    src_rows = plain[1, 0, source.start:source.stop].view(*src)
    assert aligned[1, 0, roi.start] == src_rows[1, 0]  # first region row sits on the box's first row
    if region[0] > 1:  # ... and the last on its last row (a one-row region stays on the first)
        assert aligned[1, 0, roi.stop - 1] == src_rows[src[0] - 1, 0]


def _pixels(image):
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("rotate", [None, 90, 270])
def test_pdf_region_crop_matches_a_render_at_that_resolution(rotate):
    """A PDF region is re-rendered (vector-sharp) and shows exactly the page box it names."""
    data = make_pdf(1, rotate={1: rotate} if rotate else None)
    with open_document(data, dpi=36) as doc, open_document(data, dpi=144) as fine:  # page pixels are 2 points
        width, height = doc.page_size(1)
        ink = ImageOps.invert(doc.render(1).convert("L")).getbbox()  # where the (rotated) page has content
        x0, y0 = min(ink[0], width - 150), min(ink[1], height - 90)
        box = Box(x0, y0, x0 + 150, y0 + 90)
        region = doc.render_region(1, box, (600, 360))  # 4x magnification
        reference = fine.render(1).crop((box.x0 * 4, box.y0 * 4, box.x1 * 4, box.y1 * 4))
        assert region.size == reference.size == (600, 360) and _pixels(reference).std() > 20  # not a blank box
        assert np.abs(_pixels(region) - _pixels(reference)).mean() < 3
        squeezed = doc.render_region(1, box, (600, 180))  # 4x across, 2x down: rendered at 4x, then resized
        assert np.abs(_pixels(squeezed) - _pixels(reference.resize((600, 180)))).mean() < 0.5


@pytest.mark.parametrize("size, rendered", [
    ((600, 360), (600, 360)),  # 4x both ways
    ((600, 180), (600, 360)),  # 4x across, 2x down: the larger scale
    ((300, 360), (600, 360)),  # 2x across, 4x down: the larger scale
    ((1200, 720), (900, 540)),  # 8x wanted: capped at MAX_REGION_DPI
])
def test_pdf_regions_render_at_the_scale_their_size_needs_up_to_the_cap(monkeypatch, size, rendered):
    """The clip is rendered once at the larger of the two magnifications (never beyond
    MAX_REGION_DPI, which bounds memory), then resized to `size`."""
    import qzoom_cli.documents as documents

    monkeypatch.setattr(documents, "MAX_REGION_DPI", 216)  # 6x the document's 36 dpi
    seen = []
    monkeypatch.setattr(documents, "bicubic", lambda image, size: seen.append(image.size) or image.resize(size))
    with open_document(make_pdf(1), dpi=36) as doc:  # page pixels are 2 points
        assert doc.render_region(1, Box(20, 30, 170, 120), size).size == size
    assert seen == [rendered]


def test_image_region_crop_uses_original_pixels():
    data = make_image("PNG", size=(400, 300))
    with open_document(data) as doc:
        box = Box(10, 20, 110, 70)
        region = doc.render_region(1, box, (100, 50))
        assert np.array_equal(_pixels(region), _pixels(doc.render(1).crop((10, 20, 110, 70))))
        assert doc.render_region(1, box, (200, 100)).size == (200, 100)


def test_chain_from_heatmap_to_crop_on_odd_sizes():
    """A blob in the map ends up as a crop of that part of the page, for odd grids and pages."""
    for (rows, cols), (width, height) in itertools.product([(7, 5), (13, 21), (1, 9)], [(333, 517), (29, 1001)]):
        logits = torch.full((rows, cols), -6.0)
        r, c = rows // 2, cols // 3
        logits[r, c] = 6.0
        box = foreground_box(sigmoid_region_map(logits, sink_mask(rows, cols)), 0.2)
        assert box is not None and box.x0 <= c < box.x1 and box.y0 <= r < box.y1
        px = grid_box_to_pixels(box, (rows, cols), (width, height), 28)
        centre = ((c + 0.5) * width / cols, (r + 0.5) * height / rows)
        assert px.x0 <= centre[0] <= px.x1 and px.y0 <= centre[1] <= px.y1


def test_region_on_page_cuts_the_canvas_to_the_page():
    """A very thin page is read on a wider canvas (the aspect limit); a box there maps to page pixels
    cut to the page, and one wholly in the canvas's padding to nothing."""
    from qzoom_cli.budget import ASPECT_CANVAS, MAX_ASPECT_RATIO
    from qzoom_cli.zoom.geometry import region_on_page

    page = (100, int(100 * MAX_ASPECT_RATIO * 2))          # twice too tall: the canvas is twice as wide
    canvas_width = page[1] / MAX_ASPECT_RATIO
    assert canvas_width == 2 * page[0]
    grid = (20, 2)                                          # one token column per page width
    assert region_on_page(Box(0, 0, 1, 20), grid, page, 28, ASPECT_CANVAS) == Box(0, 0, 100, page[1])
    assert region_on_page(Box(1, 0, 2, 20), grid, page, 28, ASPECT_CANVAS) is None   # the padding beside the page
    assert region_on_page(Box(0, 0, 2, 10), grid, page, 28, ASPECT_CANVAS) == Box(0, 0, 100, page[1] // 2)
    assert region_on_page(Box(0, 0, 1, 1), (2, 2), (20, 10), 28, ASPECT_CANVAS) == Box(0, 0, 20, 10)
