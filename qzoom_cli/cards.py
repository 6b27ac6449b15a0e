"""Model cards: one small TOML file per supported checkpoint under `models/`.

A card names the hub id, the family, its patch factor, the default visual-token budget without
zoom (`[budget]`), the zoom defaults (`[zoom]`: branch layer K, depth T, thresholds of trained
checkpoints, coarse budget) and, for checkpoints that reason on request, whether they do by
default (`thinking`), so `qzoom ask` can start without flags. Models without a card still
work with generic defaults.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EnvironmentProblem

GENERIC_BUDGET = (256, 1280)


@dataclass(frozen=True)
class ModelCard:
    id: str
    family: str
    patch_factor: int
    min_visual_tokens: int
    max_visual_tokens: int
    description: str = ""
    default: bool = False
    processor: str | None = None
    system_prompt: str | None = None
    max_new_tokens: int | None = None
    thinking: bool = False
    zoom: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)


def cards_dir() -> Path:
    """`qzoom_cli/models` inside an installed wheel, `models/` beside the package in a checkout."""
    packaged = Path(__file__).parent / "models"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "models"


def _parse(path: Path) -> ModelCard:
    try:
        data = tomllib.loads(path.read_text())
        budget = data.pop("budget", {})
        known = {k: data.pop(k) for k in ("id", "family", "patch_factor", "description", "default", "processor",
                                          "system_prompt", "max_new_tokens", "thinking", "zoom", "training")
                 if k in data}
        return ModelCard(min_visual_tokens=budget.get("min_visual_tokens", GENERIC_BUDGET[0]),
                         max_visual_tokens=budget.get("max_visual_tokens", GENERIC_BUDGET[1]), **known)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, TypeError, AttributeError) as exc:
        raise EnvironmentProblem(f"model card {path} is damaged ({exc}); reinstall qzoom") from None


def load_cards() -> list[ModelCard]:
    return [_parse(path) for path in sorted(cards_dir().glob("*.toml"))]


def default_card() -> ModelCard:
    defaults = [card for card in load_cards() if card.default]
    if len(defaults) != 1:
        raise EnvironmentProblem(f"expected exactly one default model card in {cards_dir()}, found {len(defaults)}; "
                                 "reinstall qzoom")
    return defaults[0]


def find_card(ref: str) -> ModelCard | None:
    """The card whose hub id is `ref` (case-insensitive), if any."""
    return next((card for card in load_cards() if card.id.lower() == ref.lower()), None)
