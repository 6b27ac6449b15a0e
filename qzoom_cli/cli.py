"""The `qzoom` command: parses flags, calls the library, prints results, maps errors to exit codes.

Results go to stdout; logs, warnings, progress and panels go to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from contextlib import contextmanager, nullcontext
from typing import Annotated

import typer
from rich.console import Console

from . import __version__
from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, QZoomError

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

Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show library logs and tracebacks.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on stderr except errors.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _version_callback(value: bool) -> None:
    if value:
        print(f"qzoom {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """qzoom: query-aware zoom for document question answering."""


def _configure_logging(verbose: bool, quiet: bool) -> None:
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    transformers.utils.logging.set_verbosity_info() if verbose else transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if quiet:
        disable_progress_bars()
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr)


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


def _print_json(obj: dict) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=2 if sys.stdout.isatty() else None), flush=True)


@app.command()
def ask(
    path: Annotated[str, typer.Argument(help="PDF or image file; '-' reads the document from stdin.")],
    questions: Annotated[list[str], typer.Argument(help="One or more questions about the document.")],
    model: Annotated[str | None, typer.Option(help="Hub id or local checkpoint directory "
                                                   "[default: the default model card].")] = None,
    adapter: Annotated[str | None, typer.Option(help="Zoom adapter directory (qzoom_config.json + "
                                                     "qzoom_adapter.safetensors) to attach to the model.")] = None,
    zoom: Annotated[str, typer.Option(help="auto: zoom when the gate says so; always: read the region "
                                           "whenever one is found; never: one pass at the page budget.")] = "auto",
    gate_threshold: Annotated[float | None, typer.Option(
        help="Zoom when the gate score reaches this [default: model card, adapter, or 0.05 for a trained "
             "gate / 2.0 attention lift without one].")] = None,
    roi_threshold: Annotated[float | None, typer.Option(
        help="Region map cut-off [default: model card, adapter, or 0.125 trained / 0.5 training-free].")] = None,
    roi_max_visual_tokens: Annotated[int | None, typer.Option(
        help="Most visual tokens for the region [default: the page budget].")] = None,
    explain: Annotated[bool, typer.Option(help="When a region is read, also decode the answer without it "
                                               "(zoom.direct_answer vs zoom.zoom_answer).")] = False,
    overlay: Annotated[str | None, typer.Option(help="Write the answering page with the region map and box "
                                                     "as PNG into this directory.")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit) to pin.")] = None,
    pages: Annotated[str | None, typer.Option("--pages", "--page-range",
                                              help="1-based inclusive pages, e.g. '1-3,7' [default: all].")] = None,
    dpi: Annotated[int, typer.Option(help="PDF render resolution; boxes are in pixels at this DPI.")] = 200,
    password: Annotated[str | None, typer.Option(help="Password of an encrypted PDF.")] = None,
    min_visual_tokens: Annotated[int | None, typer.Option(help="Fewest visual tokens per page "
                                                               "[default: from the model card].")] = None,
    max_visual_tokens: Annotated[int | None, typer.Option(help="Most visual tokens per page (the coarse pass "
                                                               "when zooming) [default: from the model card].")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 64,
    batch_size: Annotated[int, typer.Option(help="Questions about one page answered together.")] = 1,
    instruction: Annotated[str | None, typer.Option(
        help="Text appended to each question [default: ask for a single word or phrase]; '' for none.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps (or $QZOOM_DEVICE).")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, bf16, fp16 or fp32.")] = "auto",
    attn: Annotated[str, typer.Option(help="auto, sdpa, flash_attention_2 or eager.")] = "auto",
    as_json: JsonFlag = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Answer QUESTIONS about the document at PATH (every selected page is tried; the surest answer wins).

    A cheap pass over each page first; when the question needs detail, the region it is about is
    read again at high resolution in the same pass (Q-Zoom).
    """
    with _reporting_errors(verbose):
        from .api import SHORT_ANSWER_INSTRUCTION, QZoom, ZoomSettings, check_questions
        from .budget import VisualBudget
        from .doctor import check_transformers
        from .documents import open_document, parse_page_spec

        questions = check_questions(questions)
        settings = ZoomSettings(mode=zoom, gate_threshold=gate_threshold, roi_threshold=roi_threshold,
                                explain=explain)
        check_transformers()
        _configure_logging(verbose, quiet)
        with open_document(path, password=password, dpi=dpi) as doc:
            parse_page_spec(pages, doc.page_count)
            for warning in doc.warnings:
                _warn(warning, quiet)
            show_panel = not quiet and err_console.is_terminal
            status = err_console.status("Loading model…") if show_panel else nullcontext()
            with status:
                qz = QZoom.from_pretrained(model, adapter=adapter, revision=revision, device=device, dtype=dtype,
                                           attn=attn)
            budget = qz.resolve_budget(min_visual_tokens, max_visual_tokens, zoom_mode=zoom)
            if roi_max_visual_tokens is not None:
                settings.region_budget = VisualBudget(min(budget.min_tokens, roi_max_visual_tokens),
                                                      roi_max_visual_tokens)
            status = err_console.status("Answering…") if show_panel else nullcontext()
            with status:
                results = qz.ask(doc, questions, pages=pages, budget=budget, zoom=settings,
                                 max_new_tokens=max_new_tokens, overlay_dir=overlay, batch_size=batch_size,
                                 instruction=SHORT_ANSWER_INSTRUCTION if instruction is None else instruction)
            for result in results:
                for warning in result.warnings:
                    _warn(f"{result.id}: {warning}", quiet)
                if as_json:
                    _print_json(result.to_dict())
                else:
                    print(" ".join((result.answer or "").split()), flush=True)
                if show_panel:
                    from .render import answer_panel

                    err_console.print(answer_panel(result, doc.thumbnail(result.page)))


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
            print(f"{mark} {card.id:<34} {card.family:<11} patch {card.patch_factor}  "
                  f"tokens {card.min_visual_tokens}-{card.max_visual_tokens}  {card.description}")


@models_app.command("make-tiny")
def models_make_tiny(
    directory: Annotated[str, typer.Argument(help="Where to write the checkpoint.")],
    family: Annotated[str, typer.Option(help="Model family.")] = "qwen2_5_vl",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    layers: Annotated[int, typer.Option(help="Decoder layers.")] = 4,
    verbose: Verbose = False,
) -> None:
    """Write a tiny random checkpoint (offline) that loads like a real one: for tests and CI."""
    with _reporting_errors(verbose):
        from .testing import make_tiny

        _configure_logging(verbose, quiet=True)
        print(make_tiny(directory, family=family, seed=seed, num_layers=layers))


def main() -> None:
    app()
