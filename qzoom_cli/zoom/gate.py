"""The dynamic gate: does this question need a closer look at the page?

T decoder layers on the base model's layer-K hidden states, then a linear head on the last
prompt token (no final norm): p = sigmoid(w . h + b). Zoom when p >= threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..backbones import Backbone


def gate_logits(backbone: Backbone, layers: Sequence[nn.Module], head: nn.Linear, hidden: torch.Tensor,
                positions: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[batch] gate logits at each sample's last token."""
    hidden = backbone.run_modules(layers, hidden, positions, attention_mask)
    return head(hidden[:, -1]).float()[:, 0]


def gate_probabilities(backbone: Backbone, layers: Sequence[nn.Module], head: nn.Linear, hidden: torch.Tensor,
                       positions: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[float]:
    return torch.sigmoid(gate_logits(backbone, layers, head, hidden, positions, attention_mask)).tolist()
