"""LLaVA-1.5 (llava-hf layout) on a tiny checkpoint: a fixed 24 x 24 grid of a page padded to a
square, 1-D positions, the region block right after the page's, and the same exactness as Qwen."""

import json

import pytest
import torch
from docmaker import make_pdf
from PIL import Image
from typer.testing import CliRunner

from qzoom_cli import QZoom, cli
from qzoom_cli.backbones.caches import CacheMark
from qzoom_cli.backbones.llava import VICUNA_V1_SYSTEM
from qzoom_cli.budget import Canvas, VisualBudget
from qzoom_cli.decode import greedy_decode, prefill
from qzoom_cli.documents import open_document
from qzoom_cli.errors import AdapterMismatch
from qzoom_cli.testing import make_tiny
from qzoom_cli.zoom.fuse import fuse_region
from qzoom_cli.zoom.geometry import Box, region_on_page
from qzoom_cli.zoom.pipeline import ZoomEngine, ZoomSettings

QUESTION = "What is the total due?\nAnswer the question using a single word or phrase."
runner = CliRunner()


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("llava") / "llava", family="llava")


@pytest.fixture(scope="session")
def qzl(llava_dir):
    return QZoom.from_pretrained(str(llava_dir), device="cpu")


@pytest.fixture(scope="module")
def page(qzl):
    with open_document(make_pdf(1), dpi=72) as doc:
        yield qzl._encode_page(doc, 1, qzl.default_budget()).view


def expand2square(image, fill):
    """The published LLaVA pad-to-square, written out: the image centred on a square of its longer side."""
    side = max(image.size)
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square


def test_layout_prompt_and_reading_as_llava_1_5(qzl, page_image):
    bb = qzl.backbone
    layout = bb.layout
    assert (layout.patch_factor, layout.position_rows, layout.spatial_rows) == (14, 1, None)
    assert layout.fixed_grid == (24, 24)
    assert layout.canvas == Canvas(square=True, centred=True, fill=(122, 116, 104))  # CLIP's mean colour
    prompt = bb.build_prompt(QUESTION, [(24, 24)])
    ids = prompt.input_ids[0].tolist()
    assert ids[0] == bb.tokenizer.bos_token_id and prompt.images == [prompt.images[0]]
    block = prompt.images[0]
    assert ids[block.start:block.stop] == [bb.config.image_token_id] * 576
    assert bb.tokenizer.decode(ids[block.stop:]).strip().startswith("What is")
    assert bb.tokenizer.decode(ids[1:block.start]) == f"{VICUNA_V1_SYSTEM} USER: "  # every LLaVA checkpoint's
    assert bb.tokenizer.decode(ids).rstrip().endswith("ASSISTANT:")
    two = bb.build_prompt(QUESTION, [(24, 24), (24, 24)])
    assert two.images[1].start == block.stop and two.length == prompt.length + 576  # back to back
    fitted = bb.fit_image(page_image, VisualBudget(16, 64))
    expected = expand2square(page_image.convert("RGB"), (122, 116, 104)).resize((336, 336), Image.Resampling.BICUBIC)
    assert fitted.tobytes() == expected.tobytes()
    assert bb.image_grid(page_image.size, VisualBudget(16, 64)) == (24, 24)


def llava_prompt_ids(tokenizer, prompt: str, image_token_id: int, image_tokens: int) -> list[int]:
    """LLaVA's `tokenizer_image_token`, written out: each side of `<image>` tokenized alone, the
    first keeping its BOS, the others losing theirs, the image between them (here as its tokens)."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    offset = 1 if chunks[0][:1] == [tokenizer.bos_token_id] else 0
    ids = chunks[0][:offset]
    for i, chunk in enumerate(chunks):
        ids += ([image_token_id] * image_tokens if i else []) + chunk[offset:]
    return ids


def test_the_prompt_is_the_one_llava_builds(qzl, page_image):
    """vicuna_v1's conversation, tokenized as LLaVA does around <image>: the text after the image
    opens with its own word-start piece, which tokenizing the whole prompt at once (llava-hf's
    processor) loses. The pixels are llava-hf's processor's."""
    from transformers import LlavaProcessor

    bb = qzl.backbone
    conversation = f"{VICUNA_V1_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"  # conv_vicuna_v1.get_prompt()
    ours = bb.build_prompt(QUESTION, [(24, 24)]).input_ids[0].tolist()
    assert ours == llava_prompt_ids(bb.tokenizer, conversation, bb.config.image_token_id, 576)
    assert ours != bb.tokenizer(conversation.replace("<image>", "<image>" * 576)).input_ids  # the test can tell
    processor = LlavaProcessor(image_processor=bb.image_processor, tokenizer=bb.tokenizer, patch_size=14,
                               num_additional_image_tokens=1,  # the CLS token, as in llava-hf's processor config
                               vision_feature_select_strategy="default")
    fitted = bb.fit_image(page_image, qzl.default_budget())
    stock = processor(images=[fitted], text=[conversation], return_tensors="pt")
    assert torch.equal(stock["pixel_values"], bb.stock_inputs(bb.build_prompt(QUESTION, [(24, 24)]),
                                                              [fitted])["pixel_values"])


def test_never_mode_equals_stock_generate(qzl, page, page_image):
    bb = qzl.backbone
    answer = qzl.engine.answer(page, QUESTION, ZoomSettings("never"), 8)
    prompt = bb.build_prompt(QUESTION, [page.grid])
    stock = bb.model.generate(**bb.stock_inputs(prompt, [bb.fit_image(page_image, VisualBudget(1, 1))]),
                              max_new_tokens=8, do_sample=False)
    assert answer.generation.token_ids == stock[0, prompt.length:].tolist()


def test_layer_by_layer_forward_equals_stock_logits_with_page_and_region(qzl, page_image):
    bb = qzl.backbone
    images = [bb.fit_image(page_image, VisualBudget(1, 1)), bb.fit_image(page_image.crop((40, 60, 300, 200)),
                                                                         VisualBudget(1, 1))]
    encodings = [bb.encode_image(image) for image in images]
    prompt = bb.build_prompt(QUESTION, [e.grid for e in encodings])
    inputs = bb.prepare_inputs(prompt, encodings)
    with torch.no_grad():
        stock = bb.model(**bb.stock_inputs(prompt, images)).logits[0]
        ours = bb.logits(bb.run_layers(inputs.embeds, inputs.positions, None, 0, bb.num_layers))[0]
        swapped = bb.prepare_inputs(prompt, encodings[::-1])
        other = bb.logits(bb.run_layers(swapped.embeds, swapped.positions, None, 0, bb.num_layers))[0]
    assert torch.equal(inputs.positions[0, 0], torch.arange(prompt.length))
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)
    assert (other - stock).abs().max() > 1e-2  # the order of the blocks matters: the test can tell


@pytest.mark.parametrize("branch_layer", [1, 3])
def test_fused_prefill_with_cache_reuse_equals_prefill_from_scratch_and_stock(qzl, page, page_image, branch_layer):
    bb = qzl.backbone
    engine = ZoomEngine(bb, branch_layer, 1)
    prompt = bb.build_prompt(QUESTION, [page.grid])
    inputs = bb.prepare_inputs(prompt, [page.encoding])
    cache = bb.new_cache()
    box = Box(3, 8, 12, 14)
    region_px = region_on_page(box, page.grid, page.size, bb.layout.min_region_side, bb.layout.canvas)
    region = page.read_region(region_px, page.budget, bb)
    fused = fuse_region(bb, QUESTION, prompt, page.encoding, region, box, aligned=False)
    assert fused.region.start == fused.source.stop and fused.reused == fused.source.stop
    with pytest.raises(AdapterMismatch, match="^llava has no spatial positions to align a region with$"):
        fuse_region(bb, QUESTION, prompt, page.encoding, region, box, aligned=True)
    with torch.no_grad():
        hidden_k = bb.run_layers(inputs.embeds, inputs.positions, cache, 0, branch_layer)
        reused, _, mask = engine.fused_prefill([fused], hidden_k, inputs.positions,
                                               torch.ones(1, fused.reused, dtype=torch.long), cache,
                                               CacheMark(fused.reused))
        fresh = bb.new_cache()
        scratch = prefill(bb, fused.inputs.embeds, fused.inputs.positions, fresh, None, None)
        crop = page.crop(region_px, bb.layout.canvas.content_size((int(region_px.width), int(region_px.height)),
                                                                   (336, 336)))
        images = [bb.fit_image(page_image, VisualBudget(1, 1)), bb.layout.canvas.place(crop, (336, 336))]
        stock = bb.model(**bb.stock_inputs(fused.prompt, images)).logits[:, -1]
    torch.testing.assert_close(scratch, stock, atol=1e-4, rtol=1e-4)
    assert mask is None
    torch.testing.assert_close(reused, scratch, atol=1e-4, rtol=1e-4)
    assert greedy_decode(bb, reused, cache, fused.inputs.positions, 5).token_ids == \
        greedy_decode(bb, scratch, fresh, fused.inputs.positions, 5).token_ids


@pytest.mark.parametrize("size", [(1000, 500), (500, 1000), (700, 700), (336, 20)])
def test_boxes_on_the_padded_square_map_back_to_page_pixels(size):
    """A 24 x 24 grid over the page centred on its square: a box maps to page pixels shifted by
    the padding above or beside the page, cut to the page; a box wholly in the padding reads nothing."""
    canvas = Canvas(square=True, centred=True, fill=(0, 0, 0))
    width, height = size
    side = max(size)
    dx, dy = (side - width) // 2, (side - height) // 2
    cell = side / 24
    for x0, y0, x1, y1 in [(0, 0, 24, 24), (2, 3, 10, 20), (0, 0, 1, 1), (23, 23, 24, 24), (5, 11, 19, 13)]:
        got = region_on_page(Box(x0, y0, x1, y1), (24, 24), size, 1, canvas)
        lo = (max(0, int(x0 * cell) - dx), max(0, int(y0 * cell) - dy))
        hi = (min(width, int(x1 * cell) - dx), min(height, int(y1 * cell) - dy))
        if hi[0] <= lo[0] or hi[1] <= lo[1]:
            assert got is None
        else:
            assert got == Box(lo[0], lo[1], hi[0], hi[1])
    whole = region_on_page(Box(0, 0, 24, 24), (24, 24), size, 1, canvas)
    assert whole == Box(0, 0, width, height)


def test_a_box_keeps_even_one_pixel_of_the_page_and_none_of_an_edge():
    canvas = Canvas(square=True, centred=True, fill=(0, 0, 0))
    # 1000 x 502: the page starts 249 px down the square, 1 px above the edge of cell row 6 (250 px)
    assert region_on_page(Box(0, 5, 24, 6), (24, 24), (1000, 502), 1, canvas) == Box(0, 0, 1000, 1)
    assert region_on_page(Box(5, 0, 6, 24), (24, 24), (502, 1000), 1, canvas) == Box(0, 0, 1, 1000)
    # 1000 x 500: the page starts exactly at that edge; the rows above it hold nothing of the page
    assert region_on_page(Box(0, 0, 24, 6), (24, 24), (1000, 500), 1, canvas) is None


def test_canvas_places_content_centred_in_its_fill():
    canvas = Canvas(square=True, centred=True, fill=(1, 2, 3))
    assert canvas.size(300, 100) == (300, 300) and canvas.offset(300, 100) == (0, 100)
    assert canvas.size(101, 300) == (300, 300) and canvas.offset(101, 300) == (99, 0)
    assert canvas.content_size((300, 100), (336, 336)) == (336, 112)
    placed = canvas.place(Image.new("RGB", (336, 112), (200, 200, 200)), (336, 336))
    assert placed.getpixel((0, 111)) == (1, 2, 3) and placed.getpixel((0, 112)) == (200, 200, 200)
    assert placed.getpixel((335, 223)) == (200, 200, 200) and placed.getpixel((335, 224)) == (1, 2, 3)


def test_budget_flags_say_they_change_nothing_and_the_record_stays_exact(llava_dir, tmp_path):
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(make_pdf(1))
    args = ["ask", str(pdf), "What is the total?", "--model", str(llava_dir), "--device", "cpu", "--json",
            "--max-new-tokens", "2"]
    result = runner.invoke(cli.app, [*args, "--max-visual-tokens", "64", "--zoom", "always",
                                     "--roi-max-visual-tokens", "32"])
    assert result.exit_code == 0, result.stderr
    assert "fixed 24x24 grid (576 visual tokens); ignoring --min/--max-visual-tokens" in result.stderr
    assert "ignoring --roi-max-visual-tokens and --roi-native" in result.stderr
    record = json.loads(result.stdout)
    assert record["budget"]["max_tokens"] == record["budget"]["min_tokens"] == 576
    assert record["stats"]["coarse_visual_tokens"] == 576
    if record["zoom"]["zoomed"]:
        assert record["stats"]["region_visual_tokens"] == 576 and record["budget"]["roi_max_tokens"] == 576
    quiet = runner.invoke(cli.app, args)
    assert quiet.exit_code == 0 and "ignoring" not in quiet.stderr


def test_zoomed_answers_read_the_region_in_page_pixels(qzl, tmp_path):
    """`--zoom always`: the region's box is in the page's pixels (inside the page, not the square),
    read as another 576 tokens after the page's."""
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(make_pdf(1))
    [result] = qzl.ask(str(pdf), "What is the total?", zoom="always", max_new_tokens=2, dpi=72)
    with open_document(pdf, dpi=72) as doc:
        width, height = doc.render(1).size
    assert result.zoom.zoomed and result.stats.region_visual_tokens == 576
    x0, y0, x1, y1 = result.zoom.roi["bbox_xyxy"]
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


def test_an_adapter_aligning_positions_in_the_grid_is_refused(qzl):
    from zoomkit import trained_adapter

    with pytest.raises(AdapterMismatch, match="1-D positions"):
        trained_adapter(qzl.backbone, branch_layer=2, depth=1, reuse_src_pos=True)


@pytest.mark.parametrize("mode", ["never", "always"])
def test_batches_and_the_static_decoder_answer_as_one_at_a_time_eager(qzl, mode):
    """Left-padded batches of 1-D positions, pages of different shapes, questions of different
    lengths: every sample decodes as it would alone, on the eager and on the static-cache decoder."""
    from docmaker import make_tiff

    from qzoom_cli.decode import EagerDecoder
    from qzoom_cli.static_decode import StaticDecoder

    bb = qzl.backbone
    eager = ZoomEngine(bb, 2, 2, decode=EagerDecoder(bb))
    fast = ZoomEngine(bb, 2, 2, decode=StaticDecoder(bb, capture=False))
    settings = ZoomSettings(mode)
    with open_document(make_pdf(1), dpi=72) as pdf, open_document(make_tiff([(300, 160), (120, 260)])) as tiff:
        pages = [qzl._encode_page(doc, n, qzl.default_budget()).view for doc, n in ((pdf, 1), (tiff, 1), (tiff, 2))]
        items = [(page, question) for page in pages for question in ("Total?", QUESTION)]
        singles = [eager.answer(page, text, settings, 6) for page, text in items]
        assert all(a.trace.zoomed for a in singles) == (mode == "always")
        for engine in (eager, fast):
            for single, batched in zip(singles, engine.answer_batch(items, settings, 6), strict=True):
                assert batched.generation.token_ids == single.generation.token_ids
                assert batched.generation.logprobs == pytest.approx(single.generation.logprobs, abs=1e-4)
                assert batched.trace.region == single.trace.region


@pytest.mark.graphs
def test_the_decode_step_is_one_graph(qzl, page):
    from zoomkit import check_decode_step_is_one_graph

    check_decode_step_is_one_graph(qzl.backbone, [(page, "Total?"), (page, QUESTION)], ZoomSettings("always"))


def test_train_rpn_on_llava_reads_its_own_view_and_the_adapter_zooms(llava_dir, tmp_path):
    """Stage 1 on LLaVA: the teacher and the student read the page as LLaVA does (the fixed 24 x 24
    view), and the adapter written is used by `ask`; another view size is refused at once."""
    from trainkit import red_square_pages

    from qzoom_cli.errors import EXIT_USAGE

    manifest, _ = red_square_pages(tmp_path, 3, seed=41)
    common = ["--model", str(llava_dir), "--device", "cpu", "--dpi", "72"]
    trained = runner.invoke(cli.app, ["train", "rpn", "--json", str(manifest), "--out", str(tmp_path / "ad"), "--peak-floor", "0",
                                      "--max-area", "1.01", "--batch-size", "2", *common])
    assert trained.exit_code == 0, trained.stderr
    report = json.loads(trained.stdout)
    assert report["usable"] + sum(report["skipped"].values()) == 3
    config = json.loads((tmp_path / "ad" / "qzoom_config.json").read_text())
    assert config["family"] == "llava" and config["training"]["rpn"]["view_tokens"] == 576
    ask = runner.invoke(cli.app, ["ask", str(tmp_path / "page0.png"), "Where is the red square?", "--adapter",
                                  str(tmp_path / "ad"), "--zoom", "always", "--json", "--max-new-tokens", "2", *common])
    assert ask.exit_code == 0 and json.loads(ask.stdout)["zoom"]["region_head"] == "trained"
    other = runner.invoke(cli.app, ["train", "rpn", "--json", str(manifest), "--out", str(tmp_path / "x"), "--view-tokens", "64",
                                    *common])
    assert other.exit_code == EXIT_USAGE and "--view-tokens 576" in other.stderr


def test_detail_views_shrink_the_page_before_the_fixed_grid(qzl, qz, page_image):
    """The gate's ladder on LLaVA: a rung below the grid's 576 tokens is the page shrunk to that
    detail (its padded square 8 x 14 px wide for 64 tokens), then read at the grid; at or above
    576 it is the plain read. On Qwen a rung is simply the page at that budget."""
    bb = qzl.backbone
    assert bb.detail_view(page_image, 576).tobytes() == bb.detail_view(page_image, 1024).tobytes() == \
        bb.fit_image(page_image, VisualBudget(1, 1)).tobytes()
    side = max(page_image.size)
    small = page_image.resize((round(page_image.width * 112 / side), round(page_image.height * 112 / side)),
                              Image.Resampling.BICUBIC)
    low = bb.detail_view(page_image, 64)
    assert low.size == (336, 336) and low.tobytes() == bb.fit_image(small, VisualBudget(1, 1)).tobytes()
    assert low.tobytes() != bb.detail_view(page_image, 144).tobytes()
    assert qz.backbone.detail_view(page_image, 64).tobytes() == \
        qz.backbone.fit_image(page_image, VisualBudget(64, 64)).tobytes()


def test_train_gate_on_llava_learns_from_a_ladder_of_detail_up_to_its_grid(llava_dir, tmp_path):
    from trainkit import red_square_pages, seed_ladders

    from qzoom_cli.errors import EXIT_USAGE

    manifest, _ = red_square_pages(tmp_path, 4, seed=42)
    ladder = (64, 144, 256, 400, 576)
    seed_ladders(manifest, tmp_path / "gate" / "ladders", ladder,
                 {"Where is the red square?": ["?", "top", "top", "top left", "top left"]})
    common = ["--model", str(llava_dir), "--device", "cpu", "--dpi", "72", "--batch-size", "4"]
    trained = runner.invoke(cli.app, ["train", "gate", "--json", str(manifest), "--out", str(tmp_path / "gate"), *common])
    assert trained.exit_code == 0, trained.stderr
    assert "llava reads at most 576 tokens of detail: the ladder is 64,144,256,400,576" in trained.stderr
    assert json.loads(trained.stdout)["transitions"] == 4
    config = json.loads((tmp_path / "gate" / "qzoom_config.json").read_text())
    assert config["gate"] and config["training"]["gate"]["ladder"] == list(ladder)
    ask = runner.invoke(cli.app, ["ask", str(tmp_path / "page0.png"), "Where is the red square?", "--adapter",
                                  str(tmp_path / "gate"), "--json", "--max-new-tokens", "2", *common[:-2]])
    assert ask.exit_code == 0 and json.loads(ask.stdout)["zoom"]["gate"]["kind"] == "trained"
    too_high = runner.invoke(cli.app, ["train", "gate", "--json", str(manifest), "--out", str(tmp_path / "x"), "--ladder",
                                       "576,768,1024", *common])
    assert too_high.exit_code == EXIT_USAGE and "at most 576 tokens" in too_high.stderr


@pytest.fixture(scope="module")
def sd_rpn(qzl, tmp_path_factory):
    """An SD-RPN-style LLaVA region head (its own norm, no rotary on q/k, its region rule), as a qzoom
    adapter."""
    from zoomkit import trained_adapter

    folder = tmp_path_factory.mktemp("sd_rpn")
    adapter = trained_adapter(qzl.backbone, branch_layer=2, depth=2, gate=False, region_norm=True,
                              region_rotary=False, region_rule="sd_rpn", roi_threshold=0.15)
    with torch.no_grad():
        adapter.twig_norm.weight.normal_(1.0, 0.2)
    return adapter, adapter.save_pretrained(folder / "adapter")


def test_sd_rpn_region_score_is_the_hand_computation(qzl, page, sd_rpn):
    """twig layers but the last -> the head's own RMS norm -> the last layer's input norm -> q, k
    projections, no rotary -> per head q(last token).k(cell)/sqrt(d), mean over heads."""
    from qzoom_cli.zoom.region import region_logits

    adapter, _ = sd_rpn
    bb = qzl.backbone
    prompt = bb.build_prompt(QUESTION, [page.grid])
    inputs = bb.prepare_inputs(prompt, [page.encoding])
    with torch.no_grad():
        hidden_k = bb.run_layers(inputs.embeds, inputs.positions, None, 0, 2)
        [got] = region_logits(bb, adapter.region(), hidden_k, inputs.positions, [prompt.images[0]])
        hidden = bb.run_modules(list(adapter.twig_layers)[:1], hidden_k, inputs.positions)[0]

        def rms(x, norm):
            return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))

        last = adapter.twig_layers[-1]
        x = rms(rms(hidden, adapter.twig_norm), last.input_layernorm)
        heads, dim = bb.num_attention_heads, last.self_attn.head_dim
        q = last.self_attn.q_proj(x).view(-1, heads, dim)
        k = last.self_attn.k_proj(x).view(-1, heads, dim)
        block = prompt.images[0]
        expected = torch.stack([k[block.start:block.stop, h] @ q[-1, h] for h in range(heads)]).mean(0) / dim ** 0.5
        with_rotary = region_logits(bb, type(adapter.region())(list(adapter.twig_layers), adapter.twig_norm, True),
                                    hidden_k, inputs.positions, [prompt.images[0]])[0]
    torch.testing.assert_close(got.logits, expected.view(24, 24), atol=1e-4, rtol=1e-4)
    assert (with_rotary.logits - got.logits).abs().max() > 1e-3  # the rotary embedding would change it


def test_an_original_layout_sd_rpn_checkpoint_converts_to_llava_hf_and_its_adapter(llava_dir, sd_rpn, tmp_path):
    """`models convert`: the converted folder loads as llava-hf with its region head beside it and
    answers, zooms and scores exactly as the same weights loaded as llava-hf + adapter."""
    from zoomkit import write_original_llava

    adapter, adapter_dir = sd_rpn
    source = tmp_path / "original"
    write_original_llava(llava_dir, adapter, source)
    converted = runner.invoke(cli.app, ["models", "convert", "--json", str(source), str(tmp_path / "hf")])
    assert converted.exit_code == 0, converted.stderr
    report = json.loads(converted.stdout)
    assert report["adapter"] == str(tmp_path / "hf") and report["added_tokens"] == []
    assert report["dropped"] == {"rotary frequencies, recomputed from the config": 1,
                                 "SD-RPN's training-only copy of the LM head": 1}
    ours = QZoom.from_pretrained(str(tmp_path / "hf"), device="cpu")
    reference = QZoom.from_pretrained(str(llava_dir), adapter=str(adapter_dir), device="cpu")
    assert ours.adapter.config.region_norm and not ours.adapter.config.region_rotary
    assert ours.adapter.config.region_rule == "sd_rpn"
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(make_pdf(1))
    with open_document(str(pdf), dpi=72) as doc:  # a cut-off that leaves a few small components
        blurred = ours.engine.answer(ours.page_view(doc, 1, ours.default_budget()), "What is the total?",
                                     ZoomSettings("always"), 1).region_map
    settings = {"always": ZoomSettings("always", roi_threshold=float(blurred.flatten().sort().values[-12])),
                "never": ZoomSettings("never")}
    for zoom in ("always", "never"):
        [a] = ours.ask(str(pdf), "What is the total?", zoom=settings[zoom], max_new_tokens=4, dpi=72)
        [b] = reference.ask(str(pdf), "What is the total?", zoom=settings[zoom], max_new_tokens=4, dpi=72)
        assert (a.answer, a.zoom.zoomed, a.zoom.roi, a.zoom.region_head, a.zoom.region_rule) == \
            (b.answer, b.zoom.zoomed, b.zoom.roi, b.zoom.region_head, b.zoom.region_rule)
        assert a.zoom.region_head == ("trained" if zoom == "always" else None) and a.zoom.zoomed == (zoom == "always")


def test_conversion_refuses_what_does_not_map(llava_dir, sd_rpn, tmp_path):
    from safetensors.torch import load_file, save_file
    from zoomkit import write_original_llava

    from qzoom_cli.errors import EXIT_MODEL, EXIT_USAGE

    adapter, _ = sd_rpn
    source = tmp_path / "original"
    clip = write_original_llava(llava_dir, adapter, source)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    assert runner.invoke(cli.app, ["models", "convert", str(source), str(tmp_path / "busy")]).exit_code == EXIT_USAGE
    tensors = load_file(source / "model.safetensors")
    save_file({**tensors, "model.something_else.weight": torch.zeros(2)}, source / "model.safetensors")
    extra = runner.invoke(cli.app, ["models", "convert", str(source), str(tmp_path / "a")])
    assert extra.exit_code == EXIT_MODEL and "model.something_else.weight" in extra.stderr
    save_file({k: v for k, v in tensors.items() if not k.startswith("model.twig_norm")}, source / "model.safetensors")
    missing = runner.invoke(cli.app, ["models", "convert", str(source), str(tmp_path / "b")])
    assert missing.exit_code == EXIT_MODEL and "missing 1 (e.g. twig_norm.weight)" in missing.stderr
    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, source / "model.safetensors")
    base = runner.invoke(cli.app, ["models", "convert", str(source), str(tmp_path / "c"), "--vision-tower",
                                   str(clip)])
    assert base.exit_code == EXIT_MODEL and "missing 1 (e.g. model.language_model.norm.weight)" in base.stderr


def test_base_layer_region_head_scores_with_the_1d_rotary_embedding(qzl, page):
    """Training-free zoom on LLaVA: the base layers' own q.k/sqrt(d) with the rotary phases of
    the 1-D positions, computed by hand from the weights."""
    from qzoom_cli.zoom.region import RegionHead, region_logits

    bb = qzl.backbone
    prompt = bb.build_prompt(QUESTION, [page.grid])
    inputs = bb.prepare_inputs(prompt, [page.encoding])
    layer = bb.decoder_layers[1]
    with torch.no_grad():
        hidden = bb.run_layers(inputs.embeds, inputs.positions, None, 0, 1)
        [got] = region_logits(bb, RegionHead([layer]), hidden, inputs.positions, [prompt.images[0]])
        x = layer.input_layernorm(hidden[0])
        heads, dim = bb.num_attention_heads, layer.self_attn.head_dim
        q = layer.self_attn.q_proj(x).view(-1, heads, dim)
        k = layer.self_attn.k_proj(x).view(-1, heads, dim)
        theta = bb.text_config.rope_parameters["rope_theta"]
        inv = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
        angles = torch.arange(prompt.length).float()[:, None] * inv[None, :]
        cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]

        def rotate(t):
            return torch.cat([-t[..., dim // 2:], t[..., :dim // 2]], -1)

        q, k = q * cos + rotate(q) * sin, k * cos + rotate(k) * sin
        block = prompt.images[0]
        expected = torch.stack([k[block.start:block.stop, h] @ q[-1, h] for h in range(heads)]).mean(0) / dim ** 0.5
    torch.testing.assert_close(got.logits, expected.view(24, 24), atol=1e-4, rtol=1e-4)


def test_run_and_eval_on_llava(llava_dir, tmp_path):
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(make_pdf(2))
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"r{i}", "file": str(pdf), "pages": str(i + 1), "question": "Total?",
                                            "answers": ["42"]}) + "\n" for i in range(2)))
    common = ["--model", str(llava_dir), "--device", "cpu", "--dpi", "72", "--max-new-tokens", "2"]
    ran = runner.invoke(cli.app, ["run", str(manifest), "-o", str(tmp_path / "out.jsonl"), "--batch-size", "2",
                                  *common])
    assert ran.exit_code == 0, ran.stderr
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["r0", "r1"] and all(r["stats"]["coarse_visual_tokens"] == 576
                                                             for r in records)
    scored = runner.invoke(cli.app, ["eval", str(manifest), "--json", *common])
    assert scored.exit_code == 0, scored.stderr
    assert json.loads(scored.stdout)["modes"][0]["rows"] == 2


def test_bench_on_llava_times_one_read_per_mode_and_says_why(llava_dir, tmp_path):
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(make_pdf(1))
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text(json.dumps({"id": "a", "file": str(pdf), "question": "Total?", "answers": ["42"]}) + "\n")
    result = runner.invoke(cli.app, ["bench", str(manifest), "--out", str(tmp_path / "b"), "--budgets", "256,1024",
                                     "--modes", "never,always", "--model", str(llava_dir), "--device", "cpu", "--dpi",
                                     "72", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.stderr
    assert "ignoring --budgets" in result.stderr
    points = json.loads((tmp_path / "b" / "bench.json").read_text())["points"]
    assert [(p["mode"], p["max_tokens"]) for p in points] == [("never", 576), ("always", 576)]


def test_targeted_fine_tuning_on_llava_reads_the_region_after_the_page(llava_dir, qzl, tmp_path):
    """Stage 2 on LLaVA: positions continue 1-D (the default there), the LoRA weights learn, and
    asking for grid-aligned positions is refused."""
    from trainkit import red_square_pages, seed_mined
    from zoomkit import trained_adapter

    from qzoom_cli.errors import UsageError
    from qzoom_cli.training.loop import TrainOptions
    from qzoom_cli.training.settings import FineTuneSettings, LoraSettings
    from qzoom_cli.training.targeted import fine_tune

    adapter_dir = trained_adapter(qzl.backbone, gate=False).save_pretrained(tmp_path / "rpn")
    manifest, _ = red_square_pages(tmp_path, 2, seed=43)
    samples = seed_mined(manifest, tmp_path / "sft" / "mined", plain="top left", zoomed="bottom", box=(4, 4, 12, 12))
    settings = FineTuneSettings(lora=LoraSettings(rank=2, alpha=4, dropout=0.0), held_out=0.0, dpi=72,
                                max_new_tokens=3)
    tuned = QZoom.from_pretrained(str(llava_dir), adapter=str(adapter_dir), device="cpu")
    _, report = fine_tune(tuned, samples, settings, TrainOptions(epochs=3, lr=5e-3, batch_size=2), tmp_path / "sft")
    assert report["trained_on"] == 2 and report["last_loss"] < report["first_loss"]
    config = json.loads((tmp_path / "sft" / "qzoom_config.json").read_text())
    assert config["reuse_src_pos"] is False and (tmp_path / "sft" / "lora" / "adapter_model.safetensors").is_file()
    again = QZoom.from_pretrained(str(llava_dir), adapter=str(adapter_dir), device="cpu")
    from dataclasses import replace

    with pytest.raises(UsageError, match="1-D positions"):
        fine_tune(again, samples, replace(settings, aligned=True), TrainOptions(), tmp_path / "aligned")


def test_fine_tuning_input_scores_the_answer_as_decoding_reads_it(qzl, page):
    from zoomkit import check_teacher_forcing

    check_teacher_forcing(qzl, page, QUESTION, qzl.default_budget(), aligned=False, box=(8, 8, 12, 12))


def test_fine_tuning_leaves_out_pairs_whose_region_is_the_squares_padding(llava_dir, tmp_path, monkeypatch):
    """A wide page sits between padding rows on LLaVA's square: a pair mined at a box there reads
    nothing of the page and is left out, while the others of its batch still learn (the loss is
    the batch's mean, over every pair); a batch of only such pairs learns nothing, and the run
    goes on."""
    from dataclasses import replace

    from trainkit import mined_pairs
    from zoomkit import base_answer_loss, trained_adapter

    import qzoom_cli.training.sft as sft
    from qzoom_cli.training.loop import TrainOptions
    from qzoom_cli.training.settings import LoraSettings
    from qzoom_cli.training.sft import SftSettings, train_sft

    for i in range(2):
        Image.new("RGB", (224, 56), (255, 255, 255 - i)).save(tmp_path / f"wide{i}.png")
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"w{i}", "file": f"wide{i}.png", "question": "What is written?"})
                                + "\n" for i in range(2)))
    padding, content = (0, 0, 24, 3), (4, 10, 12, 14)  # the 24 x 24 grid's rows 9-14 hold the page
    read, fused_prompt = [], sft.fused_prompt
    monkeypatch.setattr(sft, "fused_prompt", lambda *args: read.append(fused_prompt(*args)) or read[-1])
    settings = SftSettings(budget=VisualBudget(576, 576), dpi=72, lora=LoraSettings(rank=2, alpha=4, dropout=0.0))

    def tune(boxes, out):
        qz = QZoom.from_pretrained(str(llava_dir), device="cpu")
        samples, mined = mined_pairs(manifest)
        mined = [replace(pair, box=box) for pair, box in zip(mined, boxes, strict=True)]
        expected = [base_answer_loss(qz, samples[p.key], p, settings.budget) for p in mined if p.box == content]
        read.clear()
        _, losses = train_sft(qz, trained_adapter(qz.backbone, gate=False), samples, mined, settings,
                              TrainOptions(epochs=1, batch_size=2, seed=0), tmp_path / out)  # seed 0: padding first
        return qz, expected, losses

    _, expected, losses = tune([padding, content], "mixed")
    assert [fused is None for fused in read] == [True, False] and len(expected) == 1
    assert losses == [pytest.approx(expected[0] / 2, rel=1e-5)]
    qz, _, losses = tune([padding, padding], "none")
    assert [fused is None for fused in read] == [True, True] and losses == [0.0]
    lora_b = [v for k, v in qz.backbone.model.state_dict().items() if "lora_B" in k]
    assert lora_b and all(not v.any() for v in lora_b)


def test_conversion_failures_are_model_errors_not_bugs(llava_dir, sd_rpn, tmp_path):
    from zoomkit import write_original_llava

    from qzoom_cli.errors import EXIT_MODEL

    adapter, _ = sd_rpn
    source = tmp_path / "original"
    write_original_llava(llava_dir, adapter, source)
    gone = runner.invoke(cli.app, ["models", "convert", str(source), str(tmp_path / "a"), "--vision-tower",
                                   str(tmp_path / "no-clip")])
    assert gone.exit_code == EXIT_MODEL and "cannot load the vision tower" in gone.stderr
    (source / "model.safetensors").write_bytes(b"not safetensors")
    damaged = runner.invoke(cli.app, ["models", "convert", str(source), str(tmp_path / "b")])
    assert damaged.exit_code == EXIT_MODEL and "is damaged" in damaged.stderr
    empty = runner.invoke(cli.app, ["models", "convert", str(tmp_path / "nothing"), str(tmp_path / "c")])
    assert empty.exit_code == EXIT_MODEL and "no config.json" in empty.stderr
