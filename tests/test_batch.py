"""A batch of N answers equals N single answers: padding, grouping by gate decision, cache rows."""


import pytest
import torch
from docmaker import make_pdf, make_tiff
from zoomkit import threshold_between, trained_adapter

from qzoom_cli.backbones import ModelInputs
from qzoom_cli.budget import VisualBudget
from qzoom_cli.documents import open_document
from qzoom_cli.padding import pad_segments
from qzoom_cli.zoom.pipeline import ZoomEngine, ZoomSettings

QUESTIONS = ["What is the total due?", "Date?", "Which company issued this invoice, and to whom is it addressed?"]


@pytest.fixture(scope="module")
def pages(qz):
    """Pages of different sizes, so prompts differ in both segments."""
    views = []
    with open_document(make_pdf(1), dpi=72) as pdf, open_document(make_tiff([(300, 160), (120, 260)])) as tiff:
        views.append(qz._encode_page(pdf, 1, VisualBudget(16, 80)).view)
        views.append(qz._encode_page(tiff, 1, VisualBudget(16, 64)).view)
        views.append(qz._encode_page(tiff, 2, VisualBudget(8, 40)).view)
        yield views


def _items(pages):
    return [(page, question) for page in pages for question in QUESTIONS[:2]] + [(pages[0], QUESTIONS[2])]


def _same(single, batched):
    assert batched.generation.token_ids == single.generation.token_ids
    assert batched.generation.finished == single.generation.finished
    assert batched.generation.logprobs == pytest.approx(single.generation.logprobs, abs=1e-4)
    assert (batched.trace.skipped_reason, batched.trace.region) == (single.trace.skipped_reason, single.trace.region)
    if single.trace.gate:
        assert batched.trace.gate.score == pytest.approx(single.trace.gate.score, abs=1e-4)
    assert (batched.prompt_tokens, batched.region_tokens) == (single.prompt_tokens, single.region_tokens)


@pytest.mark.parametrize("aligned", [False, True])
def test_batch_with_mixed_gate_decisions_equals_single_runs(qz, pages, aligned):
    bb = qz.backbone
    engine = ZoomEngine(bb, 2, 2, trained_adapter(bb, reuse_src_pos=aligned, seed=3), reuse_src_pos=aligned)
    items = _items(pages)
    probe = [engine.answer(page, text, ZoomSettings("auto", gate_threshold=0.0), 1).trace.gate.score
             for page, text in items]
    threshold = threshold_between(probe)
    settings = ZoomSettings("auto", gate_threshold=threshold, roi_threshold=0.3)
    singles = [engine.answer(page, text, settings, 6) for page, text in items]
    zoomed = sum(a.trace.zoomed for a in singles)
    assert 0 < zoomed < len(items), [a.trace.skipped_reason for a in singles]
    for single, batched in zip(singles, engine.answer_batch(items, settings, 6), strict=True):
        _same(single, batched)


@pytest.mark.parametrize("mode", ["never", "always"])
def test_batch_equals_single_runs_in_every_mode(qz, pages, mode):
    engine = ZoomEngine(qz.backbone, 2, 2)
    settings = ZoomSettings(mode, explain=True)
    items = _items(pages)
    singles = [engine.answer(page, text, settings, 5) for page, text in items]
    for single, batched in zip(singles, engine.answer_batch(items, settings, 5), strict=True):
        _same(single, batched)
        if single.direct is not None:
            assert batched.direct.token_ids == single.direct.token_ids


def test_ask_with_batch_size_equals_one_at_a_time(qz):
    questions = QUESTIONS + ["Invoice number?"]
    one = qz.ask(make_pdf(2), questions, budget=VisualBudget(16, 80), max_new_tokens=5, dpi=72, zoom="always")
    many = qz.ask(make_pdf(2), questions, budget=VisualBudget(16, 80), max_new_tokens=5, dpi=72, zoom="always",
                  batch_size=3)
    for a, b in zip(one, many, strict=True):
        assert (a.answer, a.page, a.zoom.roi) == (b.answer, b.page, b.zoom.roi)
        assert [c.score for c in a.candidates] == pytest.approx([c.score for c in b.candidates], abs=1e-4)


def test_segments_line_up():
    def seg(n, start):
        return ModelInputs(torch.full((1, n, 2), float(start)), torch.arange(start, start + n).view(1, 1, n).expand(3, 1, n))

    batch = pad_segments([[seg(3, 0), seg(2, 3)], [seg(5, 0), seg(1, 5)]])
    assert batch.boundaries == [0, 5, 7]
    assert batch.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 1]]
    assert batch.positions[0].tolist() == [[0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 0, 5]]
    assert batch.index(0, 0, 0) == 2 and batch.index(1, 1, 0) == 6 and batch.padded
    assert pad_segments([[seg(3, 0), seg(2, 3)]]).mask_or_none() is None
    assert batch.positions.dtype == torch.long and batch.attention_mask.dtype == torch.long  # ids and a 0/1 mask


def test_fractional_positions_survive_padding_beside_integer_ones():
    """A sample whose region positions are aligned inside the page grid (fractional) keeps them
    exactly when batched with samples of whole positions."""
    aligned = torch.tensor([[[0.0, 1.0, 1.5, 2.25]]]).expand(3, 1, 4)
    whole = torch.arange(3).view(1, 1, 3).expand(3, 1, 3)
    batch = pad_segments([[ModelInputs(torch.ones(1, 4, 2), aligned)], [ModelInputs(torch.ones(1, 3, 2), whole)]])
    assert batch.positions.dtype == torch.float32
    assert batch.positions[0].tolist() == [[0.0, 1.0, 1.5, 2.25], [0.0, 0.0, 1.0, 2.0]]


def test_every_sample_decodes_until_its_own_end(qz, pages, monkeypatch):
    """One sample of a batch meets its end token early; it stops there while the others go on to
    their own ends (or the limit), each with exactly its single-run tokens."""
    engine = ZoomEngine(qz.backbone, 2, 2)
    items = _items(pages)[:3]
    free = [engine.answer(page, text, ZoomSettings("never"), 8).generation.token_ids for page, text in items]
    others = {token for tokens in free[1:] for token in tokens}
    stop = next(token for token in free[0][1:] if token not in others)  # ends sample 0 only
    monkeypatch.setattr(type(qz.backbone), "eos_token_ids", property(lambda self: [stop]))
    batched = engine.answer_batch(items, ZoomSettings("never"), 8)
    first = batched[0].generation
    assert first.finished and first.token_ids == free[0][:free[0].index(stop) + 1]
    for answer, tokens in zip(batched[1:], free[1:], strict=True):
        assert answer.generation.token_ids == tokens and len(tokens) == 8 and not answer.generation.finished
