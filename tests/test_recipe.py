"""`train all` (questions -> rpn -> sft -> rpn again -> gate), resumable stage by stage, and the
region head trained again on the tuned model (stage 2.5). Teacher labels, mined pairs and answer
ladders are seeded into the stages' caches (as finished passes leave them), so the training itself
runs for real and fast."""

import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainkit import red_square_pages, seed_ladders, seed_mined, seed_teacher_labels
from typer.testing import CliRunner

from qzoom_cli import QZoom, cli
from qzoom_cli.training.loop import TrainOptions
from qzoom_cli.training.recipe import STAGES, Recipe, train_all
from qzoom_cli.training.settings import FineTuneSettings, LoraSettings

QUESTION = "Where is the red square?"
LADDER = (16, 36, 64, 100)
TUNE = FineTuneSettings(max_visual_tokens=36, min_visual_tokens=16, max_new_tokens=10, held_out=0.0, box_noise=0.8,
                        lora=LoraSettings(rank=4, alpha=8, dropout=0.1))
RECIPE = Recipe(fine_tune=TUNE, view_tokens=64, branch_layer=2, depth=2, ladder=LADDER, dpi=72)
OPTIONS = TrainOptions(epochs=2, lr=5e-3, batch_size=2, save_every=1)
NAMES = {"rpn": "rpn", "sft": "sft", "rpn again": "rpn_again", "gate": "gate"}


def seed_stages(manifest: Path, cells, out: Path) -> None:
    """What each stage's slow pass (teacher, mining, ladders) would have cached."""
    stages = out / "stages"
    seed_teacher_labels(manifest, cells, stages / "rpn" / "labels")
    seed_mined(manifest, stages / "sft" / "mined", plain="top left", zoomed="bottom")
    seed_teacher_labels(manifest, cells, stages / "rpn_again" / "labels")
    seed_ladders(manifest, stages / "gate" / "ladders", LADDER, {QUESTION: ["?", "top", "top left", "top left"]})


def loader(tiny_dir):
    def load(adapter_dir):
        return QZoom.from_pretrained(str(tiny_dir), adapter=None if adapter_dir is None else str(adapter_dir),
                                     device="cpu")
    return load


def display(stop_stage=None, stop_step=2, seen=None, on_start=lambda name: None):
    """Stage callbacks that record each stage started and stop the run (as Ctrl-C would) at an
    optimiser step of one stage, after its first checkpoint."""
    @contextmanager
    def stage(description, total):
        name = NAMES.get(description.split(":")[0], description.split(":")[0])
        if seen is not None:
            seen.append(name)
        on_start(name)

        def on_step(report):
            if name == stop_stage and report.step == stop_step:
                raise KeyboardInterrupt

        yield (lambda *args: None), on_step
    return stage


def adapter_tensors(folder: Path) -> dict:
    return {**load_file(folder / "qzoom_adapter.safetensors"),
            **{f"lora.{k}": v for k, v in load_file(folder / "lora" / "adapter_model.safetensors").items()}}


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("whole")
    manifest, cells = red_square_pages(folder, 4, seed=31)
    seed_stages(manifest, cells, folder / "out")
    seen = []
    report = train_all(manifest, folder / "out", RECIPE, OPTIONS, loader(tiny_dir), display(seen=seen))
    return folder / "out", report, seen


def test_train_all_runs_every_stage_and_publishes_one_adapter(uninterrupted, tiny_dir):
    out, report, seen = uninterrupted
    assert seen == ["rpn", "sft", "rpn_again", "gate"] and list(report["stages"]) == list(STAGES)
    assert report["stages"]["questions"]["written"] == 0  # a manifest was given
    assert report["stages"]["sft"]["trained_on"] == 4 and report["stages"]["gate"]["transitions"] == 4
    config = json.loads((out / "qzoom_config.json").read_text())
    assert config["region_head"] and config["gate"] and config["reuse_src_pos"]
    assert list(config["training"]) == ["rpn", "sft", "rpn_again", "gate"]
    stages = out / "stages"
    assert adapter_tensors(out).keys() == adapter_tensors(stages / "gate").keys()
    for stage in ("sft", "rpn_again", "gate"):  # the LoRA weights tuned by sft travel with every later stage
        assert (stages / stage / "lora" / "adapter_model.safetensors").read_bytes() == \
            (out / "lora" / "adapter_model.safetensors").read_bytes()
    twig = "twig_layers.0.self_attn.q_proj.weight"
    first, again = (load_file(stages / s / "qzoom_adapter.safetensors")[twig] for s in ("rpn", "rpn_again"))
    assert not torch.equal(first, again)
    qz = QZoom.from_pretrained(str(tiny_dir), adapter=str(out), device="cpu")
    assert qz.backbone.lora_dir == out / "lora" and qz.adapter.config.gate


@pytest.mark.parametrize("stage", ["rpn", "sft", "rpn_again", "gate"])
def test_train_all_resumes_an_interrupted_stage_to_the_uninterrupted_result(uninterrupted, tiny_dir, tmp_path,
                                                                            stage, monkeypatch):
    manifest, cells = red_square_pages(tmp_path, 4, seed=31)
    out = tmp_path / "out"
    seed_stages(manifest, cells, out)
    with pytest.raises(KeyboardInterrupt):
        train_all(manifest, out, RECIPE, OPTIONS, loader(tiny_dir), display(stop_stage=stage))
    finished = list(json.loads((out / "stages" / "progress.json").read_text())["stages"])
    assert finished == list(STAGES[:STAGES.index(stage)])
    seen = []
    report = train_all(manifest, out, RECIPE, OPTIONS, loader(tiny_dir), display(seen=seen))
    assert seen == [s for s in STAGES if s != "questions"][STAGES.index(stage) - 1:]  # done stages are not rerun
    expected = adapter_tensors(uninterrupted[0])
    result = adapter_tensors(out)
    assert result.keys() == expected.keys() and all(torch.equal(result[k], expected[k]) for k in expected)
    assert report["stages"][stage] == uninterrupted[1]["stages"][stage]


def test_train_all_refuses_to_resume_with_other_settings(uninterrupted, tiny_dir):
    from qzoom_cli.errors import ResumeMismatch

    out = uninterrupted[0]
    manifest = out.parent / "train.jsonl"
    with pytest.raises(ResumeMismatch) as refused:
        train_all(manifest, out, replace(RECIPE, ladder=(16, 36, 64), dpi=80), OPTIONS, loader(tiny_dir), display())
    assert str(refused.value) == (f"{out} was trained with other settings (dpi, ladder): rerun with the same options, "
                                  "or write to another --output")
    copy = out.parent / "copy" / "train.jsonl"  # the same rows read from elsewhere: other files
    copy.parent.mkdir()
    copy.write_bytes(manifest.read_bytes())
    with pytest.raises(ResumeMismatch, match=r"other settings \(source\)"):
        train_all(copy, out, RECIPE, OPTIONS, loader(tiny_dir), display())
    again = train_all(manifest, out, RECIPE, replace(OPTIONS, save_every=0), loader(tiny_dir), display())
    assert again["stages"] == uninterrupted[1]["stages"]  # nothing left to do; save_every changes no result


def test_train_all_on_a_folder_writes_questions_first_and_keeps_them(tiny_dir, tmp_path, monkeypatch):
    import qzoom_cli.training.questions as questions
    import qzoom_cli.training.recipe as recipe
    from qzoom_cli.errors import UsageError

    docs = tmp_path / "docs"
    docs.mkdir()
    _, cells = red_square_pages(docs, 4, seed=33)
    out = tmp_path / "out"
    monkeypatch.setattr(questions, "parse_questions", lambda text, limit: [])  # the model's lines, none a question
    with pytest.raises(UsageError, match="no usable question"):
        train_all(docs, out, RECIPE, OPTIONS, loader(tiny_dir), display())
    monkeypatch.setattr(questions, "parse_questions", lambda text, limit: [QUESTION])
    manifest = out / "stages" / "questions.jsonl"

    def seed(name):
        if name == "rpn":
            seed_stages(manifest, cells, out)

    with pytest.raises(KeyboardInterrupt):
        train_all(docs, out, RECIPE, OPTIONS, loader(tiny_dir), display(stop_stage="rpn", stop_step=1, on_start=seed))
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [(row["question"], (manifest.parent / row["file"]).resolve()) for row in rows] == \
        [(QUESTION, (docs / f"page{i}.png").resolve()) for i in range(4)]
    assert json.loads((out / "stages" / "progress.json").read_text())["stages"]["questions"]["written"] == 4

    def no_questions(*args, **kwargs):
        raise AssertionError("questions were written again")

    monkeypatch.setattr(recipe, "write_questions", no_questions)
    seen = []
    report = train_all(docs, out, RECIPE, OPTIONS, loader(tiny_dir), display(seen=seen))
    assert seen == ["rpn", "sft", "rpn_again", "gate"] and report["stages"]["gate"]["samples"] == 4


def test_train_all_command(tiny_dir, tmp_path):
    manifest, cells = red_square_pages(tmp_path, 4, seed=32)
    out = tmp_path / "out"
    seed_stages(manifest, cells, out)
    args = ["train", "all", "--json", str(manifest), "--out", str(out), "--view-tokens", "64", "--branch-layer", "2",
            "--depth", "2", "--ladder", ",".join(map(str, LADDER)), "--max-visual-tokens", "36",
            "--min-visual-tokens", "16", "--lora-rank", "4", "--lora-alpha", "8", "--held-out", "0",
            "--batch-size", "2", "--model", str(tiny_dir), "--device", "cpu", "--dpi", "72"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["adapter"] == str(out) and list(report["stages"]) == list(STAGES)
    ask = CliRunner().invoke(cli.app, ["ask", str(tmp_path / "page0.png"), QUESTION, "--adapter", str(out), "--json",
                                       "--max-new-tokens", "2", "--model", str(tiny_dir), "--device", "cpu"])
    assert ask.exit_code == 0 and json.loads(ask.stdout)["zoom"]["gate"]["kind"] == "trained"


def test_train_rpn_again_starts_from_the_tuned_adapters_region_head_and_keeps_its_lora(uninterrupted, tiny_dir,
                                                                                     tmp_path):
    """Stage 2.5 as its own command: `train rpn --adapter` (the sft adapter) trains that region head
    further on the tuned model, and the adapter it writes carries the LoRA weights."""
    from qzoom_cli.errors import EXIT_USAGE

    tuned = uninterrupted[0] / "stages" / "sft"
    manifest = uninterrupted[0].parent / "train.jsonl"
    _, cells = red_square_pages(tmp_path, 4, seed=31)  # the same pages: their cells
    seed_teacher_labels(manifest, cells, tmp_path / "again" / "labels")
    args = ["train", "rpn", "--json", str(manifest), "--adapter", str(tuned), "--view-tokens", "64", "--batch-size", "2",
            "--model", str(tiny_dir), "--device", "cpu", "--dpi", "72"]
    still = CliRunner().invoke(cli.app, [*args, "--out", str(tmp_path / "again"), "--lr", "1e-30"])
    assert still.exit_code == 0, still.stderr
    start, result = (load_file(folder / "qzoom_adapter.safetensors") for folder in (tuned, tmp_path / "again"))
    assert result.keys() == start.keys() and all(torch.equal(result[k], start[k]) for k in start)
    config = json.loads((tmp_path / "again" / "qzoom_config.json").read_text())
    assert list(config["training"]) == ["rpn", "sft", "rpn_again"] and config["reuse_src_pos"]
    assert (tmp_path / "again" / "lora" / "adapter_model.safetensors").read_bytes() == \
        (tuned / "lora" / "adapter_model.safetensors").read_bytes()
    other = CliRunner().invoke(cli.app, [*args, "--out", str(tmp_path / "other"), "--branch-layer", "1"])
    assert other.exit_code == EXIT_USAGE and "K=2" in other.stderr


class StageRecorder:
    """Stands in for the stages' own training: records what each is handed, leaves an adapter in
    its folder, reports its name. `load` hands out the model with a marker of the adapter folder."""

    def __init__(self, qz, monkeypatch, nothing_for=()):
        """The stages named in `nothing_for` find nothing to learn."""
        import qzoom_cli.training.recipe as recipe

        self.qz, self.calls, self.loads, self.shown, self.items = qz, [], [], [], 0
        self.nothing_for = nothing_for
        for name in ("train_rpn", "fine_tune", "train_gate"):
            monkeypatch.setattr(recipe, name, self._stage(name))

    def _stage(self, name):
        def run(*args, **kwargs):
            from qzoom_cli.errors import NothingToLearn

            self.calls.append((name, args, kwargs))
            if name in self.nothing_for:
                raise NothingToLearn(f"{name} found nothing")
            folder = next(arg for arg in args if isinstance(arg, Path) and arg.parent.name == "stages")
            folder.mkdir(parents=True, exist_ok=True)
            for file in ("qzoom_adapter.safetensors", "qzoom_config.json"):
                (folder / file).write_text(f"{name} {file}")
            return None, {"ran": name}
        return run

    def load(self, folder):
        from types import SimpleNamespace

        self.loads.append(folder)
        qz = self.qz
        return SimpleNamespace(backbone=qz.backbone, engine=qz.engine, card=qz.card, adapter=f"adapter of {folder}",
                               resolve_budget=qz.resolve_budget)

    @contextmanager
    def display(self, description, total):
        self.shown.append((description, total))

        def on_item(*args):
            self.items += 1

        yield on_item, "on_step"


def test_each_stage_is_handed_the_recipes_settings_and_the_previous_stages_model(qz, tmp_path, monkeypatch):
    from qzoom_cli.training.gate import GateSettings
    from qzoom_cli.training.pseudo_labels import LabelSettings
    from qzoom_cli.training.rpn import rpn_settings
    from qzoom_cli.training.settings import view_side

    docs = tmp_path / "docs"
    docs.mkdir()
    manifest, _ = red_square_pages(docs, 5, seed=5)
    elsewhere = tmp_path / "manifests" / "train.jsonl"  # rows name their files relative to --root
    elsewhere.parent.mkdir()
    manifest.rename(elsewhere)
    recipe = replace(RECIPE, free_answers=True, dpi=90, max_samples=3, gate_threshold=0.3, view_tokens=36,
                     ladder=(16, 36, 64), labels=LabelSettings(fg_ratio=0.3))
    options = replace(OPTIONS, seed=7)
    stages = StageRecorder(qz, monkeypatch)

    def judge(model):
        raise AssertionError("only handed on")

    report = train_all(elsewhere, tmp_path / "out", recipe, options, stages.load, stages.display, root=str(docs),
                       load_judge=judge)
    out = tmp_path / "out" / "stages"
    assert report["adapter"] == str(tmp_path / "out")
    assert report["stages"] == {"questions": {"stage": "questions", "manifest": str(elsewhere), "written": 0},
                                "rpn": {"ran": "train_rpn"}, "sft": {"ran": "fine_tune"},
                                "rpn_again": {"ran": "train_rpn"}, "gate": {"ran": "train_gate"}}
    assert stages.loads == [None, out / "rpn", out / "sft", out / "rpn_again"]
    assert stages.shown == [("rpn: teacher labels", 3), ("sft: mining", 3), ("rpn again: teacher labels", 3),
                            ("gate: answer ladders", 3)]
    assert (tmp_path / "out" / "qzoom_config.json").read_text() == "train_gate qzoom_config.json"  # published

    (_, rpn, rpn_kw), (_, sft, sft_kw), (_, again, again_kw), (_, gate, gate_kw) = stages.calls
    samples = rpn[1]
    assert [(s.id, Path(s.file).parent) for s in samples.samples] == [(f"s{i}", docs) for i in range(3)]
    region = rpn_settings(qz, 2, 2, view_side=view_side(36), free_answers=True, labels=recipe.labels, dpi=90)
    assert rpn == (qz.backbone, samples, region, options, out / "rpn", rpn[5], "on_step") and rpn_kw == {}
    assert sft[1:] == (samples, replace(TUNE, free_answers=True, dpi=90), options, out / "sft", judge, sft[6],
                       "on_step") and sft_kw == {}
    assert again == (qz.backbone, samples, region, options, out / "rpn_again", again[5], "on_step")
    assert again_kw == {"start": f"adapter of {out / 'sft'}"}
    assert gate == (qz.backbone, f"adapter of {out / 'rpn_again'}", samples,
                    GateSettings(ladder=(16, 36, 64), free_answers=True, dpi=90, seed=7, gate_threshold=0.3), options,
                    out / "gate", qz.engine.branch_layer, qz.engine.depth, gate[8], "on_step") and gate_kw == {}


def test_the_questions_stage_reads_each_page_plainly_and_counts_it(qz, tmp_path, monkeypatch):
    import qzoom_cli.training.recipe as recipe_module
    from qzoom_cli.errors import UsageError

    docs = tmp_path / "docs"
    docs.mkdir()
    asked = []

    def write_questions(model, folder, manifest, **options):
        asked.append((folder, manifest, options))
        for page in (1, 2):
            options["on_page"](folder / "a.pdf", page, 1)
        return written, skipped

    monkeypatch.setattr(recipe_module, "write_questions", write_questions)
    stages = StageRecorder(qz, monkeypatch)
    recipe = replace(RECIPE, questions_per_page=2, dpi=90)
    written, skipped = 0, {"a.pdf": "encrypted", "b.png": "damaged"}
    with pytest.raises(UsageError) as error:
        train_all(docs, tmp_path / "out", recipe, OPTIONS, stages.load,
                  stages.display)
    assert str(error.value) == (f"the model wrote no usable question about the documents under {docs} (2 documents "
                                "unreadable): give a manifest of questions instead")
    skipped = {}
    with pytest.raises(UsageError) as error:
        train_all(docs, tmp_path / "out", recipe, OPTIONS, stages.load,
                  stages.display)
    assert str(error.value).endswith(f"under {docs}: give a manifest of questions instead")
    manifest = tmp_path / "out" / "stages" / "questions.jsonl"
    assert [(folder, path, options["dpi"], options["per_page"], options["budget"]) for folder, path, options in asked] \
        == [(docs, manifest, 90, 2, qz.resolve_budget(zoom_mode="never"))] * 2
    assert stages.loads == [None, None] and stages.shown == [("questions: pages", None)] * 2 and stages.items == 4

    written, skipped = 1, {"b.png": "damaged"}
    manifest.write_text(json.dumps({"id": "q", "file": str(docs / "missing.png"), "question": QUESTION}) + "\n")
    train_all(docs, tmp_path / "out", recipe, OPTIONS, stages.load,
              stages.display)
    progress = json.loads((tmp_path / "out" / "stages" / "progress.json").read_text())
    assert progress["stages"]["questions"] == {"stage": "questions", "manifest": str(manifest), "written": 1,
                                               "skipped": {"b.png": "damaged"}}


@pytest.mark.parametrize("nothing_for, not_run, loads, published", [
    (("fine_tune",), ["sft", "rpn_again"], ["rpn", "rpn"], "gate"),
    (("train_gate",), ["gate"], ["rpn", "sft", "rpn_again"], "rpn_again"),
    (("fine_tune", "train_gate"), ["sft", "rpn_again", "gate"], ["rpn", "rpn"], "rpn"),
])
def test_a_stage_with_nothing_to_learn_is_passed_by_and_the_last_adapter_published(
        qz, tmp_path, monkeypatch, nothing_for, not_run, loads, published):
    """Easy data: no regression to fine-tune on, or no ladder whose answer changes. The recipe
    carries on from the last adapter trained, and says which stages did not run and why."""
    manifest, _ = red_square_pages(tmp_path, 2, seed=5)
    stages = StageRecorder(qz, monkeypatch, nothing_for)
    report = train_all(manifest, tmp_path / "out", RECIPE, OPTIONS, stages.load, stages.display)
    out = tmp_path / "out" / "stages"
    assert [stage for stage, r in report["stages"].items() if "not_run" in r] == not_run
    if "sft" in not_run:
        assert report["stages"]["sft"] == {"stage": "sft", "not_run": "fine_tune found nothing"}
        assert report["stages"]["rpn_again"]["not_run"].startswith("sft did not run, so the model was not tuned")
    assert stages.loads == [None, *(out / stage for stage in loads)]
    assert (tmp_path / "out" / "qzoom_config.json").read_text() == (out / published / "qzoom_config.json").read_text()
    again = train_all(manifest, tmp_path / "out", RECIPE, OPTIONS, stages.load, stages.display)
    assert again["stages"] == report["stages"] and len(stages.loads) == 1 + len(loads)  # recorded: not retried


def test_the_recipe_stops_when_the_region_head_has_nothing_to_learn(qz, tmp_path, monkeypatch):
    from qzoom_cli.errors import NothingToLearn

    manifest, _ = red_square_pages(tmp_path, 2, seed=5)
    stages = StageRecorder(qz, monkeypatch, ("train_rpn",))
    with pytest.raises(NothingToLearn, match="train_rpn found nothing"):
        train_all(manifest, tmp_path / "out", RECIPE, OPTIONS, stages.load, stages.display)
