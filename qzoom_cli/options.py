"""What a user asks for, checked without loading any ML library, so usage errors come at once:
questions, counts, visual-token bounds, zoom options and their defaults, and the answer instruction."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .budget import MAX_VISUAL_TOKENS, VisualBudget
from .errors import UsageError

SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."

# The most a request may ask for: beyond these a model would be held for minutes (or never answer),
# so they are refused at once (the visual-token cap lives with the budgets).
MAX_NEW_TOKENS = 32768
MAX_QUESTION_CHARS = 8192
MAX_INSTRUCTION_CHARS = 4096
MAX_DPI = 1200
MODES = ("auto", "always", "never")
STOCK = "stock"  # `qzoom bench --modes`: transformers' generate() on the same rows, the yardstick

# Thresholds when neither the call, the adapter nor the model card sets one: a trained gate's
# probability and sigmoid region map (the published values), and without them the attention
# lift and the region map scaled to its own peak.
TRAINED_GATE_THRESHOLD = 0.05
TRAINED_ROI_THRESHOLD = 0.125
LIFT_THRESHOLD = 2.0
RELATIVE_ROI_THRESHOLD = 0.5


def with_instruction(question: str, instruction: str | None = SHORT_ANSWER_INSTRUCTION) -> str:
    """The text the model is asked: the question, then the answer instruction on its own line."""
    return f"{question}\n{instruction}" if instruction else question


def parse_modes(text: str, allowed: tuple[str, ...] = MODES) -> list[str]:
    """'never,auto' -> ['never', 'auto'] (--compare, --modes)."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in allowed]
    if not modes or unknown:
        raise UsageError(f"modes are a comma list of {', '.join(allowed)}; got {text!r}")
    return modes


def parse_counts(text: str, flag: str) -> list[int]:
    """'256,576,1024' -> [256, 576, 1024] (--budgets, --ladder), each at least 1."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes whole numbers like 64,256,1024; got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{flag} needs numbers of at least 1; got {text!r}")
    return values


def changed_settings(before: dict, now: dict) -> list[str]:
    """The names whose values differ between two settings dicts (one missing counts as differing):
    what a resume refuses to continue across."""
    return sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))


def check_questions(questions: str | list[str]) -> list[str]:
    questions = [questions] if isinstance(questions, str) else list(questions)
    if not questions:
        raise UsageError("no question given")
    for question in questions:
        if not question or not question.strip():
            raise UsageError("empty question: ask something about the document")
        if len(question) > MAX_QUESTION_CHARS:
            raise UsageError(f"a question of {len(question)} characters; at most {MAX_QUESTION_CHARS} are read")
    return [q.strip() for q in questions]


def check_instruction(instruction: str | None) -> None:
    if instruction is not None and len(instruction) > MAX_INSTRUCTION_CHARS:
        raise UsageError(f"--instruction of {len(instruction)} characters; at most {MAX_INSTRUCTION_CHARS}")


def check_dpi(dpi: int) -> None:
    if not 1 <= dpi <= MAX_DPI:
        raise UsageError(f"--dpi must be between 1 and {MAX_DPI}, not {dpi}")


def check_counts(batch_size: int | str, max_new_tokens: int | None) -> None:
    """A batch size ('auto' or >= 1) and an answer length (None: the model's default, or >= 1)."""
    if (batch_size != "auto" and batch_size < 1) or (max_new_tokens is not None and max_new_tokens < 1):
        raise UsageError("--batch-size and --max-new-tokens must be at least 1")
    if max_new_tokens is not None and max_new_tokens > MAX_NEW_TOKENS:
        raise UsageError(f"--max-new-tokens must be at most {MAX_NEW_TOKENS}, not {max_new_tokens}")


def check_token_bounds(min_tokens: int | None, max_tokens: int | None) -> None:
    """--min/--max-visual-tokens as given (either may be left to the model's default)."""
    for name, value in (("--min-visual-tokens", min_tokens), ("--max-visual-tokens", max_tokens)):
        if value is not None and value < 1:
            raise UsageError(f"{name} must be positive")
        if value is not None and value > MAX_VISUAL_TOKENS:
            raise UsageError(f"{name} must be at most {MAX_VISUAL_TOKENS}, not {value}")
    if min_tokens is not None and max_tokens is not None:
        VisualBudget(min_tokens, max_tokens)


@dataclass
class ZoomSettings:
    """Per-call zoom options; None thresholds mean the engine's defaults."""

    mode: str = "auto"
    gate_threshold: float | None = None
    roi_threshold: float | None = None
    region_max_tokens: int | None = None
    region_native: bool = False
    explain: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise UsageError(f"unknown zoom mode {self.mode!r}: use {', '.join(MODES)}")
        if self.region_max_tokens is not None and not 1 <= self.region_max_tokens <= MAX_VISUAL_TOKENS:
            raise UsageError(f"--roi-max-visual-tokens must be between 1 and {MAX_VISUAL_TOKENS}")
        # scores are probabilities or attention lifts (>= 0); region maps are scaled to 0..1
        if self.gate_threshold is not None and not 0 <= self.gate_threshold < math.inf:
            raise UsageError(f"--gate-threshold must be a finite number >= 0, not {self.gate_threshold}")
        if self.roi_threshold is not None and not 0 <= self.roi_threshold <= 1:
            raise UsageError(f"--roi-threshold must be between 0 and 1, not {self.roi_threshold}")

    def region_budget(self, page_budget: VisualBudget, native_tokens: int | None = None) -> VisualBudget:
        """The page budget, with its maximum replaced by `region_max_tokens` when set; with
        `region_native`, also capped at `native_tokens` (the crop at its source resolution)."""
        high = page_budget.max_tokens if self.region_max_tokens is None else self.region_max_tokens
        if self.region_native and native_tokens is not None:
            high = max(1, min(high, native_tokens))
        return VisualBudget(min(page_budget.min_tokens, high), high)
