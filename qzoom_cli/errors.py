"""User-facing failures, each carrying the exit code and the result-record error code it maps to.

Exit codes (documented in the README): 0 ok, 1 internal error, 2 usage error, 3 input error,
4 model or environment error, 5 batch finished with failed rows, 6 results computed but an output
could not be written (they went to stdout), 130 interrupted.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_MODEL = 4
EXIT_PARTIAL = 5
EXIT_OUTPUT = 6
EXIT_INTERRUPTED = 130


def first_line(exc: BaseException) -> str:
    """An exception's message, first line only (library messages run on with advice and tracebacks)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's type and whole message on one line, whitespace folded (a validator's reason
    is on its second line)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}" if text else type(exc).__name__


class QZoomError(Exception):
    """Base class: `code` names the failure in JSON records, `exit_code` is what the CLI returns."""

    code = "internal"
    exit_code = EXIT_INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UsageError(QZoomError):
    code = "usage"
    exit_code = EXIT_USAGE


class ResumeMismatch(UsageError):
    """A rerun whose settings differ from the saved work it would continue."""

    code = "resume_mismatch"


class NothingToLearn(UsageError):
    """Training data that leaves a stage nothing to learn from (`train all` carries on without it)."""

    code = "nothing_to_learn"


class InputError(QZoomError):
    code = "input_error"
    exit_code = EXIT_INPUT


class FileNotFound(InputError):
    code = "file_not_found"


class UnsupportedType(InputError):
    code = "unsupported_type"


class PdfEncrypted(InputError):
    code = "pdf_encrypted"


class PdfCorrupt(InputError):
    code = "pdf_corrupt"


class ImageCorrupt(InputError):
    code = "image_corrupt"


class PageOutOfRange(InputError):
    code = "page_out_of_range"


class PageShape(InputError):
    """A page or region whose size cannot be read (empty, or beyond the aspect-ratio limit)."""

    code = "page_shape"


class DamagedFile(InputError):
    """A file an earlier run wrote (a cache entry, a checkpoint, progress) that cannot be read back."""

    code = "damaged_file"


class TooLarge(InputError):
    """A document over the service's upload or page limit."""

    code = "too_large"


class ModelError(QZoomError):
    code = "model_error"
    exit_code = EXIT_MODEL


class ModelNotAvailable(ModelError):
    code = "model_not_available"


class UnsupportedModel(ModelError):
    code = "unsupported_model"


class IncompatibleCheckpoint(ModelError):
    """The checkpoint's files disagree with its family (chat template, processor, end token)."""

    code = "incompatible_checkpoint"


class AdapterMismatch(ModelError):
    """A zoom adapter or checkpoint's zoom weights do not fit the base model or their own config."""

    code = "adapter_mismatch"


class EnvironmentProblem(ModelError):
    code = "environment"


class OutOfMemory(ModelError):
    code = "oom"


class Busy(ModelError):
    """`qzoom serve`'s queue is full (or it is shutting down); the request may be sent again shortly."""

    code = "busy"


class OutputError(QZoomError):
    """The work is done but a result file could not be written; the results went to stdout instead."""

    code = "output_error"
    exit_code = EXIT_OUTPUT
