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
    from trainkit import mined_pairs, red_square_pages
    from zoomkit import trained_adapter

    from qzoom_cli import QZoom
    from qzoom_cli.training.loop import TrainOptions
    from qzoom_cli.training.settings import LoraSettings
    from qzoom_cli.training.sft import SftSettings, train_sft
    from qzoom_cli.zoom.lora import LORA_FOLDER

    qz = QZoom.from_pretrained(str(tiny_dir), device="cpu")  # its own: LoRA goes into the base model
    adapter = trained_adapter(qz.backbone, gate=False, reuse_src_pos=True)
    manifest, _ = red_square_pages(tmp_path, 4, seed=13)
    samples, mined = mined_pairs(manifest)
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
    assert {b.y0 for b in drawn} >= {0, 8} and max(b.y1 for b in drawn) == 20
    assert {noisy_box(box, (4, 4), 1.0, rng).height for _ in range(200)} == {1, 2}      # at least one cell
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


# --- the whole stage and its command ---------------------------------------------------------------

SFT_OPTIONS = ["--max-visual-tokens", "36", "--min-visual-tokens", "16", "--max-new-tokens", "10", "--lora-rank", "4",
               "--lora-alpha", "8", "--lora-dropout", "0", "--batch-size", "2", "--lr", "5e-3", "--held-out", "0.34",
               "--box-noise", "0.8"]


def _cli(*args):
    from typer.testing import CliRunner

    from qzoom_cli import cli

    return CliRunner().invoke(cli.app, [str(a) for a in args])


def _device_args(tiny_dir):
    return ["--model", tiny_dir, "--device", "cpu", "--dpi", "72"]


@pytest.fixture
def region_adapter(qz, tmp_path):
    """A region-head adapter as `train rpn` writes it (no gate, no LoRA)."""
    from zoomkit import trained_adapter

    return trained_adapter(qz.backbone, gate=False).save_pretrained(tmp_path / "rpn")


def _ask(tiny_dir, page, adapter, *extra):
    import json

    result = _cli("ask", page, "Where is the red square?", "--adapter", adapter, "--zoom", "always", "--json",
                  "--max-visual-tokens", "36", "--min-visual-tokens", "16", "--max-new-tokens", "10", *extra,
                  *_device_args(tiny_dir))
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["answer"]


def test_train_sft_learns_the_mined_answers_reports_held_out_accuracy_and_resumes(tiny_dir, region_adapter, tmp_path,
                                                                                monkeypatch):
    """Six regressions (plain 'top left' right, zoomed 'bottom' wrong): four train, two are held
    out; after tuning the zoomed read answers the held-out ones right, and `ask` reads the LoRA."""
    import json

    from trainkit import red_square_pages, seed_mined

    from qzoom_cli.errors import EXIT_USAGE

    manifest, _ = red_square_pages(tmp_path, 6, seed=21)
    out = tmp_path / "sft"
    seed_mined(manifest, out / "mined", plain="top left", zoomed="bottom")
    run = _cli("train", "sft", "--json", manifest, "--adapter", region_adapter, "--out", out, "--epochs", "20", "--save-every",
               "10", *SFT_OPTIONS, *_device_args(tiny_dir))
    assert run.exit_code == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["mining"]["by_kind"] == {"regression": 6, "improvement": 0, "both right": 0, "both wrong": 0}
    assert (report["trained_on"], report["held_out"], report["steps"]) == (4, 2, 40)
    assert report["held_out_accuracy_before"] == 0.0 and report["held_out_accuracy_after"] == 1.0
    assert report["notes"] == [] and not report["label_free"] and report["last_loss"] < report["first_loss"] / 10
    config = json.loads((out / "qzoom_config.json").read_text())
    assert config["reuse_src_pos"] and config["training"]["sft"]["trained_on"] == 4
    assert (out / "lora" / "adapter_model.safetensors").is_file()
    page = tmp_path / "page0.png"
    assert _ask(tiny_dir, page, out) == _ask(tiny_dir, page, out, "--no-merge") == "top left"
    assert _ask(tiny_dir, page, region_adapter) != "top left"

    import qzoom_cli.training.mining as mining

    def no_mining(*args, **kwargs):
        raise AssertionError("a mined pair was answered again")

    monkeypatch.setattr(mining, "_answer_both", no_mining)
    more = _cli("train", "sft", "--json", manifest, "--adapter", region_adapter, "--out", out, "--epochs", "25", *SFT_OPTIONS,
                *_device_args(tiny_dir))
    assert more.exit_code == 0, more.stderr
    assert json.loads(more.stdout)["steps"] == 50  # the 40 done, then 10 more from the last checkpoint
    other = _cli("train", "sft", "--json", manifest, "--adapter", region_adapter, "--out", out, "--epochs", "25",
                 *SFT_OPTIONS, "--max-new-tokens", "5", *_device_args(tiny_dir))
    assert other.exit_code == EXIT_USAGE and "other settings (max_new_tokens)" in other.stderr
    rank = _cli("train", "sft", "--json", manifest, "--adapter", region_adapter, "--out", out, "--epochs", "25",
                *SFT_OPTIONS, "--lora-rank", "8", *_device_args(tiny_dir))
    assert rank.exit_code == EXIT_USAGE and "other settings (lora)" in rank.stderr
    tuned = _cli("train", "sft", "--json", manifest, "--adapter", out, "--out", tmp_path / "again", *SFT_OPTIONS,
                 *_device_args(tiny_dir))
    assert tuned.exit_code == EXIT_USAGE and "already carries LoRA weights" in tuned.stderr
    assert "fine-tune from an adapter without them (the one `train rpn` wrote)" in tuned.stderr


@pytest.mark.parametrize("args, message", [
    (["--mix", "-1"], "--mix"), (["--held-out", "1"], "--held-out"), (["--box-noise", "1.5"], "--box-noise"),
    (["--lora-rank", "0"], "--lora-rank"), (["--lora-targets", "q_proj,fc1"], "not fc1"),
    (["--metric", "bleu"], "unknown metric"), (["--pseudo-reference-tokens", "0"], "--pseudo-reference-tokens"),
    (["--min-visual-tokens", "64", "--max-visual-tokens", "16"], "visual-tokens")])
def test_train_sft_refuses_bad_options_before_loading_anything(tmp_path, args, message):
    from qzoom_cli.errors import EXIT_USAGE

    result = _cli("train", "sft", "--json", tmp_path / "none.jsonl", "--adapter", tmp_path, "--out", tmp_path / "o", *args,
                  "--model", tmp_path / "no-model")
    assert result.exit_code == EXIT_USAGE and message in result.stderr


def _fine_tune(tiny_dir, adapter_dir, samples, out, options, load_judge=None, on_step=lambda report: None,
               **settings):
    from qzoom_cli import QZoom
    from qzoom_cli.training.settings import FineTuneSettings, LoraSettings
    from qzoom_cli.training.targeted import fine_tune

    qz = QZoom.from_pretrained(str(tiny_dir), adapter=str(adapter_dir), device="cpu")  # its own: LoRA goes into it
    settings = FineTuneSettings(**{"max_visual_tokens": 36, "min_visual_tokens": 16, "max_new_tokens": 10, "dpi": 72,
                                   "lora": LoraSettings(rank=4, alpha=8, dropout=0.0), **settings})
    return fine_tune(qz, samples, settings, options, out, load_judge, on_step=on_step)[1]


def test_an_interrupted_fine_tuning_resumes_to_the_uninterrupted_weights(tiny_dir, region_adapter, tmp_path):
    """Checkpoints keep the LoRA weights, the optimiser and the random state: dropout draws the same
    masks after a resume, so the result is the one an uninterrupted run gives."""
    from safetensors.torch import load_file
    from trainkit import red_square_pages, seed_mined, stop_at

    from qzoom_cli.training.loop import TrainOptions
    from qzoom_cli.training.settings import LoraSettings

    manifest, _ = red_square_pages(tmp_path, 4, seed=22)
    options = TrainOptions(epochs=3, lr=5e-3, batch_size=2, save_every=1)
    lora = LoraSettings(rank=4, alpha=8, dropout=0.3)
    weights = {}
    for name in ("whole", "interrupted"):
        samples = seed_mined(manifest, tmp_path / name / "mined", plain="top left", zoomed="bottom")

        try:
            _fine_tune(tiny_dir, region_adapter, samples, tmp_path / name, options,
                       on_step=stop_at(3) if name == "interrupted" else lambda report: None, lora=lora, held_out=0.0)
        except KeyboardInterrupt:
            report = _fine_tune(tiny_dir, region_adapter, samples, tmp_path / name, options, lora=lora, held_out=0.0)
            assert report["steps"] == 6
        weights[name] = load_file(tmp_path / name / "lora" / "adapter_model.safetensors")
    assert weights["whole"].keys() == weights["interrupted"].keys()
    assert all(torch.equal(weights["whole"][k], weights["interrupted"][k]) for k in weights["whole"])
    first = load_file(tmp_path / "interrupted" / "checkpoint-1" / "lora" / "adapter_model.safetensors")
    assert any(not torch.equal(first[k], weights["whole"][k]) for k in first)  # the steps after it mattered


def test_a_judge_is_loaded_only_while_pairs_remain_to_judge(tiny_dir, region_adapter, tmp_path):
    from types import SimpleNamespace

    from trainkit import red_square_pages, seed_mined

    from qzoom_cli.training.loop import TrainOptions
    from qzoom_cli.training.mining import JUDGE_SYSTEM

    manifest, _ = red_square_pages(tmp_path, 2, seed=23)
    samples = seed_mined(manifest, tmp_path / "out" / "mined", plain="top left", zoomed="bottom")
    samples.samples.append(samples.samples[0].__class__(**{**vars(samples.samples[0]), "question": "Which colour?"}))
    loaded = []

    def load_judge(name):
        judge = SimpleNamespace(backbone=SimpleNamespace(system_prompt=None),
                                ask=lambda doc, request, **options: [SimpleNamespace(answer="A: Yes\nB: No")])
        loaded.append((name, judge))
        return judge

    options = TrainOptions(epochs=1, lr=1e-3, batch_size=2)
    report = _fine_tune(tiny_dir, region_adapter, samples, tmp_path / "out", options, load_judge, judge="judge-model",
                        held_out=0.0)
    assert [name for name, _ in loaded] == ["judge-model"] and loaded[0][1].backbone.system_prompt == JUDGE_SYSTEM
    assert report["mining"]["judged_by"] == {"references": 2, "judge": 1}
    assert any("judge judge-model" in note for note in report["notes"])
    _fine_tune(tiny_dir, region_adapter, samples, tmp_path / "out", options, load_judge, judge="judge-model",
               held_out=0.0)
    assert len(loaded) == 1  # every pair was judged before: no judge is loaded


def test_the_report_says_when_no_label_was_used_and_when_nothing_can_be_learned(tiny_dir, region_adapter, tmp_path):
    from trainkit import red_square_pages, seed_mined

    from qzoom_cli.errors import UsageError
    from qzoom_cli.training.loop import TrainOptions

    manifest, _ = red_square_pages(tmp_path, 3, seed=24)
    options = TrainOptions(epochs=1, lr=1e-3, batch_size=2)
    samples = seed_mined(manifest, tmp_path / "free" / "mined", "top left", "bottom", judged_by="pseudo-reference")
    report = _fine_tune(tiny_dir, region_adapter, samples, tmp_path / "free", options, held_out=0.0,
                        pseudo_reference_tokens=100)
    assert report["label_free"] and "pseudo-reference" in report["notes"][0] and "100 visual tokens" in \
        report["notes"][0]
    assert "not measured" in report["notes"][1]
    samples = seed_mined(manifest, tmp_path / "none" / "mined", "top left", "bottom", kind="both wrong")
    with pytest.raises(UsageError) as error:
        _fine_tune(tiny_dir, region_adapter, samples, tmp_path / "none", options)
    assert str(error.value) == ("nothing to fine-tune on: 3 pairs mined (0 regression, 0 improvement, 0 both right, "
                                "3 both wrong); the zoomed read answered no pair worse than the plain one (--mix also "
                                "trains on improvements)")


def test_gradient_checkpointing_recomputes_the_decoder_layers_and_takes_the_same_step(tiny_dir, tmp_path, recwarn):
    """`--gradient-checkpointing` trades compute for memory and nothing else: the same LoRA step,
    and no warning that gradients will be None (reentrant checkpointing's complaint about inputs,
    the frozen embeddings, that need no gradient)."""
    from trainkit import mined_pairs, red_square_pages
    from zoomkit import trained_adapter

    from qzoom_cli import QZoom
    from qzoom_cli.training.loop import TrainOptions
    from qzoom_cli.training.sft import SftSettings, train_sft

    samples, mined = mined_pairs(red_square_pages(tmp_path, 2, seed=25)[0])
    calls, lora = {}, {}
    for checkpointing in (False, True):
        qz = QZoom.from_pretrained(str(tiny_dir), device="cpu")
        attention = qz.backbone.decoder_layers[0].self_attn  # runs inside the checkpointed forward
        attention.register_forward_pre_hook(lambda *args, c=checkpointing: calls.setdefault(c, []).append(1))
        options = TrainOptions(epochs=1, batch_size=2, gradient_checkpointing=checkpointing)
        _, losses = train_sft(qz, trained_adapter(qz.backbone, gate=False), samples, mined,
                              SftSettings(budget=VisualBudget(16, 36), dpi=72), options, tmp_path / str(checkpointing))
        assert len(losses) == 1
        lora[checkpointing] = {k: v for k, v in qz.backbone.model.state_dict().items() if "lora_B" in k}
    assert len(calls[False]) == 2 and len(calls[True]) == 4  # each sample's forward, then again in the backward
    assert lora[True] and all(v.any() and torch.allclose(v, lora[False][k], atol=1e-6) for k, v in lora[True].items())
    assert not [w for w in recwarn if "requires_grad" in str(w.message)]


def test_train_sft_asks_the_judge_model_given(tiny_dir, region_adapter, tmp_path):
    """`--judge MODEL` loads that model as the judge; the tiny one never answers 'A: Yes/No, B: Yes/No',
    so every pair is left out and nothing can be learned (said, exit 2); a judge not at hand is exit 4."""
    from trainkit import red_square_pages

    from qzoom_cli.errors import EXIT_MODEL, EXIT_USAGE

    manifest, _ = red_square_pages(tmp_path, 2, seed=26)
    args = ["train", "sft", "--json", manifest, "--adapter", region_adapter, *SFT_OPTIONS, "--max-new-tokens", "2",
            *_device_args(tiny_dir)]
    judged = _cli(*args, "--out", tmp_path / "a", "--judge", tiny_dir)
    assert judged.exit_code == EXIT_USAGE and "0 pairs mined" in judged.stderr
    missing = _cli(*args, "--out", tmp_path / "b", "--judge", tmp_path / "no-such-model")
    assert missing.exit_code == EXIT_MODEL


def test_only_the_decoders_lora_weights_learn(tiny_dir, tmp_path):
    """Vision tower, embeddings, every base weight, the LM head and the zoom branches stay as they
    were; the LoRA weights of the decoder layers move."""
    from trainkit import mined_pairs, red_square_pages
    from zoomkit import trained_adapter

    from qzoom_cli import QZoom
    from qzoom_cli.training.loop import TrainOptions
    from qzoom_cli.training.sft import SftSettings, train_sft

    qz = QZoom.from_pretrained(str(tiny_dir), device="cpu")
    adapter = trained_adapter(qz.backbone, gate=True)
    manifest, _ = red_square_pages(tmp_path, 2, seed=27)
    samples, mined = mined_pairs(manifest)
    base = {k: v.clone() for k, v in qz.backbone.model.state_dict().items()}
    branches = {k: v.clone() for k, v in adapter.state_dict().items()}
    model, _ = train_sft(qz, adapter, samples, mined, SftSettings(budget=VisualBudget(16, 36), dpi=72),
                         TrainOptions(epochs=2, lr=1e-2, batch_size=1), tmp_path / "out")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name and ".layers." in name and "visual" not in name for name in trainable)
    after = {k.replace(".base_layer", ""): v for k, v in qz.backbone.model.state_dict().items() if "lora_" not in k}
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)
    assert all(torch.equal(v, branches[k]) for k, v in adapter.state_dict().items())
    lora_b = [v for k, v in qz.backbone.model.state_dict().items() if "lora_B" in k]
    assert lora_b and all(bool(v.abs().sum() > 0) for v in lora_b)  # every B moved off its zero start


def test_held_out_pairs_are_asked_on_their_page_with_the_training_settings_and_metric(tmp_path):
    from types import SimpleNamespace

    from docmaker import make_encrypted_pdf

    from qzoom_cli.training.data import TrainSample
    from qzoom_cli.training.mining import Mined
    from qzoom_cli.training.rpn import answer_instruction
    from qzoom_cli.training.sft import SftSettings, held_out_accuracy

    pdf = tmp_path / "locked.pdf"
    pdf.write_bytes(make_encrypted_pdf("pw"))
    samples = {"a": TrainSample("a", str(pdf), "pw", 2, "Total?", "sha"),
               "b": TrainSample("b", str(pdf), "pw", 1, "Due?", "sha")}
    asked = []

    class Recorder:
        def ask(self, file, question, **options):
            asked.append((file, question, options))
            return [SimpleNamespace(answer="total $1,200 usd")]  # within 5% of 1234.5; far from it as text

    pairs = [Mined("a", "Total?", "p", "z", ("1234.5",), "references", "regression"),
             Mined("b", "Due?", "p", "z", ("2000",), "references", "regression")]
    settings = SftSettings(budget=VisualBudget(16, 36), free_answers=True, dpi=90)
    assert held_out_accuracy(Recorder(), pairs, samples, settings, max_new_tokens=4, metric="relaxed") == 0.5
    common = {"password": "pw", "dpi": 90, "zoom": "always", "budget": settings.budget, "max_new_tokens": 4,
              "instruction": answer_instruction(True)}
    assert asked == [(str(pdf), "Total?", {"pages": "2", **common}), (str(pdf), "Due?", {"pages": "1", **common})]


def test_the_fine_tuning_reads_and_trains_with_its_settings():
    from qzoom_cli.training.mining import MiningSettings
    from qzoom_cli.training.settings import FineTuneSettings, LoraSettings
    from qzoom_cli.training.sft import SftSettings
    from qzoom_cli.training.targeted import mining_settings, sft_settings

    lora = LoraSettings(rank=4)
    settings = FineTuneSettings(lora=lora, box_noise=0.3, free_answers=True, dpi=90, seed=7, max_new_tokens=9,
                                metric="relaxed")
    budget, pseudo = VisualBudget(16, 36), VisualBudget(64, 64)
    assert sft_settings(settings, budget) == SftSettings(budget, lora=lora, box_noise=0.3, free_answers=True, dpi=90,
                                                         seed=7)
    assert mining_settings(settings, budget, pseudo) == MiningSettings(budget, pseudo, max_new_tokens=9, dpi=90,
                                                                       metric="relaxed", free_answers=True)


@pytest.mark.parametrize("label_free, judge, before, after, notes", [
    (False, None, 0.5, 0.75, []),
    (False, None, 0.5, 0.5, ["held-out accuracy did not rise (0.500 before, 0.500 after)"]),
    (False, None, None, None, ["no pair was held out (too few were mined): held-out accuracy was not measured"]),
    (True, "judge-model", 0.5, 0.75, [
        "label-free: without reference answers, right and wrong were judged against the model's own answer at 64 "
        "visual tokens (pseudo-reference), and held-out accuracy measures agreement with it",
        "pairs were classified by the judge judge-model; held-out accuracy uses the metric"]),
])
def test_the_fine_tuning_report_notes_what_the_numbers_do_not_say(label_free, judge, before, after, notes):
    from qzoom_cli.training.settings import FineTuneSettings
    from qzoom_cli.training.targeted import _notes

    settings = FineTuneSettings(judge=judge)
    assert _notes({"label_free": label_free}, settings, VisualBudget(64, 64), before, after) == notes


def test_pairs_are_mined_at_the_given_coarse_budget_and_judged_at_the_models_plain_one(qz):
    from qzoom_cli.training.settings import FineTuneSettings
    from qzoom_cli.training.targeted import budgets

    assert budgets(FineTuneSettings(), qz) == (qz.default_budget("auto"), qz.default_budget("never"))
    given = FineTuneSettings(min_visual_tokens=16, max_visual_tokens=36, pseudo_reference_tokens=64)
    assert budgets(given, qz) == (VisualBudget(16, 36), VisualBudget(64, 64))


def test_fine_tuning_refuses_what_it_cannot_tune_before_any_work(tmp_path):
    from types import SimpleNamespace

    from qzoom_cli.errors import UsageError
    from qzoom_cli.training.data import SampleSet
    from qzoom_cli.training.loop import TrainOptions
    from qzoom_cli.training.settings import FineTuneSettings
    from qzoom_cli.training.targeted import fine_tune

    def model(adapter, spatial_rows=None):
        layout = SimpleNamespace(spatial_rows=spatial_rows)
        return SimpleNamespace(adapter=adapter, backbone=SimpleNamespace(family="llava", lora_dir=None, layout=layout))

    def refusal(qz, settings=FineTuneSettings()):
        with pytest.raises(UsageError) as refused:
            fine_tune(qz, SampleSet([]), settings, TrainOptions(), tmp_path)
        return str(refused.value)

    no_head = ("targeted fine-tuning zooms with a trained region head: give the adapter `qzoom train rpn` wrote")
    assert refusal(model(None)) == no_head
    assert refusal(model(SimpleNamespace(config=SimpleNamespace(region_head=False)))) == no_head
    region = SimpleNamespace(config=SimpleNamespace(region_head=True))
    assert refusal(model(region), FineTuneSettings(aligned=True)) == (
        "llava has 1-D positions: its region cannot be aligned inside the page's grid (--second-image)")


def test_the_judge_is_loaded_only_for_pairs_left_to_judge_and_let_go_before_training(tmp_path, monkeypatch):
    import weakref
    from types import SimpleNamespace

    import qzoom_cli.training.targeted as targeted
    from qzoom_cli.errors import ResumeMismatch
    from qzoom_cli.training.data import SampleSet, Shard, TrainSample
    from qzoom_cli.training.mining import JUDGE_SYSTEM, MiningSettings
    from qzoom_cli.training.settings import FineTuneSettings

    class Judge:
        backbone = SimpleNamespace(system_prompt=None)

    judges, mined, released = [], [], []

    def load_judge(name):
        judge = Judge()
        judges.append((name, weakref.ref(judge)))
        return judge

    def mine(qz, samples, settings, store, judge, on_pair, shard):
        mined.append((judge is not None and judge.backbone.system_prompt, shard))
        return []

    monkeypatch.setattr(targeted, "mine", mine)
    monkeypatch.setattr(targeted, "release_memory", lambda: released.append([ref() for _, ref in judges]))
    qz = SimpleNamespace(backbone=SimpleNamespace(model_id="base"))
    samples = SampleSet([TrainSample("a", "a.png", None, 1, "Total?", "sha")])
    mining = MiningSettings(VisualBudget(16, 36), VisualBudget(64, 64))
    judged = FineTuneSettings(judge="judge-model")

    assert targeted._mine(qz, samples, judged, mining, tmp_path / "a", load_judge, print) == []
    assert [name for name, _ in judges] == ["judge-model"] and mined == [(JUDGE_SYSTEM, Shard())]
    assert released == [[None]]  # released once, with the judge already gone
    targeted._mine(qz, samples, FineTuneSettings(), mining, tmp_path / "b", load_judge, print)
    assert len(judges) == 1 and mined[-1] == (False, Shard()) and len(released) == 1  # no judge: nothing to free
    with pytest.raises(ValueError, match="^a judge is named but no way to load it was given$"):
        targeted._mine(qz, samples, judged, mining, tmp_path / "c", None, print)

    for changed, named in [(SimpleNamespace(backbone=SimpleNamespace(model_id="other")), "model"),
                           (FineTuneSettings(judge="judge-model", aligned=True), "aligned"),
                           (FineTuneSettings(judge="another judge"), "judge")]:
        model, settings = (changed, judged) if named == "model" else (qz, changed)
        with pytest.raises(ResumeMismatch, match=rf"other settings \({named}\)"):
            targeted._mine(model, samples, settings, mining, tmp_path / "a", load_judge, print)


def test_fine_tuning_mines_chooses_holds_out_and_trains_as_its_settings_say(tmp_path, monkeypatch):
    """The stages of `fine_tune` replaced by recorders: what each is handed."""
    from dataclasses import asdict
    from types import SimpleNamespace

    import qzoom_cli.training.targeted as targeted
    from qzoom_cli.errors import UsageError
    from qzoom_cli.training.data import SampleSet, TrainSample
    from qzoom_cli.training.loop import TrainOptions, options_dict
    from qzoom_cli.training.mining import Mined, mining_report, training_set
    from qzoom_cli.training.settings import FineTuneSettings
    from qzoom_cli.training.sft import split_held_out

    samples = SampleSet([TrainSample(f"s{i}", "a.png", None, 1, "Total?", f"sha{i}") for i in range(18)])
    mined = [Mined(s.key, "Total?", "p", "z", ("p",), "references", "regression" if i < 8 else "improvement",
                   (0, 0, 1, 1)) for i, s in enumerate(samples.samples[:16])]
    calls = {}

    def record(name, result):
        def stage(*args):
            calls.setdefault(name, []).append(args)
            return result
        return stage

    monkeypatch.setattr(targeted, "_mine", record("mine", mined))
    monkeypatch.setattr(targeted, "held_out_accuracy", record("accuracy", 0.5))
    monkeypatch.setattr(targeted, "train_sft", record("train", (None, [0.9, 0.4, 0.2])))
    config = SimpleNamespace(region_head=True, reuse_src_pos=None, training={})
    saved = []
    adapter = SimpleNamespace(config=config, save_config=saved.append)
    qz = SimpleNamespace(adapter=adapter, engine=SimpleNamespace(reuse_src_pos=None),
                         backbone=SimpleNamespace(family="qwen2_5_vl", lora_dir=None,
                                                  layout=SimpleNamespace(spatial_rows=(0, 1))),
                         resolve_budget=lambda low, high: VisualBudget(low, high),
                         default_budget=lambda mode: VisualBudget(1, 1))
    settings = FineTuneSettings(min_visual_tokens=16, max_visual_tokens=36, pseudo_reference_tokens=64, aligned=False,
                                mix=0.5, held_out=0.25, seed=7, max_new_tokens=9, metric="relaxed")
    _, report = targeted.fine_tune(qz, samples, settings, TrainOptions(), tmp_path)

    [(_, _, mined_with, mining, *_)] = calls["mine"]
    assert mined_with.aligned is False and config.reuse_src_pos is False and qz.engine.reuse_src_pos is False
    assert mining.pseudo_budget == VisualBudget(64, 64) and mining.budget == VisualBudget(16, 36)
    train, held = split_held_out(training_set(mined, 0.5, 7), 0.25, 7)
    [(_, _, _, trained, *_)] = calls["train"]
    assert trained == train and [args[1] for args in calls["accuracy"]] == [held, held]
    assert all(args[4:] == (9, "relaxed") for args in calls["accuracy"])
    assert report == {
        "stage": "sft", "samples": 18, "skipped": {}, "trained_on": 9, "held_out": 3, "steps": 3,
        "mining": {**mining_report(mined, training_set(mined, 0.5, 7)), "left_out": 2},
        "first_loss": 0.9, "last_loss": 0.2, "held_out_accuracy_before": 0.5, "held_out_accuracy_after": 0.5,
        "held_out_metric": "relaxed: a score of at least 0.5 against the pair's references counts as right (as "
                           "`qzoom eval` scores)",
        "label_free": False, "notes": ["held-out accuracy did not rise (0.500 before, 0.500 after)"]}
    recorded = {**report, "data_fingerprint": samples.fingerprint(), "lora": asdict(settings.lora), "aligned": False,
                "mix": 0.5, "box_noise": 0.0, "options": options_dict(TrainOptions())}
    assert config.training == {"sft": recorded}
    assert saved == [tmp_path]

    monkeypatch.setattr(targeted, "_mine", record("mine", mined[8:]))  # improvements only: no regression to learn
    with pytest.raises(UsageError) as refused:
        targeted.fine_tune(qz, samples, settings, TrainOptions(), tmp_path)
    assert str(refused.value) == ("nothing to fine-tune on: 8 pairs mined (0 regression, 8 improvement, 0 both right, "
                                  "0 both wrong); the zoomed read answered no pair worse than the plain one")


def _tune(tiny_dir, samples, mined, out, aligned=False, options=None, **settings):
    """train_sft's step losses on a fresh copy of the tiny model (the LoRA goes into its base
    model) with an untrained region head."""
    from zoomkit import trained_adapter

    from qzoom_cli import QZoom
    from qzoom_cli.training.loop import TrainOptions
    from qzoom_cli.training.settings import LoraSettings
    from qzoom_cli.training.sft import SftSettings, train_sft

    qz = QZoom.from_pretrained(str(tiny_dir), device="cpu")
    settings = SftSettings(**{"budget": VisualBudget(16, 36), "dpi": 72, "lora": LoraSettings(rank=2, alpha=4,
                                                                                             dropout=0.0), **settings})
    adapter = trained_adapter(qz.backbone, gate=False, reuse_src_pos=aligned)
    return train_sft(qz, adapter, samples, mined, settings, options or TrainOptions(epochs=1, batch_size=2), out)[1]


@pytest.mark.parametrize("aligned, free_answers", [(True, False), (False, True)])
def test_the_first_step_learns_each_pairs_answer_after_the_sequence_ask_reads(tiny_dir, qz, tmp_path, aligned,
                                                                              free_answers):
    """LoRA starts as the identity, so the first step's loss is the base model's answer loss
    averaged over the batch, each pair read with the instruction its settings pick and the
    region placed as the adapter places it."""
    from trainkit import mined_pairs, red_square_pages
    from zoomkit import base_answer_loss

    samples, mined = mined_pairs(red_square_pages(tmp_path, 2, seed=28)[0], box=(1, 2, 4, 5))
    budget = VisualBudget(16, 36)
    expected = [base_answer_loss(qz, samples[p.key], p, budget, free_answers, aligned) for p in mined]
    other = [base_answer_loss(qz, samples[p.key], p, budget, not free_answers, not aligned) for p in mined]
    assert sum(other) != pytest.approx(sum(expected), rel=1e-3)  # the settings change what is read
    losses = _tune(tiny_dir, samples, mined, tmp_path / "out", aligned=aligned, free_answers=free_answers)
    assert losses == [pytest.approx(sum(expected) / 2, rel=1e-5)]


def test_fine_tuning_resumes_only_with_the_settings_its_steps_depend_on(tiny_dir, tmp_path):
    from trainkit import mined_pairs, red_square_pages

    from qzoom_cli.errors import ResumeMismatch
    from qzoom_cli.training.loop import TrainOptions

    samples, mined = mined_pairs(red_square_pages(tmp_path, 2, seed=29)[0])
    options, out = TrainOptions(epochs=1, batch_size=2, save_every=1), tmp_path / "out"
    _tune(tiny_dir, samples, mined, out, options=options)
    with pytest.raises(ResumeMismatch) as refused:
        _tune(tiny_dir, samples, mined, out, aligned=True, options=options, box_noise=0.5, free_answers=True)
    assert str(refused.value).startswith(f"{out / 'checkpoint-1'} was trained with other settings "
                                         "(aligned, box_noise, free_answers): ")
