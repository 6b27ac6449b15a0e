"""The `qzoom` command: parses flags, calls the library, prints results; errors become exit codes
in one place, the root command's error boundary.

Results go to stdout; logs, warnings, progress and panels go to stderr. One module per command
group (ask, run, scoring: eval and bench, train, serve, models and doctor), their shared options in
`common`.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from typer._click import exceptions as parse_errors  # typer's own click: what its parser raises
from typer.core import TyperArgument, TyperGroup, TyperOption
from typer.exceptions import TyperException

from .. import __version__
from ..errors import EXIT_INTERNAL, EXIT_INTERRUPTED, QZoomError
from .ask import ask
from .common import VERBOSE_KEY, flag
from .models import doctor, models_app
from .run import run
from .scoring import bench, evaluate_command
from .serve import serve
from .train import train_app

_METAVARS = {"int": "N", "float": "NUMBER", "str": "TEXT"}


class _NamedArgument(TyperArgument):
    """An argument shown by its name alone (PATH, QUESTIONS...), as in `qzoom ask PATH QUESTIONS...`,
    rather than typer's `{path} <str>`."""

    def _usage_display_name(self) -> str:
        return self._rich_display_name() if self.required else f"[{self._rich_display_name()}]"

    def _rich_display_name(self) -> str:
        return self.name.upper() + ("..." if self.nargs == -1 else "")

    def display_type_rich(self, ctx: typer.Context) -> None:
        return None


OLD_SPELLINGS = ("--out", "--page-range")  # still read, no longer shown: one spelling per flag in --help


class _QuietAliasOption(TyperOption):
    """An option whose old spelling still works but is left out of its help line."""

    def get_help_record(self, ctx: typer.Context):
        every = self.opts
        self.opts = [name for name in every if name not in OLD_SPELLINGS]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = every


def _readable(command) -> None:
    """Help that names what a value is (PATH, N, TEXT, auto|always|never) rather than Python's types
    (<str>, <list[str]>), and each flag by its one current spelling; an explicit metavar (choices,
    or none for a flag) stays. Subcommands too. (The parameters are the same; only shown otherwise.)"""
    for param in command.params:
        if isinstance(param, TyperArgument):
            param.__class__ = _NamedArgument
            continue
        if param.metavar is None:
            param.metavar = _METAVARS.get(param.bare_type(), param.bare_type().upper())
        if len(param.opts) > 1 and set(param.opts) & set(OLD_SPELLINGS):
            param.__class__ = _QuietAliasOption
    for sub in getattr(command, "commands", {}).values():
        _readable(sub)


class _ErrorBoundary(TyperGroup):
    """Every command runs inside this: a QZoomError becomes its one-line message and exit code,
    Ctrl-C exit 130, anything else an internal error (a bug; the traceback with -v)."""

    def get_command(self, ctx: typer.Context, name: str):
        command = super().get_command(ctx, name)
        if command is not None:
            _readable(command)
        return command

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):  # --help, exit codes, usage errors: typer's own
            raise
        except QZoomError as exc:
            _traceback_if_verbose(ctx)
            print(f"qzoom: error: {exc.message}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            print("qzoom: interrupted", file=sys.stderr)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:
            _traceback_if_verbose(ctx)
            first_line = (str(exc).strip().splitlines() or [""])[0]
            print(f"qzoom: internal error: {type(exc).__name__}: {first_line} (rerun with -v for details)",
                  file=sys.stderr)
            raise typer.Exit(EXIT_INTERNAL) from None


def _traceback_if_verbose(ctx: typer.Context) -> None:
    if ctx.meta.get(VERBOSE_KEY):
        traceback.print_exc(file=sys.stderr)


app = typer.Typer(
    name="qzoom",
    help="Answer questions about PDFs and images with a local vision-language model.",
    cls=_ErrorBoundary,
    no_args_is_help=True,
    rich_markup_mode=None,  # click's own help: wraps long text instead of cutting it, at any width
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version_callback(value: bool) -> None:
    if value:
        print(f"qzoom {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, flag("--version", callback=_version_callback, is_eager=True,
                                        help="Print the version and exit.")] = False) -> None:
    """qzoom: query-aware zoom for document question answering."""


app.command(short_help="Answer questions about one PDF or image.")(ask)
app.command(short_help="Answer a manifest of questions (JSONL), resumable.")(run)
app.command("eval", short_help="Score answers against references, per zoom mode.")(evaluate_command)
app.command(short_help="Speed against accuracy across visual-token budgets.")(bench)
app.add_typer(train_app, name="train")
app.command(short_help="Answer over HTTP (qzoom's API, OpenAI's chat API, a page).")(serve)
app.command(short_help="Versions, devices, flash-attention, the model cache.")(doctor)
app.add_typer(models_app, name="models")


def main() -> None:
    """Run the command; a flag or argument it cannot parse is one `qzoom: error:` line (exit 2), as
    every other error is, not a box."""
    try:
        code = app(standalone_mode=False, prog_name="qzoom")
    except parse_errors.NoArgsIsHelpError as exc:  # a bare group: its help
        exc.show()
        code = exc.exit_code
    except parse_errors.UsageError as exc:
        print(f"qzoom: error: {_usage_message(exc)}", file=sys.stderr)
        code = exc.exit_code
    except parse_errors.ClickException as exc:
        print(f"qzoom: error: {exc.format_message()}", file=sys.stderr)
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("qzoom: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code or 0)


def _usage_message(exc: parse_errors.UsageError) -> str:
    """The parser's complaint in one line, with where to look; an 'option' that is an existing
    file (a name starting with '-') gets the way to pass it."""
    message = " ".join(exc.format_message().split())
    command = exc.ctx.command_path if exc.ctx is not None else "qzoom"
    if isinstance(exc, parse_errors.NoSuchOption):
        files = [arg for arg in sys.argv[1:] if arg.startswith("-") and arg != "-" and Path(arg).exists()]
        if files:
            return (f"{message}; {files[0]} is a file: put it after '--' so it is not read as an option "
                    f"({command} -- {files[0]} ...), or write ./{files[0]}")
    return f"{message} (see {command} --help)"
