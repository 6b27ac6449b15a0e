import pytest
import torch
from docmaker import make_pdf, make_tiff
from rich.console import Console

from qzoom_cli.budget import VisualBudget, visual_tokens
from qzoom_cli.errors import OutOfMemory, UsageError
from qzoom_cli.render import answer_panel

BUDGET = VisualBudget(16, 96)


def test_every_page_is_a_candidate_and_the_surest_wins(qz):
    [result] = qz.ask(make_pdf(3), "What is the total due?", budget=BUDGET, max_new_tokens=6, dpi=72, zoom="always")
    assert [c.page for c in result.candidates] == [1, 2, 3]
    best = max(result.candidates, key=lambda c: c.score)
    assert result.page == best.page and result.answer == best.answer
    assert len({c.score for c in result.candidates}) == 3  # pages differ, so do the scores
    stats = result.stats  # times cover every page answered, and so does the speed
    assert stats.total_output_tokens == sum(c.output_tokens for c in result.candidates) > stats.output_tokens
    assert stats.tokens_per_s == pytest.approx(stats.total_output_tokens / stats.time.decode_s, rel=1e-3)


def test_answers_are_deterministic(qz):
    runs = [qz.ask(make_pdf(2), ["total?", "date?"], budget=BUDGET, max_new_tokens=5, dpi=72) for _ in range(2)]
    first, second = ([(r.answer, r.page, [c.score for c in r.candidates]) for r in run] for run in runs)
    assert first == second


def test_page_selection_and_tiff_frames(qz):
    [result] = qz.ask(make_pdf(4), "q?", pages="2,4", budget=BUDGET, max_new_tokens=2, dpi=72)
    assert result.input.pages == [2, 4] and [c.page for c in result.candidates] == [2, 4]
    [result] = qz.ask(make_tiff([(200, 100), (100, 200)]), "q?", budget=BUDGET, max_new_tokens=2, zoom="never")
    assert result.input.kind == "tiff" and [c.page for c in result.candidates] == [1, 2]
    assert [c.visual_tokens for c in result.candidates] == [
        visual_tokens(100, 200, 28, BUDGET), visual_tokens(200, 100, 28, BUDGET)]


def test_visual_tokens_are_exactly_the_budgeted_count(qz):
    for budget in (VisualBudget(4, 30), VisualBudget(16, 96), VisualBudget(200, 400)):
        [result] = qz.ask(make_pdf(1), "q?", budget=budget, max_new_tokens=1, dpi=100, zoom="never")
        width, height = round(595 * 100 / 72), round(842 * 100 / 72)
        expected = visual_tokens(height, width, 28, budget)
        assert result.stats.visual_tokens == result.budget.visual_tokens == expected <= budget.max_tokens
        prompt = qz.backbone.build_prompt("q?", [(1, 1)])
        assert result.stats.prompt_tokens > expected
        assert result.stats.prompt_tokens - expected >= prompt.length - 1


def test_record_fields(qz, pdf_path):
    results = qz.ask(pdf_path, ["total?", "date?"], budget=BUDGET, max_new_tokens=3, dpi=72)
    assert [r.id for r in results] == ["q1", "q2"]
    for r in results:
        assert r.status in ("ok", "truncated") and r.error is None
        assert r.input.file == str(pdf_path) and len(r.input.sha256) == 64 and r.input.dpi == 72
        assert r.zoom.mode == "auto" and r.zoom.region_head == "base_layers"
        assert r.model.family == "qwen2_5_vl" and r.model.device == "cpu" and r.model.dtype == "float32"
        t = r.stats.time
        assert t.render_s > 0 and t.preprocess_s > 0 and t.coarse_prefill_s > 0 and t.region_s > 0 and t.decode_s > 0
        assert r.stats.latency_s == pytest.approx(t.total, abs=1e-5)
        assert r.stats.total_visual_tokens == sum(c.visual_tokens for c in r.candidates)
        assert r.stats.visual_tokens == r.stats.coarse_visual_tokens + r.stats.region_visual_tokens
        assert r.stats.output_tokens == len([c for c in r.candidates if c.page == r.page]) * \
            next(c.output_tokens for c in r.candidates if c.page == r.page)
    # rendering and encoding happen once per page and are split evenly between the questions
    assert results[0].stats.time.render_s == results[1].stats.time.render_s


def test_truncation_is_reported(qz):
    [result] = qz.ask(make_pdf(1), "q?", budget=BUDGET, max_new_tokens=1, dpi=72)
    if result.candidates[0].truncated:
        assert result.status == "truncated" and any("max-new-tokens" in w for w in result.warnings)
    else:
        assert result.status == "ok"


def test_usage_errors(qz):
    with pytest.raises(UsageError):
        qz.ask(make_pdf(1), ["ok", "   "])
    with pytest.raises(UsageError):
        qz.ask(make_pdf(1), [])
    with pytest.raises(UsageError):
        qz.ask(make_pdf(1), "q", max_new_tokens=0)


def test_out_of_memory_retries_at_half_budget_then_fails_cleanly(qz, monkeypatch):
    bb = qz.backbone
    original = type(bb).encode_image
    seen = []

    def flaky(self, image):
        tokens = image.width // 28 * (image.height // 28)
        seen.append(tokens)
        if tokens > 48:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, image)

    monkeypatch.setattr(type(bb), "encode_image", flaky)
    [result] = qz.ask(make_pdf(1), "q?", budget=VisualBudget(16, 96), max_new_tokens=1, dpi=72)
    assert seen[0] > 48 >= seen[1] and result.stats.visual_tokens == seen[1]
    assert any("out of memory" in w for w in result.warnings)
    with pytest.raises(OutOfMemory, match="even at"):
        qz.ask(make_pdf(1), "q?", budget=VisualBudget(16, 400), max_new_tokens=1, dpi=72)


def test_answer_panel_shows_answer_page_and_stats(qz):
    from qzoom_cli.documents import open_document

    with open_document(make_pdf(2), dpi=72) as doc:
        [result] = qz.ask(doc, "total?", budget=BUDGET, max_new_tokens=3)
        console = Console(record=True, width=140, color_system="truecolor")
        console.print(answer_panel(result, doc.thumbnail(result.page)))
    text = console.export_text(clear=False)
    assert "total?" in text and result.answer in text
    assert "visual tokens" in text and f"{result.page} (the surest of pages 1-2)" in text
    thumbnail_rows = [line for line in text.splitlines() if "▀" * 28 in line]
    assert 18 <= len(thumbnail_rows) <= 21  # an A4 page, 28 cells wide, two pixel rows per cell
    html = console.export_html(inline_styles=True)
    assert "color: #ffffff; background-color: #ffffff" in html  # the page's white, as the terminal paints it


def test_the_terminal_thumbnail_paints_each_half_cell_its_pixels_colour():
    from PIL import Image

    from qzoom_cli.render import page_thumbnail_text

    image = Image.new("RGB", (4, 4), (10, 20, 30))
    for row in (1, 3):  # every second pixel row: the lower half of each character cell
        image.paste((200, 100, 50), (0, row, 4, row + 1))
    text = page_thumbnail_text(image, width=4)
    styles = {(span.style.color.triplet, span.style.bgcolor.triplet) for span in text.spans}
    assert styles == {((10, 20, 30), (200, 100, 50))}  # top pixel row as the glyph, the bottom as its background


def test_page_lists_read_as_page_specs():
    from qzoom_cli.documents import format_pages, parse_page_spec

    assert format_pages([1, 2, 3, 7]) == "1-3,7" and format_pages([4]) == "4" and format_pages([2, 4, 5]) == "2,4-5"
    assert parse_page_spec(format_pages([1, 2, 3, 7, 9, 10]), 10) == [1, 2, 3, 7, 9, 10]
