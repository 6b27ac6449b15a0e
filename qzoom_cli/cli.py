"""The `qzoom` command: parses flags, calls the library, prints results, maps errors to exit codes.

Results go to stdout; logs, warnings, progress and panels go to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from . import __version__
from .errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_PARTIAL,
    OutputError,
    QZoomError,
    UsageError,
)
from .outputs import check_output_file, check_output_folder

app = typer.Typer(
    name="qzoom",
    help="Answer questions about PDFs and images with a local vision-language model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="Model cards and tiny offline checkpoints.", no_args_is_help=True)
app.add_typer(models_app, name="models")

err_console = Console(stderr=True)

def _flag(*names: str, **kwargs):
    """A true/false option: no type column in --help, and its default spelled out."""
    single = bool(names) and "/" not in names[0] and "callback" not in kwargs
    return typer.Option(*names, metavar="", **({"show_default": "off"} if single else {}), **kwargs)


Verbose = Annotated[bool, _flag("--verbose", "-v", help="Show library logs and tracebacks.")]
Quiet = Annotated[bool, _flag("--quiet", "-q", help="Print nothing on stderr except errors.")]
JsonFlag = Annotated[bool, _flag("--json", help="Print JSON instead of text.")]


def _version_callback(value: bool) -> None:
    if value:
        print(f"qzoom {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, _flag("--version", callback=_version_callback, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """qzoom: query-aware zoom for document question answering."""


def _configure_logging(verbose: bool, quiet: bool) -> None:
    import transformers
    from huggingface_hub.utils import disable_progress_bars
    from huggingface_hub.utils import logging as hub_logging

    transformers.utils.logging.set_verbosity_info() if verbose else transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # the hub logs every retry of an unreachable host; the error that follows says it in one line
    hub_logging.set_verbosity_info() if verbose else hub_logging.set_verbosity_error()
    if quiet:
        disable_progress_bars()
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr)
    qzoom_log = logging.getLogger("qzoom")
    qzoom_log.propagate = False
    if not any(isinstance(h, _WarningLine) for h in qzoom_log.handlers):
        qzoom_log.addHandler(_WarningLine())
    qzoom_log.setLevel(logging.ERROR if quiet else logging.WARNING)


class _WarningLine(logging.Handler):
    """The library's warnings as `qzoom: warning: ...` lines on the stderr of the moment."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"qzoom: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def _warn(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"qzoom: warning: {message}", file=sys.stderr)


@contextmanager
def _reporting_errors(verbose: bool):
    """Turn failures into one stderr line and the documented exit code (tracebacks only with -v)."""
    try:
        yield
    except typer.Exit:
        raise
    except QZoomError as exc:
        if verbose:
            traceback.print_exc(file=sys.stderr)
        print(f"qzoom: error: {exc.message}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        print("qzoom: interrupted", file=sys.stderr)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as exc:  # anything else is a bug: say so, keep the details for -v
        if verbose:
            traceback.print_exc(file=sys.stderr)
        first_line = (str(exc).strip().splitlines() or [""])[0]
        print(f"qzoom: internal error: {type(exc).__name__}: {first_line} (rerun with -v for details)",
              file=sys.stderr)
        raise typer.Exit(EXIT_INTERNAL) from None


def _write_or_print(path: Path, text: str, what: str) -> None:
    """Write `text` to `path`; if that fails after all the work, print it to stdout and say so (exit 6)."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
        raise OutputError(f"could not write {path} ({exc.strerror or exc}); {what} went to stdout instead") from None


def _print_json(obj: dict) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=2 if sys.stdout.isatty() else None), flush=True)


# Options shared by the commands that load a model and answer questions.
ModelOpt = Annotated[str | None, typer.Option("--model", help="Hub id or local checkpoint directory "
                                                             "\\[default: the default model card].")]
AdapterOpt = Annotated[str | None, typer.Option("--adapter", help="Zoom adapter directory (qzoom_config.json + "
                                                                 "qzoom_adapter.safetensors) to attach.")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit) to pin.")]
ZoomOpt = Annotated[str, typer.Option("--zoom", help="auto: zoom when the gate says so; always: read the region "
                                                     "whenever one is found; never: one pass at the page budget.")]
GateOpt = Annotated[float | None, typer.Option(
    "--gate-threshold", help="Zoom when the gate score reaches this \\[default: model card, adapter, or 0.05 for a "
                             "trained gate / 2.0 attention lift without one].")]
RoiOpt = Annotated[float | None, typer.Option(
    "--roi-threshold", help="Region map cut-off \\[default: model card, adapter, or 0.125 trained / 0.5 "
                            "training-free].")]
RoiTokensOpt = Annotated[int | None, typer.Option(
    "--roi-max-visual-tokens", help="Most visual tokens for the region \\[default: the page budget].")]
MinTokensOpt = Annotated[int | None, typer.Option("--min-visual-tokens", help="Fewest visual tokens per page "
                                                                            "\\[default: from the model card].")]
MaxTokensOpt = Annotated[int | None, typer.Option("--max-visual-tokens", help="Most visual tokens per page (the "
                                                  "coarse pass when zooming) \\[default: from the model card].")]
DpiOpt = Annotated[int, typer.Option("--dpi", help="PDF render resolution; boxes are in pixels at this DPI.")]
MaxNewOpt = Annotated[int | None, typer.Option("--max-new-tokens", help="Longest answer, in tokens "
                                                "\\[default: 64; 1024 for thinking models].")]
InstructionOpt = Annotated[str | None, typer.Option(
    "--instruction", help="Text appended to each question \\[default: ask for a single word or phrase]; '' for none.")]
BatchOpt = Annotated[str, typer.Option("--batch-size", help="(page, question) pairs answered together, across "
                                                             "documents; 'auto' sizes it from free GPU memory.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps (or $QZOOM_DEVICE).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto, bf16, fp16 or fp32.")]
AttnOpt = Annotated[str, typer.Option("--attn", help="auto, sdpa, flash_attention_2 or eager.")]
CompileOpt = Annotated[str, typer.Option("--compile", help="Decode on a static cache captured as a CUDA graph: "
                                                           "auto (on CUDA), on (also elsewhere, uncaptured), max "
                                                           "(also fuse kernels with torch.compile: slow first "
                                                           "answer) or off (the eager loop).")]
RoiNativeOpt = Annotated[bool, _flag("--roi-native", help="Never read a region at more tokens than it has "
                                                               "at its source resolution (faster on small regions; "
                                                               "the reference always uses the full budget).")]
RootOpt = Annotated[str | None, typer.Option("--root", help="Folder that relative document paths in the manifest "
                                                           "start from \\[default: the manifest's folder].")]


def _load(model, adapter, revision, device, dtype, attn, compile_mode="off"):
    """The model for a command; training and question writing keep the eager decode loop (compile off)."""
    from .api import QZoom

    return QZoom.from_pretrained(model, adapter=adapter, revision=revision, device=device, dtype=dtype, attn=attn,
                                 compile=compile_mode)


def _batch_size(value: str) -> int | str:
    """--batch-size: a positive number or 'auto'."""
    if value.strip().lower() == "auto":
        return "auto"
    if not value.strip().isdigit() or int(value) < 1:
        raise UsageError(f"--batch-size must be a positive number or 'auto', not {value!r}")
    return int(value)


def _check_request(batch_size: str, max_new_tokens: int | None, min_tokens: int | None = None,
                   max_tokens: int | None = None) -> int | str:
    """The usage checks that need no ML library, done first so a bad flag is reported at once;
    returns the parsed --batch-size."""
    from .options import check_counts, check_token_bounds

    batch = _batch_size(batch_size)
    check_counts(batch, max_new_tokens)
    check_token_bounds(min_tokens, max_tokens)
    return batch


def _instruction(value: str | None) -> str:
    """--instruction: the short-answer instruction unless given ('' for none)."""
    from .options import SHORT_ANSWER_INSTRUCTION

    return SHORT_ANSWER_INSTRUCTION if value is None else value


def _settings(zoom, gate_threshold, roi_threshold, roi_max_visual_tokens, explain=False, roi_native=False):
    from .options import ZoomSettings

    return ZoomSettings(mode=zoom, gate_threshold=gate_threshold, roi_threshold=roi_threshold,
                        region_max_tokens=roi_max_visual_tokens, region_native=roi_native, explain=explain)


@app.command()
def ask(
    path: Annotated[str, typer.Argument(help="PDF or image file; '-' reads the document from stdin.")],
    questions: Annotated[list[str], typer.Argument(help="One or more questions about the document.")],
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    revision: RevisionOpt = None,
    zoom: ZoomOpt = "auto",
    gate_threshold: GateOpt = None,
    roi_threshold: RoiOpt = None,
    roi_max_visual_tokens: RoiTokensOpt = None,
    roi_native: RoiNativeOpt = False,
    explain: Annotated[bool, _flag(help="When a region is read, also decode the answer without it "
                                               "(zoom.direct_answer vs zoom.zoom_answer).")] = False,
    overlay: Annotated[str | None, typer.Option(help="Write the answering page with the region map and box "
                                                     "as PNG into this directory.")] = None,
    pages: Annotated[str | None, typer.Option("--pages", "--page-range",
                                              help="1-based inclusive pages, e.g. '1-3,7' \\[default: all].")] = None,
    dpi: DpiOpt = 200,
    password: Annotated[str | None, typer.Option(help="Password of an encrypted PDF.")] = None,
    min_visual_tokens: MinTokensOpt = None,
    max_visual_tokens: MaxTokensOpt = None,
    max_new_tokens: MaxNewOpt = None,
    batch_size: BatchOpt = "1",
    instruction: InstructionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    compile_mode: CompileOpt = "auto",
    as_json: JsonFlag = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Answer QUESTIONS about the document at PATH (every selected page is tried; the surest answer wins).

    A cheap pass over each page first; when the question needs detail, the region it is about is
    read again at high resolution in the same pass (Q-Zoom).
    """
    with _reporting_errors(verbose):
        from .doctor import check_transformers
        from .documents import open_document, parse_page_spec
        from .options import check_questions

        questions = check_questions(questions)
        settings = _settings(zoom, gate_threshold, roi_threshold, roi_max_visual_tokens, explain, roi_native)
        batch = _check_request(batch_size, max_new_tokens, min_visual_tokens, max_visual_tokens)
        if overlay:
            check_output_folder(Path(overlay))
        check_transformers()
        with open_document(path, password=password, dpi=dpi) as doc:
            parse_page_spec(pages, doc.page_count)
            _configure_logging(verbose, quiet)
            for warning in doc.warnings:
                _warn(warning, quiet)
            show_panel = not quiet and err_console.is_terminal
            with err_console.status("Loading model…") if show_panel else nullcontext():
                qz = _load(model, adapter, revision, device, dtype, attn, compile_mode)
            budget = qz.resolve_budget(min_visual_tokens, max_visual_tokens, zoom_mode=zoom)
            with err_console.status("Answering…") if show_panel else nullcontext():
                results = qz.ask(doc, questions, pages=pages, budget=budget, zoom=settings,
                                 max_new_tokens=max_new_tokens, overlay_dir=overlay, batch_size=batch,
                                 instruction=_instruction(instruction))
            for result in results:
                for warning in result.warnings:
                    _warn(f"{result.id}: {warning}", quiet)
                if as_json:
                    _print_json(result.to_dict())
                else:
                    from .render import printable

                    answer = result.answer or ""
                    print(printable(answer) if sys.stdout.isatty() else " ".join(answer.split()), flush=True)
                if show_panel:
                    from .render import answer_panel

                    err_console.print(answer_panel(result, doc.thumbnail(result.page)))
            if overlay and any(result.zoom.overlay is None for result in results):
                raise OutputError(f"could not write the overlays into {overlay}; the answers are complete")


def _relaunch_on_gpus(gpus: str) -> int:
    """`--gpus 0,1`: the same command under `accelerate launch`, one process per listed GPU."""
    import subprocess

    import torch

    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids or not all(g.isdigit() for g in ids):
        raise UsageError(f"--gpus takes GPU indices like 0,1,2, got {gpus!r}")
    present = torch.cuda.device_count()
    if max(int(g) for g in ids) >= present:
        raise UsageError(f"--gpus {gpus}: this machine has {present} CUDA GPU(s)" +
                         (f" (indices 0-{present - 1})" if present else ""))
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            argv.append(arg)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(len(ids)),
               "--gpu_ids", ",".join(ids), "-m", "qzoom_cli", *argv]
    return subprocess.call(command)


def _distributed(device: str) -> tuple[int, int, object]:
    """(rank, world size, state) under `accelerate launch`/torchrun, else (0, 1, None)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    return state.process_index, state.num_processes, state


@app.command()
def run(
    manifest: Annotated[str, typer.Argument(help="JSONL manifest of {id, file, question, pages?, password?, "
                                                 "answers?} rows; '-' reads it from stdin.")],
    output: Annotated[str | None, typer.Option("--output", "-o", help="Write the records here instead of stdout.")]
    = None,
    resume: Annotated[bool, _flag(help="Keep the finished records already in --output, redo the rest "
                                              "(errors included).")] = False,
    force: Annotated[bool, _flag(help="Overwrite a non-empty --output.")] = False,
    gpus: Annotated[str | None, typer.Option(help="Run one replica per listed GPU (e.g. 0,1,2,3) through "
                                                  "accelerate, merging into one ordered output.")] = None,
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    revision: RevisionOpt = None,
    zoom: ZoomOpt = "auto",
    gate_threshold: GateOpt = None,
    roi_threshold: RoiOpt = None,
    roi_max_visual_tokens: RoiTokensOpt = None,
    roi_native: RoiNativeOpt = False,
    dpi: DpiOpt = 200,
    min_visual_tokens: MinTokensOpt = None,
    max_visual_tokens: MaxTokensOpt = None,
    max_new_tokens: MaxNewOpt = None,
    batch_size: BatchOpt = "1",
    instruction: InstructionOpt = None,
    root: RootOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    compile_mode: CompileOpt = "auto",
    progress: Annotated[bool | None, _flag("--progress/--no-progress",
                                       help="Progress bar on stderr \\[default: when it is a terminal].")]
    = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Answer every row of MANIFEST: one qzoom.result/v1 line per row, in manifest order.

    Rows about the same document share one rendering. Exit code 5 when any row failed (its
    record says why); Ctrl-C leaves a valid file that --resume continues.
    """
    with _reporting_errors(verbose):
        from .doctor import check_transformers
        from .manifest import read_manifest

        if gpus:
            raise typer.Exit(_relaunch_on_gpus(gpus))
        settings = _settings(zoom, gate_threshold, roi_threshold, roi_max_visual_tokens, roi_native=roi_native)
        batch = _check_request(batch_size, max_new_tokens, min_visual_tokens, max_visual_tokens)
        if output:
            check_output_file(Path(output), inputs=(manifest,))
        rows = read_manifest(manifest, root)
        check_transformers()
        from .batch import RunOptions, run_manifest

        _configure_logging(verbose, quiet)
        rank, world, state = _distributed(device)
        if state is not None and device == "auto":
            device = str(state.device)

        def load():
            qz = _load(model, adapter, revision, device, dtype, attn, compile_mode)
            options.budget = qz.resolve_budget(min_visual_tokens, max_visual_tokens, zoom_mode=zoom)
            return qz

        run_settings = {"model": model, "adapter": adapter, "revision": revision, "zoom": zoom,
                        "gate_threshold": gate_threshold, "roi_threshold": roi_threshold,
                        "roi_max_visual_tokens": roi_max_visual_tokens, "roi_native": roi_native, "dpi": dpi,
                        "min_visual_tokens": min_visual_tokens, "max_visual_tokens": max_visual_tokens,
                        "max_new_tokens": max_new_tokens, "instruction": _instruction(instruction), "dtype": dtype}
        options = RunOptions(zoom=settings, dpi=dpi, max_new_tokens=max_new_tokens,
                             instruction=_instruction(instruction),
                             batch_size=batch, verbose=verbose, settings=run_settings)
        show = (err_console.is_terminal if progress is None else progress) and not quiet
        with _batch_progress(show, f"rank {rank}" if world > 1 else "rows") as (track, start):
            summary = run_manifest(load, rows, options, output=Path(output) if output else None, stdout=sys.stdout,
                                   resume=resume, force=force, rank=rank, world=world,
                                   barrier=state.wait_for_everyone if state is not None else (lambda: None),
                                   on_result=track, on_start=start)
        if not quiet and rank == 0:
            kept = f", {summary.kept} kept from before" if summary.kept else ""
            print(f"qzoom: {summary.done} rows answered ({summary.zoomed} zoomed, {summary.failed} failed){kept}",
                  file=sys.stderr)
        if summary.failed:
            raise typer.Exit(EXIT_PARTIAL)


@contextmanager
def _batch_progress(show: bool, label: str):
    """(on_result, on_start) callbacks feeding a rich progress bar on stderr, or doing nothing."""
    if not show:
        yield (lambda result: None), (lambda total: None)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} rows/s"), TimeRemainingColumn(),
               TextColumn("zoom {task.fields[zoom]}"), TextColumn("[red]failed {task.fields[failed]}"))
    counts = {"zoomed": 0, "failed": 0, "done": 0}
    with Progress(*columns, console=err_console, transient=False) as bar:
        task = bar.add_task(label, total=None, rate="-", zoom="-", failed=0)

        def start(total: int) -> None:
            bar.update(task, total=total)

        def track(result) -> None:
            counts["done"] += 1
            counts["zoomed"] += bool(result.zoom.zoomed)
            counts["failed"] += result.status == "error"
            elapsed = bar.tasks[task].elapsed or 0
            bar.update(task, advance=1, failed=counts["failed"],
                       rate=f"{counts['done'] / elapsed:.2f}" if elapsed else "-",
                       zoom=f"{counts['zoomed'] / counts['done']:.0%}")

        yield track, start


def _modes(text: str) -> list[str]:
    from .options import MODES

    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise UsageError(f"modes are a comma list of {', '.join(MODES)}; got {text!r}")
    return modes


MetricOpt = Annotated[str, typer.Option("--metric", help="auto (per row: its metric, its dataset, 10 references "
                                                         "-> vqa, else anls), anls, relaxed, vqa or exact.")]


@app.command("eval")
def evaluate_command(
    manifest: Annotated[str, typer.Argument(help="Manifest whose rows carry reference answers (qzoom JSONL, "
                                                 "DocVQA JSON or lmms-eval samples).")],
    compare: Annotated[str, typer.Option(help="Zoom modes to run on the same rows, e.g. never,auto,always.")]
    = "auto",
    metric: MetricOpt = "auto",
    output: Annotated[str | None, typer.Option("--output", "-o", help="Write per-row scores (JSONL) here.")]
    = None,
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    revision: RevisionOpt = None,
    gate_threshold: GateOpt = None,
    roi_threshold: RoiOpt = None,
    roi_max_visual_tokens: RoiTokensOpt = None,
    dpi: DpiOpt = 200,
    min_visual_tokens: MinTokensOpt = None,
    max_visual_tokens: MaxTokensOpt = None,
    max_new_tokens: MaxNewOpt = None,
    batch_size: BatchOpt = "1",
    instruction: InstructionOpt = None,
    root: RootOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    compile_mode: CompileOpt = "auto",
    as_json: JsonFlag = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Score answers against the manifest's references, for each zoom mode in --compare."""
    with _reporting_errors(verbose):
        from dataclasses import asdict

        from .doctor import check_transformers
        from .evaluate import METRICS
        from .manifest import read_manifest

        modes = _modes(compare)
        if metric != "auto" and metric not in METRICS:
            raise UsageError(f"unknown metric {metric!r}: use auto, {', '.join(METRICS)}")
        settings = {mode: _settings(mode, gate_threshold, roi_threshold, roi_max_visual_tokens) for mode in modes}
        batch = _check_request(batch_size, max_new_tokens, min_visual_tokens, max_visual_tokens)
        if output:
            check_output_file(Path(output), inputs=(manifest,))
        rows = read_manifest(manifest, root)
        check_transformers()
        from .batch import RunOptions
        from .bench import run_scored, warm_up

        _configure_logging(verbose, quiet)
        qz = _load(model, adapter, revision, device, dtype, attn, compile_mode)
        summaries, per_mode = [], {}
        for mode in modes:
            options = RunOptions(zoom=settings[mode],
                                 budget=qz.resolve_budget(min_visual_tokens, max_visual_tokens, zoom_mode=mode),
                                 dpi=dpi, max_new_tokens=max_new_tokens, instruction=_instruction(instruction),
                                 batch_size=batch, verbose=verbose)
            if not summaries:
                warm_up(qz, rows, options)
            if not quiet:
                print(f"qzoom: evaluating {len(rows)} rows with --zoom {mode}", file=sys.stderr)
            summary, scored = run_scored(qz, rows, options, metric)
            summaries.append(summary)
            per_mode[mode] = scored
        if as_json:
            _print_json({"model": asdict(qz.model_info()), "modes": [asdict(s) for s in summaries]})
        else:
            from .render import eval_table

            Console(width=None if sys.stdout.isatty() else 140).print(eval_table(summaries))
        if output:
            lines = [json.dumps({"mode": mode, **asdict(row)}, ensure_ascii=False) + "\n"
                     for mode, scored in per_mode.items() for row in scored]
            _write_or_print(Path(output), "".join(lines), "the per-row scores")


@app.command()
def bench(
    manifest: Annotated[str, typer.Argument(help="Rows to time (and score, when they carry references).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for bench.json and pareto.png.")] = "qzoom-bench",
    budgets: Annotated[str, typer.Option(help="Maximum visual tokens to sweep.")] = "256,576,1024,2048,4096",
    modes: Annotated[str, typer.Option(help="Zoom modes to sweep (never is the baseline).")] = "never,auto",
    limit: Annotated[int | None, typer.Option(help="Use only the first N rows.")] = None,
    metric: MetricOpt = "auto",
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    revision: RevisionOpt = None,
    gate_threshold: GateOpt = None,
    roi_threshold: RoiOpt = None,
    dpi: DpiOpt = 200,
    max_new_tokens: MaxNewOpt = None,
    batch_size: BatchOpt = "1",
    instruction: InstructionOpt = None,
    root: RootOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    compile_mode: CompileOpt = "auto",
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Sweep visual-token budgets for each zoom mode on the same rows: a JSON report and a Pareto plot."""
    with _reporting_errors(verbose):
        from .doctor import check_transformers
        from .manifest import read_manifest

        chosen_modes = _modes(modes)
        settings = _settings("auto", gate_threshold, roi_threshold, None)
        batch = _check_request(batch_size, max_new_tokens)
        try:
            maxima = [int(b) for b in budgets.split(",") if b.strip()]
        except ValueError:
            raise UsageError(f"--budgets takes whole numbers like 256,576,1024; got {budgets!r}") from None
        if not maxima or min(maxima) < 1:
            raise UsageError("--budgets needs positive numbers")
        check_output_folder(Path(out))
        if limit is not None and limit < 1:
            raise UsageError("--limit must be at least 1")
        rows = read_manifest(manifest, root)[:limit]
        check_transformers()
        import torch
        import transformers

        from .batch import RunOptions
        from .bench import pareto_png, sweep

        _configure_logging(verbose, quiet)
        qz = _load(model, adapter, revision, device, dtype, attn, compile_mode)
        options = RunOptions(zoom=settings, dpi=dpi, max_new_tokens=max_new_tokens,
                             instruction=_instruction(instruction), batch_size=batch, verbose=verbose)

        def report(point):
            if not quiet:
                s = point.summary
                accuracy = f"accuracy {s.accuracy:.3f}, " if s.accuracy is not None else ""
                print(f"qzoom: zoom {point.mode:<6} max {point.max_tokens:>5} tokens: {accuracy}"
                      f"{s.samples_per_s:.3f} samples/s, {s.mean_visual_tokens:.0f} visual tokens, "
                      f"zoom rate {s.zoom_rate:.0%}", file=sys.stderr)

        points = sweep(qz, rows, chosen_modes, maxima, options, metric, on_point=report)
        folder = Path(out)
        info = qz.model_info()
        meta = {"model": info.id, "device": info.device, "dtype": info.dtype, "attn": info.attn,
                "device_name": torch.cuda.get_device_name(qz.runtime.device) if qz.runtime.device.type == "cuda"
                else "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
                "rows": len(rows), "manifest": str(manifest), "warmup_rows": 1}
        report_text = json.dumps({"meta": meta, "points": [p.to_dict() for p in points]}, indent=2)
        _write_or_print(folder / "bench.json", report_text, "the report")
        try:
            pareto_png(points, folder / "pareto.png", f"{info.id} on {meta['device_name']} ({info.dtype}, {info.attn})")
        except OSError as exc:
            raise OutputError(f"could not write {folder / 'pareto.png'} ({exc.strerror or exc}); "
                              f"{folder / 'bench.json'} has the numbers") from None
        print(folder / "bench.json")
        print(folder / "pareto.png")


train_app = typer.Typer(help="Train the zoom adapter on your own documents, without labels.", no_args_is_help=True)
app.add_typer(train_app, name="train")

EpochsOpt = Annotated[int, typer.Option("--epochs", help="Passes over the training samples.")]
LrOpt = Annotated[float, typer.Option("--lr", help="Peak learning rate (3% warm-up, cosine decay).")]
TrainBatchOpt = Annotated[int, typer.Option("--batch-size", help="Samples per micro-batch (per process).")]
GradAccumOpt = Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimiser step.")]
MaxSamplesOpt = Annotated[int | None, typer.Option("--max-samples", help="Use at most this many samples.")]
SaveEveryOpt = Annotated[int, typer.Option("--save-every", help="Write a checkpoint every N optimiser steps "
                                                                "(0: only the final adapter); a rerun resumes from "
                                                                "the newest.")]
CheckpointingOpt = Annotated[bool, _flag("--gradient-checkpointing", help="Recompute branch activations "
                                                                               "in the backward pass.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Shuffling and sampling seed.")]
FreeAnswersOpt = Annotated[bool, _flag("--free-answers", help="Ask for free-form answers instead of a "
                                                                     "single word or phrase.")]


def _train_options(epochs, lr, batch_size, grad_accum, max_samples, save_every, gradient_checkpointing, seed):
    from .training.loop import TrainOptions

    if min(epochs, batch_size, grad_accum) < 1 or lr <= 0:
        raise UsageError("--epochs, --batch-size and --grad-accum must be at least 1 and --lr positive")
    return TrainOptions(epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum, max_samples=max_samples,
                        save_every=save_every, gradient_checkpointing=gradient_checkpointing, seed=seed)


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
    _print_json({"adapter": str(adapter_dir), **report})
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
                                                  "number).")] = 576,
    free_answers: FreeAnswersOpt = False,
    sink_threshold: Annotated[float, typer.Option(help="Sink-head attention marking a sink cell.")] = 1e-2,
    fg_ratio: Annotated[float, typer.Option(help="Foreground: attention above this share of the peak.")] = 0.25,
    bg_ratio: Annotated[float, typer.Option(help="Background: outside the box and below this share.")] = 0.05,
    max_area: Annotated[float, typer.Option(help="Skip samples whose box covers this share of the view.")] = 0.5,
    peak_floor: Annotated[float, typer.Option(help="Skip samples whose attention peak is below this.")] = 5e-3,
    epochs: EpochsOpt = 1,
    lr: LrOpt = 1e-4,
    batch_size: TrainBatchOpt = 4,
    grad_accum: GradAccumOpt = 1,
    max_samples: MaxSamplesOpt = None,
    save_every: SaveEveryOpt = 0,
    gradient_checkpointing: CheckpointingOpt = False,
    seed: SeedOpt = 0,
    dpi: DpiOpt = 200,
    root: RootOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Stage 1 (SD-RPN): distil where the model looks while answering into the region head."""
    with _reporting_errors(verbose):
        import math

        from .doctor import check_transformers
        from .manifest import read_manifest
        from .training.data import expand_samples
        from .training.pseudo_labels import LabelSettings
        from .training.rpn import RpnSettings, train_rpn
        from .training.teacher import HeadTable, fallback_heads

        side = math.isqrt(view_tokens)
        if side * side != view_tokens or side < 2:
            raise UsageError(f"--view-tokens must be a square number like 576 (24 x 24), got {view_tokens}")
        options = _train_options(epochs, lr, batch_size, grad_accum, max_samples, save_every,
                                 gradient_checkpointing, seed)
        rows = read_manifest(manifest, root)
        check_transformers()
        _configure_logging(verbose, quiet)
        qz = _load(model, None, revision, device, dtype, attn)
        k = branch_layer or qz.engine.branch_layer
        t = depth or qz.engine.depth
        card_heads = (qz.card.training.get("heads") if qz.card else None) or None
        heads = HeadTable.from_dict(card_heads) if card_heads else \
            fallback_heads(k, qz.backbone.num_attention_heads)
        samples = expand_samples(rows, max_samples, dpi)
        settings = RpnSettings(branch_layer=k, depth=t, heads=heads, view_side=side, free_answers=free_answers,
                               labels=LabelSettings(sink_threshold, fg_ratio, bg_ratio, max_area, peak_floor), dpi=dpi)
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
    = "64,144,256,400,576,768,1024",
    gate_threshold: Annotated[float, typer.Option(help="Threshold stored in the adapter for `ask`.")] = 0.05,
    free_answers: FreeAnswersOpt = False,
    epochs: EpochsOpt = 1,
    lr: LrOpt = 1e-4,
    batch_size: TrainBatchOpt = 4,
    grad_accum: GradAccumOpt = 1,
    max_samples: MaxSamplesOpt = None,
    save_every: SaveEveryOpt = 0,
    gradient_checkpointing: CheckpointingOpt = False,
    seed: SeedOpt = 42,
    dpi: DpiOpt = 200,
    root: RootOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Stage 3: teach the gate when the coarse view is not enough (answers at a ladder of resolutions)."""
    with _reporting_errors(verbose):
        from .doctor import check_transformers
        from .manifest import read_manifest
        from .training.data import expand_samples
        from .training.gate import GateSettings, train_gate

        try:
            rungs = tuple(int(x) for x in ladder.split(",") if x.strip())
        except ValueError:
            raise UsageError(f"--ladder takes whole numbers like 64,256,1024; got {ladder!r}") from None
        if len(rungs) < 3 or list(rungs) != sorted(set(rungs)) or rungs[0] < 1:
            raise UsageError("--ladder needs at least three increasing budgets")
        if adapter is None and out is None:
            raise UsageError("give --adapter (from `qzoom train rpn`) or --out for a gate-only adapter")
        options = _train_options(epochs, lr, batch_size, grad_accum, max_samples, save_every,
                                 gradient_checkpointing, seed)
        rows = read_manifest(manifest, root)
        check_transformers()
        _configure_logging(verbose, quiet)
        qz = _load(model, adapter, revision, device, dtype, attn)
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
    per_page: Annotated[int, typer.Option(help="Questions asked for per page.")] = 5,
    force: Annotated[bool, _flag(help="Overwrite an existing --output.")] = False,
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
    with _reporting_errors(verbose):
        from .doctor import check_transformers
        from .training.questions import documents, write_questions

        if not Path(folder).is_dir():
            raise UsageError(f"{folder} is not a folder")
        if not any(True for _ in documents(Path(folder))):
            raise UsageError(f"no PDF or image under {folder}")
        check_output_file(Path(output))
        if Path(output).exists() and Path(output).stat().st_size > 0 and not force:
            raise UsageError(f"{output} already exists: --force to overwrite it, or -o another file")
        check_transformers()
        _configure_logging(verbose, quiet)
        qz = _load(model, None, revision, device, dtype, attn)
        budget = qz.resolve_budget(None, max_visual_tokens, zoom_mode="never")

        def on_page(path, page, count):
            if not quiet:
                print(f"qzoom: {path} page {page}: {count} questions", file=sys.stderr)

        rows, skipped = write_questions(qz, Path(folder), Path(output), per_page, dpi, budget, on_page=on_page)
        for path, reason in skipped.items():
            _warn(f"skipped {path}: {reason}", quiet)
        print(output)
        if not quiet:
            print(f"qzoom: {rows} questions written", file=sys.stderr)


@app.command()
def doctor(as_json: JsonFlag = False, verbose: Verbose = False) -> None:
    """Report versions, devices, flash-attention and the Hugging Face cache (offline mode included)."""
    with _reporting_errors(verbose):
        from .doctor import collect_report

        report = collect_report()
        if as_json:
            _print_json(report)
            return
        console = Console()
        console.print(f"[bold]qzoom {report['qzoom']}[/] on Python {report['python']} ({report['platform']})")
        for name, version in report["packages"].items():
            console.print(f"  {name:<16} {version or '-'}")
        verdict = "ok" if report["transformers_ok"] else "[red]NOT SUPPORTED[/]"
        console.print(f"transformers range {report['transformers_supported']}: {verdict}")
        console.print(f"CUDA available: {report['cuda']['available']} (torch built for CUDA "
                      f"{report['cuda']['torch_cuda'] or '-'})")
        for dev in report["devices"]:
            details = ", ".join(f"{k} {v}" for k, v in dev.items() if k not in ("device", "name"))
            console.print(f"  {dev['device']:<8} {dev['name']}" + (f" ({details})" if details else ""))
        console.print(f"flash-attention: {'available' if report['flash_attention'] else 'not installed'}")
        hub = report["hub"]
        console.print(f"hub cache: {hub['cache']}  offline: {hub['offline']}  endpoint: {hub['endpoint']}")


@models_app.command("list")
def models_list(as_json: JsonFlag = False, verbose: Verbose = False) -> None:
    """List the model cards qzoom ships (hub id, family, patch factor, default budgets)."""
    with _reporting_errors(verbose):
        from dataclasses import asdict

        from .cards import load_cards

        cards = load_cards()
        if as_json:
            _print_json({"models": [asdict(card) for card in cards]})
            return
        for card in cards:
            mark = "*" if card.default else " "
            print(f"{mark} {card.id:<34} {card.family:<12} patch {card.patch_factor}  "
                  f"tokens {card.min_visual_tokens}-{card.max_visual_tokens}  {card.description}")


@models_app.command("make-tiny")
def models_make_tiny(
    directory: Annotated[str, typer.Argument(help="Where to write the checkpoint.")],
    family: Annotated[str, typer.Option(help="Model family: qwen2_5_vl, qwen3_vl.")] = "qwen2_5_vl",
    moe: Annotated[bool, _flag(help="Qwen3-VL with mixture-of-experts layers (qwen3_vl_moe).")] = False,
    thinking: Annotated[bool, _flag(help="Qwen3-VL with a Thinking checkpoint's chat template.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    layers: Annotated[int, typer.Option(help="Decoder layers.")] = 4,
    verbose: Verbose = False,
) -> None:
    """Write a tiny random checkpoint (offline) that loads like a real one: for tests and CI."""
    with _reporting_errors(verbose):
        from .errors import UsageError
        from .testing import make_tiny

        _configure_logging(verbose, quiet=True)
        if moe and family != "qwen3_vl":
            raise UsageError("--moe is for --family qwen3_vl")
        print(make_tiny(directory, family="qwen3_vl_moe" if moe else family, seed=seed, num_layers=layers,
                        thinking=thinking))


def main() -> None:
    app()
