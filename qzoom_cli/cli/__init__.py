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
from typer.core import TyperGroup
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


class _ErrorBoundary(TyperGroup):
    """Every command runs inside this: a QZoomError becomes its one-line message and exit code,
    Ctrl-C exit 130, anything else an internal error (a bug; the traceback with -v)."""

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


app.command()(ask)
app.command()(run)
app.command("eval")(evaluate_command)
app.command()(bench)
app.add_typer(train_app, name="train")
app.command()(serve)
app.command()(doctor)
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
