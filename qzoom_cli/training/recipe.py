"""`qzoom train all`: every training stage on the user's documents, one after another.

questions (when given a folder of documents) -> rpn -> sft -> rpn again (on the tuned model) ->
gate. Each stage works in its own folder under `out/stages` and is recorded in
`out/stages/progress.json` when it finishes; a rerun skips the finished stages and resumes the
interrupted one from its own caches and checkpoints. A stage after rpn that finds nothing to learn
(easy data: no regression to fine-tune on, no ladder whose answer changes) is recorded as not run
and the recipe carries on from the last adapter trained; that adapter is published into `out`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..api import QZoom
from ..errors import NothingToLearn, ResumeMismatch, UsageError
from ..options import TRAINED_GATE_THRESHOLD, changed_settings
from ..runtime import release_memory
from ..zoom.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..zoom.lora import LORA_FOLDER
from .data import SampleSet, expand_samples
from .gate import GateSettings, train_gate
from .loop import TrainOptions, options_dict
from .pseudo_labels import LabelSettings
from .questions import write_questions
from .rpn import RpnSettings, rpn_settings, train_rpn
from .saved import read_json, reading_back, write_whole, writing
from .settings import DEFAULT_LADDER, DEFAULT_VIEW_TOKENS, QUESTIONS_PER_PAGE, view_side
from .targeted import FineTuneSettings, fine_tune

STAGES = ("questions", "rpn", "sft", "rpn_again", "gate")
NOT_RUN = "not_run"  # a stage's report key: why it trained nothing
PROGRESS = "progress.json"
# a rerun may change these: they alter no result (the stages' own resumes accept them too)
_FREE_ON_RESUME = ("save_every", "gradient_checkpointing")

# (stage, items it prepares or None if unknown) -> a context giving (on_item, on_step) callbacks
StageDisplay = Callable[[str, int | None], AbstractContextManager[tuple[Callable, Callable]]]
Loader = Callable[[Path | None], QZoom]  # the model, with the adapter of that folder (None: none)


@dataclass(frozen=True)
class Recipe:
    """What `train all` runs; each stage's own settings keep their defaults unless given here."""

    fine_tune: FineTuneSettings = field(default_factory=FineTuneSettings)
    labels: LabelSettings = field(default_factory=LabelSettings)
    view_tokens: int = DEFAULT_VIEW_TOKENS
    branch_layer: int | None = None
    depth: int | None = None
    ladder: tuple[int, ...] = DEFAULT_LADDER
    gate_threshold: float = TRAINED_GATE_THRESHOLD
    questions_per_page: int = QUESTIONS_PER_PAGE
    free_answers: bool = False
    max_samples: int | None = None
    dpi: int = 200


def train_all(source: Path, out_dir: Path, recipe: Recipe, options: TrainOptions, load: Loader,
              display: StageDisplay, root: str | None = None,
              load_judge: Callable[[str], QZoom] | None = None) -> dict:
    """Run the stages not yet finished; returns {"adapter": out_dir, "stages": each stage's report}.
    `source` is a manifest, or a folder of documents the model first writes questions about."""
    stages_dir = out_dir / "stages"
    progress = _Progress(stages_dir / PROGRESS, {"source": str(source.resolve()), **asdict(recipe),
                                                  **options_dict(options)})
    manifest = source if source.is_file() else stages_dir / "questions.jsonl"
    for stage in STAGES:
        if stage not in progress.done:
            try:
                report = _run_stage(stage, source, manifest, stages_dir, recipe, options, load, display, root,
                                    load_judge, _trained(progress.done))
            except NothingToLearn as exc:
                if stage == "rpn":  # every later stage builds on its region head
                    raise
                report = {"stage": stage, NOT_RUN: exc.message}
            progress.finish(stage, report)
            release_memory()
    with writing(out_dir):
        _publish(stages_dir / _trained(progress.done)[-1], out_dir)
    return {"adapter": str(out_dir), "stages": progress.done}


def _trained(done: dict[str, dict]) -> list[str]:
    """The stages, in order, whose folders hold an adapter."""
    return [stage for stage in STAGES[1:] if stage in done and NOT_RUN not in done[stage]]


def _run_stage(stage: str, source: Path, manifest: Path, stages_dir: Path, recipe: Recipe, options: TrainOptions,
               load: Loader, display: StageDisplay, root: str | None,
               load_judge: Callable[[str], QZoom] | None, trained: list[str]) -> dict:
    """One stage's report; it starts from the adapter of the last stage that trained one."""
    if stage == "questions":
        return _questions(source, manifest, recipe, load, display)
    samples = _samples(manifest, recipe, root)
    folder = stages_dir / stage
    if stage == "rpn":
        qz = load(None)
        with display("rpn: teacher labels", len(samples.samples)) as (on_item, on_step):
            return train_rpn(qz.backbone, samples, _rpn_settings(qz, recipe), options, folder, on_item, on_step)[1]
    if stage == "sft":
        qz = load(stages_dir / trained[-1])
        settings = replace(recipe.fine_tune, free_answers=recipe.free_answers, dpi=recipe.dpi)
        with display("sft: mining", len(samples.samples)) as (on_item, on_step):
            return fine_tune(qz, samples, settings, options, folder, load_judge, on_item, on_step)[1]
    if stage == "rpn_again":
        if trained[-1] != "sft":
            raise NothingToLearn("sft did not run, so the model was not tuned: its region head needs no second "
                                 "pass")
        qz = load(stages_dir / "sft")
        with display("rpn again: teacher labels", len(samples.samples)) as (on_item, on_step):
            return train_rpn(qz.backbone, samples, _rpn_settings(qz, recipe), options, folder, on_item, on_step,
                             start=qz.adapter)[1]
    qz = load(stages_dir / trained[-1])
    settings = GateSettings(ladder=recipe.ladder, free_answers=recipe.free_answers, dpi=recipe.dpi,
                            seed=options.seed, gate_threshold=recipe.gate_threshold)
    with display("gate: answer ladders", len(samples.samples)) as (on_item, on_step):
        return train_gate(qz.backbone, qz.adapter, samples, settings, options, folder,
                          qz.engine.branch_layer, qz.engine.depth, on_item, on_step)[1]


def _questions(source: Path, manifest: Path, recipe: Recipe, load: Loader, display: StageDisplay) -> dict:
    if source.is_file():
        return {"stage": "questions", "manifest": str(source), "written": 0}
    manifest.parent.mkdir(parents=True, exist_ok=True)
    qz = load(None)
    with display("questions: pages", None) as (on_item, _):
        rows, skipped = write_questions(qz, source, manifest, dpi=recipe.dpi, per_page=recipe.questions_per_page,
                                        budget=qz.resolve_budget(zoom_mode="never"),
                                        on_page=lambda path, page, count: on_item())
    if not rows:
        unreadable = f" ({len(skipped)} documents unreadable)" if skipped else ""
        raise UsageError(f"the model wrote no usable question about the documents under {source}{unreadable}: "
                         "give a manifest of questions instead")
    return {"stage": "questions", "manifest": str(manifest), "written": rows, "skipped": skipped}


def _rpn_settings(qz: QZoom, recipe: Recipe) -> RpnSettings:
    return rpn_settings(qz, recipe.branch_layer, recipe.depth, view_side=view_side(recipe.view_tokens),
                        free_answers=recipe.free_answers, labels=recipe.labels, dpi=recipe.dpi)


def _samples(manifest: Path, recipe: Recipe, root: str | None) -> SampleSet:
    """Each stage's own sample set (stages count what they skip in it)."""
    from ..manifest import read_manifest

    return expand_samples(read_manifest(str(manifest), root), recipe.max_samples)


def _publish(folder: Path, out_dir: Path) -> None:
    """The last stage's adapter (with the LoRA weights it carries) becomes `out_dir`'s."""
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        shutil.copy2(folder / name, out_dir / name)
    if (folder / LORA_FOLDER).is_dir():
        shutil.copytree(folder / LORA_FOLDER, out_dir / LORA_FOLDER, dirs_exist_ok=True)


class _Progress:
    """Finished stages and their reports, kept with the settings they were run with."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.settings = json.loads(json.dumps(settings))
        self.done: dict[str, dict] = {}
        if path.exists():
            remedy = "delete it and rerun: the stages run again, each resuming from its own caches and checkpoints"
            with reading_back(path, remedy):
                saved = read_json(path, remedy)
                before, done = dict(saved["settings"]), dict(saved["stages"])
            changed = [name for name in changed_settings(before, self.settings)
                       if name not in _FREE_ON_RESUME]
            if changed:
                raise ResumeMismatch(f"{path.parent.parent} was trained with other settings ({', '.join(changed)}): "
                                     "rerun with the same options, or write to another --output")
            self.done = done

    def finish(self, stage: str, report: dict) -> None:
        self.done[stage] = report
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(self.path, json.dumps({"settings": self.settings, "stages": self.done}, indent=2))
