"""Training the zoom adapter: pseudo labels, teacher capture, the student, the gate, the commands."""

import json
import math
import random
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from trainkit import SIDE, red_square_pages, seed_ladders, seed_teacher_labels, stop_at
from typer.testing import CliRunner

from qzoom_cli import QZoom, cli
from qzoom_cli.budget import Canvas, VisualBudget
from qzoom_cli.errors import EXIT_USAGE, ResumeMismatch, UsageError
from qzoom_cli.manifest import read_manifest
from qzoom_cli.training.data import ArtefactStore, Shard, expand_samples
from qzoom_cli.training.gate import (
    GateSettings,
    build_pool,
    classify,
    draw_label,
    gate_bce,
    make_ladders,
    train_gate,
)
from qzoom_cli.training.loop import TrainOptions
from qzoom_cli.training.pseudo_labels import (
    IGNORE,
    LabelSettings,
    padding_cells,
    pseudo_labels,
)
from qzoom_cli.training.rpn import RpnSettings, label_auc, selective_bce, train_rpn
from qzoom_cli.training.teacher import HeadTable, square_view, teacher_maps

runner = CliRunner()


# --- pseudo labels: every branch of the tri-state algorithm -------------------------------------------

def blob(rows=10, cols=10, cells=((4, 4), (4, 5), (5, 4), (5, 5)), value=0.2, floor=0.001):
    grounding = torch.full((rows, cols), floor)
    for r, c in cells:
        grounding[r, c] = value
    return grounding


def test_foreground_ignore_ring_and_background():
    out = pseudo_labels(blob(), torch.zeros(10, 10))
    assert out.valid and (out.box.x0, out.box.y0, out.box.x1, out.box.y1) == (3, 3, 7, 7)  # blur grows by one
    labels = out.labels
    assert labels[4:6, 4:6].eq(1).all()
    ring = labels[3:7, 3:7].clone()
    ring[1:3, 1:3] = 7
    assert ring[ring != 7].eq(IGNORE).all()
    outside = torch.ones(10, 10, dtype=torch.bool)
    outside[3:7, 3:7] = False
    assert labels[outside].eq(0).all()


def test_foreground_needs_a_quarter_of_the_peak():
    grounding = blob()
    grounding[5, 5] = 0.04   # below 0.25 * 0.2 = 0.05: inside the box, but not foreground
    labels = pseudo_labels(grounding, torch.zeros(10, 10)).labels
    assert labels[4, 4] == 1 and labels[5, 5] == IGNORE


def test_bright_cells_outside_the_box_are_ignored_not_background():
    grounding = blob()
    grounding[0, 9] = 0.011  # >= 0.05 * 0.2 = 0.01 and < 0.25 * 0.2: neither foreground nor background
    labels = pseudo_labels(grounding, torch.zeros(10, 10)).labels
    assert labels[0, 9] == IGNORE and labels[0, 8] == 0


def test_sinks_never_foreground_but_background_outside_the_box():
    grounding = blob()
    grounding[0, 0] = 0.9                     # brighter than anything, but a sink
    sink = torch.zeros(10, 10)
    sink[0, 0] = 0.02
    out = pseudo_labels(grounding, sink)
    assert out.valid and out.labels[0, 0] == 0 and out.labels[4:6, 4:6].eq(1).all()
    assert (out.box.x0, out.box.y0) == (3, 3)  # the sink did not drag the box to the corner


def test_padding_is_always_background():
    padding = padding_cells(10, 100, 50)       # a wide image: top and bottom rows are padding
    assert padding[:2].all() and padding[-2:].all() and not padding[3:7].any()
    grounding = blob()
    grounding[0, 4] = 0.5                      # attention on padding is discarded
    out = pseudo_labels(grounding, torch.zeros(10, 10), padding)
    assert out.labels[padding].eq(0).all() and out.labels[4:6, 4:6].eq(1).all()
    assert padding_cells(4, 50, 100)[:, 0].all() and not padding_cells(4, 60, 60).any()


def test_skips_large_regions_and_weak_peaks():
    wide = blob(cells=[(r, c) for r in range(1, 9) for c in range(1, 6)])
    out = pseudo_labels(wide, torch.zeros(10, 10))
    assert out.skipped == "region covers too much of the page" and out.labels.eq(IGNORE).all()
    weak = pseudo_labels(blob(value=0.004, floor=0.0001), torch.zeros(10, 10))
    assert weak.skipped == "attention peak below the floor" and weak.labels.eq(IGNORE).all()
    assert (weak.box.x0, weak.box.y0, weak.box.x1, weak.box.y1) == (3, 3, 7, 7) and weak.labels.dtype == torch.long
    assert pseudo_labels(blob(value=0.004, floor=0.0001), torch.zeros(10, 10),
                         settings=LabelSettings(peak_floor=1e-3)).valid


def test_every_threshold_is_inclusive_on_the_side_the_algorithm_says():
    """Values exactly at a threshold (powers of two: no rounding): a sink at the sink threshold is a
    sink, foreground needs more than fg_ratio of the peak, background less than bg_ratio of it, a
    box of exactly max_area is too large, and a peak exactly at the floor is enough."""
    at = LabelSettings(sink_threshold=0.5, fg_ratio=0.25, bg_ratio=0.25, max_area=0.5, peak_floor=0.5)
    grounding = blob(value=0.5, floor=0.0)
    grounding[4, 6] = 0.125                     # exactly fg_ratio * peak: not foreground (inside the box)
    grounding[0, 0] = 0.125                     # exactly bg_ratio * peak outside the box: not background
    grounding[9, 9] = 1.0                       # the brightest cell, but a sink exactly at the threshold
    sink = torch.zeros(10, 10)
    sink[9, 9] = 0.5
    out = pseudo_labels(grounding, sink, settings=at)
    assert out.valid and (out.box.x0, out.box.y0, out.box.x1, out.box.y1) == (3, 3, 7, 7)
    assert out.labels[4, 6] == IGNORE and out.labels[0, 0] == IGNORE and out.labels[9, 9] == 0
    assert out.labels[4:6, 4:6].eq(1).all() and out.labels[0, 1] == 0
    wide = pseudo_labels(blob(cells=[(r, c) for r in range(1, 4) for c in range(1, 9)], value=0.5), sink, settings=at)
    assert (wide.box.x1 - wide.box.x0) * (wide.box.y1 - wide.box.y0) == 50
    assert wide.skipped == "region covers too much of the page"


def test_attention_only_on_sinks_leaves_no_box_and_no_label():
    sink = torch.full((8, 10), 0.02)
    out = pseudo_labels(blob(rows=8), sink)
    assert (out.box.x0, out.box.y0, out.box.x1, out.box.y1) == (0, 0, 10, 8) and out.labels.eq(IGNORE).all()
    assert out.skipped == "region covers too much of the page"


@pytest.mark.parametrize("canvas, padding", [(Canvas(), (127, 127, 127)),
                                             (Canvas(square=True, centred=True, fill=(10, 20, 30)), (10, 20, 30))])
def test_the_teachers_square_view_pads_with_the_familys_colour_or_grey(canvas, padding):
    from types import SimpleNamespace

    from PIL import Image

    def grid_pixels(grid):
        return grid[1] * 4, grid[0] * 4

    backbone = SimpleNamespace(layout=SimpleNamespace(canvas=canvas), grid_pixels=grid_pixels)
    view = square_view(backbone, Image.new("RGB", (40, 20), (200, 0, 0)), 4)
    assert view.size == (16, 16) and view.getpixel((8, 0)) == padding and view.getpixel((8, 8)) == (200, 0, 0)


# --- teacher capture --------------------------------------------------------------------------------

def test_teacher_capture_equals_eager_attention(qz, tiny_dir, tmp_path):
    from PIL import Image, ImageDraw

    bb = qz.backbone
    eager = QZoom.from_pretrained(str(tiny_dir), device="cpu", attn="eager").backbone
    image = Image.new("RGB", (300, 200), "white")
    ImageDraw.Draw(image).rectangle([40, 60, 140, 120], fill="blue")
    view = square_view(bb, image, 6)
    assert view.size == (168, 168) and view.getpixel((0, 0)) == (127, 127, 127)
    heads = HeadTable({1: [0, 3], 2: [1]}, {0: [2]})
    maps = teacher_maps(bb, view, "Where is the blue box?", heads, max_new_tokens=6)
    assert maps.steps == len(maps.answer_ids) - 1 >= 1
    prompt = bb.build_prompt("Where is the blue box?", [(6, 6)])
    ids = torch.cat([prompt.input_ids, torch.tensor([maps.answer_ids[:-1]])], dim=1)
    pixels = eager.image_processor(images=[view], do_resize=False, return_tensors="pt")
    with torch.no_grad():
        out = eager.model(input_ids=ids, pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"],
                          mm_token_type_ids=(ids == bb.config.image_token_id).int(), output_attentions=True)
    block, rows = prompt.images[0], slice(prompt.length, ids.shape[1])

    def reference(table):
        maps_ = [out.attentions[layer][0, head, rows, block.start:block.stop].mean(0)
                 for layer, hs in table.items() for head in hs]
        return torch.stack(maps_).mean(0).view(6, 6)

    assert torch.allclose(maps.grounding, reference(heads.grounding), atol=1e-5)
    assert torch.allclose(maps.sink, reference(heads.sink), atol=1e-5)


# --- the student --------------------------------------------------------------------------------------

def test_selective_bce_and_auc():
    logits = [torch.tensor([[2.0, -2.0], [0.0, 5.0]], requires_grad=True)]
    labels = [torch.tensor([[1, 0], [IGNORE, 1]])]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([2.0, -2.0, 5.0]),
                                                                    torch.tensor([1.0, 0.0, 1.0]))
    assert torch.isclose(selective_bce(logits, labels), expected)
    none = selective_bce(logits, [torch.full((2, 2), IGNORE)])
    assert none.item() == 0.0 and none.requires_grad
    assert label_auc(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1, 0, 0])) == 1.0
    assert label_auc(torch.tensor([1.0, 1.0]), torch.tensor([1, 0])) == 0.5
    assert label_auc(torch.tensor([1.0, 2.0]), torch.tensor([1, IGNORE])) is None  # nothing to separate it from
    assert label_auc(torch.tensor([1.0, 2.0]), torch.tensor([0, IGNORE])) is None


def test_the_held_out_measure_before_training_is_kept_for_a_resume_only(tmp_path):
    """A run starting afresh measures its starting weights (another --adapter may have left a value
    there); a resumed one reports the value its first start measured, not its checkpoint's."""
    from qzoom_cli.training.rpn import _before_training

    assert _before_training(tmp_path, lambda: 0.5) == 0.5
    assert _before_training(tmp_path, lambda: 0.7) == 0.7
    (tmp_path / "checkpoint-1").mkdir()
    assert _before_training(tmp_path, lambda: 0.9) == 0.7


def test_student_learns_the_teacher_labels(qz, tmp_path, monkeypatch):
    """Held-out metric: ROC AUC of the cell scores separating labelled foreground from background.
    The adapter written names the base it was trained on."""
    manifest, cells = red_square_pages(tmp_path, 32)
    out = tmp_path / "out"
    samples = seed_teacher_labels(manifest, cells, out / "labels")
    settings = RpnSettings(branch_layer=2, depth=2, heads=HeadTable({1: [0]}), view_side=SIDE, held_out=0.25)
    monkeypatch.setattr(qz.backbone, "revision", "abc123")
    labelled = []
    options = TrainOptions(epochs=6, lr=1e-3, batch_size=4)
    adapter, report = train_rpn(qz.backbone, samples, settings, options, out,
                                on_label=lambda sample, skipped: labelled.append((sample.key, skipped)))
    assert labelled == [(s.key, None) for s in samples.samples]
    assert report["usable"] == 32 and report["held_out"] == 8 and report["steps"] == 36
    assert report["last_loss"] < report["first_loss"] / 4
    assert 0.9 <= report["held_out_auc_after"] <= 1.0 and 0.0 <= report["held_out_auc_before"]  # means of AUCs
    assert report["held_out_auc_after"] > report["held_out_auc_before"] + 0.3
    saved = json.loads((out / "qzoom_config.json").read_text())
    assert saved["region_head"] and saved["gate"] is False and saved["branch_layer"] == 2
    assert (saved["family"], saved["hidden_size"], saved["base_revision"]) == ("qwen2_5_vl", qz.backbone.hidden_size,
                                                                               "abc123")
    assert saved["training"] == {"rpn": json.loads(json.dumps({
        **report, "data_fingerprint": samples.fingerprint(), "heads": settings.heads.to_dict(),
        "view_tokens": SIDE ** 2, "labels": vars(settings.labels), "options": asdict(options)}))}
    assert report["stage"] == "rpn" and len(samples.fingerprint()) == 64


@pytest.mark.parametrize("stage", ["rpn", "gate"])
def test_gradient_checkpointing_recomputes_the_branch_and_changes_nothing_else(qz, tmp_path, stage):
    """--gradient-checkpointing: each branch layer runs again in the backward pass; the losses and
    the trained weights are those of a run without it."""
    def train(checkpointing):
        out, options = tmp_path / str(checkpointing), TrainOptions(epochs=1, batch_size=4,
                                                                   gradient_checkpointing=checkpointing)
        out.mkdir()
        torch.manual_seed(0)
        if stage == "rpn":
            manifest, cells = red_square_pages(out, 8, seed=2)
            samples = seed_teacher_labels(manifest, cells, out / "labels")
            return train_rpn(qz.backbone, samples, RpnSettings(2, 2, HeadTable({1: [0]}), view_side=SIDE), options, out)
        samples, ladder = _ladder_pages(out, out)
        return train_gate(qz.backbone, None, samples, GateSettings(ladder=ladder), options, out, branch_layer=2,
                          depth=2)

    runs = {}
    mlp_class = type(qz.backbone.decoder_layers[0].mlp)  # inside the layer: seen again when it is recomputed
    for checkpointing in (False, True):
        calls = []
        hook = torch.nn.modules.module.register_module_forward_pre_hook(
            lambda module, args: calls.append(1) if isinstance(module, mlp_class) and torch.is_grad_enabled()
            else None)
        try:
            adapter, report = train(checkpointing)
        finally:
            hook.remove()
        runs[checkpointing] = adapter.state_dict(), report, len(calls)
    (plain, plain_report, plain_calls), (saved, saved_report, saved_calls) = runs[False], runs[True]
    assert saved_report["first_loss"] == pytest.approx(plain_report["first_loss"], rel=1e-5)
    assert saved_report["last_loss"] == pytest.approx(plain_report["last_loss"], rel=1e-4)
    assert all(torch.allclose(plain[k], saved[k], atol=1e-5) for k in plain)
    assert saved_calls > plain_calls > 0  # the checkpointed layer ran again while gradients were taken


def test_trained_adapter_changes_the_region_ask_picks(qz, tiny_dir, tmp_path):
    manifest, cells = red_square_pages(tmp_path, 32, seed=1)
    samples = seed_teacher_labels(manifest, cells, tmp_path / "ad" / "labels")
    train_rpn(qz.backbone, samples, RpnSettings(branch_layer=2, depth=2, heads=HeadTable({1: [0]}), view_side=SIDE),
              TrainOptions(epochs=6, lr=1e-3, batch_size=4), tmp_path / "ad")
    test_pages, test_cells = red_square_pages(tmp_path / "held", 1, seed=99) if (tmp_path / "held").mkdir() is None \
        else (None, None)
    [(x, y)] = test_cells
    args = ["ask", str(tmp_path / "held" / "page0.png"), "Where is the red square?", "--model", str(tiny_dir),
            "--device", "cpu", "--zoom", "always", "--json", "--max-new-tokens", "2", "--max-visual-tokens",
            str(SIDE * SIDE), "--min-visual-tokens", str(SIDE * SIDE)]
    trained = json.loads(runner.invoke(cli.app, [*args, "--adapter", str(tmp_path / "ad"), "--roi-threshold",
                                                 "0.5"]).stdout)["zoom"]
    free = json.loads(runner.invoke(cli.app, args).stdout)["zoom"]
    assert trained["region_head"] == "trained" and free["region_head"] == "base_layers"
    x0, y0, x1, y1 = trained["roi"]["grid_box"]
    assert x0 <= x + 1 and x1 >= x + 1 and y0 <= y + 1 and y1 >= y + 1  # the box covers the square
    assert (x1 - x0) * (y1 - y0) <= 16                                   # ... and not the whole page
    assert trained["roi"]["grid_box"] != free["roi"]["grid_box"]


# --- the gate -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("answers,references,kind", [
    (["$42", "about 42", "42", "$42"], [], "easy"),                          # containment after normalising
    (["42", "42", "42.00", "42"], [], "top two rungs disagree"),             # "4200" is not "42"
    (["7", "9", "42", "$42"], [], "transition"),
    (["7", "42", "9", "42", "42"], [], "not monotonic"),
    (["?", "42", "42"], [], "transition"),                                   # an empty answer matches nothing
    (["7", "42", "42", "43"], [], "top two rungs disagree"),
    (["7", "9", "42", "42"], ["43"], "consensus contradicts the reference answer"),
    (["7", "9", "42", "42"], ["Total 42"], "transition"),
    (["?", "net 30", "net 30"], ["NET 30"], "transition"),                   # references compared lowercased
])
def test_ladder_classification(answers, references, kind):
    assert classify(answers, references) == kind


def test_pool_is_balanced_between_transitions_and_easy():
    ladders = {f"t{i}": (["a", "b", "c", "c"], []) for i in range(3)}
    ladders.update({f"e{i}": (["c", "c", "c", "c"], []) for i in range(10)})
    ladders["x"] = (["a", "c", "b", "c", "c"], [])
    ladders["r"] = (["a", "b", "c", "c"], ["z"])
    kept, dropped = build_pool(ladders, seed=1)
    assert sum(k.startswith("t") for k in kept) == 3 and sum(k.startswith("e") for k in kept) == 3
    assert dropped == {"not monotonic": 1, "consensus contradicts the reference answer": 1, "easy beyond balance": 7}
    assert build_pool(ladders, seed=1)[0] == kept


def test_label_draws():
    rng = random.Random(0)
    transition = (["a", "b", "c", "d", "d", "d"], [])          # wrong at rungs 0-2, right from 3
    draws = [draw_label(*transition, rng) for _ in range(2000)]
    ones = [rung for label, rung in draws if label == 1]
    zeros = [rung for label, rung in draws if label == 0]
    assert 0.85 < len(ones) / len(draws) < 0.95 and set(ones) == {1, 2}   # the two highest wrong rungs
    assert set(zeros) == {3}                                              # a right rung below the top two
    easy = [draw_label(["x"] * 5, [], rng) for _ in range(200)]
    assert {label for label, _ in easy} == {0} and {rung for _, rung in easy} == {0, 1, 2}
    assert draw_label(["a", "b", "c", "c"], ["zzz"], random.Random(3))[0] in (IGNORE, 0)
    assert draw_label(["a", "b", "c", "d"], [], rng) == (IGNORE, 0)
    assert draw_label(["x", "x"], [], rng) == (IGNORE, 0)                 # nothing below the top two


class FixedDraw:
    """A label draw whose coin lands at `coin` and whose choice takes the first option."""

    def __init__(self, coin):
        self.coin = coin

    def random(self):
        return self.coin

    def choice(self, options):
        return options[0]


@pytest.mark.parametrize("answers, references, coin, drawn", [
    (["?", "??", "net 30", "net 30"], ["Net 30 days"], 0.5, (1, 0)),  # a reference the consensus matches: learned
    (["?", "??", "net 30", "net 30"], ["net 60"], 0.5, (IGNORE, 0)),   # contradicted: not learned from
    (["?", "net 30", "net 30", "net 30"], [], 0.95, (0, 1)),          # a right rung below the top two
    (["?", "??", "net 30", "net 30"], [], 0.95, (IGNORE, 0)),         # none: nothing to learn at label 0
])
def test_a_transitions_label_follows_its_coin_and_references(answers, references, coin, drawn):
    assert draw_label(answers, references, FixedDraw(coin)) == drawn


@pytest.mark.parametrize("answers, agreed", [(["7", "42", "$42."], "42"), (["42", "$42"], "42"), (["42", "43"], None),
                                             (["42"], None), (["a", "b", "B!"], "b")])
def test_the_consensus_is_the_top_two_rungs_normalised_answer(answers, agreed):
    from qzoom_cli.training.gate import consensus

    assert consensus(answers) == agreed


def test_gate_bce_guards_all_ignored_batches():
    logits = torch.tensor([0.3, -1.0], requires_grad=True)
    assert gate_bce(logits, torch.tensor([IGNORE, IGNORE])).item() == 0.0
    loss = gate_bce(logits, torch.tensor([1, IGNORE]))
    assert torch.isclose(loss, torch.nn.functional.softplus(torch.tensor(-0.3)))
    loss.backward()
    assert logits.grad[1] == 0


@pytest.mark.parametrize("free_answers", [False, True])
def test_answer_ladders_are_the_plain_answers_at_each_budget_and_are_cached(qz, tmp_path, monkeypatch, free_answers):
    """The gate's training signal: the model's plain answer at every rung (as `ask --zoom never` at
    that budget gives it, with or without the short-answer instruction), computed once and cached;
    a rerun with another ladder is refused."""
    import qzoom_cli.training.gate as gate
    from qzoom_cli.options import SHORT_ANSWER_INSTRUCTION

    manifest, _ = red_square_pages(tmp_path, 2, seed=9)
    samples = expand_samples(read_manifest(manifest))
    settings = GateSettings(ladder=(16, 36, 64), max_new_tokens=4, dpi=72, free_answers=free_answers)
    store = ArtefactStore(tmp_path / "ladders")
    seen = []
    ladders = make_ladders(qz.backbone, samples, settings, store, Shard(), on_sample=seen.append)
    assert seen == samples.samples and set(ladders) == {s.key for s in samples.samples}
    instruction = "" if free_answers else SHORT_ANSWER_INSTRUCTION
    for sample in samples.samples:
        answers, references = ladders[sample.key]
        plain = [qz.ask(sample.file, sample.question, zoom="never", max_new_tokens=4, instruction=instruction,
                        budget=VisualBudget(t, t))[0].answer for t in settings.ladder]
        assert answers == plain and references == []

    def never(*args, **kwargs):
        raise AssertionError("a cached ladder was answered again")

    monkeypatch.setattr(gate, "answer_ladder", never)
    assert make_ladders(qz.backbone, samples, settings, store, Shard()) == ladders
    with pytest.raises(ResumeMismatch) as refused:
        make_ladders(qz.backbone, samples, GateSettings(ladder=(16, 36, 100), dpi=72), store, Shard())
    assert refused.value.message == (f"cached answers in {store.folder} were made with another ladder; use another "
                                     "--output or the same --ladder")


def test_gate_training_reduces_the_loss(qz, tmp_path):
    """Questions about fine print change their answer with resolution (label 1 at low rungs), the
    others never do (label 0): the gate learns to tell them apart."""
    manifest, _ = red_square_pages(tmp_path, 24, seed=2)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["question"] = "What does the fine print say?" if i % 2 else "What colour is the square?"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ladder = (16, 36, 64, 100, 144)
    answers = {"What does the fine print say?": ["?", "??", "net 30", "net 30", "net 30"],
               "What colour is the square?": ["red"] * 5}
    samples = seed_ladders(manifest, tmp_path / "gate" / "ladders", ladder, answers)
    gated, report = train_gate(qz.backbone, None, samples, GateSettings(ladder=ladder), TrainOptions(
        epochs=8, lr=1e-3, batch_size=4), tmp_path / "gate", branch_layer=2, depth=2)
    assert report["transitions"] == 12 and report["easy"] == 12 and report["steps"] == 48
    assert report["last_loss"] < report["first_loss"] / 2
    config = json.loads((tmp_path / "gate" / "qzoom_config.json").read_text())
    assert config["gate"] and not config["region_head"] and config["gate_threshold"] == 0.05
    assert config["training"]["gate"]["ladder"] == list(ladder)
    assert config["training"]["gate"]["data_fingerprint"] == samples.fingerprint()
    assert config["training"]["gate"]["options"]["epochs"] == 8


# --- the commands ----------------------------------------------------------------------------------------

def train_args(tiny_dir):
    return ["--model", str(tiny_dir), "--device", "cpu", "--dpi", "72"]


def test_train_rpn_command_resumes_from_its_caches(tiny_dir, tmp_path, monkeypatch):
    manifest, cells = red_square_pages(tmp_path, 6, seed=3)
    out = tmp_path / "adapter"
    first = runner.invoke(cli.app, ["train", "rpn", "--json", str(manifest), "--out", str(out), "--view-tokens", "64",
                                    "--batch-size", "2", "--save-every", "1", "--peak-floor", "0",
                                    "--max-area", "1.01", *train_args(tiny_dir)])
    assert first.exit_code == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["samples"] == 6 and report["usable"] + sum(report["skipped"].values()) == 6
    assert len(list((out / "labels").glob("*.safetensors"))) == 6
    assert any(out.glob("checkpoint-*")) and (out / "qzoom_adapter.safetensors").exists()
    config = json.loads((out / "qzoom_config.json").read_text())
    assert config["base_model"] == str(tiny_dir) and config["training"]["rpn"]["view_tokens"] == 64

    from qzoom_cli.training import rpn

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran again although its labels are cached")

    monkeypatch.setattr(rpn, "teacher_maps", no_teacher)
    again = runner.invoke(cli.app, ["train", "rpn", "--json", str(manifest), "--out", str(out), "--view-tokens", "64",
                                    "--batch-size", "2", "--epochs", "2", "--peak-floor", "0", "--max-area", "1.01",
                                    *train_args(tiny_dir)])
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["steps"] > report["steps"]  # continued from the checkpoint
    other = runner.invoke(cli.app, ["train", "rpn", "--json", str(manifest), "--out", str(out), "--view-tokens", "64",
                                    "--batch-size", "3", "--epochs", "2", "--peak-floor", "0", "--max-area", "1.01",
                                    *train_args(tiny_dir)])
    assert other.exit_code == EXIT_USAGE and "other settings (batch_size)" in other.stderr
    ask = runner.invoke(cli.app, ["ask", str(tmp_path / "page0.png"), "where?", "--adapter", str(out), "--json",
                                  "--zoom", "always", "--max-new-tokens", "1", *train_args(tiny_dir)])
    assert ask.exit_code == 0 and json.loads(ask.stdout)["zoom"]["region_head"] == "trained"


def test_train_gate_command_adds_a_gate_to_the_adapter(qz, tiny_dir, tmp_path):
    manifest, cells = red_square_pages(tmp_path, 8, seed=4)
    seed_teacher_labels(manifest, cells, tmp_path / "ad" / "labels")
    train_rpn(qz.backbone, expand_samples(read_manifest(manifest)), RpnSettings(2, 2, HeadTable({1: [0]}),
              view_side=SIDE), TrainOptions(epochs=1, batch_size=4), tmp_path / "ad")
    ladder = (16, 36, 64, 100)
    seed_ladders(manifest, tmp_path / "ad" / "ladders", ladder,
                 {"Where is the red square?": ["?", "top", "top left", "top left"]})
    result = runner.invoke(cli.app, ["train", "gate", "--json", str(manifest), "--adapter", str(tmp_path / "ad"), "--ladder",
                                     ",".join(map(str, ladder)), "--batch-size", "4", *train_args(tiny_dir)])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["transitions"] == 8
    config = json.loads((tmp_path / "ad" / "qzoom_config.json").read_text())
    assert config["gate"] and config["region_head"] and set(config["training"]) == {"rpn", "gate"}
    ask = runner.invoke(cli.app, ["ask", str(tmp_path / "page0.png"), "where?", "--adapter", str(tmp_path / "ad"),
                                  "--json", "--max-new-tokens", "1", *train_args(tiny_dir)])
    assert json.loads(ask.stdout)["zoom"]["gate"]["kind"] == "trained"
    bad = runner.invoke(cli.app, ["train", "gate", "--json", str(manifest), "--ladder", "5,4,3", "--out", str(tmp_path / "x"),
                                  *train_args(tiny_dir)])
    assert bad.exit_code == EXIT_USAGE


def test_train_questions_command(tiny_dir, tmp_path):
    from docmaker import make_pdf

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.pdf").write_bytes(make_pdf(2))
    red_square_pages(tmp_path / "docs", 1)
    out = tmp_path / "q.jsonl"
    result = runner.invoke(cli.app, ["train", "questions", str(tmp_path / "docs"), "-o", str(out), "--per-page", "3",
                                     "--max-visual-tokens", "64", *train_args(tiny_dir)])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("questions") >= 3  # a line per page: a.pdf 1, a.pdf 2, page0.png 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert (out.parent / row["file"]).exists() and row["pages"] in ("1", "2") and row["question"]
    assert runner.invoke(cli.app, ["train", "questions", str(tmp_path / "nope")]).exit_code == EXIT_USAGE
    again = runner.invoke(cli.app, ["train", "questions", str(tmp_path / "docs"), "-o", str(out),
                                    *train_args(tiny_dir)])
    assert again.exit_code == EXIT_USAGE and "--force" in again.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows  # kept as it was


def test_written_questions_have_unique_ids_across_folders(tmp_path):
    """Documents with one name in two folders: every row keeps an id of its own."""
    from types import SimpleNamespace

    from docmaker import make_pdf

    from qzoom_cli.training.questions import write_questions

    for folder in ("docs", "docs/2024"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "invoice.pdf").write_bytes(make_pdf(1))
    model = SimpleNamespace(ask=lambda *a, **k: [SimpleNamespace(answer="What is the total due?\nWho signed it?")])
    written, skipped = write_questions(model, tmp_path / "docs", tmp_path / "q.jsonl", per_page=2, dpi=36)
    rows = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert written == 4 and not skipped and len({r["id"] for r in rows}) == 4
    assert {r["id"] for r in rows} >= {"invoice.pdf-p1-q1", "2024/invoice.pdf-p1-q1"}


@pytest.mark.processes
def test_two_processes_train_data_parallel(tiny_dir, tmp_path):
    """torchrun starts two processes (as `accelerate launch` does on GPUs): gradients are averaged
    across them, the frozen parts stay out of the data-parallel wrapper, one adapter is written."""
    import os
    import subprocess
    import sys

    manifest, cells = red_square_pages(tmp_path, 12, seed=5)
    seed_teacher_labels(manifest, cells, tmp_path / "ad" / "labels")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29657", "-m",
               "qzoom_cli", "train", "rpn", "--json", str(manifest), "--out", str(tmp_path / "ad"), "--view-tokens", "64",
               "--batch-size", "2", "--branch-layer", "2", "--depth", "2", "-q", *train_args(tiny_dir)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    [report] = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert report["usable"] == 12 and report["steps"] == 3   # 11 training samples / 2 per batch / 2 processes
    assert (tmp_path / "ad" / "qzoom_adapter.safetensors").exists()


def test_teacher_heads_come_from_the_card_or_the_layers_below_the_branch():
    from qzoom_cli.training.teacher import teacher_heads

    card = {"heads": {"grounding": {"14": [1, 3]}, "sink": {"2": [0]}}}
    table = teacher_heads(card, branch_layer=18, num_heads=4)
    assert (table.grounding, table.sink, table.layers) == ({14: [1, 3]}, {2: [0]}, [2, 14])
    assert HeadTable.from_dict(table.to_dict()) == table
    fallback = teacher_heads({}, branch_layer=18, num_heads=3)
    assert (fallback.grounding, fallback.sink) == ({16: [0, 1, 2], 17: [0, 1, 2]}, {})
    assert teacher_heads(None, branch_layer=1, num_heads=2).grounding == {0: [0, 1]}


def test_question_writing_asks_each_page_plainly_and_keeps_real_questions(tmp_path):
    """Each page is asked on its own, at the given budget, without zoom or the short-answer
    instruction; numbering, bullets, quotes, duplicates and non-questions are dropped; the manifest
    (UTF-8) points at the documents relative to itself; unreadable documents are skipped by name."""
    from types import SimpleNamespace

    from docmaker import make_pdf

    from qzoom_cli.training.questions import REQUEST, parse_questions, write_questions

    assert parse_questions('1. "Wie hoch ist die Summe?"\n- Who signed it?\nq3) 42\n* Who signed it?\n'
                           '(4) Which date?\nshort?\n   \n2) Total in €?', 9) == \
        ["Wie hoch ist die Summe?", "Who signed it?", "Which date?", "Total in €?"]
    assert parse_questions("Which date?\nWho signed it?", 1) == ["Which date?"]
    assert parse_questions('Who won?\nWho is?\n"Value of X"', 9) == ["Who won?", "Value of X"]  # 8 letters at least
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "sub" / "a.pdf").write_bytes(make_pdf(2))
    (docs / "broken.pdf").write_bytes(b"%PDF-1.7 nothing")
    (docs / "notes.txt").write_text("not a document")
    calls, pages = [], []

    def ask(doc, question, **options):
        assert doc.dpi == 36
        calls.append((question, options))
        return [SimpleNamespace(answer="1. Wie hoch ist die Summe in €?\n2. Who signed it?")]

    budget = VisualBudget(16, 64)
    out = tmp_path / "lists" / "q.jsonl"
    out.parent.mkdir()
    written, skipped = write_questions(SimpleNamespace(ask=ask), docs, out, per_page=3, dpi=36, budget=budget,
                                       max_new_tokens=50, on_page=lambda *args: pages.append(args))
    assert written == 4 and list(skipped) == [str(docs / "broken.pdf")] and skipped[str(docs / "broken.pdf")]
    assert [c[1] for c in calls] == [{"pages": str(n), "instruction": "", "zoom": "never", "budget": budget,
                                      "max_new_tokens": 50} for n in (1, 2)]
    assert all(question == REQUEST.format(count=3) and "3 different" in question for question, _ in calls)
    assert pages == [(docs / "sub" / "a.pdf", 1, 2), (docs / "sub" / "a.pdf", 2, 2)]
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["sub/a.pdf-p1-q1", "sub/a.pdf-p1-q2", "sub/a.pdf-p2-q1", "sub/a.pdf-p2-q2"]
    assert {r["file"] for r in rows} == {str((docs / "sub" / "a.pdf").resolve())}  # not under the manifest's folder
    assert rows[0]["question"] == "Wie hoch ist die Summe in €?" and rows[0]["pages"] == "1"
    assert write_questions(SimpleNamespace(ask=ask), docs, tmp_path / "q.jsonl", per_page=1, dpi=36)[0] == 2
    assert {json.loads(line)["file"] for line in (tmp_path / "q.jsonl").read_text().splitlines()} == \
        {"docs/sub/a.pdf"}  # under it: relative, so the folder can move


def test_the_gate_trains_on_what_it_reads_at_inference(qz, tmp_path):
    """Pages at two rungs batched together (so one is padded): the student's probabilities are the
    engine's gate scores for the same page, budget and question."""
    from zoomkit import trained_adapter

    from qzoom_cli.documents import open_document
    from qzoom_cli.training.gate import GateStudent, gate_inputs, prompt_text
    from qzoom_cli.zoom.pipeline import ZoomEngine, ZoomSettings

    manifest, _ = red_square_pages(tmp_path, 2, seed=6)
    adapter = trained_adapter(qz.backbone, seed=5)
    with torch.no_grad():  # a head of moderate logits, so probabilities tell rows apart
        adapter.high_res_head.weight.mul_(1e-3)
        adapter.high_res_head.bias.zero_()
    student = GateStudent(adapter, qz.backbone)
    pages = [tmp_path / "page0.png", tmp_path / "page1.png"]
    views = []
    for path, tokens in zip(pages, (16, 64), strict=True):
        with open_document(path) as doc:
            views.append((doc.render(1).copy(), tokens))
    texts = [prompt_text("Where is the red square?", False), prompt_text("Which colour is the square?", True)]
    hidden, positions, mask = gate_inputs(qz.backbone, 2, views, texts)
    assert mask is not None  # the shorter prompt is padded
    with torch.no_grad():
        trained = torch.sigmoid(student(hidden, positions, mask)).tolist()
    engine = ZoomEngine(qz.backbone, 2, 2, adapter)
    for path, (_, tokens), text, probability in zip(pages, views, texts, trained, strict=True):
        with open_document(path) as doc:
            view = qz._encode_page(doc, 1, VisualBudget(tokens, tokens)).view
            read = engine.answer(view, text, ZoomSettings("auto", gate_threshold=0.0), 1).trace.gate
        assert read.kind == "trained" and 0.02 < read.score < 0.98
        assert probability == pytest.approx(read.score, abs=1e-5)


def test_training_samples_are_pages_and_what_cannot_be_read_is_counted(tmp_path):
    from docmaker import make_encrypted_pdf, make_pdf

    (tmp_path / "a.pdf").write_bytes(make_pdf(3))
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.7 not really")
    (tmp_path / "locked.pdf").write_bytes(make_encrypted_pdf("pw"))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join([
        json.dumps({"id": "one", "file": "a.pdf", "question": "q1?", "pages": "2", "answers": ["x"]}),
        "{not json",
        json.dumps({"id": "gone", "file": "gone.pdf", "question": "q2?"}),
        json.dumps({"id": "also gone", "file": "gone.png", "question": "q2?"}),
        json.dumps({"id": "bad", "file": "broken.pdf", "question": "q3?"}),
        json.dumps({"id": "all", "file": "a.pdf", "question": "q4?"}),
        json.dumps({"id": "locked", "file": "locked.pdf", "password": "pw", "question": "q5?", "pages": "2"}),
    ]) + "\n")
    rows = read_manifest(str(manifest))
    samples = expand_samples(rows)
    assert [(s.id, s.page, s.question, s.answers, s.password) for s in samples.samples] == [
        ("one", 2, "q1?", ("x",), None), ("all#p1", 1, "q4?", (), None), ("all#p2", 2, "q4?", (), None),
        ("all#p3", 3, "q4?", (), None), ("locked", 2, "q5?", (), "pw")]
    assert samples.skipped == {"bad manifest row (bad_row)": 1, "unreadable document (file_not_found)": 2,
                               "unreadable document (pdf_corrupt)": 1}
    assert [s.id for s in expand_samples(rows, max_samples=2).samples] == ["one", "all#p1"]
    first = expand_samples(rows, max_samples=1)  # enough samples: the rows after are not even read
    assert [s.id for s in first.samples] == ["one"] and first.skipped == {}


@pytest.mark.parametrize("text, rungs", [("64,256,1024", (64, 256, 1024)), (" 16, 36,64,100 ", (16, 36, 64, 100)),
                                         ("64,256", None), ("64,64,256", None), ("256,64,1024", None)])
def test_ladder_needs_three_increasing_budgets(text, rungs):
    from qzoom_cli.errors import UsageError
    from qzoom_cli.training.settings import parse_ladder

    if rungs:
        assert parse_ladder(text) == rungs
    else:
        with pytest.raises(UsageError, match=f"--ladder needs at least three increasing budgets; got '{text}'"):
            parse_ladder(text)


def test_ladder_of_words_names_the_flag():
    from qzoom_cli.errors import UsageError
    from qzoom_cli.training.settings import parse_ladder

    with pytest.raises(UsageError, match="^--ladder takes whole numbers"):
        parse_ladder("64,many,1024")


def test_head_table_read_back_from_a_card():
    table = HeadTable({14: [3, 7]}, {14: [0]})
    assert HeadTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table
    assert HeadTable.from_dict({"grounding": {"2": [1]}}) == HeadTable({2: [1]}, {})  # a card without sink heads


# --- the gate stage: its adapter, its seeds, its resume ---------------------------------------------------

def test_a_fresh_gate_starts_from_the_base_and_keeps_a_trained_region_head(qz):
    from zoomkit import trained_adapter

    from qzoom_cli.training.gate import with_gate

    torch.manual_seed(0)
    backbone = qz.backbone
    rpn_adapter = trained_adapter(backbone, gate=False)
    gated = with_gate(rpn_adapter, backbone, branch_layer=9, depth=9)  # the adapter's own layers win
    assert gated.config.gate and gated.config.region_head and gated.config.branch_layer == 2
    for name, tensor in rpn_adapter.twig_layers.state_dict().items():
        assert torch.equal(gated.twig_layers.state_dict()[name], tensor)
    for i, layer in enumerate(gated.high_res_layers):
        base = backbone.decoder_layers[2 + i].state_dict()
        assert all(torch.equal(tensor, base[name]) for name, tensor in layer.state_dict().items())
    head = gated.high_res_head
    assert abs(float(head.weight.mean())) < 0.01 and 0.015 < float(head.weight.std()) < 0.025
    assert not head.bias.any()

    alone = with_gate(None, backbone, branch_layer=1, depth=2)
    assert alone.config.region_head is False and alone.config.gate and alone.config.branch_layer == 1
    assert alone.config.base_model == backbone.model_id and alone.config.family == backbone.family


def _ladder_pages(tmp_path, out):
    """Four questions whose answer needs resolution, eight that never change, one inconsistent."""
    manifest, _ = red_square_pages(tmp_path, 13, seed=5)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    kinds = ["fine print"] * 4 + ["colour"] * 8 + ["noise"]
    for row, kind in zip(rows, kinds, strict=True):
        row["question"] = f"What is the {kind} of page {row['id']}?"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ladder = (16, 36, 64, 100)
    answers = {row["question"]: {"fine print": ["?", "net 3", "net 30", "net 30"], "colour": ["red"] * 4,
                                 "noise": ["a", "b", "a", "b"]}[kind] for row, kind in zip(rows, kinds)}
    return seed_ladders(manifest, out / "ladders", ladder, answers), ladder


def _gate_weights(adapter):
    return {k: v.clone() for k, v in adapter.state_dict().items() if k.startswith("high_res")}


def test_gate_training_is_seeded_and_resumes_to_the_uninterrupted_weights(qz, tmp_path):
    runs = {}

    def train(name, seed=7, save_every=0, on_step=lambda report: None):
        (tmp_path / name).mkdir(exist_ok=True)
        samples, ladder = _ladder_pages(tmp_path / name, tmp_path / name / "gate")
        torch.manual_seed(0)
        return train_gate(qz.backbone, None, samples, GateSettings(ladder=ladder, seed=seed),
                          TrainOptions(epochs=2, lr=1e-3, batch_size=2, save_every=save_every),
                          tmp_path / name / "gate", branch_layer=2, depth=2, on_step=on_step)

    gated, report = train("straight")
    runs["straight"] = _gate_weights(gated)
    assert report["stage"] == "gate" and (report["kept"], report["transitions"], report["easy"]) == (8, 4, 4)
    assert report["dropped"] == {"top two rungs disagree": 1, "easy beyond balance": 4} and report["steps"] == 8
    assert (report["samples"], report["skipped"], report["reference_answers"]) == (13, {}, False)
    assert set(report) == {"stage", "samples", "kept", "transitions", "easy", "dropped", "skipped", "steps",
                           "first_loss", "last_loss", "reference_answers"}

    with pytest.raises(KeyboardInterrupt):
        train("resumed", save_every=1, on_step=stop_at(5))
    torch.manual_seed(1)  # a resumed run must not depend on the fresh initialisation it no longer uses
    runs["resumed"] = _gate_weights(train("resumed", save_every=1)[0])
    runs["other seed"] = _gate_weights(train("other seed", seed=8)[0])
    assert all(torch.allclose(runs["straight"][k], runs["resumed"][k], atol=1e-6) for k in runs["straight"])
    assert any(not torch.allclose(runs["straight"][k], runs["other seed"][k]) for k in runs["straight"])


def test_gate_training_without_a_usable_ladder_says_what_to_do(qz, tmp_path):
    manifest, _ = red_square_pages(tmp_path, 2, seed=6)
    samples = seed_ladders(manifest, tmp_path / "gate" / "ladders", (16, 36, 64),
                           {"Where is the red square?": ["a", "b", "a"]})
    expected = ("no ladder survived the consistency filter ({'top two rungs disagree': 2, 'easy beyond balance': 0}); "
                "add questions whose answers change with resolution")
    with pytest.raises(UsageError, match=re.escape(expected)):
        train_gate(qz.backbone, None, samples, GateSettings(ladder=(16, 36, 64)), TrainOptions(),
                   tmp_path / "gate", branch_layer=2, depth=2)


def test_the_gate_trainer_feeds_the_student_what_inference_reads(qz, tmp_path, monkeypatch):
    """Each batch: the sample's question as the gate prompt, the adapter's branch layer, and the
    padding mask of the batch, all handed on to the student."""
    import qzoom_cli.training.gate as gate

    samples, ladder = _ladder_pages(tmp_path, tmp_path / "gate")
    questions = {s.question for s in samples.samples}
    seen, original_inputs, original_forward = [], gate.gate_inputs, gate.GateStudent.forward

    def inputs(backbone, branch_layer, views, texts):
        assert branch_layer == 3 and set(texts) <= {gate.prompt_text(q, False) for q in questions}
        result = original_inputs(backbone, branch_layer, views, texts)
        seen.append(result[2])
        return result

    def forward(self, hidden, positions, mask):
        assert mask is seen[-1]
        return original_forward(self, hidden, positions, mask)

    monkeypatch.setattr(gate, "gate_inputs", inputs)
    monkeypatch.setattr(gate.GateStudent, "forward", forward)
    train_gate(qz.backbone, None, samples, GateSettings(ladder=ladder), TrainOptions(batch_size=4),
               tmp_path / "gate", branch_layer=3, depth=1)
    assert seen and any(mask is not None for mask in seen)  # some batches mixed rungs: padded


@pytest.mark.parametrize("free_answers", [False, True])
def test_teacher_labels_are_the_teachers_maps_of_the_question_as_asked(qz, tmp_path, free_answers):
    """The teacher pass caches, per sample, the maps `teacher_maps` gives for the question with the
    inference instruction (or without, for free answers), its answer and what the sample is, and
    the labels drawn from them with the view's padding (a wide page's rows above and below it) as
    background."""
    from PIL import Image

    from qzoom_cli.training.rpn import make_labels, prompt_text

    manifest, _ = red_square_pages(tmp_path, 4, seed=12)
    Image.new("RGB", (SIDE * 28, SIDE * 14), (230, 230, 230)).save(tmp_path / "page1.png")
    samples = expand_samples(read_manifest(manifest))
    labels = LabelSettings(sink_threshold=1.0, fg_ratio=0.99, bg_ratio=0.99, peak_floor=0.0)  # the tiny model's
    # attention is nearly flat: only its very peak is foreground
    settings = RpnSettings(2, 2, HeadTable({1: [0]}, {1: [1]}), view_side=SIDE, free_answers=free_answers,
                           teacher_max_new_tokens=3, dpi=72, labels=labels)
    store, told = ArtefactStore(tmp_path / "labels"), []
    usable = make_labels(qz.backbone, samples, settings, store, Shard(), lambda *sample: told.append(sample))
    skipped = []
    for sample in samples.samples:
        image = Image.open(sample.file).convert("RGB")
        maps = teacher_maps(qz.backbone, square_view(qz.backbone, image, SIDE),
                            prompt_text(sample.question, free_answers), settings.heads, 3)
        tensors, meta = store.load(sample.key)
        assert maps.steps <= 3 and meta["steps"] == maps.steps
        assert {k: meta[k] for k in ("id", "question", "page", "answer")} == {
            "id": sample.id, "question": sample.question, "page": 1, "answer": qz.backbone.decode_text(maps.answer_ids)}
        if maps.grounding is None:
            assert meta["skipped"] == "answer too short for a map"
        else:
            padding = padding_cells(SIDE, *image.size)
            drawn = pseudo_labels(maps.grounding, maps.sink, padding, labels)
            assert torch.equal(tensors["grounding"], maps.grounding) and torch.equal(tensors["sink"], maps.sink)
            assert torch.equal(tensors["padding"], padding) and torch.equal(tensors["labels"], drawn.labels)
            assert meta["skipped"] == drawn.skipped
        skipped.append(meta["skipped"])
    assert told == list(zip(samples.samples, skipped, strict=True))
    assert usable == [s for s, reason in told if reason is None]
    wide = store.load(next(s.key for s in samples.samples if s.file.endswith("page1.png")))[0]
    assert "padding" in wide and bool(wide["padding"].any()) and bool((wide["labels"][wide["padding"]] == 0).all())


@pytest.mark.parametrize("values", [
    {"rank": 1}, {"alpha": 0.5}, {"dropout": 0.0}, {"dropout": 0.99}, {"targets": ("q_proj",)},
])
def test_lora_settings_at_their_bounds_are_accepted(values):
    from qzoom_cli.training.settings import LoraSettings

    assert {k: getattr(LoraSettings(**values), k) for k in values} == values


@pytest.mark.parametrize("values, message", [
    ({"rank": 0}, "--lora-rank must be at least 1, --lora-alpha positive and --lora-dropout in [0, 1)"),
    ({"alpha": 0}, "--lora-rank must be at least 1, --lora-alpha positive and --lora-dropout in [0, 1)"),
    ({"dropout": 1.0}, "--lora-rank must be at least 1, --lora-alpha positive and --lora-dropout in [0, 1)"),
    ({"dropout": -0.1}, "--lora-rank must be at least 1, --lora-alpha positive and --lora-dropout in [0, 1)"),
    ({"targets": ()}, "--lora-targets takes names among q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                      "down_proj, in_proj_qkv, in_proj_z, out_proj"),
    ({"targets": ("q_proj", "lm_head", "embed")}, "--lora-targets takes names among q_proj, k_proj, v_proj, "
                                                   "o_proj, gate_proj, up_proj, down_proj, in_proj_qkv, in_proj_z, "
                                                   "out_proj (not embed, lm_head)"),
])
def test_lora_settings_out_of_bounds_are_usage_errors(values, message):
    from qzoom_cli.training.settings import LoraSettings

    with pytest.raises(UsageError) as caught:
        LoraSettings(**values)
    assert str(caught.value) == message


TRAIN_BOUNDS = ("--epochs, --batch-size, --grad-accum and --max-samples must be at least 1, --save-every at least 0 "
                "and --lr positive")
TUNE_BOUNDS = "--mix must be at least 0, --held-out in [0, 1) and --box-noise in [0, 1]"


@pytest.mark.parametrize("settings, values, message", [
    ("train", {"epochs": 1, "batch_size": 1, "grad_accum": 1, "lr": 1e-12, "save_every": 0, "max_samples": 1}, None),
    ("train", {"epochs": 0}, TRAIN_BOUNDS), ("train", {"batch_size": 0}, TRAIN_BOUNDS),
    ("train", {"grad_accum": 0}, TRAIN_BOUNDS), ("train", {"lr": 0.0}, TRAIN_BOUNDS),
    ("train", {"save_every": -1}, TRAIN_BOUNDS), ("train", {"max_samples": 0}, TRAIN_BOUNDS),
    ("tune", {"mix": 0.0, "held_out": 0.0, "box_noise": 0.0, "pseudo_reference_tokens": 1}, None),
    ("tune", {"held_out": 0.99, "box_noise": 1.0}, None),
    ("tune", {"mix": -0.1}, TUNE_BOUNDS), ("tune", {"held_out": 1.0}, TUNE_BOUNDS),
    ("tune", {"held_out": -0.1}, TUNE_BOUNDS), ("tune", {"box_noise": 1.01}, TUNE_BOUNDS),
    ("tune", {"box_noise": -0.1}, TUNE_BOUNDS),
    ("tune", {"pseudo_reference_tokens": 0}, "--pseudo-reference-tokens must be at least 1"),
    ("tune", {"min_visual_tokens": 0}, "--min-visual-tokens must be positive"),
])
def test_training_settings_are_checked_at_their_bounds(settings, values, message):
    from qzoom_cli.training.settings import FineTuneSettings, TrainOptions

    make = {"train": TrainOptions, "tune": FineTuneSettings}[settings]
    if message is None:
        assert {k: getattr(make(**values), k) for k in values} == values
    else:
        with pytest.raises(UsageError) as caught:
            make(**values)
        assert str(caught.value) == message


@pytest.mark.parametrize("tokens, side", [(4, 2), (576, 24), (1, None), (0, None), (575, None), (-4, None)])
def test_the_view_is_a_square_grid_of_at_least_two_by_two(tokens, side):
    from qzoom_cli.training.settings import view_side

    if side is not None:
        assert view_side(tokens) == side
    else:
        with pytest.raises(UsageError) as caught:
            view_side(tokens)
        assert str(caught.value) == f"--view-tokens must be a square number like 576 (24 x 24), got {tokens}"


def test_a_fixed_grid_family_climbs_only_the_rungs_its_grid_holds(caplog):
    from types import SimpleNamespace

    from qzoom_cli.training.gate import ladder_for

    fixed = SimpleNamespace(family="llava", layout=SimpleNamespace(fixed_grid=(8, 12)))  # 96 tokens
    free = SimpleNamespace(family="qwen2_5_vl", layout=SimpleNamespace(fixed_grid=None))
    assert ladder_for(free, (16, 64, 1024)) == (16, 64, 1024)
    with caplog.at_level("WARNING", logger="qzoom"):
        assert ladder_for(fixed, (16, 36, 64, 96)) == (16, 36, 64, 96) and not caplog.records
        assert ladder_for(fixed, (16, 36, 96, 144, 576)) == (16, 36, 96)
    assert caplog.messages == ["llava reads at most 96 tokens of detail: the ladder is 16,36,96"]
    with pytest.raises(UsageError) as refused:
        ladder_for(fixed, (16, 64, 144, 256))
    assert str(refused.value) == ("llava reads at most 96 tokens of detail: give --ladder at least three budgets up "
                                  "to that, e.g. 64,144,256,400,576")


# --- the trainer: accumulation, schedule, optimiser -------------------------------------------------

def _fit(tmp_path, name, items, seen=None, on_step=lambda report: None, **options):
    """A 2-weight linear model fitted to y = 3x by the Trainer; returns (weights, step losses, trainer).
    `seen` collects the (epoch, batch) pairs the loss was computed on. Its checkpoints keep the
    weights, which a resumed run starts from (as the adapters' trainers do)."""
    from torch import nn

    from qzoom_cli.training.loop import Trainer, latest_checkpoint
    from qzoom_cli.training.settings import TrainOptions

    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    checkpoint = latest_checkpoint(tmp_path / name)
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint / "model.pt"))

    def save(folder):
        folder.mkdir(parents=True)
        torch.save(model.state_dict(), folder / "model.pt")

    def loss_fn(module, batch, epoch):
        if seen is not None:
            seen.append((epoch, batch))
        x = torch.tensor([[float(i)] for i in batch])
        return (module(x) - 3 * x).pow(2).mean()

    trainer = Trainer(model, TrainOptions(**{"lr": 0.1, **options}), tmp_path / name,
                      save, torch.float32)
    losses = trainer.train(items, loss_fn, on_step)
    return torch.cat([model.weight.detach().flatten(), model.bias.detach()]), losses, trainer


def test_accumulated_micro_batches_step_as_one_batch_and_a_short_last_window_still_steps(tmp_path):
    items = [1, 2, 3, 4, 5, 6, 7]
    whole, whole_losses, _ = _fit(tmp_path, "whole", items, batch_size=2, max_grad_norm=1e9)
    accumulated, accumulated_losses, _ = _fit(tmp_path, "accumulated", items, batch_size=1, grad_accum=2,
                                              max_grad_norm=1e9)
    assert torch.allclose(whole, accumulated, atol=1e-6)  # the same pairs, in the same shuffled order
    assert len(whole_losses) == len(accumulated_losses) == 4
    assert accumulated_losses == pytest.approx(whole_losses, rel=1e-5)
    start, _, _ = _fit(tmp_path, "none", items, batch_size=2, lr=1e-30)
    one, losses, _ = _fit(tmp_path, "one", items[:3], batch_size=2, grad_accum=4)  # 2 micro-batches, window of 4
    assert len(losses) == 1 and not torch.equal(one, start)


def test_the_optimiser_and_schedule_are_the_reference_recipe(tmp_path):
    from qzoom_cli.training.loop import cosine_with_warmup

    _, _, trainer = _fit(tmp_path, "adamw", [1], weight_decay=0.02)  # not torch's default (0.01) nor ours (0)
    [group] = trainer.optimizer.param_groups
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.999), 1e-8, 0.02)
    factor = cosine_with_warmup(100, 0.03)  # 3 warm-up steps, then cosine from 1 to 0 over the other 97
    assert [factor(step) for step in (0, 1, 2, 3)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert factor(3 + 97 // 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 48 / 97)))
    assert factor(100) == pytest.approx(0.0) and factor(130) == pytest.approx(0.0)
    assert [cosine_with_warmup(10, 0.0)(step) for step in (0, 5)] == pytest.approx([1.0, 0.5])  # no warm-up
    assert [cosine_with_warmup(4, 0.75)(step) for step in range(5)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 0.0])
    assert [cosine_with_warmup(2, 1.0)(step) for step in range(3)] == pytest.approx([0.5, 1.0, 1.0])  # all warm-up


def test_gradients_are_clipped_at_the_given_norm(tmp_path):
    clipped, _, _ = _fit(tmp_path, "clipped", [50, 1, 2], batch_size=1, epochs=2, max_grad_norm=1.0)
    loose, _, _ = _fit(tmp_path, "loose", [50, 1, 2], batch_size=1, epochs=2, max_grad_norm=1e9)
    assert not torch.allclose(clipped, loose)


@pytest.mark.parametrize("rank, expected", [(0, [[3, 2], [4]]), (1, [[1, 5], [3, 2]])])
def test_each_process_takes_every_world_size_th_batch_and_all_take_the_same_steps(tmp_path, monkeypatch, rank,
                                                                                 expected):
    """Five samples in batches of two make three batches per epoch: with two processes the second
    is one short and takes the epoch's first batch again, so both take two optimiser steps."""
    from accelerate import Accelerator

    from qzoom_cli.training.loop import batches

    items = [1, 2, 3, 4, 5]
    assert list(batches(items, 2, 0, 0)) == [[3, 2], [1, 5], [4]]
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    monkeypatch.setattr(Accelerator, "process_index", property(lambda self: rank))
    seen = []
    _, losses, _ = _fit(tmp_path, "share", items, seen, batch_size=2, seed=0)
    assert len(losses) == 2 and seen == [(0, batch) for batch in expected]


def test_the_gate_answers_missing_ladders_with_its_model_and_learns_from_the_question_as_asked(qz, tmp_path,
                                                                                              monkeypatch):
    import qzoom_cli.training.gate as gate
    from qzoom_cli.training.rpn import prompt_text

    manifest, _ = red_square_pages(tmp_path, 2, seed=8)
    samples = expand_samples(read_manifest(manifest))
    answered, read, seen = [], [], []

    def answer_ladder(backbone, image, text, ladder, max_new_tokens):
        answered.append((backbone, text, ladder, max_new_tokens))
        return ["?", "red", "red"]  # a transition: the gate has something to learn

    def gate_inputs(backbone, branch_layer, views, texts):
        read.extend(texts)
        return real_inputs(backbone, branch_layer, views, texts)

    real_inputs = gate.gate_inputs
    monkeypatch.setattr(gate, "answer_ladder", answer_ladder)
    monkeypatch.setattr(gate, "gate_inputs", gate_inputs)
    settings = GateSettings(ladder=(16, 36, 64), free_answers=True, max_new_tokens=5, dpi=72)
    train_gate(qz.backbone, None, samples, settings, TrainOptions(batch_size=2), tmp_path / "gate", 2, 2,
               on_ladder=seen.append)
    text = prompt_text("Where is the red square?", True)
    assert answered == [(qz.backbone, text, (16, 36, 64), 5)] * 2 and seen == samples.samples
    assert read == [text] * 2


def test_region_settings_follow_the_card_and_a_fixed_grid_familys_view():
    from types import SimpleNamespace

    from qzoom_cli.training.rpn import rpn_settings
    from qzoom_cli.training.teacher import fallback_heads

    def model(grid=None, card=None):
        backbone = SimpleNamespace(family="llava", layout=SimpleNamespace(fixed_grid=grid), num_attention_heads=4,
                                   num_layers=8, key_layers=tuple(range(8)))
        return SimpleNamespace(backbone=backbone, engine=SimpleNamespace(branch_layer=3, depth=2), card=card)

    published = SimpleNamespace(training={"heads": {"grounding": {"1": [0, 2]}}})
    assert rpn_settings(model(card=published)).heads == HeadTable({1: [0, 2]})
    settings = rpn_settings(model(), 2, 1, view_side=8)
    assert (settings.branch_layer, settings.depth, settings.view_side) == (2, 1, 8)
    assert settings.heads == fallback_heads(2, 4)
    assert rpn_settings(model(grid=(24, 24))).view_side == 24  # the default view is LLaVA's grid
    with pytest.raises(UsageError) as refused:
        rpn_settings(model(grid=(24, 24)), view_side=16)
    assert str(refused.value) == ("llava reads every page as its fixed 24x24 grid: train the region head on that view "
                                  "(--view-tokens 576)")


@pytest.mark.parametrize("world, rank", [(None, 0), ("1", 0), ("2", 1)])
def test_a_process_knows_its_share_from_the_launcher(monkeypatch, world, rank):
    """One process (WORLD_SIZE unset or 1) owns every sample without asking accelerate; under
    `accelerate launch` the shared state says which share is this process's."""
    import accelerate

    from qzoom_cli.training.data import Shard

    made = []

    class State:
        process_index, num_processes = 1, 2

        def __init__(self, **options):
            self.options = options
            made.append(self)

    monkeypatch.setattr(accelerate, "PartialState", State)
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    shard = Shard.current()
    assert (shard.rank, shard.world) == ((1, 2) if made else (0, 1)) and shard.rank == rank
    assert [state.options for state in made] == ([{"cpu": not torch.cuda.is_available()}] if world == "2" else [])
    assert shard.state is (made[0] if made else None)  # the barrier waits on the launcher's processes


def test_a_cache_made_with_other_settings_is_refused_naming_them(tmp_path):
    ArtefactStore(tmp_path / "cache", {"ladder": [1, 2, 3], "dpi": 72, "model": "m"})
    ArtefactStore(tmp_path / "cache", {"ladder": [1, 2, 3], "dpi": 72, "model": "m"})  # the same: accepted
    with pytest.raises(ResumeMismatch) as refused:
        ArtefactStore(tmp_path / "cache", {"ladder": [1, 2], "dpi": 96, "model": "m"})
    assert str(refused.value) == (f"{tmp_path / 'cache'} holds work done with other settings (dpi, ladder): rerun "
                                  "with the same options, or write to another --output")


@pytest.mark.parametrize("count, fraction, held", [(1, 0.5, 0), (2, 0.1, 1), (3, 0.5, 1), (4, 0.1, 1), (8, 0.25, 2),
                                                   (10, 0.5, 5)])
def test_a_share_of_the_samples_at_least_one_is_held_out_unless_only_one_is_usable(count, fraction, held):
    from qzoom_cli.training.rpn import held_out_samples

    usable = [f"s{i}" for i in range(count)]
    assert held_out_samples(usable, fraction) == (usable[held:], usable[:held])


def test_the_student_scores_a_padded_batch_as_inference_scores_each_page(qz):
    """With the adapter's own norm and scoring without rotary (SD-RPN's LLaVA head) too; and every
    weight it trains gets a gradient (data parallelism requires it): the last layer lends only its
    queries and keys."""
    from PIL import Image
    from zoomkit import trained_adapter

    from qzoom_cli.training.rpn import RegionStudent, branch_inputs
    from qzoom_cli.zoom.region import region_logits

    adapter = trained_adapter(qz.backbone, gate=False, region_norm=True, region_rotary=False)
    student = RegionStudent(adapter, qz.backbone)
    views = [Image.new("RGB", (SIDE * 28, SIDE * 28), colour) for colour in ("white", (200, 30, 30))]
    texts = ["Where?", "Where on this page is the red square, and how large is it?"]  # padded to one length
    hidden, positions, mask, blocks = branch_inputs(qz.backbone, views, texts, 2)
    alone = [branch_inputs(qz.backbone, [view], [text], 2) for view, text in zip(views, texts, strict=True)]
    assert mask is not None  # the shorter question is padded
    together = student(hidden, positions, mask, blocks)
    for logits, (h, p, m, b) in zip(together, alone, strict=True):
        [inference] = region_logits(qz.backbone, adapter.region(), h, p, b, m)
        assert torch.allclose(logits, inference.logits, atol=1e-5)
    sum(logits.sum() for logits in together).backward()
    trained = {name: p for name, p in student.named_parameters() if p.requires_grad}
    assert trained and all(p.grad is not None for p in trained.values())
    assert any(name.startswith("twig_norm.") for name in trained)


def test_the_student_reads_each_sample_as_its_teacher_did(qz, tmp_path):
    """The square view of the sample's page, its question with the instruction the settings pick,
    run to the branch layer; the labels its teacher left."""
    from PIL import Image

    from qzoom_cli.training.rpn import RpnData, branch_inputs, prompt_text

    manifest, cells = red_square_pages(tmp_path, 2, seed=6)
    samples = seed_teacher_labels(manifest, cells, tmp_path / "labels")
    store = ArtefactStore(tmp_path / "labels")
    data = RpnData(qz.backbone, store, RpnSettings(1, 2, HeadTable({1: [0]}), view_side=SIDE, free_answers=True))
    inputs, labels = data.batch(samples.samples)
    views = [square_view(qz.backbone, Image.open(s.file), SIDE) for s in samples.samples]
    expected = branch_inputs(qz.backbone, views, [prompt_text(s.question, True) for s in samples.samples], 1)
    assert torch.equal(inputs[0], expected[0]) and inputs[3] == expected[3]
    assert all(torch.equal(got, store.load(s.key)[0]["labels"]) for got, s in zip(labels, samples.samples, strict=True))


def test_the_first_step_learns_the_labels_from_a_padded_batch_as_from_each_sample_alone(qz, tmp_path):
    """The region head starts as base layers K..K+T-1, so the first loss is their pooled BCE on the
    trained samples' labels, each page scored as if alone (its question's length padded away)."""
    from qzoom_cli.training.rpn import RegionStudent, RpnData
    from qzoom_cli.zoom.adapter import AdapterConfig, ZoomAdapter

    manifest, cells = red_square_pages(tmp_path, 3, seed=7)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row, question in zip(rows, ["Where?", "Where is the red square?", "Which cells does the red square cover?"],
                             strict=True):
        row["question"] = question
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    samples = seed_teacher_labels(manifest, cells, tmp_path / "out" / "labels")
    settings = RpnSettings(branch_layer=2, depth=2, heads=HeadTable({1: [0]}), view_side=SIDE)
    config = AdapterConfig(branch_layer=2, depth=2, gate=False, family=qz.backbone.family)
    student = RegionStudent(ZoomAdapter.initialized_from_base(config, qz.backbone), qz.backbone)
    data = RpnData(qz.backbone, ArtefactStore(tmp_path / "out" / "labels"), settings)
    logits, labels = [], []
    with torch.no_grad():
        for sample in samples.samples[1:]:  # the first is held out
            (hidden, positions, mask, blocks), [label] = data.batch([sample])
            logits += student(hidden, positions, mask, blocks)
            labels.append(label)
    _, report = train_rpn(qz.backbone, samples, settings, TrainOptions(epochs=1, batch_size=2), tmp_path / "out")
    assert (report["held_out"], report["trained_on"], report["steps"]) == (1, 2, 1)
    assert report["first_loss"] == pytest.approx(selective_bce(logits, labels).item(), rel=1e-5)


def test_training_the_region_head_again_keeps_the_adapters_position_scheme_threshold_and_history(qz, tmp_path):
    from zoomkit import trained_adapter

    manifest, cells = red_square_pages(tmp_path, 2, seed=8)
    samples = seed_teacher_labels(manifest, cells, tmp_path / "again" / "labels")
    settings = RpnSettings(2, 2, HeadTable({1: [0]}), view_side=SIDE)
    start = trained_adapter(qz.backbone, gate=False, reuse_src_pos=True, roi_threshold=0.3,
                            training={"rpn": {"steps": 9}})
    adapter, report = train_rpn(qz.backbone, samples, settings, TrainOptions(epochs=1, batch_size=2),
                                tmp_path / "again", start=start)
    config = adapter.config
    assert report["stage"] == "rpn_again" and (config.reuse_src_pos, config.roi_threshold) == (True, 0.3)
    assert list(config.training) == ["rpn", "rpn_again"] and config.training["rpn"] == {"steps": 9}


def test_region_training_refuses_an_adapter_without_a_head_and_pages_without_a_label(qz, tmp_path):
    from zoomkit import trained_adapter

    manifest, _ = red_square_pages(tmp_path, 2, seed=9)
    samples = expand_samples(read_manifest(manifest))
    settings = RpnSettings(2, 2, HeadTable({1: [0]}), view_side=SIDE, teacher_max_new_tokens=1)
    with pytest.raises(UsageError) as refused:
        train_rpn(qz.backbone, samples, settings, TrainOptions(), tmp_path / "gate", start=trained_adapter(
            qz.backbone, region_head=False))
    assert str(refused.value) == "the adapter has no region head to train again: give the one `train sft` wrote"
    told = []
    with pytest.raises(UsageError) as refused:
        train_rpn(qz.backbone, samples, settings, TrainOptions(), tmp_path / "short",
                  on_label=lambda *sample: told.append(sample))
    assert str(refused.value) == "no usable training sample (skipped: 2 answer too short for a map)"
    assert told == [(sample, "answer too short for a map") for sample in samples.samples]


def test_skipped_samples_are_counted_by_reason_in_words():
    from qzoom_cli.training.data import skipped_text

    assert skipped_text({}) == "none"
    assert skipped_text({"answer too short for a map": 2, "unreadable document": 1}) == \
        "2 answer too short for a map, 1 unreadable document"


def test_each_step_reports_its_loss_learning_rate_and_samples_per_second(tmp_path, monkeypatch):
    """Four samples in batches of two for two epochs, on a clock that moves one second a step:
    two samples a second throughout; the learning rate after each step follows the schedule."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    import qzoom_cli.training.loop as loop
    from qzoom_cli.training.loop import StepReport

    clock = iter(range(100, 200))
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    reports, seen = [], []
    _, losses, _ = _fit(tmp_path, "reported", [1, 2, 3, 4], seen, reports.append, batch_size=2, epochs=2)
    assert [epoch for epoch, _ in seen] == [0, 0, 1, 1]
    lrs = [0.1 * f for f in (1.0, 0.75, 0.25, 0.0)]  # 1 warm-up step, then cosine over 3
    assert reports == [StepReport(k + 1, 4, losses[k], 2.0, pytest.approx(lrs[k])) for k in range(4)]
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: 5.0))
    still = []
    _fit(tmp_path, "instant", [1, 2], None, still.append, batch_size=2)
    assert [report.samples_per_s for report in still] == [0.0]  # no time passed: no rate, not a division by zero
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    shared = []
    _fit(tmp_path, "shared", [1, 2, 3, 4], None, shared.append, batch_size=2)
    assert [report.samples_per_s for report in shared] == [4.0]  # each of two processes took a batch of two


def test_a_resume_continues_where_the_accumulated_steps_stopped_and_refuses_other_samples_or_processes(
        tmp_path, monkeypatch):
    from accelerate import Accelerator

    items, options = [1, 2, 3, 4, 5, 6, 7, 8], {"batch_size": 1, "grad_accum": 2, "save_every": 1}
    whole, _, _ = _fit(tmp_path, "whole", items, **options)

    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, "resumed", items, on_step=stop_at(2), **options)
    seen = []
    resumed, losses, _ = _fit(tmp_path, "resumed", items, seen, **options)
    assert len(losses) == 4 and len(seen) == 6 and torch.allclose(resumed, whole)  # from checkpoint-1: 3-8
    with pytest.raises(ResumeMismatch) as refused:
        _fit(tmp_path, "resumed", items[:6], **options)
    assert str(refused.value) == (f"{tmp_path / 'resumed' / 'checkpoint-4'} was trained with other settings (samples): "
                                  "rerun with the same options and samples, or write to another --output")
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    with pytest.raises(ResumeMismatch, match=r"other settings \(processes\)"):
        _fit(tmp_path, "resumed", items, **options)


def test_training_pages_stay_open_per_document_and_read_locked_pdfs_at_the_given_dpi(tmp_path):
    """The trainers' page reader keeps the current document open across its samples' pages,
    opens another (closing the first) when the document or its password changes, and can be
    closed twice and used again."""
    from dataclasses import replace

    from docmaker import make_encrypted_pdf, make_image

    from qzoom_cli.documents import open_document
    from qzoom_cli.training.data import TrainSample
    from qzoom_cli.training.rpn import _Pages

    pdf, png = tmp_path / "locked.pdf", tmp_path / "page.png"
    pdf.write_bytes(make_encrypted_pdf("pw"))
    png.write_bytes(make_image("PNG"))
    with open_document(pdf, password="pw", dpi=36) as document:
        size = document.render(2).size
    first, second = (TrainSample(f"p{n}", str(pdf), "pw", n, "Total?", "sha") for n in (1, 2))
    picture = TrainSample("i", str(png), None, 1, "Total?", "sha")
    pages = _Pages(dpi=36)
    assert pages.render(second).size == size
    locked = pages.document(first)
    assert pages.document(second) is locked
    image = pages.document(picture)
    assert image is not locked and pages.document(replace(picture, password="other")) is not image
    pages.close()
    pages.close()
    assert pages.render(second).size == size
    pages.close()


def test_a_checkpoint_from_before_plans_and_random_states_were_kept_still_resumes(tmp_path):
    """Older checkpoints hold neither the run's plan nor its random state: they resume as they are."""
    items, options = [1, 2, 3, 4], {"batch_size": 1, "save_every": 1}
    whole, _, _ = _fit(tmp_path, "whole", items, **options)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, "old", items, on_step=stop_at(2), **options)
    state_file = tmp_path / "old" / "checkpoint-1" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    torch.save({k: v for k, v in state.items() if k not in ("plan", "rng")}, state_file)
    resumed, losses, _ = _fit(tmp_path, "old", items, **options)
    assert len(losses) == 4 and torch.allclose(resumed, whole)


# --- the work a rerun reads back: damage named with what to do, writes whole -----------------------------

@pytest.mark.parametrize("damage", ["truncated", "missing", "not a trainer state"])
def test_a_damaged_checkpoint_is_named_and_without_it_the_run_resumes_from_the_one_before(tmp_path, damage):
    from qzoom_cli.errors import DamagedFile

    items, options = [1, 2, 3, 4], {"batch_size": 1, "save_every": 1}
    whole, _, _ = _fit(tmp_path, "whole", items, **options)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, "run", items, on_step=stop_at(3), **options)  # checkpoints 1 and 2
    newest = tmp_path / "run" / "checkpoint-2"
    state = newest / "trainer_state.pt"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[:200])
    elif damage == "missing":
        state.unlink()
    else:
        torch.save([1, 2], state)
    with pytest.raises(DamagedFile) as refused:
        _fit(tmp_path, "run", items, **options)
    what = "is missing" if damage == "missing" else "cannot be read back ("
    assert str(refused.value).startswith(f"{state} {what}")
    assert str(refused.value).endswith(f": delete {newest} and rerun to resume from the checkpoint before it "
                                       "(or from the start)")
    import shutil

    shutil.rmtree(newest)
    seen = []
    resumed, losses, _ = _fit(tmp_path, "run", items, seen, **options)
    assert len(seen) == 3 and len(losses) == 4 and torch.allclose(resumed, whole)  # from checkpoint-1


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_leaves_none_half_written(tmp_path, monkeypatch):
    """A full disk mid-save: one line naming what could not be written, no checkpoint the rerun
    would trip on, and the rerun (once there is room) ends where an uninterrupted run ends."""
    import shutil
    from collections import namedtuple

    import qzoom_cli.training.saved as saved
    from qzoom_cli.errors import OutputError
    from qzoom_cli.training.loop import latest_checkpoint

    items, options = [1, 2, 3, 4], {"batch_size": 1, "save_every": 1}
    whole, _, _ = _fit(tmp_path, "whole", items, **options)
    real_save = torch.save

    def disk_fills_at_step_2(obj, path):
        if Path(path).parent.name == ".checkpoint-2.partial":
            Path(path).write_bytes(b"PK\x03\x04")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        real_save(obj, path)

    monkeypatch.setattr(torch, "save", disk_fills_at_step_2)
    monkeypatch.setattr(saved.shutil, "disk_usage", lambda folder: namedtuple("Usage", "total used free")(9, 9, 0))
    with pytest.raises(OutputError) as stopped:
        _fit(tmp_path, "run", items, **options)
    assert str(stopped.value) == (f"could not write {tmp_path / 'run' / 'checkpoint-2'} (no space left on device): "
                                  "make room or fix the folder, then rerun the same command; it resumes from the "
                                  "work already saved")
    assert latest_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoint-1"
    monkeypatch.setattr(torch, "save", real_save)
    monkeypatch.setattr(saved.shutil, "disk_usage", shutil.disk_usage)
    seen = []
    resumed, _, _ = _fit(tmp_path, "run", items, seen, **options)
    assert len(seen) == 3 and torch.allclose(resumed, whole)
    assert not (tmp_path / "run" / ".checkpoint-2.partial").exists()


def test_a_damaged_cache_entry_or_cache_settings_is_named_with_what_to_do(tmp_path, monkeypatch):
    import qzoom_cli.training.data as data
    from qzoom_cli.errors import DamagedFile, OutputError

    store = ArtefactStore(tmp_path / "labels", {"dpi": 72})
    store.save("a", {"x": torch.ones(3)}, {"k": 1})
    assert store.load("a")[1] == {"k": 1}
    store.path("a").write_bytes(store.path("a").read_bytes()[:20])
    with pytest.raises(DamagedFile) as damaged:
        store.load("a")
    assert str(damaged.value).startswith(f"{store.path('a')} cannot be read back (")
    assert str(damaged.value).endswith("): delete it and rerun: only its sample is computed again")
    for text, reason in (("{", "cannot be read back"), ("[72]", "holds list, not the object qzoom wrote")):
        (tmp_path / "labels" / "settings.json").write_text(text)
        with pytest.raises(DamagedFile) as damaged:
            ArtefactStore(tmp_path / "labels", {"dpi": 72})
        assert str(damaged.value).startswith(f"{tmp_path / 'labels' / 'settings.json'} {reason}")
        assert str(damaged.value).endswith(f": delete {tmp_path / 'labels'} to compute its work afresh, or write to "
                                           "another --output")

    def full_disk(*args, **kwargs):
        from safetensors import SafetensorError

        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(data, "save_file", full_disk)
    with pytest.raises(OutputError, match=r"^could not write .*b\.safetensors \(Error while serializing: I/O error: "
                                          r"No space left on device \(os error 28\)\)"):
        store.save("b", {"x": torch.ones(3)}, {})
    assert "b" not in store


@pytest.mark.parametrize("text", ['{"settings": {"a": 1}', '{"settings": {"a": 1}}', '[]', '{"settings": 3, '
                                                                                          '"stages": {}}'])
def test_damaged_stage_progress_is_named_with_what_to_do(tmp_path, text):
    from qzoom_cli.errors import DamagedFile
    from qzoom_cli.training.recipe import _Progress

    path = tmp_path / "stages" / "progress.json"
    _Progress(path, {"a": 1}).finish("questions", {"written": 4})
    assert _Progress(path, {"a": 1}).done == {"questions": {"written": 4}}
    path.write_text(text)
    with pytest.raises(DamagedFile) as damaged:
        _Progress(path, {"a": 1})
    assert str(damaged.value).startswith(f"{path} ")
    assert str(damaged.value).endswith(": delete it and rerun: the stages run again, each resuming from its own "
                                       "caches and checkpoints")


@pytest.mark.parametrize("text", ['{"value": 0.', '{"value": "high"}', '{}', '0.7'])
def test_a_damaged_held_out_measure_is_named_with_what_to_do(tmp_path, text):
    from qzoom_cli.errors import DamagedFile
    from qzoom_cli.training.rpn import _before_training

    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "held_out_before.json").write_text(text)
    with pytest.raises(DamagedFile) as damaged:
        _before_training(tmp_path, lambda: 0.9)
    assert str(damaged.value).startswith(f"{tmp_path / 'held_out_before.json'} ")
    assert str(damaged.value).endswith(": delete it and rerun: the measure is taken again")
    (tmp_path / "held_out_before.json").write_text('{"value": null}')  # nothing was held out: nothing measured
    assert _before_training(tmp_path, lambda: 0.9) is None


def test_an_out_folder_training_cannot_write_is_refused_before_any_work(tmp_path):
    from qzoom_cli.training.saved import check_out_folder

    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "adapter"):
        with pytest.raises(UsageError, match=f"^--output {re.escape(str(out))}: {re.escape(str(tmp_path / 'file'))} "
                                             "is a file; name a folder for the adapter$"):
            check_out_folder(out, None)
    with pytest.raises(UsageError, match=r"^--output /sys/qzoom/adapter: cannot write in /sys \(.+\); name a folder "
                                         "you can write$"):
        check_out_folder(Path("/sys/qzoom/adapter"), None)
    check_out_folder(tmp_path / "new" / "adapter", str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the check leaves nothing behind


@pytest.mark.parametrize("command", ["rpn", "gate", "all"])
def test_training_into_the_models_own_folder_is_refused_before_any_work(tiny_dir, tmp_path, command):
    manifest, _ = red_square_pages(tmp_path, 2, seed=5)
    (tmp_path / "link").symlink_to(tiny_dir)
    before = sorted(p.relative_to(tiny_dir) for p in tiny_dir.rglob("*"))
    result = runner.invoke(cli.app, ["train", command, str(manifest), "--out", str(tmp_path / "link"),
                                     *train_args(tiny_dir)])
    assert result.exit_code == EXIT_USAGE, result.stderr
    assert result.stderr == f"qzoom: error: --output {tmp_path / 'link'} is the model's own folder; write the adapter " \
                            "to a folder of its own\n"
    assert sorted(p.relative_to(tiny_dir) for p in tiny_dir.rglob("*")) == before
