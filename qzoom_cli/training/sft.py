"""Targeted fine-tuning's training input: the fused sequence inference reads (page, then the
region spliced in with the adapter's position scheme), followed by the answer to learn, and the
cross-entropy on the answer's tokens only.

Built from the engine's own pieces (`region_on_page`, `PageView.read_region`, `fuse_region`), so
what is learned is exactly what `ask` reads; the answer's positions are those greedy decoding
gives its tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backbones import Backbone, ModelInputs, VisualAdditions
from ..budget import VisualBudget
from ..zoom.fuse import FusedInputs, fuse_region
from ..zoom.geometry import Box, region_on_page
from ..zoom.pipeline import PageView


def fused_prompt(backbone: Backbone, page: PageView, text: str, box: Box, region_budget: VisualBudget,
                 aligned: bool) -> FusedInputs | None:
    """The page and the region `box` (token grid cells of the page) read at `region_budget`, as one
    prompt; None when the box lies off the page (the padding of a very thin page)."""
    region_px = region_on_page(box, page.grid, page.size, backbone.layout.min_region_side)
    if region_px is None:
        return None
    coarse = backbone.build_prompt(text, [page.grid])
    region = page.read_region(region_px, region_budget, backbone)
    return fuse_region(backbone, text, coarse, page.encoding, region, box, aligned)


def answer_token_ids(backbone: Backbone, answer: str) -> list[int]:
    """The answer as the model generates it: its text's tokens, then the end-of-answer token."""
    return backbone.tokenizer.encode(answer, add_special_tokens=False) + [backbone.eos_token_ids[0]]


def with_answer(backbone: Backbone, prompt: ModelInputs, answer_ids: list[int]) -> ModelInputs:
    """The prompt followed by the answer's tokens (teacher forcing), at the positions decoding
    gives them."""
    ids = torch.tensor([answer_ids], device=prompt.embeds.device)
    embeds = backbone.embed_tokens(ids).to(prompt.embeds.dtype)
    positions = torch.cat([backbone.next_position_ids(prompt.positions, step).to(prompt.positions.dtype)
                           for step in range(len(answer_ids))], dim=2)
    additions = VisualAdditions.concat([(prompt.additions, prompt.length), (None, len(answer_ids))])
    return ModelInputs(torch.cat([prompt.embeds, embeds], dim=1), torch.cat([prompt.positions, positions], dim=2),
                       additions)


def answer_loss(backbone: Backbone, inputs: ModelInputs, answer_ids: list[int]) -> torch.Tensor:
    """Mean cross-entropy of the answer's tokens, each predicted from everything before it."""
    hidden = backbone.run_layers(inputs.embeds, inputs.positions, None, 0, backbone.num_layers, None,
                                 inputs.additions)
    start = inputs.length - len(answer_ids)
    logits = backbone.logits(hidden[:, start - 1:-1])[0]
    return F.cross_entropy(logits.float(), torch.tensor(answer_ids, device=logits.device))
