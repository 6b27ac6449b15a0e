"""Targeted fine-tuning's input: the fused sequence `ask` reads, then the answer, teacher-forced."""

import pytest
from docmaker import make_pdf
from zoomkit import check_teacher_forcing

from qzoom_cli.budget import VisualBudget
from qzoom_cli.documents import open_document
from qzoom_cli.training.sft import fused_prompt
from qzoom_cli.zoom.geometry import Box

BUDGET = VisualBudget(16, 48)
TEXT = "What is the total due?\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def page(qz):
    with open_document(make_pdf(1), dpi=72) as doc:
        yield qz._encode_page(doc, 1, BUDGET).view


@pytest.mark.parametrize("aligned", [True, False])
def test_the_answer_is_scored_exactly_as_greedy_decoding_would_read_it(qz, page, aligned):
    check_teacher_forcing(qz, page, TEXT, BUDGET, aligned)


def test_a_box_off_the_page_gives_no_sample(qz):
    """A very thin page is read on a wider canvas; a box in the canvas's padding reads nothing."""
    from types import SimpleNamespace

    from qzoom_cli.zoom.pipeline import PageView

    view = PageView(number=1, size=(100, 40_000), encoding=SimpleNamespace(grid=(20, 2)), budget=BUDGET,
                    crop=None, coord_space="page_px")
    assert fused_prompt(qz.backbone, view, TEXT, Box(1, 0, 2, 20), BUDGET, True) is None
