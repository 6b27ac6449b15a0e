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
    zoomed: bool = False


@dataclass
class ZoomInfo:
    """What the zoom stage did on the answering page.

    `mode` is what was asked (auto, always, never); `zoomed` whether a region was read;
    `region_head` 'trained' (SD-RPN twig layers) or 'base_layers' (training-free);
    `gate` {kind, score, threshold}: kind 'trained' (probability from the gate head) or
    'attention_lift' (training-free: attention share inside the box / its area share);
    `roi` the region read, in page pixels; `skipped_reason` why no region was read;
    `positions` 'aligned' (inside the page grid) or 'second_image'; `region_rule` how the map
    became the region read: 'qzoom' (one box around the cells above the threshold) or 'sd_rpn'
    (SD-RPN's components, mask and stretched crop, for its converted heads).
    """

    mode: str = "never"
    zoomed: bool = False
    region_head: str | None = None
    gate: dict | None = None
    roi: dict | None = None
    skipped_reason: str | None = None
    positions: str | None = None
    region_rule: str | None = None
    direct_answer: str | None = None
    zoom_answer: str | None = None
    overlay: str | None = None


@dataclass
class ModelInfo:
    id: str
    revision: str | None
    family: str
    device: str
    dtype: str
    attn: str
    decoder: str = "eager"  # eager, static_cache or cuda_graphs (runtime.DECODERS)


@dataclass
class BudgetInfo:
    min_tokens: int
    max_tokens: int
    visual_tokens: int
    roi_tokens: int = 0
    roi_max_tokens: int | None = None


@dataclass
class Timings:
    """Seconds this question cost, by stage.

    coarse_prefill_s covers the page-level prefill: every layer when no region is read, layers
    below the branch point when one is; fused_prefill_s the replay of the new suffix and the
    upper layers over the fused sequence.
    """

    render_s: float = 0.0
    preprocess_s: float = 0.0
    coarse_prefill_s: float = 0.0
    gate_s: float = 0.0
    region_s: float = 0.0
    region_encode_s: float = 0.0
    fused_prefill_s: float = 0.0
    decode_s: float = 0.0

    def add(self, other: Timings) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def total(self) -> float:
        return sum(getattr(self, name) for name in self.__dataclass_fields__)

    def rounded(self, digits: int = 6) -> Timings:
        return Timings(**{name: round(getattr(self, name), digits) for name in self.__dataclass_fields__})


@dataclass
class Stats:
    """Token counts of the answering page (visual = coarse + region) and totals over all pages;
    baseline_visual_tokens is what one page read at the region's resolution would cost. Times and
    `tokens_per_s` cover every page answered (all pages' output tokens over `time.decode_s`)."""

    latency_s: float
    visual_tokens: int
    coarse_visual_tokens: int
    region_visual_tokens: int
    baseline_visual_tokens: int
    prompt_tokens: int
    output_tokens: int
    tokens_per_s: float
    total_visual_tokens: int
    total_prompt_tokens: int
    total_output_tokens: int
    peak_mem_gib: float
    peak_mem_source: str
    time: Timings


def decode_speed(tokens: int, seconds: float) -> float:
    return round(tokens / seconds, 3) if seconds > 0 else 0.0


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
    reasoning: str | None = None  # thinking checkpoints: the reasoning before the answer, kept apart
    page: int | None = None
    candidates: list[Candidate] = field(default_factory=list)
    zoom: ZoomInfo = field(default_factory=ZoomInfo)
    model: ModelInfo | None = None
    budget: BudgetInfo | None = None
    stats: Stats | None = None
    error: ErrorInfo | None = None
    warnings: list[str] = field(default_factory=list)
    run: dict | None = None  # `qzoom run`: the settings that produced it (a resume must match them)
    schema: str = SCHEMA

    @classmethod
    def failure(cls, id: str, question: str, input: InputInfo | None, error: QZoomError) -> Result:
        return cls(id=id, status="error", input=input, question=question,
                   error=ErrorInfo(code=error.code, message=error.message))

    def to_dict(self) -> dict:
        record = asdict(self)
        return {"schema": record.pop("schema"), **record}

    def to_json(self, indent: int | None = None) -> str:
        return json_text(self.to_dict(), indent)


# Characters a reader splitting on line breaks other than "\n" (str.splitlines, JavaScript) would cut
# a record at: kept escaped, so one record is always one line.
_LINE_BREAKS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def json_text(record: dict, indent: int | None = None) -> str:
    """A record as JSON with its text readable (UTF-8, not \\u escapes), but for line separators."""
    return json.dumps(record, ensure_ascii=False, indent=indent).translate(_LINE_BREAKS)
