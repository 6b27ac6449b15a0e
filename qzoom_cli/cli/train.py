"""`qzoom train rpn | gate | questions`: the zoom adapter from the user's own documents, without labels."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UsageError
from ..options import TRAINED_GATE_THRESHOLD
from ..outputs import check_output_file
from ..training.settings import (
    DEFAULT_LADDER,
    DEFAULT_VIEW_TOKENS,
    GATE_SEED,
    QUESTIONS_PER_PAGE,
    LabelSettings,
    TrainOptions,
    parse_ladder,
    view_side,
)
from .common import (
    AttnOpt,
    DeviceOpt,
    DpiOpt,
    DtypeOpt,
    MaxTokensOpt,
    ModelOpt,
    Quiet,
    RevisionOpt,
    RootOpt,
    Verbose,
    configure_logging,
    err_console,
    flag,
    load_model,
    print_json,
    warn,
)

_LABELS = LabelSettings()


def _train_options(parameters: dict) -> TrainOptions:
    """TrainOptions from the command's parameters of the same names (it checks them itself)."""
    return TrainOptions(**{f.name: parameters[f.name] for f in fields(TrainOptions) if f.name in parameters})

train_app = typer.Typer(help="Train the zoom adapter on your own documents, without labels.", no_args_is_help=True)

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


@contextmanager
def _training_progress(show: bool, stage: str, total: int):
    """(on_item, on_step) callbacks: rows prepared (teacher / ladder pass), then optimiser steps."""
    if not show:
        yield (lambda *args: None), (lambda report: None)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[info]}"), console=err_console) as bar:
        prepare = bar.add_task(stage, total=total, info="")
        steps = bar.add_task("training", total=None, info="", visible=False)

        def on_item(*args) -> None:
            bar.advance(prepare)

        def on_step(report) -> None:
            bar.update(steps, visible=True, total=report.total_steps, completed=report.step,
                       info=f"loss {report.loss:.4f}  {report.samples_per_s:.1f} samples/s  lr {report.lr:.2e}")

        yield on_item, on_step


def _finish_training(adapter_dir, report: dict, quiet: bool) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # one report from a multi-process run
        return
    print_json({"adapter": str(adapter_dir), **report})
    if not quiet:
        skipped = ", ".join(f"{n} {reason}" for reason, n in (report.get("skipped") or {}).items()) or "none"
        print(f"qzoom: adapter written to {adapter_dir} (skipped samples: {skipped})", file=sys.stderr)


@train_app.command("rpn")
def train_rpn_command(
    manifest: Annotated[str, typer.Argument(help="Rows of {file, question, pages?}; answers are not needed.")],
    out: Annotated[str, typer.Option("--out", help="Adapter folder to write (labels are cached inside).")],
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    branch_layer: Annotated[int | None, typer.Option(help="K: the region head reads base layer K's input "
                                                          "\\[default: model card].")] = None,
    depth: Annotated[int | None, typer.Option(help="T: region-head layers \\[default: model card].")] = None,
    view_tokens: Annotated[int, typer.Option(help="Visual tokens of the square teacher/student view (a square "
                                                  "number).")] = DEFAULT_VIEW_TOKENS,
    free_answers: FreeAnswersOpt = False,
    sink_threshold: Annotated[float, typer.Option(help="Sink-head attention marking a sink cell.")]
    = _LABELS.sink_threshold,
    fg_ratio: Annotated[float, typer.Option(help="Foreground: attention above this share of the peak.")]
    = _LABELS.fg_ratio,
    bg_ratio: Annotated[float, typer.Option(help="Background: outside the box and below this share.")]
    = _LABELS.bg_ratio,
    max_area: Annotated[float, typer.Option(help="Skip samples whose box covers this share of the view.")]
    = _LABELS.max_area,
    peak_floor: Annotated[float, typer.Option(help="Skip samples whose attention peak is below this.")]
    = _LABELS.peak_floor,
    epochs: EpochsOpt = TrainOptions.epochs,
    lr: LrOpt = TrainOptions.lr,
    batch_size: TrainBatchOpt = TrainOptions.batch_size,
    grad_accum: GradAccumOpt = TrainOptions.grad_accum,
    max_samples: MaxSamplesOpt = None,
    save_every: SaveEveryOpt = TrainOptions.save_every,
    gradient_checkpointing: CheckpointingOpt = False,
    seed: SeedOpt = TrainOptions.seed,
    dpi: DpiOpt = 200,
    root: RootOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Stage 1 (SD-RPN): distil where the model looks while answering into the region head."""
    from ..doctor import check_transformers
    from ..manifest import read_manifest

    side = view_side(view_tokens)
    options = _train_options(locals())
    labels = LabelSettings(sink_threshold, fg_ratio, bg_ratio, max_area, peak_floor)
    rows = read_manifest(manifest, root)
    check_transformers()
    from ..training.data import expand_samples
    from ..training.rpn import RpnSettings, train_rpn
    from ..training.teacher import teacher_heads

    configure_logging(verbose, quiet)
    qz = load_model(model, None, revision, device, dtype, attn)
    k = branch_layer or qz.engine.branch_layer
    t = depth or qz.engine.depth
    heads = teacher_heads(qz.card.training if qz.card else None, k, qz.backbone.num_attention_heads)
    samples = expand_samples(rows, max_samples, dpi)
    settings = RpnSettings(branch_layer=k, depth=t, heads=heads, view_side=side, free_answers=free_answers,
                           labels=labels, dpi=dpi)
    show = not quiet and err_console.is_terminal
    with _training_progress(show, "teacher labels", len(samples.samples)) as (on_item, on_step):
        _, report = train_rpn(qz.backbone, samples, settings, options, Path(out), on_item, on_step)
    _finish_training(out, report, quiet)


@train_app.command("gate")
def train_gate_command(
    manifest: Annotated[str, typer.Argument(help="Rows of {file, question, pages?, answers?}; reference answers "
                                                 "are used when present.")],
    adapter: Annotated[str | None, typer.Option("--adapter", help="Adapter folder from `train rpn`; the gate is "
                                                                  "added to it.")] = None,
    out: Annotated[str | None, typer.Option("--out", help="Where to write the adapter \\[default: --adapter].")] = None,
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
    seed: SeedOpt = GATE_SEED,
    dpi: DpiOpt = 200,
    root: RootOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Stage 3: teach the gate when the coarse view is not enough (answers at a ladder of resolutions)."""
    from ..doctor import check_transformers
    from ..manifest import read_manifest

    rungs = parse_ladder(ladder)
    if adapter is None and out is None:
        raise UsageError("give --adapter (from `qzoom train rpn`) or --out for a gate-only adapter")
    options = _train_options(locals())
    rows = read_manifest(manifest, root)
    check_transformers()
    from ..training.data import expand_samples
    from ..training.gate import GateSettings, train_gate

    configure_logging(verbose, quiet)
    qz = load_model(model, adapter, revision, device, dtype, attn)
    samples = expand_samples(rows, max_samples, dpi)
    settings = GateSettings(ladder=rungs, free_answers=free_answers, dpi=dpi, seed=seed,
                            gate_threshold=gate_threshold)
    target = Path(out or adapter)
    show = not quiet and err_console.is_terminal
    with _training_progress(show, "answer ladders", len(samples.samples)) as (on_item, on_step):
        _, report = train_gate(qz.backbone, qz.adapter, samples, settings, options, target,
                               qz.engine.branch_layer, qz.engine.depth, on_item, on_step)
    _finish_training(target, report, quiet)


@train_app.command("questions")
def train_questions_command(
    folder: Annotated[str, typer.Argument(help="Folder of documents (searched recursively).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Manifest to write.")] = "questions.jsonl",
    per_page: Annotated[int, typer.Option(help="Questions asked for per page.")] = QUESTIONS_PER_PAGE,
    force: Annotated[bool, flag(help="Overwrite an existing --output.")] = False,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    dpi: DpiOpt = 200,
    max_visual_tokens: MaxTokensOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Have the model write questions about details of every page, as a manifest for `train rpn`."""
    from ..doctor import check_transformers
    from ..training.questions import documents, write_questions

    if not Path(folder).is_dir():
        raise UsageError(f"{folder} is not a folder")
    if not any(True for _ in documents(Path(folder))):
        raise UsageError(f"no PDF or image under {folder}")
    check_output_file(Path(output))
    if Path(output).exists() and Path(output).stat().st_size > 0 and not force:
        raise UsageError(f"{output} already exists: --force to overwrite it, or -o another file")
    check_transformers()
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
    print(output)
    if not quiet:
        print(f"qzoom: {rows} questions written", file=sys.stderr)


