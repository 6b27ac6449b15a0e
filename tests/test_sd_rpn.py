"""SD-RPN's region rule for its converted LLaVA heads (components, mask, stretched crop), pinned on
tiny maps, and read by the engine: the boxes, region tokens and answers SD-RPN's evaluation reads."""

import json

import pytest
import torch
from docmaker import make_pdf
from PIL import Image
from typer.testing import CliRunner

from qzoom_cli import QZoom, cli
from qzoom_cli.decode import prefill
from qzoom_cli.documents import open_document
from qzoom_cli.zoom import pipeline
from qzoom_cli.zoom.geometry import Box
from qzoom_cli.zoom.pipeline import ZoomSettings
from qzoom_cli.zoom.region import RegionMap
from qzoom_cli.zoom.sd_rpn import component_boxes, components, sd_rpn_region, source_box, token_mask

HIGH, LOW = 12.0, -12.0  # logits whose sigmoid is ~1 and ~0


def cells(*where: tuple[int, int], size: int = 24) -> torch.Tensor:
    grid = torch.zeros(size, size)
    for r, c in where:
        grid[r, c] = 1.0
    return grid


def block(grid: torch.Tensor, r: int, c: int, h: int, w: int) -> torch.Tensor:
    grid[r:r + h, c:c + w] = 1.0
    return grid


def test_components_are_8_connected_in_raster_order():
    found = components(cells((3, 3), (4, 4), (0, 10), (9, 0), (9, 2)) > 0.5)
    assert found == [[(0, 10)], [(3, 3), (4, 4)], [(9, 0)], [(9, 2)]]  # diagonal cells join; a gap does not


def test_component_boxes_drop_single_cells_grow_small_ones_and_drop_large_ones():
    assert component_boxes(cells((5, 5)), 0.5) == []  # one cell: a sink or noise
    assert component_boxes(cells((5, 5), (5, 6)), 0.5) == [Box(4, 4, 7, 7)]  # two cells: grown to 3 x 3
    assert component_boxes(cells((5, 5), (5, 6), (6, 5)), 0.5) == [Box(4, 4, 7, 7)]
    assert component_boxes(block(torch.zeros(24, 24), 5, 5, 2, 2), 0.5) == [Box(5, 5, 7, 7)]  # four: as they are
    assert component_boxes(block(torch.zeros(24, 24), 0, 0, 15, 15), 0.5) == [Box(0, 0, 15, 15)]  # 225 cells
    assert component_boxes(block(torch.zeros(24, 24), 0, 0, 15, 16), 0.5) == []  # 240 cells: too large
    # a small component at the far corner: grown, its far edge capped at the last cell (SD-RPN's cap)
    assert component_boxes(cells((23, 22), (23, 23)), 0.5) == [Box(21, 22, 23, 23)]
    assert component_boxes(cells((2, 2), (2, 3), (20, 20)), 0.5) == [Box(1, 1, 4, 4)]


def test_source_box_takes_the_squares_padding_off_in_source_pixels():
    # 500 x 300 fitted into 336: 336 x 201, 67.5 px of padding above and below
    assert source_box(Box(7, 12, 13, 18), (24, 24), 336, (500, 300)) == Box(145, 149, 270, 274)
    assert source_box(Box(0, 0, 24, 24), (24, 24), 336, (500, 300)) == Box(0, 0, 500, 300)  # cut to the image
    # 100 x 400 fitted into 336: 84 x 336, 126 px of padding left and right; a box there reads nothing
    assert source_box(Box(0, 0, 3, 3), (24, 24), 336, (100, 400)).width == 0


def test_token_mask_resizes_the_masks_box_to_the_regions_grid():
    mask = torch.zeros(24, 24, dtype=torch.bool)
    mask[2:4, 10:12] = True
    mask[2:4, 13] = True  # a gap of one column between the two parts
    keep = token_mask(mask, Box(10, 2, 14, 4), (24, 24))
    assert keep.shape == (24, 24) and all(row == [True] * 12 + [False] * 6 + [True] * 6 for row in keep.tolist())


def logits_with(*blocks: tuple[int, int, int, int]) -> torch.Tensor:
    grid = torch.full((24, 24), LOW)
    for r, c, h, w in blocks:
        grid[r:r + h, c:c + w] = HIGH
    return grid


def test_no_component_reads_nothing_and_one_is_read_whole():
    nothing, blurred = sd_rpn_region(logits_with((5, 5, 1, 1)), 0.5, (500, 300), 336, (24, 24))
    assert nothing is None and blurred.shape == (24, 24)
    one, _ = sd_rpn_region(logits_with((5, 6, 2, 2)), 0.5, (336, 336), 336, (24, 24))
    assert one.grid_box == Box(6, 5, 8, 7) and one.keep is None and one.page_box == Box(84, 70, 112, 98)


def test_two_components_read_the_box_around_every_cell_above_the_threshold_and_only_the_masked_tokens():
    """The mask path reads the box around every cell above the threshold, a lone cell the
    components dropped included, and keeps only the region tokens under that mask."""
    logits = logits_with((4, 4, 2, 2), (4, 10, 2, 2), (15, 20, 1, 1))
    found, blurred = sd_rpn_region(logits, 0.15, (336, 336), 336, (24, 24))
    mask = blurred > 0.15
    assert len(component_boxes(blurred, 0.15)) == 2 and bool(mask[15, 20])
    assert found.grid_box.x1 == 21 and found.grid_box.y1 == 16  # reaches the lone cell
    assert torch.equal(found.keep, token_mask(mask, found.grid_box, (24, 24)))
    assert 0 < int(found.keep.sum()) < 576


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    from qzoom_cli.testing import make_tiny

    return make_tiny(tmp_path_factory.mktemp("llava-sd") / "llava", family="llava")


@pytest.fixture(scope="module")
def converted(llava_dir, tmp_path_factory):
    """An SD-RPN checkpoint in its original layout, with only a sentencepiece tokenizer, converted."""
    from zoomkit import trained_adapter, write_original_llava

    folder = tmp_path_factory.mktemp("converted")
    base = QZoom.from_pretrained(str(llava_dir), device="cpu")
    adapter = trained_adapter(base.backbone, branch_layer=2, depth=2, gate=False, region_norm=True,
                              region_rotary=False)
    write_original_llava(llava_dir, adapter, folder / "original", sentencepiece=True)
    result = CliRunner().invoke(cli.app, ["models", "convert", str(folder / "original"), str(folder / "hf")])
    assert result.exit_code == 0, result.stderr
    return folder


def test_convert_reads_a_sentencepiece_only_tokenizer_and_prompts_as_llava_does(converted):
    """The released checkpoints ship only `tokenizer.model`: converted, the prompt's ids are LLaVA's
    (sentencepiece on each side of <image>, one BOS, vicuna_v1's system text)."""
    import sentencepiece

    from qzoom_cli.backbones.llava import VICUNA_V1_SYSTEM

    assert not (converted / "original" / "tokenizer.json").exists()
    qz = QZoom.from_pretrained(str(converted / "hf"), device="cpu")
    bb = qz.backbone
    assert qz.adapter.config.region_rule == "sd_rpn"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(converted / "original" / "tokenizer.model"))
    question = "What is the total?\nAnswer the question using a single word or phrase."
    before, after = f"{VICUNA_V1_SYSTEM} USER: ", f"\n{question} ASSISTANT:"
    expected = [sp.bos_id(), *sp.encode(before), *[bb.config.image_token_id] * 576, *sp.encode(after)]
    assert bb.build_prompt(question, [(24, 24)]).input_ids[0].tolist() == expected


def test_the_engine_reads_sd_rpns_region_its_masked_tokens_and_its_stretched_crop(converted, monkeypatch):
    """With a score map of two components, the engine (auto, no gate: SD-RPN zooms whenever its
    rule finds a region) reads the box around the mask from the page's own pixels, stretched
    (bilinear) to 336 x 336, puts only the masked tokens after the page's, and answers as that
    fused prompt run from scratch."""
    qz = QZoom.from_pretrained(str(converted / "hf"), device="cpu")
    bb = qz.backbone
    logits = logits_with((4, 4, 2, 2), (4, 10, 2, 2))
    monkeypatch.setattr(pipeline, "region_logits", lambda *args: [RegionMap(logits, torch.ones(24, 24, dtype=bool))])
    encoded = []
    encode = bb.encode_image
    monkeypatch.setattr(bb, "encode_image", lambda image: encoded.append(image) or encode(image))
    image = Image.frombytes("RGB", (420, 300), bytes((i * 7) % 256 for i in range(420 * 300 * 3)))
    with open_document(_png(image)) as doc:
        page = qz.page_view(doc, 1, qz.default_budget())
        answer = qz.engine.answer(page, "Total?", ZoomSettings("auto"), 4)
    expected, _ = sd_rpn_region(logits, 0.15, (420, 300), 336, (24, 24))
    region = answer.trace.region
    assert answer.trace.region_rule == "sd_rpn" and answer.trace.gate is None
    assert (region.grid_box, region.page_box) == (expected.grid_box, expected.page_box)
    kept = int(expected.keep.sum())
    assert region.grid == (1, kept) and answer.region_tokens == kept < 576
    box = expected.page_box
    stretched = image.crop((int(box.x0), int(box.y0), int(box.x1), int(box.y1))).resize((336, 336),
                                                                                         Image.Resampling.BILINEAR)
    assert encoded[-1].tobytes() == stretched.tobytes()
    features = encode(stretched).features[expected.keep.flatten()]
    from qzoom_cli.backbones import ImageEncoding

    prompt = bb.build_prompt("Total?", [page.grid, (1, kept)])
    inputs = bb.prepare_inputs(prompt, [page.encoding, ImageEncoding(features, (1, kept))])
    first = prefill(bb, inputs.embeds, inputs.positions, bb.new_cache())
    assert answer.prompt_tokens == prompt.length
    assert answer.generation.token_ids[0] == int(first.argmax())


def _png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_record_says_which_rule_read_the_region(converted, llava_dir, tmp_path):
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(make_pdf(1))
    runner = CliRunner()
    common = [str(pdf), "Total?", "--device", "cpu", "--dpi", "72", "--max-new-tokens", "2", "--json"]
    sd = runner.invoke(cli.app, ["ask", *common, "--model", str(converted / "hf"), "--zoom", "always"])
    free = runner.invoke(cli.app, ["ask", *common, "--model", str(llava_dir), "--zoom", "always"])
    never = runner.invoke(cli.app, ["ask", *common, "--model", str(converted / "hf"), "--zoom", "never"])
    assert json.loads(sd.stdout)["zoom"]["region_rule"] == "sd_rpn"
    assert json.loads(free.stdout)["zoom"]["region_rule"] == "qzoom"
    assert json.loads(never.stdout)["zoom"]["region_rule"] is None


def test_an_adapter_converted_before_the_rule_was_recorded_reads_by_sd_rpns_rule():
    from qzoom_cli.errors import ModelError
    from qzoom_cli.zoom.adapter import AdapterConfig

    assert AdapterConfig(2, 2, training={"converted": {"from": "SD-RPN"}}).region_rule == "sd_rpn"
    assert AdapterConfig(2, 2).region_rule == "qzoom"
    with pytest.raises(ModelError, match="unknown region_rule"):
        AdapterConfig(2, 2, region_rule="two boxes")
