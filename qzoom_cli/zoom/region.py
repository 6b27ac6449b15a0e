"""SD-RPN region scores: where in the page the question's last token looks.

For each image token j: mean over heads h of q_h(last prompt token) . k_h(j) / sqrt(head_dim),
with the rotary positions of the prompt, computed by the region head's last layer after its
other layers have run on the base model's layer-K hidden states. Computed in float32.

Cells that soak up attention whatever the question (attention sinks) are marked by the family's
rule (`FamilyLayout.attention_sink`): the top-left corner of large grids (Qwen2.5-VL), or the
cells the first prompt token attends to strongly (Qwen3-VL: mean over heads of head 0's query of
the first token against each head's keys, as the reference computes it; sigmoid >= 0.75 is a sink).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..backbones import Backbone, ImageBlock
from .geometry import sink_mask

FIRST_TOKEN_SINK = 0.75


@dataclass
class RegionMap:
    logits: torch.Tensor  # [rows, cols]
    keep: torch.Tensor    # [rows, cols] bool: False on attention-sink cells


def first_token_keep(first_query: torch.Tensor, image_keys: torch.Tensor) -> torch.Tensor:
    """[tokens] True where the first token's head-0 query [head_dim], scored against every head's
    keys [heads, tokens, head_dim] and averaged over heads, stays below the sink probability."""
    logits = torch.einsum("d,hnd->hn", first_query, image_keys)  # pragma: no mutate (einsum letters: any case)
    scores = logits / math.sqrt(first_query.shape[-1])
    return torch.sigmoid(scores.mean(dim=0)) < FIRST_TOKEN_SINK  # pragma: no mutate (a tie has probability zero)


def region_logits(backbone: Backbone, layers: Sequence[nn.Module], hidden: torch.Tensor, positions: torch.Tensor,
                  blocks: list[ImageBlock], attention_mask: torch.Tensor | None = None) -> list[RegionMap]:
    """Each sample's image block scored by its last token, with the family's sink cells marked."""
    if len(layers) > 1:
        hidden = backbone.run_modules(layers[:-1], hidden, positions, attention_mask)
    queries, keys = backbone.query_key(layers[-1], hidden, positions)
    first = attention_mask.argmax(dim=1).tolist() if attention_mask is not None else [0] * len(blocks)
    maps = []
    for b, block in enumerate(blocks):
        query = queries[b, :, -1].float()                          # [heads, head_dim]
        image_keys = keys[b, :, block.start:block.stop].float()    # [heads, tokens, head_dim]
        scores = torch.einsum("hd,hnd->hn", query, image_keys) / math.sqrt(query.shape[-1])
        if backbone.layout.attention_sink == "first_token":
            keep = first_token_keep(queries[b, 0, first[b]].float(), image_keys).view(block.rows, block.cols)
        else:
            keep = sink_mask(block.rows, block.cols).to(scores.device)
        maps.append(RegionMap(scores.mean(dim=0).view(block.rows, block.cols), keep))
    return maps
