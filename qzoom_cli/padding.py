"""Batches of unequal sequences: segment-wise left padding with an attention mask.

Each sample is a list of segments (`ModelInputs` of one sequence); segment j of every sample is
left-padded to the longest segment j, so segment boundaries line up across the batch. With two
segments split after each page's last image token, every sample's reusable prefix ends at the
same index, and all last tokens sit at index -1, ready for batched decoding. Padding tokens have
zero embeddings, position 0 and no per-layer additions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from .backbones import ModelInputs, VisualAdditions


@dataclass
class PaddedBatch:
    embeds: torch.Tensor             # [batch, length, hidden]
    positions: torch.Tensor          # [rows, batch, length], 0 on padding
    attention_mask: torch.Tensor     # [batch, length], 1 on real tokens
    boundaries: list[int]            # start index of each segment column, then the total length
    lengths: list[list[int]]         # [sample][segment] real lengths
    additions: VisualAdditions | None = None

    @property
    def padded(self) -> bool:
        return not bool(self.attention_mask.all())

    def mask_or_none(self) -> torch.Tensor | None:
        """The mask, or None when nothing is padded (one sequence keeps the unmasked fast path)."""
        return self.attention_mask if self.padded else None

    def index(self, sample: int, segment: int, offset: int) -> int:
        """Batch index of the token at `offset` within `segment` of `sample`."""
        end = self.boundaries[segment + 1]
        return end - self.lengths[sample][segment] + offset


def pad_segments(samples: list[list[ModelInputs]]) -> PaddedBatch:
    count = len(samples[0])
    widths = [max(sample[j].length for sample in samples) for j in range(count)]
    boundaries = [0]
    for width in widths:
        boundaries.append(boundaries[-1] + width)
    first = samples[0][0]
    total, hidden = boundaries[-1], first.embeds.shape[-1]
    embeds = first.embeds.new_zeros(len(samples), total, hidden)
    dtype = torch.float32 if any(seg.positions.is_floating_point() for s in samples for seg in s) else torch.long
    zeros = partial(torch.zeros, device=first.embeds.device)  # pragma: no mutate (one device in the tests)
    positions = zeros(first.positions.shape[0], len(samples), total, dtype=dtype)
    mask = zeros(len(samples), total, dtype=torch.long)
    visual = zeros(len(samples), total, dtype=torch.bool)
    values = []  # batch-major, as VisualAdditions wants them
    for b, sample in enumerate(samples):
        for j, segment in enumerate(sample):
            end = boundaries[j + 1]
            start = end - segment.length
            embeds[b, start:end] = segment.embeds[0]
            positions[:, b, start:end] = segment.positions[:, 0]  # the assignment casts to `dtype`
            mask[b, start:end] = 1
            if segment.additions is not None:
                visual[b, start:end] = segment.additions.mask[0]
                values.append(segment.additions.values)
    additions = VisualAdditions(visual, torch.cat(values, dim=1)) if values else None
    return PaddedBatch(embeds, positions, mask, boundaries, [[seg.length for seg in s] for s in samples], additions)
