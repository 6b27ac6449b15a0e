"""`qzoom train rpn | gate | questions`: the zoom adapter from the user's own documents, without labels."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer

from ..errors import FileNotFound, UsageError
from ..options import TRAINED_GATE_THRESHOLD
from ..outputs import check_output_file
from ..training.saved import check_out_folder
from ..training.settings import (
    DEFAULT_LADDER,
    DEFAULT_VIEW_TOKENS,
    QUESTIONS_PER_PAGE,
    SEED,
    FineTuneSettings,
    LabelSettings,
    LoraSettings,
    TrainOptions,
    parse_ladder,
    view_side,
)
from .common import (
    AttnOpt,
    DeviceOpt,
    DpiOpt,
    DtypeOpt,
    JsonFlag,
    MaxTokensOpt,
    MetricOpt,
    MinTokensOpt,
    ModelOpt,
    Quiet,
    RevisionOpt,
    RootOpt,
    Verbose,
    configure_logging,
    err_console,
    flag,
    load_model,
    preflight,
    print_json,
    warn,
)

_LABELS = LabelSettings()


def _train_options(parameters: dict) -> TrainOptions:
    """TrainOptions from the command's parameters of the same names (it checks them itself)."""
    return TrainOptions(**{f.name: parameters[f.name] for f in fields(TrainOptions) if f.name in parameters})

train_app = typer.Typer(help="Train the zoom adapter on your own documents, without labels.", no_args_is_help=True,
                        rich_markup_mode=None)

EpochsOpt = Annotated[int, typer.Option("--epochs", help="Passes over the training samples.")]
LrOpt = Annotated[float, typer.Option("--lr", help="Peak learning rate (3% warm-up, cosine decay).")]
TrainBatchOpt = Annotated[int, typer.Option("--batch-size", help="Samples per micro-batch (per process).")]
GradAccumOpt = Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimiser step.")]
MaxSamplesOpt = Annotated[int | None, typer.Option("--max-samples", help="Use at most this many samples.")]
SaveEveryOpt = Annotated[int, typer.Option("--save-every", help="Write a checkpoint every N optimiser steps "
                                                                "(0: only the final adapter); a rerun resumes from "
                                                                "the newest.")]
CheckpointingOpt = Annotated[bool, flag("--gradient-checkpointing", help="Recompute branch activations "
                                                                               "in the backward pass.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Shuffling and sampling seed.")]
FreeAnswersOpt = Annotated[bool, flag("--free-answers", help="Ask for free-form answers instead of a "
                                                                     "single word or phrase.")]


class TrainingDisplay:
    """One progress display on stderr (a terminal only) for one or more training stages: the items
    each stage prepares, then its optimiser steps."""

    def __init__(self, quiet: bool):
        self.bar = None
        if not quiet and err_console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err_console)

    def __enter__(self) -> TrainingDisplay:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    @contextmanager
    def stage(self, description: str, total: int | None):
        """(on_item, on_step) callbacks of one stage."""
        bar = self.bar
        if bar is None:
            yield (lambda *args: None), (lambda report: None)
            return
        prepare = bar.add_task(description, total=total, info="")
        steps = bar.add_task("  training", total=None, info="", visible=False)

        def on_item(*args) -> None:
            bar.advance(prepare)

        def on_step(report) -> None:
            bar.update(steps, visible=True, total=report.total_steps, completed=report.step,
                       info=f"loss {report.loss:.4f}  {report.samples_per_s:.1f} samples/s  lr {report.lr:.2e}")

        yield on_item, on_step


SinkOpt = Annotated[float, typer.Option("--sink-threshold", help="Sink-head attention marking a sink cell.")]
FgOpt = Annotated[float, typer.Option("--fg-ratio", help="Foreground: attention above this share of the peak.")]
BgOpt = Annotated[float, typer.Option("--bg-ratio", help="Background: outside the box and below this share.")]
MaxAreaOpt = Annotated[float, typer.Option("--max-area", help="Skip samples whose box covers this share of the view.")]
PeakFloorOpt = Annotated[float, typer.Option("--peak-floor", help="Skip samples whose attention peak is below this.")]
JudgeOpt = Annotated[str | None, typer.Option("--judge", help="A model (any supported checkpoint) that decides "
                                                             "whether each answer is right, asked the published "
                                                             "yes/no comparison, instead of the metric.")]
MixOpt = Annotated[float, typer.Option("--mix", help="Also train on this many improvements (plain wrong, zoomed "
                                                     "right) per regression.")]
HeldOutOpt = Annotated[float, typer.Option("--held-out", help="Share of the mined pairs kept apart to measure "
                                                              "accuracy before and after.")]
BoxNoiseOpt = Annotated[float, typer.Option("--box-noise", help="Chance a training visit reads a random box (10-60% "
                                                                "of the page's sides) instead of the mined one; "
                                                                "the published setting is 0.8.")]
AlignedOpt = Annotated[bool | None, flag("--aligned/--second-image", help="Region positions inside the page's grid "
                                                                          "(the published scheme), or a second "
                                                                          "image's [default: aligned, 1-D on "
                                                                          "LLaVA].")]
LoraRankOpt = Annotated[int, typer.Option("--lora-rank", help="LoRA rank.")]
LoraAlphaOpt = Annotated[int, typer.Option("--lora-alpha", help="LoRA alpha (scale alpha/rank).")]
LoraDropoutOpt = Annotated[float, typer.Option("--lora-dropout", help="Dropout on the LoRA input.")]
LoraTargetsOpt = Annotated[str, typer.Option("--lora-targets", help="Linear layers of each decoder layer to tune "
                                                                    "(Qwen3.5's linear-attention layers: add "
                                                                    "in_proj_qkv,in_proj_z,out_proj).")]
PseudoTokensOpt = Annotated[int | None, typer.Option(
    "--pseudo-reference-tokens", help="Without reference answers, the model's own answer at this many visual tokens "
                                      "is the reference [default: the model's plain budget].")]
MiningTokensOpt = Annotated[int, typer.Option("--max-new-tokens", help="Longest answer while mining and measuring.")]
_TUNE = FineTuneSettings()
_LORA = LoraSettings()


@contextmanager
def _training_progress(quiet: bool, stage: str, total: int):
    """The (on_item, on_step) callbacks of a one-stage command."""
    with TrainingDisplay(quiet) as display, display.stage(stage, total) as callbacks:
        yield callbacks


def _finish_training(adapter_dir, report: dict, quiet: bool, as_json: bool) -> None:
    """The adapter's folder on stdout (its training report as JSON with --json), a summary on stderr."""
    if int(os.environ.get("RANK", "0")) != 0:  # one report from a multi-process run
        return
    if as_json:
        print_json({"adapter": str(adapter_dir), **report})
    else:
        print(adapter_dir)
    if not quiet:
        from ..training.data import skipped_text

        print(f"qzoom: adapter written to {adapter_dir} (skipped samples: {skipped_text(report.get('skipped') or {})})",
              file=sys.stderr)


@train_app.command("rpn", short_help="Stage 1: the region head (SD-RPN).")
def train_rpn_command(
    manifest: Annotated[str, typer.Argument(help="Rows of {file, question, pages?}; answers are not needed.")],
    out: Annotated[str, typer.Option("--output", "-o", "--out", metavar="DIR",
                                     help="Adapter folder to write (labels are cached inside).")],
    adapter: Annotated[str | None, typer.Option("--adapter", help="Train again from this adapter's region head, "
                                                                  "on the model its LoRA weights tuned (the "
                                                                  "adapter `train sft` wrote: stage 2.5).")] = None,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    branch_layer: Annotated[int | None, typer.Option(help="K: the region head reads base layer K's input "
                                                          "[default: model card].")] = None,
    depth: Annotated[int | None, typer.Option(help="T: region-head layers [default: model card].")] = None,
    view_tokens: Annotated[int, typer.Option(help="Visual tokens of the square teacher/student view (a square "
                                                  "number).")] = DEFAULT_VIEW_TOKENS,
    free_answers: FreeAnswersOpt = False,
    sink_threshold: SinkOpt = _LABELS.sink_threshold,
    fg_ratio: FgOpt = _LABELS.fg_ratio,
    bg_ratio: BgOpt = _LABELS.bg_ratio,
    max_area: MaxAreaOpt = _LABELS.max_area,
    peak_floor: PeakFloorOpt = _LABELS.peak_floor,
    epochs: EpochsOpt = TrainOptions.epochs,
    lr: LrOpt = TrainOptions.lr,
    batch_size: TrainBatchOpt = TrainOptions.batch_size,
    grad_accum: GradAccumOpt = TrainOptions.grad_accum,
    max_samples: MaxSamplesOpt = None,
    save_every: SaveEveryOpt = TrainOptions.save_every,
    gradient_checkpointing: CheckpointingOpt = False,
    seed: SeedOpt = SEED,
    dpi: DpiOpt = 200,
    root: RootOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    as_json: JsonFlag = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Stage 1 (SD-RPN): distil where the model looks while answering into the region head."""
    from ..manifest import read_manifest

    side = view_side(view_tokens)
    options = _train_options(locals())
    labels = LabelSettings(sink_threshold, fg_ratio, bg_ratio, max_area, peak_floor)
    check_out_folder(Path(out), model)
    rows = read_manifest(manifest, root)
    preflight(model, adapter, revision)
    from ..training.data import expand_samples
    from ..training.rpn import rpn_settings, train_rpn

    configure_logging(verbose, quiet)
    qz = load_model(model, adapter, revision, device, dtype, attn)
    samples = expand_samples(rows, max_samples)
    settings = rpn_settings(qz, branch_layer, depth, view_side=side, free_answers=free_answers, labels=labels,
                            dpi=dpi)
    with _training_progress(quiet, "teacher labels", len(samples.samples)) as (on_item, on_step):
        _, report = train_rpn(qz.backbone, samples, settings, options, Path(out), on_item, on_step,
                              start=qz.adapter if adapter else None)
    _finish_training(out, report, quiet, as_json)


@train_app.command("gate", short_help="Stage 3: the gate.")
def train_gate_command(
    manifest: Annotated[str, typer.Argument(help="Rows of {file, question, pages?, answers?}; reference answers "
                                                 "are used when present.")],
    adapter: Annotated[str | None, typer.Option("--adapter", help="Adapter folder from `train rpn`; the gate is "
                                                                  "added to it.")] = None,
    out: Annotated[str | None, typer.Option("--output", "-o", "--out", metavar="DIR",
                                            help="Where to write the adapter [default: --adapter].")] = None,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    ladder: Annotated[str, typer.Option(help="Visual-token budgets the model answers at, ascending.")]
    = ",".join(map(str, DEFAULT_LADDER)),
    gate_threshold: Annotated[float, typer.Option(help="Threshold stored in the adapter for `ask`.")]
    = TRAINED_GATE_THRESHOLD,
    free_answers: FreeAnswersOpt = False,
    epochs: EpochsOpt = TrainOptions.epochs,
    lr: LrOpt = TrainOptions.lr,
    batch_size: TrainBatchOpt = TrainOptions.batch_size,
    grad_accum: GradAccumOpt = TrainOptions.grad_accum,
    max_samples: MaxSamplesOpt = None,
    save_every: SaveEveryOpt = TrainOptions.save_every,
    gradient_checkpointing: CheckpointingOpt = False,
    seed: SeedOpt = SEED,
    dpi: DpiOpt = 200,
    root: RootOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    as_json: JsonFlag = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Stage 3: teach the gate when the coarse view is not enough (answers at a ladder of resolutions)."""
    from ..manifest import read_manifest

    rungs = parse_ladder(ladder)
    if adapter is None and out is None:
        raise UsageError("give --adapter (from `qzoom train rpn`) or --output for a gate-only adapter")
    options = _train_options(locals())
    target = Path(out or adapter)
    check_out_folder(target, model)
    rows = read_manifest(manifest, root)
    preflight(model, adapter, revision)
    from ..training.data import expand_samples
    from ..training.gate import GateSettings, train_gate

    configure_logging(verbose, quiet)
    qz = load_model(model, adapter, revision, device, dtype, attn)
    samples = expand_samples(rows, max_samples)
    settings = GateSettings(ladder=rungs, free_answers=free_answers, dpi=dpi, seed=seed,
                            gate_threshold=gate_threshold)
    with _training_progress(quiet, "answer ladders", len(samples.samples)) as (on_item, on_step):
        _, report = train_gate(qz.backbone, qz.adapter, samples, settings, options, target,
                               qz.engine.branch_layer, qz.engine.depth, on_item, on_step)
    _finish_training(target, report, quiet, as_json)


@train_app.command("questions", short_help="Questions about each page, as a manifest.")
def train_questions_command(
    folder: Annotated[str, typer.Argument(help="Folder of documents (searched recursively).")],
    output: Annotated[str, typer.Option("--output", "-o", metavar="FILE",
                                        help="Manifest to write.")] = "questions.jsonl",
    per_page: Annotated[int, typer.Option(help="Questions asked for per page.")] = QUESTIONS_PER_PAGE,
    force: Annotated[bool, flag(help="Overwrite an existing --output.")] = False,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    dpi: DpiOpt = 200,
    max_visual_tokens: MaxTokensOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    as_json: JsonFlag = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Have the model write questions about details of every page, as a manifest for `train rpn`."""
    from ..training.questions import documents, write_questions

    if not Path(folder).is_dir():
        raise UsageError(f"{folder} is not a folder")
    if not any(True for _ in documents(Path(folder))):
        raise UsageError(f"no PDF or image under {folder}")
    check_output_file(Path(output))
    if Path(output).exists() and Path(output).stat().st_size > 0 and not force:
        raise UsageError(f"{output} already exists: --force to overwrite it, or -o another file")
    preflight(model, revision=revision)
    configure_logging(verbose, quiet)
    qz = load_model(model, None, revision, device, dtype, attn)
    budget = qz.resolve_budget(None, max_visual_tokens, zoom_mode="never")

    def on_page(path, page, count):
        if not quiet:
            print(f"qzoom: {path} page {page}: {count} questions", file=sys.stderr)

    rows, skipped = write_questions(qz, Path(folder), Path(output), per_page=per_page, dpi=dpi, budget=budget,
                                    on_page=on_page)
    for path, reason in skipped.items():
        warn(f"skipped {path}: {reason}", quiet)
    if as_json:
        print_json({"manifest": output, "written": rows, "skipped": skipped})
    else:
        print(output)
    if not quiet:
        print(f"qzoom: {rows} questions written", file=sys.stderr)




def _fine_tune_settings(parameters: dict) -> FineTuneSettings:
    """FineTuneSettings from a command's options (`train sft`, `train all`), checked before any model loads."""
    from ..evaluate import check_metric

    check_metric(parameters["metric"])
    lora = LoraSettings(rank=parameters["lora_rank"], alpha=parameters["lora_alpha"],
                        dropout=parameters["lora_dropout"],
                        targets=tuple(t.strip() for t in parameters["lora_targets"].split(",") if t.strip()))
    return FineTuneSettings(lora=lora, **{f.name: parameters[f.name] for f in fields(FineTuneSettings)
                                          if f.name != "lora"})


def _judge_loader(revision, device, dtype, attn):
    return lambda judge: load_model(judge, None, revision, device, dtype, attn)


@train_app.command("sft", short_help="Stage 2: LoRA for the page with its region.")
def train_sft_command(
    manifest: Annotated[str, typer.Argument(help="Rows of {file, question, pages?, answers?}; without answers the "
                                                 "model's own best read is the reference (label-free).")],
    adapter: Annotated[str, typer.Option("--adapter", help="The adapter `train rpn` wrote: its region head picks the "
                                                           "regions.")],
    out: Annotated[str, typer.Option("--output", "-o", "--out", metavar="DIR",
                                     help="Adapter folder to write: the region head, the LoRA weights "
                                          "(lora/), the mined pairs and checkpoints.")],
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    judge: JudgeOpt = None,
    mix: MixOpt = _TUNE.mix,
    held_out: HeldOutOpt = _TUNE.held_out,
    box_noise: BoxNoiseOpt = _TUNE.box_noise,
    aligned: AlignedOpt = _TUNE.aligned,
    lora_rank: LoraRankOpt = _LORA.rank,
    lora_alpha: LoraAlphaOpt = _LORA.alpha,
    lora_dropout: LoraDropoutOpt = _LORA.dropout,
    lora_targets: LoraTargetsOpt = ",".join(_LORA.targets),
    min_visual_tokens: MinTokensOpt = None,
    max_visual_tokens: MaxTokensOpt = None,
    pseudo_reference_tokens: PseudoTokensOpt = None,
    max_new_tokens: MiningTokensOpt = _TUNE.max_new_tokens,
    metric: MetricOpt = _TUNE.metric,
    free_answers: FreeAnswersOpt = False,
    epochs: EpochsOpt = TrainOptions.epochs,
    lr: LrOpt = TrainOptions.lr,
    batch_size: TrainBatchOpt = TrainOptions.batch_size,
    grad_accum: GradAccumOpt = TrainOptions.grad_accum,
    max_samples: MaxSamplesOpt = None,
    save_every: SaveEveryOpt = TrainOptions.save_every,
    gradient_checkpointing: CheckpointingOpt = False,
    seed: SeedOpt = SEED,
    dpi: DpiOpt = 200,
    root: RootOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    as_json: JsonFlag = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Stage 2: teach the model to read the page with the region spliced in (LoRA on the decoder),
    on the pairs the zoomed read answers worse than the plain one."""
    from ..manifest import read_manifest

    settings = _fine_tune_settings(locals())
    options = _train_options(locals())
    check_out_folder(Path(out), model)
    rows = read_manifest(manifest, root)
    preflight(model, adapter, revision)
    from ..training.data import expand_samples
    from ..training.targeted import fine_tune

    configure_logging(verbose, quiet)
    qz = load_model(model, adapter, revision, device, dtype, attn)
    samples = expand_samples(rows, max_samples)
    with _training_progress(quiet, "mining", len(samples.samples)) as (on_item, on_step):
        _, report = fine_tune(qz, samples, settings, options, Path(out), _judge_loader(revision, device, dtype, attn),
                              on_item, on_step)
    _finish_training(out, report, quiet, as_json)


@train_app.command("all", short_help="Every stage, resumable.")
def train_all_command(
    source: Annotated[str, typer.Argument(help="A manifest of {file, question, pages?, answers?}, or a folder of "
                                               "documents the model first writes questions about.")],
    out: Annotated[str, typer.Option("--output", "-o", "--out", metavar="DIR",
                                     help="Folder of the finished adapter; each stage works in "
                                          "out/stages, and a rerun resumes where it stopped.")],
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    per_page: Annotated[int, typer.Option(help="Questions written per page (a folder source).")] = QUESTIONS_PER_PAGE,
    branch_layer: Annotated[int | None, typer.Option(help="K of the region head and gate [default: model card].")]
    = None,
    depth: Annotated[int | None, typer.Option(help="T of the region head and gate [default: model card].")] = None,
    view_tokens: Annotated[int, typer.Option(help="Visual tokens of the region head's square teacher/student "
                                                  "view.")] = DEFAULT_VIEW_TOKENS,
    sink_threshold: SinkOpt = _LABELS.sink_threshold,
    fg_ratio: FgOpt = _LABELS.fg_ratio,
    bg_ratio: BgOpt = _LABELS.bg_ratio,
    max_area: MaxAreaOpt = _LABELS.max_area,
    peak_floor: PeakFloorOpt = _LABELS.peak_floor,
    ladder: Annotated[str, typer.Option(help="Visual-token budgets of the gate's answer ladders.")]
    = ",".join(map(str, DEFAULT_LADDER)),
    gate_threshold: Annotated[float, typer.Option(help="Threshold stored in the adapter for `ask`.")]
    = TRAINED_GATE_THRESHOLD,
    judge: JudgeOpt = None,
    mix: MixOpt = _TUNE.mix,
    held_out: HeldOutOpt = _TUNE.held_out,
    box_noise: BoxNoiseOpt = _TUNE.box_noise,
    aligned: AlignedOpt = _TUNE.aligned,
    lora_rank: LoraRankOpt = _LORA.rank,
    lora_alpha: LoraAlphaOpt = _LORA.alpha,
    lora_dropout: LoraDropoutOpt = _LORA.dropout,
    lora_targets: LoraTargetsOpt = ",".join(_LORA.targets),
    min_visual_tokens: MinTokensOpt = None,
    max_visual_tokens: MaxTokensOpt = None,
    pseudo_reference_tokens: PseudoTokensOpt = None,
    max_new_tokens: MiningTokensOpt = _TUNE.max_new_tokens,
    metric: MetricOpt = _TUNE.metric,
    free_answers: FreeAnswersOpt = False,
    epochs: EpochsOpt = TrainOptions.epochs,
    lr: LrOpt = TrainOptions.lr,
    batch_size: TrainBatchOpt = TrainOptions.batch_size,
    grad_accum: GradAccumOpt = TrainOptions.grad_accum,
    max_samples: MaxSamplesOpt = None,
    save_every: SaveEveryOpt = TrainOptions.save_every,
    gradient_checkpointing: CheckpointingOpt = False,
    seed: SeedOpt = SEED,
    dpi: DpiOpt = 200,
    root: RootOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    as_json: JsonFlag = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Every stage, label-free unless the manifest has answers: questions (for a folder) -> rpn ->
    sft -> rpn again on the tuned model -> gate."""

    settings = _fine_tune_settings(locals())
    options = _train_options(locals())
    rungs = parse_ladder(ladder)
    view_side(view_tokens)
    if not Path(source).exists():
        raise FileNotFound(f"{source}: no such manifest or folder")
    check_out_folder(Path(out), model)
    preflight(model, revision=revision)
    from ..training.recipe import NOT_RUN, Recipe, train_all

    configure_logging(verbose, quiet)
    recipe = Recipe(fine_tune=settings, labels=LabelSettings(sink_threshold, fg_ratio, bg_ratio, max_area, peak_floor),
                    view_tokens=view_tokens, branch_layer=branch_layer, depth=depth,
                    ladder=rungs, gate_threshold=gate_threshold, questions_per_page=per_page,
                    free_answers=free_answers, max_samples=max_samples, dpi=dpi)

    def load(adapter_dir: Path | None):
        return load_model(model, None if adapter_dir is None else str(adapter_dir), revision, device, dtype, attn)

    with TrainingDisplay(quiet) as display:
        report = train_all(Path(source), Path(out), recipe, options, load, display.stage, root,
                           _judge_loader(revision, device, dtype, attn))
    for stage, stage_report in report["stages"].items():
        if NOT_RUN in stage_report:
            warn(f"stage {stage} not run: {stage_report[NOT_RUN]}", quiet)
    _finish_training(out, report, quiet, as_json)
