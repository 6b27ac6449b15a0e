"""Training settings and their defaults, importable without torch so the CLI checks them at once."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UsageError
from ..options import parse_counts

DEFAULT_LADDER = (64, 144, 256, 400, 576, 768, 1024)
DEFAULT_VIEW_TOKENS = 576
GATE_SEED = 42


@dataclass
class TrainOptions:
    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 4
    grad_accum: int = 1
    max_samples: int | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 0
    gradient_checkpointing: bool = False
    seed: int = 0

    def __post_init__(self):
        if min(self.epochs, self.batch_size, self.grad_accum) < 1 or self.lr <= 0 or self.save_every < 0 \
                or (self.max_samples is not None and self.max_samples < 1):
            raise UsageError("--epochs, --batch-size, --grad-accum and --max-samples must be at least 1, "
                             "--save-every at least 0 and --lr positive")


@dataclass(frozen=True)
class LabelSettings:
    """Pseudo-label thresholds (see pseudo_labels.py)."""

    sink_threshold: float = 1e-2
    fg_ratio: float = 0.25
    bg_ratio: float = 0.05
    max_area: float = 0.5
    peak_floor: float = 5e-3


QUESTIONS_PER_PAGE = 5  # `train questions`
QUESTION_MAX_TOKENS = 160  # room for a numbered list of short questions


def parse_ladder(text: str) -> tuple[int, ...]:
    """--ladder '64,256,1024': at least three increasing visual-token budgets."""
    rungs = tuple(parse_counts(text, "--ladder"))
    if len(rungs) < 3 or list(rungs) != sorted(set(rungs)):
        raise UsageError(f"--ladder needs at least three increasing budgets; got {text!r}")
    return rungs


def view_side(view_tokens: int) -> int:
    """--view-tokens: the side of the square teacher/student token grid (576 -> 24)."""
    if view_tokens < 4 or math.isqrt(view_tokens) ** 2 != view_tokens:
        raise UsageError(f"--view-tokens must be a square number like 576 (24 x 24), got {view_tokens}")
    return math.isqrt(view_tokens)
