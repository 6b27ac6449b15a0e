"""SD-RPN region scores: where in the page the question's last token looks.

For each image token j: mean over heads h of q_h(last prompt token) . k_h(j) / sqrt(head_dim),
with the rotary positions of the prompt, computed by the region head's last layer after its
other layers have run on the base model's layer-K hidden states. Computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..backbones import Backbone, ImageBlock


def region_logits(backbone: Backbone, layers: Sequence[nn.Module], hidden: torch.Tensor, positions: torch.Tensor,
                  blocks: list[ImageBlock], attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """[rows, cols] logits of each sample's image block, queried by its last token."""
    if len(layers) > 1:
        hidden = backbone.run_modules(layers[:-1], hidden, positions, attention_mask)
    queries, keys = backbone.query_key(layers[-1], hidden, positions)
    maps = []
    for b, block in enumerate(blocks):
        query = queries[b, :, -1].float()                          # [heads, head_dim]
        image_keys = keys[b, :, block.start:block.stop].float()    # [heads, tokens, head_dim]
        scores = torch.einsum("hd,hnd->hn", query, image_keys) / math.sqrt(query.shape[-1])
        maps.append(scores.mean(dim=0).view(block.rows, block.cols))
    return maps
