"""What the commands share: the stderr console, logging, output helpers and the option types."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..errors import OutputError, UsageError
from ..options import (
    LIFT_THRESHOLD,
    RELATIVE_ROI_THRESHOLD,
    TRAINED_GATE_THRESHOLD,
    TRAINED_ROI_THRESHOLD,
)
from ..results import json_text

err_console = Console(stderr=True)
VERBOSE_KEY = "qzoom.verbose"


def flag(*names: str, **kwargs):
    """A true/false option: no type column in --help, and its default spelled out."""
    single = bool(names) and "/" not in names[0] and "callback" not in kwargs
    return typer.Option(*names, metavar="", **({"show_default": "off"} if single else {}), **kwargs)


def _remember_verbose(ctx: typer.Context, value: bool) -> bool:
    """-v is read by the error boundary (tracebacks), which runs outside the command."""
    ctx.meta[VERBOSE_KEY] = value
    return value


Verbose = Annotated[bool, flag("--verbose", "-v", help="Show library logs and tracebacks.",
                               callback=_remember_verbose, show_default="off")]
Quiet = Annotated[bool, flag("--quiet", "-q", help="Print nothing on stderr except errors.")]
JsonFlag = Annotated[bool, flag("--json", help="Print JSON instead of text.")]


def configure_logging(verbose: bool, quiet: bool) -> None:
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


def warn(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"qzoom: warning: {message}", file=sys.stderr)


def write_or_print(path: Path, text: str, what: str) -> None:
    """Write `text` to `path`; if that fails after all the work, print it to stdout and say so (exit 6)."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
        raise OutputError(f"could not write {path} ({exc.strerror or exc}); {what} went to stdout instead") from None


def print_json(obj: dict) -> None:
    print(json_text(obj, 2 if sys.stdout.isatty() else None), flush=True)


# Options shared by the commands that load a model and answer questions.
ModelOpt = Annotated[str | None, typer.Option("--model", metavar="ID|DIR",
                                              help="Hub id or local checkpoint directory "
                                                   "[default: the default model card].")]
AdapterOpt = Annotated[str | None, typer.Option("--adapter", metavar="DIR",
                                                help="Zoom adapter directory (qzoom_config.json + "
                                                     "qzoom_adapter.safetensors) to attach.")]
NoMergeOpt = Annotated[bool, flag("--no-merge", help="Keep the adapter's LoRA weights (train sft) apart from the "
                                                   "base weights instead of merging them (slower, exact).")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit) to pin.")]
ZoomOpt = Annotated[str, typer.Option("--zoom", metavar="auto|always|never",
                                      help="auto: zoom when the gate says so; always: read the region "
                                           "whenever one is found; never: one pass at the page budget.")]
GateOpt = Annotated[float | None, typer.Option(
    "--gate-threshold", help=f"Zoom when the gate score reaches this [default: model card, adapter, or "
                             f"{TRAINED_GATE_THRESHOLD} for a trained gate / {LIFT_THRESHOLD} attention lift "
                             f"without one].")]
RoiOpt = Annotated[float | None, typer.Option(
    "--roi-threshold", help=f"Region map cut-off [default: model card, adapter, or {TRAINED_ROI_THRESHOLD} "
                            f"trained / {RELATIVE_ROI_THRESHOLD} training-free].")]
RoiTokensOpt = Annotated[int | None, typer.Option(
    "--roi-max-visual-tokens", help="Most visual tokens for the region [default: the page budget].")]
ThinkOpt = Annotated[bool | None, flag("--think/--no-think", help="Let a checkpoint that reasons on request "
                                        "(Qwen3.5/3.6) think before answering: reasoning in the record, longer "
                                        "answers [default: the model card's; off].")]
ExplainOpt = Annotated[bool, flag("--explain", help="When a region is read, also decode the answer without it "
                                                   "(zoom.direct_answer vs zoom.zoom_answer).")]
RoiNativeOpt = Annotated[bool, flag("--roi-native", help="Never read a region at more tokens than it has "
                                                         "at its source resolution (faster on small regions; "
                                                         "the reference always uses the full budget).")]
MinTokensOpt = Annotated[int | None, typer.Option("--min-visual-tokens", help="Fewest visual tokens per page "
                                                                            "[default: from the model card].")]
MaxTokensOpt = Annotated[int | None, typer.Option("--max-visual-tokens", help="Most visual tokens per page (the "
                                                  "coarse pass when zooming) [default: from the model card].")]
DpiOpt = Annotated[int, typer.Option("--dpi", help="PDF render resolution; boxes are in pixels at this DPI.")]
PagesOpt = Annotated[str | None, typer.Option("--pages", "--page-range", metavar="PAGES",
                                              help="1-based inclusive pages, e.g. '1-3,7' [default: all].")]
PasswordOpt = Annotated[str | None, typer.Option(help="Password of an encrypted PDF.")]
MaxNewOpt = Annotated[int | None, typer.Option("--max-new-tokens", help="Longest answer, in tokens "
                                                "[default: 64; 1024 for thinking models].")]
InstructionOpt = Annotated[str | None, typer.Option(
    "--instruction", help="Text appended to each question [default: ask for a single word or phrase]; '' for none.")]
ProgressOpt = Annotated[bool | None, flag("--progress/--no-progress",
                                         help="Progress bar on stderr [default: when it is a terminal].")]
BatchOpt = Annotated[str, typer.Option("--batch-size", metavar="N|auto",
                                       help="(page, question) pairs answered together, across "
                                            "documents; 'auto' sizes it from free GPU memory.")]
DeviceOpt = Annotated[str, typer.Option("--device", metavar="auto|cpu|cuda|cuda:N|mps",
                                        help="auto, cpu, cuda, cuda:N or mps (or $QZOOM_DEVICE).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", metavar="auto|bf16|fp16|fp32", help="auto, bf16, fp16 or fp32.")]
AttnOpt = Annotated[str, typer.Option("--attn", metavar="auto|sdpa|flash_attention_2|eager",
                                      help="auto, sdpa, flash_attention_2 or eager.")]
CompileOpt = Annotated[str, typer.Option("--compile", metavar="auto|on|max|off",
                                         help="Decode on a static cache captured as a CUDA graph: "
                                              "auto (on CUDA), on (also elsewhere, uncaptured), max "
                                              "(also fuse kernels with torch.compile: slow first "
                                              "answer) or off (the eager loop).")]
RootOpt = Annotated[str | None, typer.Option("--root", metavar="DIR",
                                             help="Folder that relative document paths in the manifest "
                                                  "start from [default: the manifest's folder].")]
MetricOpt = Annotated[str, typer.Option("--metric", metavar="auto|anls|relaxed|vqa|exact",
                                        help="auto (per row: its metric, its dataset, 10 references "
                                             "-> vqa, else anls), anls, relaxed, vqa or exact.")]


def preflight(model: str | None, adapter: str | None = None, revision: str | None = None) -> None:
    """What a command checks before it imports the ML libraries and loads a model: the model (the
    default card's when none is named) and adapter can be had, and the installed transformers is
    one qzoom supports."""
    from ..cards import default_card
    from ..doctor import check_transformers
    from ..refs import check_local_refs

    check_local_refs(model or default_card().id, adapter, revision)
    check_transformers()


def load_model(model, adapter, revision, device, dtype, attn, compile_mode="off", no_merge=False, think=None):
    """The model for a command; training and question writing keep the eager decode loop (compile off)."""
    from ..api import QZoom

    return QZoom.from_pretrained(model, adapter=adapter, revision=revision, device=device, dtype=dtype, attn=attn,
                                 compile=compile_mode, merge_lora=not no_merge, thinking=think)


def parse_batch_size(value: str) -> int | str:
    """--batch-size: a positive number or 'auto'."""
    if value.strip().lower() == "auto":
        return "auto"
    if not value.strip().isdigit() or int(value) < 1:
        raise UsageError(f"--batch-size must be a positive number or 'auto', not {value!r}")
    return int(value)


def check_request(batch_size: str, max_new_tokens: int | None, min_tokens: int | None = None,
                  max_tokens: int | None = None, dpi: int | None = None, instruction: str | None = None) -> int | str:
    """The usage checks that need no ML library, done first so a bad flag is reported at once;
    returns the parsed --batch-size."""
    from ..options import check_counts, check_dpi, check_instruction, check_token_bounds

    batch = parse_batch_size(batch_size)
    check_counts(batch, max_new_tokens)
    check_token_bounds(min_tokens, max_tokens)
    if dpi is not None:
        check_dpi(dpi)
    check_instruction(instruction)
    return batch


def instruction_text(value: str | None) -> str:
    """--instruction: the short-answer instruction unless given ('' for none)."""
    from ..options import SHORT_ANSWER_INSTRUCTION

    return SHORT_ANSWER_INSTRUCTION if value is None else value


def zoom_settings(zoom, gate_threshold, roi_threshold, roi_max_visual_tokens, explain=False, roi_native=False):
    from ..options import ZoomSettings

    return ZoomSettings(mode=zoom, gate_threshold=gate_threshold, roi_threshold=roi_threshold,
                        region_max_tokens=roi_max_visual_tokens, region_native=roi_native, explain=explain)
