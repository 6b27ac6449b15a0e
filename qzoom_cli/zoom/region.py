"""SD-RPN region scores: where in the page the question's last token looks.

For each image token j: mean over heads h of q_h(last prompt token) . k_h(j) / sqrt(head_dim),
with the rotary positions of the prompt (unless the head scores without them), computed by the
region head's last layer after its other layers (and its norm, if it has one) have run on the
base model's layer-K hidden states. Computed in float32.

Cells that soak up attention whatever the question (attention sinks) are marked by the family's
rule (`FamilyLayout.attention_sink`): the top-left corner of large grids (Qwen2.5-VL), or the
cells the first prompt token attends to strongly (Qwen3-VL: mean over heads of head 0's query of
the first token against each head's keys, as the reference computes it; sigmoid >= 0.75 is a sink).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..backbones import Backbone, ImageBlock
from .geometry import sink_mask

FIRST_TOKEN_SINK = 0.75


@dataclass
class RegionHead:
    """What scores a page's cells: decoder layers (the last one only lends its queries and keys),
    an optional norm on the others' output (SD-RPN's LLaVA `twig_norm`), and whether the queries
    and keys get the rotary embedding (SD-RPN's LLaVA head scores without it)."""

    layers: list[nn.Module]
    norm: nn.Module | None = None
    rotary: bool = True


@dataclass
class RegionMap:
    logits: torch.Tensor  # [rows, cols]
    keep: torch.Tensor    # [rows, cols] bool, on the logits' device: False on attention-sink cells


def scoring_layer_problem(backbone: Backbone, branch_layer: int, depth: int) -> str | None:
    """Why a region head branching at `branch_layer` with `depth` layers cannot score pages on this
    model (it runs past the top, or its last layer has no keys: a linear-attention layer of a
    hybrid stack), or None."""
    last = branch_layer + depth - 1
    if branch_layer < 1 or depth < 1 or last >= backbone.num_layers:
        return (f"a region head of layers K..K+T-1 = {branch_layer}..{last} (K={branch_layer}, T={depth}) does not "
                f"fit a {backbone.num_layers}-layer model")
    keys = backbone.key_layers
    if last in keys:
        return None
    fits = [k - depth + 1 for k in keys if k - depth + 1 >= 1]
    return (f"the region head's last layer K+T-1 = {last} (K={branch_layer}, T={depth}) is a linear-attention layer "
            f"of {backbone.family}, which has no keys to score a page with; its full-attention layers are "
            f"{', '.join(map(str, keys))}, so with T={depth} choose K among {', '.join(map(str, fits))}")


def first_token_keep(first_query: torch.Tensor, image_keys: torch.Tensor) -> torch.Tensor:
    """[tokens] True where the first token's head-0 query [head_dim], scored against every head's
    keys [heads, tokens, head_dim] and averaged over heads, stays below the sink probability."""
    logits = torch.einsum("d,hnd->hn", first_query, image_keys)  # pragma: no mutate (einsum letters: any case)
    scores = logits / math.sqrt(first_query.shape[0])
    return torch.sigmoid(scores.mean(dim=0)) < FIRST_TOKEN_SINK  # pragma: no mutate (a tie has probability zero)


def region_logits(backbone: Backbone, head: RegionHead, hidden: torch.Tensor, positions: torch.Tensor,
                  blocks: list[ImageBlock], attention_mask: torch.Tensor | None = None) -> list[RegionMap]:
    """Each sample's image block scored by its last token, with the family's sink cells marked."""
    if len(head.layers) > 1:  # pragma: no mutate (only speed: an empty stack changes nothing)
        hidden = backbone.run_modules(head.layers[:-1], hidden, positions, attention_mask)
    if head.norm is not None:
        hidden = head.norm(hidden)
    queries, keys = backbone.query_key(head.layers[-1], hidden, positions, rotary=head.rotary)
    first = attention_mask.argmax(dim=1).tolist() if attention_mask is not None else [0] * len(blocks)
    maps = []
    for b, block in enumerate(blocks):
        query = queries[b, :, -1].float()                          # [heads, head_dim]
        image_keys = keys[b, :, block.start:block.stop].float()    # [heads, tokens, head_dim]
        logits = torch.einsum("hd,hnd->hn", query, image_keys)  # pragma: no mutate (einsum letters: any case)
        scores = logits / math.sqrt(query.shape[1])
        if backbone.layout.attention_sink == "first_token":
            keep = first_token_keep(queries[b, 0, first[b]].float(), image_keys).view(block.rows, block.cols)
        else:
            keep = sink_mask(block.rows, block.cols)
            keep = keep.to(scores.device)  # pragma: no mutate (one device in the tests)
        maps.append(RegionMap(scores.mean(dim=0).view(block.rows, block.cols), keep))
    return maps
