"""Training settings and their defaults, importable without torch so the CLI checks them at once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import UsageError
from ..options import check_token_bounds, parse_counts

DEFAULT_LADDER = (64, 144, 256, 400, 576, 768, 1024)
DEFAULT_VIEW_TOKENS = 576
SEED = 42  # every stage's default seed, as the reference's scripts use


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
    seed: int = SEED

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


DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Qwen3.5's linear-attention (Gated DeltaNet) projections: tuned only when asked for.
LINEAR_ATTENTION_LINEARS = ("in_proj_qkv", "in_proj_z", "out_proj")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: tuple[str, ...] = DECODER_LINEARS  # linear layers inside each decoder layer, by name

    def __post_init__(self):
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise UsageError("--lora-rank must be at least 1, --lora-alpha positive and --lora-dropout in [0, 1)")
        known = DECODER_LINEARS + LINEAR_ATTENTION_LINEARS
        unknown = sorted(set(self.targets) - set(known))
        if not self.targets or unknown:
            raise UsageError(f"--lora-targets takes names among {', '.join(known)}"
                             + (f" (not {', '.join(unknown)})" if unknown else ""))


@dataclass(frozen=True)
class FineTuneSettings:
    """`train sft`: how pairs are mined and what is learned from them."""

    min_visual_tokens: int | None = None       # the coarse page, mined and trained alike [the model's zoom budget]
    max_visual_tokens: int | None = None
    pseudo_reference_tokens: int | None = None  # the model's own best read, without references [its plain budget]
    lora: LoraSettings = field(default_factory=LoraSettings)
    aligned: bool | None = None    # region positions inside the page's grid (the published scheme) [when the
                                   # family has grid positions; LLaVA's continue 1-D]
    mix: float = 0.0               # improvements trained per regression
    held_out: float = 0.1          # share of the chosen pairs kept apart to measure
    box_noise: float = 0.0
    judge: str | None = None       # a model deciding right/wrong instead of the metric
    free_answers: bool = False
    max_new_tokens: int = 32
    metric: str = "auto"
    dpi: int = 200
    seed: int = SEED

    def __post_init__(self):
        if self.mix < 0 or not 0 <= self.held_out < 1 or not 0 <= self.box_noise <= 1:
            raise UsageError("--mix must be at least 0, --held-out in [0, 1) and --box-noise in [0, 1]")
        check_token_bounds(self.min_visual_tokens, self.max_visual_tokens)
        if self.pseudo_reference_tokens is not None and self.pseudo_reference_tokens < 1:
            raise UsageError("--pseudo-reference-tokens must be at least 1")


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
