"""`qzoom run`: a JSONL manifest answered in batches, one record per row, resumable."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import EXIT_PARTIAL, UsageError
from ..outputs import check_output_file, check_results_kept
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
    MaxNewOpt,
    MaxTokensOpt,
    MinTokensOpt,
    ModelOpt,
    NoMergeOpt,
    ProgressOpt,
    Quiet,
    RevisionOpt,
    RoiNativeOpt,
    RoiOpt,
    RoiTokensOpt,
    RootOpt,
    ThinkOpt,
    Verbose,
    ZoomOpt,
    check_request,
    configure_logging,
    err_console,
    flag,
    instruction_text,
    load_model,
    preflight,
    zoom_settings,
)
from .progress import row_progress


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



def run(
    manifest: Annotated[str, typer.Argument(help="JSONL manifest of {id, file, question, pages?, password?, "
                                                 "answers?} rows; '-' reads it from stdin.")],
    output: Annotated[str | None, typer.Option("--output", "-o", metavar="FILE",
                                               help="Write the records here instead of stdout.")]
    = None,
    resume: Annotated[bool, flag(help="Keep the finished records already in --output, redo the rest "
                                              "(errors included).")] = False,
    force: Annotated[bool, flag(help="Overwrite a non-empty --output.")] = False,
    gpus: Annotated[str | None, typer.Option(help="Run one replica per listed GPU (e.g. 0,1,2,3) through "
                                                  "accelerate, merging into one ordered output.")] = None,
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    no_merge: NoMergeOpt = False,
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
    think: ThinkOpt = None,
    batch_size: BatchOpt = "1",
    instruction: InstructionOpt = None,
    root: RootOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    compile_mode: CompileOpt = "auto",
    progress: ProgressOpt = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Answer every row of MANIFEST: one qzoom.result/v1 line per row, in manifest order.

    Rows about the same document share one rendering. Exit code 5 when any row failed (its
    record says why); Ctrl-C leaves a valid file that --resume continues.
    """
    from ..manifest import document_files, read_manifest

    if gpus:
        raise typer.Exit(_relaunch_on_gpus(gpus))
    settings = zoom_settings(zoom, gate_threshold, roi_threshold, roi_max_visual_tokens, roi_native=roi_native)
    batch = check_request(batch_size, max_new_tokens, min_visual_tokens, max_visual_tokens, dpi, instruction)
    if resume and force:
        raise UsageError("--resume keeps the finished records and --force drops them: give one of them")
    if output:
        check_output_file(Path(output), inputs=(manifest,))
    rows = read_manifest(manifest, root)
    if output:  # the rows' documents are inputs too
        check_output_file(Path(output), inputs=document_files(rows))
        check_results_kept(Path(output), resume, force)
    preflight(model, adapter, revision)
    from ..batch import RunOptions, run_manifest

    configure_logging(verbose, quiet)
    rank, world, state = _distributed(device)
    if state is not None and device == "auto":
        device = str(state.device)

    def load():
        qz = load_model(model, adapter, revision, device, dtype, attn, compile_mode, no_merge, think)
        options.budget = qz.resolve_budget(min_visual_tokens, max_visual_tokens, zoom_mode=zoom)
        return qz

    run_settings = {"model": model, "adapter": adapter, "revision": revision, "zoom": zoom,
                    "gate_threshold": gate_threshold, "roi_threshold": roi_threshold,
                    "roi_max_visual_tokens": roi_max_visual_tokens, "roi_native": roi_native, "dpi": dpi,
                    "min_visual_tokens": min_visual_tokens, "max_visual_tokens": max_visual_tokens,
                    "max_new_tokens": max_new_tokens, "instruction": instruction_text(instruction), "dtype": dtype,
                    **({"no_merge": True} if no_merge else {}),  # absent by default: older files still resume
                    **({"think": think} if think is not None else {})}
    options = RunOptions(zoom=settings, dpi=dpi, max_new_tokens=max_new_tokens,
                         instruction=instruction_text(instruction),
                         batch_size=batch, verbose=verbose, settings=run_settings)
    show = (err_console.is_terminal if progress is None else progress) and not quiet
    with row_progress(show, f"rank {rank}" if world > 1 else "rows") as (track, start):
        summary = run_manifest(load, rows, options, output=Path(output) if output else None, stdout=sys.stdout,
                               resume=resume, force=force, rank=rank, world=world,
                               barrier=state.wait_for_everyone if state is not None else (lambda: None),
                               on_result=track, on_start=start)
    if not quiet and rank == 0:
        print(f"qzoom: {summary.line()}", file=sys.stderr)
    if summary.failed:
        raise typer.Exit(EXIT_PARTIAL)
