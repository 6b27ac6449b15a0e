"""What a request may set (the `qzoom ask` options) and what the service was started with."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..documents import DEFAULT_DPI
from ..errors import UsageError
from ..options import SHORT_ANSWER_INSTRUCTION, ZoomSettings, check_counts, check_token_bounds


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
        if self.dpi < 1:
            raise UsageError("dpi must be positive")
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

    @property
    def upload_limit(self) -> int:
        """--max-upload-mb in bytes."""
        return int(self.max_upload_mb * 2**20)

    @property
    def body_limit(self) -> int:
        """The most bytes a request may send: a document at the limit, base64 in JSON, and its fields."""
        return self.upload_limit * 4 // 3 + 2**16

    def __post_init__(self):
        if self.max_queue < 1 or self.batch_size < 1 or self.max_pages < 1:
            raise UsageError("--max-queue, --batch-size and --max-pages must be at least 1")
        if self.max_upload_mb <= 0 or self.batch_wait_ms < 0:
            raise UsageError("--max-upload-mb must be positive and --batch-wait-ms at least 0")
        if self.root is not None and not Path(self.root).is_dir():
            raise UsageError(f"--root {self.root} is not a folder")
