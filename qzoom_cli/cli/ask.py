"""`qzoom ask`: questions about one document, answers on stdout."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer

from ..errors import OutputError
from ..outputs import check_output_folder
from .common import (
    AdapterOpt,
    AttnOpt,
    BatchOpt,
    CompileOpt,
    DeviceOpt,
    DpiOpt,
    DtypeOpt,
    ExplainOpt,
    GateOpt,
    InstructionOpt,
    JsonFlag,
    MaxNewOpt,
    MaxTokensOpt,
    MinTokensOpt,
    ModelOpt,
    NoMergeOpt,
    PagesOpt,
    PasswordOpt,
    Quiet,
    RevisionOpt,
    RoiNativeOpt,
    RoiOpt,
    RoiTokensOpt,
    ThinkOpt,
    Verbose,
    ZoomOpt,
    check_request,
    configure_logging,
    err_console,
    instruction_text,
    load_model,
    preflight,
    print_json,
    warn,
    zoom_settings,
)


def ask(
    path: Annotated[str, typer.Argument(help="PDF or image file; '-' reads the document from stdin.")],
    questions: Annotated[list[str], typer.Argument(help="One or more questions about the document.")],
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    no_merge: NoMergeOpt = False,
    revision: RevisionOpt = None,
    zoom: ZoomOpt = "auto",
    gate_threshold: GateOpt = None,
    roi_threshold: RoiOpt = None,
    roi_max_visual_tokens: RoiTokensOpt = None,
    roi_native: RoiNativeOpt = False,
    explain: ExplainOpt = False,
    overlay: Annotated[str | None, typer.Option(help="Write the answering page with the region map and box "
                                                     "as PNG into this directory.")] = None,
    pages: PagesOpt = None,
    dpi: DpiOpt = 200,
    password: PasswordOpt = None,
    min_visual_tokens: MinTokensOpt = None,
    max_visual_tokens: MaxTokensOpt = None,
    max_new_tokens: MaxNewOpt = None,
    think: ThinkOpt = None,
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
    from ..documents import check_page_spec, open_document, parse_page_spec
    from ..options import check_questions

    questions = check_questions(questions)
    settings = zoom_settings(zoom, gate_threshold, roi_threshold, roi_max_visual_tokens, explain, roi_native)
    batch = check_request(batch_size, max_new_tokens, min_visual_tokens, max_visual_tokens, dpi, instruction)
    check_page_spec(pages)
    if overlay:
        check_output_folder(Path(overlay))
    preflight(model, adapter, revision)
    with open_document(path, password=password, dpi=dpi) as doc:
        parse_page_spec(pages, doc.page_count)
        configure_logging(verbose, quiet)
        for warning in doc.warnings:
            warn(warning, quiet)
        show_panel = not quiet and err_console.is_terminal
        with err_console.status("Loading model…") if show_panel else nullcontext():
            qz = load_model(model, adapter, revision, device, dtype, attn, compile_mode, no_merge, think)
        budget = qz.resolve_budget(min_visual_tokens, max_visual_tokens, zoom_mode=zoom)
        with err_console.status("Answering…") if show_panel else nullcontext():
            results = qz.ask(doc, questions, pages=pages, budget=budget, zoom=settings,
                             max_new_tokens=max_new_tokens, overlay_dir=overlay, batch_size=batch,
                             instruction=instruction_text(instruction))
        for result in results:
            for warning in result.warnings:
                warn(f"{result.id}: {warning}", quiet)
            if as_json:
                print_json(result.to_dict())
            else:
                from ..render import printable

                answer = result.answer or ""
                print(printable(answer) if sys.stdout.isatty() else " ".join(answer.split()), flush=True)
            if show_panel:
                from ..render import answer_panel

                err_console.print(answer_panel(result, doc.thumbnail(result.page)))
        if overlay and any(result.zoom.overlay is None for result in results):
            raise OutputError(f"could not write the overlays into {overlay}; the answers are complete")
