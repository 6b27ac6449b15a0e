"""The fused sequence: the region block spliced in right after the page's image block.

    ... <|vision_start|> page tokens <|vision_end|> <|vision_start|> region tokens <|vision_end|> question ...

Everything before the page's last image token is unchanged (so its KV cache is reused), text
after the region moves on by the region's extent. Region positions follow either the ordinary
second-image rule or, for checkpoints trained with it, are aligned inside the page's grid. The
region's per-layer additions (deepstack) ride along at the region's tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbones import Backbone, ImageBlock, ImageEncoding, ModelInputs, Prompt
from ..errors import AdapterMismatch, IncompatibleCheckpoint
from .geometry import Box, aligned_region_positions


@dataclass
class FusedInputs:
    prompt: Prompt
    inputs: ModelInputs
    reused: int  # tokens [0, reused) are identical to the coarse prompt's and keep their cache

    @property
    def source(self) -> ImageBlock:
        return self.prompt.images[0]

    @property
    def region(self) -> ImageBlock:
        return self.prompt.images[1]

    @property
    def suffix(self) -> ModelInputs:
        """The tokens that are new in the fused sequence."""
        return self.inputs.tokens(self.reused)


def align_positions(positions: torch.Tensor, spatial_rows: tuple[int, int], source: ImageBlock,
                    region: ImageBlock, box: Box) -> torch.Tensor:
    """Positions (float) with the region block's spatial rows moved into the source grid at `box`."""
    row_axis, col_axis = spatial_rows
    src = positions[:, 0, source.start:source.stop]
    rows, cols = aligned_region_positions(src[row_axis].view(source.rows, source.cols),
                                          src[col_axis].view(source.rows, source.cols),
                                          box, region.rows, region.cols)
    aligned = positions.float().clone()
    aligned[row_axis, 0, region.start:region.stop] = rows  # a slice assignment copies across devices
    aligned[col_axis, 0, region.start:region.stop] = cols
    return aligned


def fuse_region(backbone: Backbone, text: str, coarse: Prompt, page: ImageEncoding, region: ImageEncoding,
                box: Box, aligned: bool) -> FusedInputs:
    source = coarse.images[0]
    prompt = backbone.build_prompt(text, [page.grid, region.grid])
    reused = source.stop
    if not torch.equal(prompt.input_ids[0, :reused], coarse.input_ids[0, :reused]) or prompt.images[0] != source:
        raise IncompatibleCheckpoint("the fused prompt does not extend the coarse prompt; the chat template moved the image")
    inputs = backbone.prepare_inputs(prompt, [page, region])
    if aligned:
        spatial = backbone.layout.spatial_rows
        if spatial is None:
            raise AdapterMismatch(f"{backbone.family} has no spatial positions to align a region with")
        inputs.positions = align_positions(inputs.positions, spatial, source, prompt.images[1], box)
    return FusedInputs(prompt, inputs, reused)
