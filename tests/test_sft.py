"""Targeted fine-tuning's input: the fused sequence `ask` reads, then the answer, teacher-forced."""

import pytest
import torch
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


def test_fine_tuning_lowers_the_answer_loss_and_writes_an_adapter_ask_loads(tiny_dir, tmp_path):
    from trainkit import red_square_pages
    from zoomkit import trained_adapter

    from qzoom_cli import QZoom
    from qzoom_cli.manifest import read_manifest
    from qzoom_cli.training.data import expand_samples
    from qzoom_cli.training.loop import TrainOptions
    from qzoom_cli.training.mining import Mined
    from qzoom_cli.training.sft import SftSettings, train_sft
    from qzoom_cli.zoom.lora import LORA_FOLDER, LoraSettings

    qz = QZoom.from_pretrained(str(tiny_dir), device="cpu")  # its own: LoRA goes into the base model
    adapter = trained_adapter(qz.backbone, gate=False, reuse_src_pos=True)
    manifest, _ = red_square_pages(tmp_path, 4, seed=13)
    samples = {s.key: s for s in expand_samples(read_manifest(manifest)).samples}
    mined = [Mined(key, s.question, "top left", "bottom", ("top left",), "references", "regression", (1, 1, 3, 3))
             for key, s in samples.items()]
    settings = SftSettings(budget=VisualBudget(16, 36), lora=LoraSettings(rank=4, alpha=8, dropout=0.0), dpi=72)
    model, losses = train_sft(qz, adapter, samples, mined, settings,
                              TrainOptions(epochs=6, lr=5e-3, batch_size=2, warmup_ratio=0.0), tmp_path / "tuned")
    assert len(losses) == 12 and losses[-1] < losses[0] / 2
    assert (tmp_path / "tuned" / LORA_FOLDER / "adapter_model.safetensors").is_file()
    assert (tmp_path / "tuned" / "qzoom_adapter.safetensors").is_file()
    tuned = QZoom.from_pretrained(str(tiny_dir), adapter=str(tmp_path / "tuned"), device="cpu")
    assert tuned.adapter.config.reuse_src_pos
    from qzoom_cli.training.rpn import prompt_text
    from qzoom_cli.training.sft import answer_loss, answer_token_ids, with_answer

    sample = next(iter(samples.values()))
    with open_document(sample.file, dpi=72) as doc:  # what `ask --adapter tuned` now reads: the lesson stuck
        fused = fused_prompt(tuned.backbone, tuned.page_view(doc, 1, settings.budget),
                             prompt_text(sample.question, False), Box(1, 1, 3, 3), settings.budget, True)
        answer = answer_token_ids(tuned.backbone, "top left")
        with torch.no_grad():
            assert answer_loss(tuned.backbone, with_answer(tuned.backbone, fused.inputs, answer), answer) < \
                losses[0] / 2


def test_box_noise_draws_boxes_of_a_tenth_to_six_tenths_of_the_grid_inside_it():
    import random

    from qzoom_cli.training.sft import noisy_box

    box, rng = Box(2, 3, 5, 7), random.Random(0)
    assert all(noisy_box(box, (20, 30), 0.0, rng) == box for _ in range(50))
    drawn = [noisy_box(box, (20, 30), 1.0, rng) for _ in range(500)]
    assert all(0 <= b.x0 < b.x1 <= 30 and 0 <= b.y0 < b.y1 <= 20 for b in drawn)
    assert min(b.height for b in drawn) == 2 and max(b.height for b in drawn) == 12      # 10% .. 60% of 20 rows
    assert min(b.width for b in drawn) == 3 and max(b.width for b in drawn) == 18        # 10% .. 60% of 30 columns
    assert {b.x0 for b in drawn} >= {0, 12} and max(b.x1 for b in drawn) == 30           # anywhere on the grid
    mixed = [noisy_box(box, (20, 30), 0.8, rng) == box for _ in range(1000)]
    assert 0.15 < sum(mixed) / len(mixed) < 0.25


def test_held_out_pairs_are_drawn_once_and_measured_as_ask_answers_them(qz, tmp_path):
    from trainkit import red_square_pages

    from qzoom_cli.manifest import read_manifest
    from qzoom_cli.training.data import expand_samples
    from qzoom_cli.training.mining import Mined
    from qzoom_cli.training.sft import SftSettings, held_out_accuracy, split_held_out

    manifest, _ = red_square_pages(tmp_path, 2, seed=14)
    samples = {s.key: s for s in expand_samples(read_manifest(manifest)).samples}
    settings = SftSettings(budget=VisualBudget(16, 36), dpi=72)
    keys = sorted(samples)
    zoomed = qz.ask(samples[keys[0]].file, samples[keys[0]].question, zoom="always", budget=settings.budget,
                    max_new_tokens=3)[0].answer
    pairs = [Mined(keys[0], "q", "p", "z", (zoomed,), "references", "regression", (1, 1, 2, 2)),
             Mined(keys[1], "q", "p", "z", ("nothing like it",), "references", "regression", (1, 1, 2, 2))]
    assert held_out_accuracy(qz, pairs, samples, settings, max_new_tokens=3) == 0.5
    assert held_out_accuracy(qz, [], samples, settings, max_new_tokens=3) is None

    many = [Mined(f"k{i}", "q", "p", "z", (), "references", "regression", None) for i in range(10)]
    train, held = split_held_out(many, 0.2, seed=3)
    assert len(held) == 2 and len(train) == 8
    assert {m.key for m in train} | {m.key for m in held} == {m.key for m in many}
    assert (train, held) == split_held_out(many, 0.2, seed=3) and held != split_held_out(many, 0.2, seed=4)[1]
    assert split_held_out(many, 0.0, seed=3) == (sorted(many, key=lambda m: m.key), [])
    with pytest.raises(ValueError):
        split_held_out(many, 1.0, seed=3)
