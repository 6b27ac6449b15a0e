"""The `qzoom.result/v1` record: one per answered (or failed) question, the same shape everywhere.

Field meanings are documented in the README ("Result record"). Boxes, when present, are
`[x1, y1, x2, y2]` in page pixels (top-left origin, exclusive ends) of the rendered page.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .errors import QZoomError

SCHEMA = "qzoom.result/v1"


@dataclass
class InputInfo:
    file: str
    sha256: str
    kind: str
    pages: list[int]
    dpi: int | None
    warnings: list[str] = field(default_factory=list)


@dataclass
class Candidate:
    """One page's answer. `score` is the mean natural-log probability of the generated tokens."""

    page: int
    answer: str
    score: float
    output_tokens: int
    visual_tokens: int
    truncated: bool


@dataclass
class ZoomInfo:
    """What the zoom stage did; `mode` 'never' means the page was answered at one resolution."""

    mode: str = "never"
    zoomed: bool = False
    gate: dict | None = None
    roi: dict | None = None


@dataclass
class ModelInfo:
    id: str
    revision: str | None
    family: str
    device: str
    dtype: str
    attn: str


@dataclass
class BudgetInfo:
    min_tokens: int
    max_tokens: int
    visual_tokens: int
    roi_tokens: int = 0


@dataclass
class Timings:
    """Seconds spent on this question: rendering, resize + vision encoding, prefill, decode."""

    render_s: float = 0.0
    preprocess_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    def add(self, other: Timings) -> None:
        self.render_s += other.render_s
        self.preprocess_s += other.preprocess_s
        self.prefill_s += other.prefill_s
        self.decode_s += other.decode_s

    @property
    def total(self) -> float:
        return self.render_s + self.preprocess_s + self.prefill_s + self.decode_s


@dataclass
class Stats:
    latency_s: float
    visual_tokens: int
    prompt_tokens: int
    output_tokens: int
    tokens_per_s: float
    total_visual_tokens: int
    total_prompt_tokens: int
    peak_mem_gib: float
    peak_mem_source: str
    time: Timings


@dataclass
class ErrorInfo:
    code: str
    message: str


@dataclass
class Result:
    id: str
    status: str
    input: InputInfo | None
    question: str
    answer: str | None = None
    page: int | None = None
    candidates: list[Candidate] = field(default_factory=list)
    zoom: ZoomInfo = field(default_factory=ZoomInfo)
    model: ModelInfo | None = None
    budget: BudgetInfo | None = None
    stats: Stats | None = None
    error: ErrorInfo | None = None
    warnings: list[str] = field(default_factory=list)
    schema: str = SCHEMA

    @classmethod
    def failure(cls, id: str, question: str, input: InputInfo | None, error: QZoomError) -> Result:
        return cls(id=id, status="error", input=input, question=question,
                   error=ErrorInfo(code=error.code, message=error.message))

    def to_dict(self) -> dict:
        record = asdict(self)
        return {"schema": record.pop("schema"), **record}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=indent)
