"""The teacher pass of SD-RPN self-distillation: where does the frozen model look while it answers?

The base model answers the question on a fixed square view of the page (padded with grey to a
square, then resized to side x side tokens: 24 x 24 = 576 by default). Its attention from each
answer token fed back during decoding (the second to the last but one generated token; the
prefill row is not used) to the image cells is averaged over those steps and over the chosen
(layer, head) pairs: once for the grounding heads, once for the sink heads.

Only the needed layers are looked at, and without switching the model to eager attention: after
decoding, one forward pass over prompt + answer runs up to the deepest needed layer, and at each
needed layer the queries and keys of the chosen heads give softmax(q.k / sqrt(d)) over the causal
prefix, which is exactly the attention that layer computed while decoding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..backbones import Backbone, ModelInputs, VisualAdditions
from ..budget import Canvas, resize_canvas
from ..decode import answer_plainly
from ..errors import UsageError

SQUARE_FILL = (127, 127, 127)


@dataclass
class HeadTable:
    """(layer -> heads) whose attention makes the grounding map and the sink map."""

    grounding: dict[int, list[int]]
    sink: dict[int, list[int]] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(set(self.grounding) | set(self.sink))

    def to_dict(self) -> dict:
        return {"grounding": {str(k): v for k, v in self.grounding.items()},
                "sink": {str(k): v for k, v in self.sink.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> HeadTable:
        """A table as `to_dict` writes it (or a model card lists it); sink heads may be left out."""
        return cls({int(k): list(v) for k, v in data["grounding"].items()},
                   {int(k): list(v) for k, v in data.get("sink", {}).items()})


def teacher_heads(card_training: dict | None, branch_layer: int, num_heads: int,
                  key_layers: Sequence[int] | None = None) -> HeadTable:
    """The model card's published head table when it has one, else `fallback_heads`. Attention
    maps come from layers with keys only (`key_layers`, None: all; a hybrid stack's full-attention
    layers): a table naming another layer is refused."""
    published = (card_training or {}).get("heads")
    table = HeadTable.from_dict(published) if published else fallback_heads(branch_layer, num_heads, key_layers)
    keyless = [layer for layer in table.layers if key_layers is not None and layer not in key_layers]
    if keyless:
        raise UsageError(f"the teacher's heads at layer(s) {', '.join(map(str, keyless))} are on linear-attention "
                         f"layers, which have no attention map; use full-attention layers "
                         f"({', '.join(map(str, key_layers))})")
    return table


def fallback_heads(branch_layer: int, num_heads: int, key_layers: Sequence[int] | None = None) -> HeadTable:
    """For models without a published table: every head of the two layers with keys (`key_layers`,
    None: all) just below the branch point, where the region head will read; no sink heads."""
    below = [layer for layer in (range(branch_layer) if key_layers is None else key_layers) if layer < branch_layer]
    layers = below[-2:] or [0]
    return HeadTable({layer: list(range(num_heads)) for layer in layers})


def square_view(backbone: Backbone, image: Image.Image, side: int) -> Image.Image:
    """The view teacher and student read: the image centred on a square (grey, or the family's own
    padding colour when it reads every image that way), resized to a side x side token grid."""
    canvas = backbone.layout.canvas
    square = Canvas(square=True, centred=True, fill=canvas.fill if canvas.square else SQUARE_FILL)
    return resize_canvas(image, backbone.grid_pixels((side, side)), square)


@dataclass
class TeacherMaps:
    answer_ids: list[int]
    grounding: torch.Tensor | None   # [side, side] float32, None when the answer was too short
    sink: torch.Tensor | None
    steps: int


@torch.inference_mode()
def attention_to_image(backbone: Backbone, embeds: torch.Tensor, positions: torch.Tensor, rows: range,
                       image: slice, heads: dict[int, list[int]], additions: VisualAdditions | None = None
                       ) -> dict[tuple[int, int], torch.Tensor]:
    """Softmax attention of the query positions `rows` to the `image` key positions, for each
    (layer, head) asked for: {(layer, head): [len(rows), image tokens]} in float32."""
    wanted: dict[tuple[int, int], torch.Tensor] = {}
    if not heads:
        return wanted
    hidden = embeds
    causal = torch.arange(embeds.shape[1], device=embeds.device)
    for layer_index in range(max(heads) + 1):
        if layer_index in heads:
            queries, keys = backbone.query_key(backbone.decoder_layers[layer_index], hidden, positions)
            q = queries[0, heads[layer_index]][:, rows.start:rows.stop].float()       # [h, r, d]
            k = keys[0, heads[layer_index]].float()                                  # [h, s, d]
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            future = causal[None, :] > causal[rows.start:rows.stop, None]
            probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
            for i, head in enumerate(heads[layer_index]):
                wanted[(layer_index, head)] = probs[i, :, image]
        hidden = backbone.run_layers(hidden, positions, None, layer_index, layer_index + 1, None, additions)
    return wanted


def with_answer(backbone: Backbone, prompt: ModelInputs, answer_ids: list[int]) -> ModelInputs:
    """The prompt followed by the answer's tokens (teacher forcing), at the positions decoding
    gives them."""
    ids = torch.tensor([answer_ids], device=prompt.embeds.device)  # pragma: no mutate (CPU: every tensor is there)
    embeds = backbone.embed_tokens(ids).to(prompt.embeds.dtype)  # pragma: no mutate (float32 on CPU either way)
    positions = torch.cat([backbone.next_position_ids(prompt.positions, step) for step in range(len(answer_ids))],
                          dim=2)  # the cat below promotes them to float when the prompt's are (aligned)
    additions = VisualAdditions.concat([(prompt.additions, prompt.length), (None, len(answer_ids))])
    return ModelInputs(torch.cat([prompt.embeds, embeds], dim=1), torch.cat([prompt.positions, positions], dim=2),
                       additions)


@torch.inference_mode()
def teacher_maps(backbone: Backbone, view: Image.Image, text: str, heads: HeadTable,
                 max_new_tokens: int) -> TeacherMaps:
    """Answer `text` about the square `view` and average the chosen heads' attention to it."""
    encoding = backbone.encode_image(view)
    rows, cols = encoding.grid
    prompt = backbone.build_prompt(text, [encoding.grid])
    inputs = backbone.prepare_inputs(prompt, [encoding])
    generation = answer_plainly(backbone, inputs, max_new_tokens)
    fed = generation.token_ids[:-1]  # tokens fed back while decoding; the last one never was
    if not fed:
        return TeacherMaps(generation.token_ids, None, None, 0)
    full = with_answer(backbone, inputs, fed)
    block = prompt.images[0]
    layers = {layer: sorted(set(heads.grounding.get(layer, [])) | set(heads.sink.get(layer, [])))
              for layer in heads.layers}
    attention = attention_to_image(backbone, full.embeds, full.positions,
                                   range(prompt.length, prompt.length + len(fed)), slice(block.start, block.stop),
                                   layers, full.additions)

    def average(table: dict[int, list[int]]) -> torch.Tensor | None:
        maps = [attention[(layer, head)].mean(dim=0) for layer, hs in table.items() for head in hs]
        return torch.stack(maps).mean(dim=0).view(rows, cols).cpu() if maps else torch.zeros(rows, cols)

    return TeacherMaps(generation.token_ids, average(heads.grounding), average(heads.sink), len(fed))
