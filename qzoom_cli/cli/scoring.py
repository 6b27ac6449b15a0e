"""`qzoom eval` (scores per zoom mode) and `qzoom bench` (a budget sweep and its Pareto plot)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..errors import OutputError, UsageError
from ..outputs import check_output_file, check_output_folder
from .common import (
    AdapterOpt,
    AttnOpt,
    BatchOpt,
    CompileOpt,
    DeviceOpt,
    DpiOpt,
    DtypeOpt,
    GateOpt,
    InstructionOpt,
    JsonFlag,
    MaxNewOpt,
    MaxTokensOpt,
    MetricOpt,
    MinTokensOpt,
    ModelOpt,
    NoMergeOpt,
    ProgressOpt,
    Quiet,
    RevisionOpt,
    RoiOpt,
    RoiTokensOpt,
    RootOpt,
    ThinkOpt,
    Verbose,
    check_request,
    configure_logging,
    err_console,
    instruction_text,
    load_model,
    preflight,
    print_json,
    write_or_print,
    zoom_settings,
)
from .progress import row_progress

LimitOpt = Annotated[int | None, typer.Option("--limit", help="Use only the first N rows.")]


def check_limit(limit: int | None) -> int | None:
    if limit is not None and limit < 1:
        raise UsageError("--limit must be at least 1")
    return limit


def evaluate_command(
    manifest: Annotated[str, typer.Argument(help="Manifest whose rows carry reference answers (qzoom JSONL, "
                                                 "DocVQA JSON or lmms-eval samples).")],
    compare: Annotated[str, typer.Option(help="Zoom modes to run on the same rows, e.g. never,auto,always.")]
    = "auto",
    metric: MetricOpt = "auto",
    limit: LimitOpt = None,
    output: Annotated[str | None, typer.Option("--output", "-o", metavar="FILE",
                                               help="Write per-row scores (JSONL) here.")]
    = None,
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    no_merge: NoMergeOpt = False,
    revision: RevisionOpt = None,
    gate_threshold: GateOpt = None,
    roi_threshold: RoiOpt = None,
    roi_max_visual_tokens: RoiTokensOpt = None,
    dpi: DpiOpt = 200,
    min_visual_tokens: MinTokensOpt = None,
    max_visual_tokens: MaxTokensOpt = None,
    max_new_tokens: MaxNewOpt = None,
    think: ThinkOpt = None,
    batch_size: BatchOpt = "1",
    instruction: InstructionOpt = None,
    root: RootOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    compile_mode: CompileOpt = "auto",
    as_json: JsonFlag = False,
    progress: ProgressOpt = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Score answers against the manifest's references, for each zoom mode in --compare."""
    from dataclasses import asdict

    from ..evaluate import check_metric
    from ..manifest import document_files, read_manifest
    from ..options import parse_modes

    modes = parse_modes(compare)
    check_metric(metric)
    settings = {mode: zoom_settings(mode, gate_threshold, roi_threshold, roi_max_visual_tokens) for mode in modes}
    batch = check_request(batch_size, max_new_tokens, min_visual_tokens, max_visual_tokens, dpi, instruction)
    check_limit(limit)
    if output:
        check_output_file(Path(output), inputs=(manifest,))
    rows = read_manifest(manifest, root)[:limit]
    if output:  # the rows' documents are inputs too
        check_output_file(Path(output), inputs=document_files(rows))
    preflight(model, adapter, revision)
    from ..batch import RunOptions
    from ..bench import compare_modes, score_lines

    configure_logging(verbose, quiet)
    qz = load_model(model, adapter, revision, device, dtype, attn, compile_mode, no_merge, think)
    options = {mode: RunOptions(zoom=settings[mode],
                                budget=qz.resolve_budget(min_visual_tokens, max_visual_tokens, zoom_mode=mode),
                                dpi=dpi, max_new_tokens=max_new_tokens, instruction=instruction_text(instruction),
                                batch_size=batch, verbose=verbose)
               for mode in modes}

    show = (err_console.is_terminal if progress is None else progress) and not quiet

    def mode_progress(mode: str):
        if not quiet:
            print(f"qzoom: evaluating {len(rows)} rows with --zoom {mode}", file=sys.stderr)
        return row_progress(show, f"--zoom {mode}")

    summaries, per_mode = compare_modes(qz, rows, options, metric, mode_progress)
    if as_json:
        print_json({"model": asdict(qz.model_info()), "modes": [asdict(s) for s in summaries]})
    else:
        from ..render import eval_table

        Console(width=None if sys.stdout.isatty() else 140).print(eval_table(summaries))
    if output:
        write_or_print(Path(output), score_lines(per_mode), "the per-row scores")


def bench(
    manifest: Annotated[str, typer.Argument(help="Rows to time (and score, when they carry references).")],
    out: Annotated[str, typer.Option("--output", "-o", "--out", metavar="DIR",
                                     help="Folder for bench.json and pareto.png.")] = "qzoom-bench",
    budgets: Annotated[str, typer.Option(help="Maximum visual tokens to sweep.")] = "256,576,1024,2048,4096",
    modes: Annotated[str, typer.Option(help="Zoom modes to sweep (never is the baseline); stock adds transformers' "
                                            "generate() on the same rows, and each point's time against it.")
                     ] = "never,auto",
    limit: LimitOpt = None,
    metric: MetricOpt = "auto",
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    no_merge: NoMergeOpt = False,
    revision: RevisionOpt = None,
    gate_threshold: GateOpt = None,
    roi_threshold: RoiOpt = None,
    dpi: DpiOpt = 200,
    max_new_tokens: MaxNewOpt = None,
    think: ThinkOpt = None,
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
    """Sweep visual-token budgets for each zoom mode on the same rows: a JSON report and a Pareto plot."""
    from ..evaluate import check_metric
    from ..manifest import read_manifest
    from ..options import MODES, STOCK, parse_counts, parse_modes

    chosen_modes = parse_modes(modes, (*MODES, STOCK))
    check_metric(metric)
    settings = zoom_settings("auto", gate_threshold, roi_threshold, None)
    batch = check_request(batch_size, max_new_tokens, dpi=dpi, instruction=instruction)
    maxima = parse_counts(budgets, "--budgets")
    check_output_folder(Path(out))
    rows = read_manifest(manifest, root)[:check_limit(limit)]
    preflight(model, adapter, revision)
    from ..batch import RunOptions
    from ..bench import bench_report, mode_label, pareto_png, pareto_title, sweep

    configure_logging(verbose, quiet)
    qz = load_model(model, adapter, revision, device, dtype, attn, compile_mode, no_merge, think)
    options = RunOptions(zoom=settings, dpi=dpi, max_new_tokens=max_new_tokens,
                         instruction=instruction_text(instruction), batch_size=batch, verbose=verbose)

    def report(point):
        if not quiet:
            s = point.summary
            accuracy = f"accuracy {s.accuracy:.3f}, " if s.accuracy is not None else ""
            versus = f", {point.time_vs_stock:.3f}x stock's time" if point.time_vs_stock is not None else ""
            print(f"qzoom: {mode_label(point.mode):<16} max {point.max_tokens:>5} tokens: {accuracy}"
                  f"{s.samples_per_s:.3f} samples/s, {s.mean_visual_tokens:.0f} visual tokens, "
                  f"zoom rate {s.zoom_rate:.0%}{versus}", file=sys.stderr)

    points = sweep(qz, rows, chosen_modes, maxima, options, metric, on_point=report)
    folder = Path(out)
    report_data = bench_report(qz, points, rows, manifest)
    write_or_print(folder / "bench.json", json.dumps(report_data, indent=2), "the report")
    try:
        pareto_png(points, folder / "pareto.png", pareto_title(report_data))
    except OSError as exc:
        raise OutputError(f"could not write {folder / 'pareto.png'} ({exc.strerror or exc}); "
                          f"{folder / 'bench.json'} has the numbers") from None
    if as_json:
        print_json(report_data)
    else:
        print(folder / "bench.json")
        print(folder / "pareto.png")

