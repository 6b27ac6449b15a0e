"""What a request may set (the `qzoom ask` options) and what the service was started with."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..documents import DEFAULT_DPI, check_page_spec
from ..errors import TooLarge, UsageError
from ..options import (
    SHORT_ANSWER_INSTRUCTION,
    ZoomSettings,
    check_counts,
    check_dpi,
    check_instruction,
    check_token_bounds,
)


@dataclass(frozen=True)
class AskOptions:
    """Per-request options, as `qzoom ask` takes them; the service's own flags are the defaults."""

    pages: str | None = None
    dpi: int = DEFAULT_DPI
    password: str | None = None
    zoom: str = "auto"
    gate_threshold: float | None = None
    roi_threshold: float | None = None
    roi_max_visual_tokens: int | None = None
    roi_native: bool = False
    explain: bool = False
    min_visual_tokens: int | None = None
    max_visual_tokens: int | None = None
    max_new_tokens: int | None = None
    instruction: str = SHORT_ANSWER_INSTRUCTION

    def __post_init__(self):
        check_counts(1, self.max_new_tokens)
        check_token_bounds(self.min_visual_tokens, self.max_visual_tokens)
        check_dpi(self.dpi)
        check_instruction(self.instruction)
        if self.pages is not None:
            check_page_spec(self.pages)  # its syntax, before any document
        self.zoom_settings()  # its own checks

    def zoom_settings(self) -> ZoomSettings:
        return ZoomSettings(mode=self.zoom, gate_threshold=self.gate_threshold, roi_threshold=self.roi_threshold,
                            region_max_tokens=self.roi_max_visual_tokens, region_native=self.roi_native,
                            explain=self.explain)

    def updated(self, values: dict[str, object]) -> AskOptions:
        """These options with a request's values (strings from a form, or JSON values) applied."""
        known = {f.name: f for f in fields(self)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UsageError(f"unknown option(s): {', '.join(unknown)}; known: {', '.join(known)}")
        return replace(self, **{name: _convert(name, value, known[name].type) for name, value in values.items()})


def _convert(name: str, value: object, annotation: str) -> object:
    """A form field's text (or a JSON value) as the option's type."""
    if value is None or value == "":
        if "None" in annotation:
            return None
        if annotation == "str":
            return ""
        raise UsageError(f"{name} needs a value")
    try:
        if annotation.startswith("bool"):
            return parse_bool(name, value)
        if annotation.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if annotation.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        kind = annotation.split(" ")[0]
        raise UsageError(f"{name} must be a {'number' if kind in ('int', 'float') else kind}, not {value!r}") from None


def parse_bool(name: str, value: object) -> bool:
    """A JSON boolean, or a form field's true/false, 1/0, yes/no, on/off."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise UsageError(f"{name} must be true or false, not {value!r}")
    return text in ("true", "1", "yes", "on")


@dataclass(frozen=True)
class ServeSettings:
    """How the service runs; `defaults` are the ask options its command line gave."""

    defaults: AskOptions = field(default_factory=AskOptions)
    root: Path | None = None
    max_upload_mb: float = 50.0
    max_pages: int = 100
    max_queue: int = 64
    batch_size: int = 8
    batch_wait_ms: float = 5.0
    api_key: str | None = None
    allow_remote_images: bool = False
    # per-request caps: beyond them a request would hold the engine for minutes
    max_questions: int = 32
    max_request_visual_tokens: int = 4096
    max_answer_tokens: int = 2048
    max_instruction_chars: int = 1000
    allowed_hosts: tuple[str, ...] | None = None  # Host names a keyless service answers; None: any
    body_timeout_s: float = 30.0  # the most a request may take to send its body (and its headers)
    served_model_name: str | None = None  # the model's name to clients; None: its hub id or folder name
    log_requests: bool = False  # one line per request on stderr

    def check_request(self, options: AskOptions, questions: int) -> None:
        """A request within the service's caps (413 beyond them)."""
        visual = [v for v in (options.min_visual_tokens, options.max_visual_tokens, options.roi_max_visual_tokens)
                  if v is not None]
        limits = ((questions, self.max_questions, "questions", "--max-questions"),
                  (max(visual, default=0), self.max_request_visual_tokens, "visual tokens",
                   "--max-request-visual-tokens"),
                  (options.max_new_tokens or 0, self.max_answer_tokens, "answer tokens", "--max-answer-tokens"),
                  (len(options.instruction), self.max_instruction_chars, "characters of instruction",
                   "--max-instruction-chars"))
        for asked, cap, what, flag in limits:
            if asked > cap:
                raise TooLarge(f"{asked} {what} asked for; this service takes at most {cap} per request ({flag})")

    @property
    def upload_limit(self) -> int:
        """--max-upload-mb in bytes."""
        return int(self.max_upload_mb * 2**20)

    @property
    def body_limit(self) -> int:
        """The most bytes a request may send: a document at the limit, base64 in JSON, and its fields."""
        return self.upload_limit * 4 // 3 + 2**16

    def __post_init__(self):
        counts = (self.max_queue, self.batch_size, self.max_pages, self.max_questions, self.max_request_visual_tokens,
                  self.max_answer_tokens, self.max_instruction_chars)
        if min(counts) < 1:
            raise UsageError("--max-queue, --batch-size, --max-pages, --max-questions, --max-request-visual-tokens, "
                             "--max-answer-tokens and --max-instruction-chars must be at least 1")
        if not (0 < self.max_upload_mb < math.inf and 0 <= self.batch_wait_ms < math.inf
                and 0 < self.body_timeout_s < math.inf):
            raise UsageError("--max-upload-mb and --body-timeout must be positive numbers and --batch-wait-ms a "
                             "number of at least 0")
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("the API key is empty (--api-key '' or an empty $QZOOM_API_KEY), which would let "
                             "anyone in; give a key, or none for a service on this machine only")
        if self.root is not None and not Path(self.root).is_dir():
            raise UsageError(f"--root {self.root} is not a folder")
