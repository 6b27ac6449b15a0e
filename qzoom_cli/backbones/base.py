"""The one interface the answering and zoom code talk to, whatever the model family.

A backbone exposes the model as a pipeline of small steps (prompt -> image encodings -> model
inputs -> decoder layers i..j with a cache -> logits) so qzoom can run its own prefill and
decode, stop after a chosen layer, and later splice in a region block, without forking any
transformers model file. What the engine must know about a family is declared as data
(`FamilyLayout`), never inferred from its class.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image
from torch import nn
from transformers import Cache

from ..budget import ASPECT_CANVAS, Canvas, VisualBudget, bicubic, resize_canvas, resize_to_budget, token_grid
from ..errors import IncompatibleCheckpoint

SINK_RULES = ("corner", "first_token")


@dataclass(frozen=True)
class FamilyLayout:
    """Facts about a model family that the zoom pipeline relies on.

    patch_factor: side in pixels of the square that becomes one LLM token (28 Qwen2.5-VL, 32 Qwen3-VL).
    position_rows: rows of a position tensor [rows, batch, seq]; spatial_rows: which of them carry an
        image token's (height, width) (None for 1-D positions).
    min_region_side: the smallest side, in page pixels, of a region read at high resolution.
    addition_layers: image tokens get per-layer additions after decoder layers 0..n-1 (deepstack; 0: none).
    attention_sink: how region maps lose their attention-sink cells: "corner" (the top-left rule of
        large grids) or "first_token" (cells the first prompt token attends to strongly).
    canvas: how an image is laid on the canvas the model reads (padding, where the content sits).
    fixed_grid: the (rows, cols) every image is read at, whatever the budget (LLaVA's 24 x 24); None
        when the budget sets the grid.
    """

    patch_factor: int
    position_rows: int
    spatial_rows: tuple[int, int] | None
    min_region_side: int
    addition_layers: int
    attention_sink: str
    canvas: Canvas = ASPECT_CANVAS
    fixed_grid: tuple[int, int] | None = None

    def __post_init__(self):
        if self.attention_sink not in SINK_RULES:
            raise ValueError(f"attention_sink must be one of {SINK_RULES}")


@dataclass(frozen=True)
class ImageBlock:
    """The `rows * cols` tokens of one image in a sequence: cell (r, c) of its grid is the token at
    `start + r * cols + c` (row-major, consecutive)."""

    start: int
    rows: int
    cols: int

    @property
    def length(self) -> int:
        return self.rows * self.cols

    @property
    def stop(self) -> int:
        return self.start + self.length


@dataclass
class Prompt:
    """Token ids of one chat prompt (batch of one) and where its images sit in it."""

    input_ids: torch.Tensor
    images: list[ImageBlock]

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[-1])


@dataclass
class ImageEncoding:
    """An image as the language model takes it: one feature row per grid cell (row-major) and, for
    families that have them, per-layer additions for the same tokens ([levels, tokens, hidden])."""

    features: torch.Tensor
    grid: tuple[int, int]
    additions: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass
class VisualAdditions:
    """Per-layer additions to image tokens' hidden states (Qwen3-VL's deepstack): after decoder layer
    i < levels, `hidden[mask] += values[i]`. `values` rows follow the mask's True entries in
    batch-major order, the order `hidden[mask]` reads them."""

    mask: torch.Tensor    # [batch, seq] bool
    values: torch.Tensor  # [levels, mask.sum(), hidden]

    @property
    def levels(self) -> int:
        return self.values.shape[0]

    def _keep(self, where: torch.Tensor) -> torch.Tensor:
        return where[self.mask]

    def tokens(self, start: int, stop: int | None = None) -> VisualAdditions:
        """The additions of sequence positions [start, stop)."""
        span = torch.zeros_like(self.mask)
        span[:, start:stop] = True
        return VisualAdditions(self.mask[:, start:stop], self.values[:, self._keep(span)])

    def rows(self, rows: list[int]) -> VisualAdditions:
        """The additions of batch rows `rows` (ascending)."""
        if rows != sorted(rows):
            raise ValueError("rows must be ascending")
        picked = torch.zeros_like(self.mask)
        picked[rows] = True
        return VisualAdditions(self.mask[rows], self.values[:, self._keep(picked)])

    def apply(self, hidden: torch.Tensor, level: int) -> torch.Tensor:
        """`hidden` with level `level` added at the image tokens (a new tensor, as the stock model does)."""
        mask = self.mask.to(hidden.device)
        hidden = hidden.clone()
        hidden[mask] = hidden[mask] + self.values[level].to(hidden.device, hidden.dtype)
        return hidden

    def then(self, other: VisualAdditions) -> VisualAdditions:
        """These additions followed, along the sequence, by `other`'s (same batch)."""
        return VisualAdditions.concat([(self, self.mask.shape[1]), (other, other.mask.shape[1])])

    @staticmethod
    def concat(parts: list[tuple[VisualAdditions | None, int]]) -> VisualAdditions | None:
        """Sequences side by side (same batch): `parts` are (additions or None, sequence length)."""
        present = [part for part, _ in parts if part is not None]
        if not present:
            return None
        reference = present[0]
        batch = reference.mask.shape[0]
        masks = [part.mask if part is not None else reference.mask.new_zeros(batch, length) for part, length in parts]
        owner = torch.cat([torch.full_like(mask, i, dtype=torch.long) for i, mask in enumerate(masks)], dim=1)
        mask = torch.cat(masks, dim=1)
        order = owner[mask]
        values = reference.values.new_zeros(reference.levels, int(mask.sum()), reference.values.shape[-1])
        for i, (part, _) in enumerate(parts):
            if part is not None:
                values[:, order == i] = part.values
        return VisualAdditions(mask, values)


@dataclass
class ModelInputs:
    """What the decoder layers take for some tokens: embeddings [batch, seq, hidden], positions in
    the family's layout [position_rows, batch, seq], and the image tokens' per-layer additions."""

    embeds: torch.Tensor
    positions: torch.Tensor
    additions: VisualAdditions | None = None

    @property
    def length(self) -> int:
        return self.embeds.shape[1]

    def tokens(self, start: int, stop: int | None = None) -> ModelInputs:
        """The inputs of sequence positions [start, stop)."""
        additions = self.additions.tokens(start, stop) if self.additions is not None else None
        return ModelInputs(self.embeds[:, start:stop], self.positions[..., start:stop], additions)


class Backbone(ABC):
    """A loaded vision-language model seen as steps; see module docstring."""

    family: ClassVar[str]

    model_id: str
    revision: str | None
    tokenizer: object
    model: nn.Module          # the stock transformers model, whole (training freezes it)
    device: torch.device
    dtype: torch.dtype
    attn: str
    system_prompt: str | None  # an explicit system turn for every prompt; None: the chat template's default
    thinking: bool  # the chat template's enable_thinking (checkpoints that think or not on request)
    reasoning_end_id: int | None  # prompts that open a reasoning block: the token that closes it; else None
    lora_dir: Path | None = None  # the LoRA weights (`qzoom train sft`) the decoder carries, if any

    @property
    @abstractmethod
    def layout(self) -> FamilyLayout: ...

    @property
    @abstractmethod
    def num_layers(self) -> int: ...

    @property
    @abstractmethod
    def hidden_size(self) -> int: ...

    @property
    @abstractmethod
    def num_attention_heads(self) -> int: ...

    @property
    @abstractmethod
    def eos_token_ids(self) -> list[int]: ...

    @property
    def key_layers(self) -> tuple[int, ...]:
        """The decoder layers that attend with per-token queries and keys (all of them but in hybrid
        stacks): only these can score a region or show a teacher where the model looked."""
        return tuple(range(self.num_layers))

    @abstractmethod
    def checkpoint_setting(self, name: str, default=None):
        """A free key of the checkpoint's config.json (where Q-Zoom keeps `twig_K` and friends)."""

    @abstractmethod
    def build_prompt(self, question: str, image_grids: list[tuple[int, int]]) -> Prompt:
        """Chat prompt with one image per grid (rows, cols) followed by the question."""

    @abstractmethod
    def encode_image(self, image: Image.Image) -> ImageEncoding:
        """An image already sized to a token grid (`fit_image`) as LLM-ready features."""

    @abstractmethod
    def stock_inputs(self, prompt: Prompt, images: list[Image.Image]) -> dict:
        """What the stock model's `forward`/`generate` takes for `prompt` with `images` (already
        fitted): the reference qzoom's own path is checked and timed against."""

    def stock_attention(self) -> AbstractContextManager:
        """While entered, the model attends with the kernels transformers chose at load time (qzoom's
        own swapped out), so the stock `generate()` baseline is what a transformers user runs."""
        return nullcontext()

    @abstractmethod
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [batch, seq, hidden]."""

    @abstractmethod
    def position_ids(self, prompt: Prompt) -> torch.Tensor:
        """Position ids of the prompt in the family's layout [position_rows, 1, seq]."""

    @abstractmethod
    def next_position_ids(self, positions: torch.Tensor, step: int) -> torch.Tensor:
        """Position ids of each sample's `step`-th (0-based) generated token after a prompt with
        `positions` (padding positions are 0)."""

    @abstractmethod
    def new_cache(self) -> Cache: ...

    @abstractmethod
    def new_static_cache(self, max_length: int) -> Cache:
        """A preallocated cache of `max_length` positions (fixed addresses, for CUDA graphs)."""

    @abstractmethod
    def run_layers(self, hidden: torch.Tensor, positions: torch.Tensor, cache: Cache | None,
                   start: int, stop: int, attention_mask: torch.Tensor | None = None,
                   additions: VisualAdditions | None = None) -> torch.Tensor:
        """Decoder layers [start, stop) on `hidden`, appending to `cache` when one is given.

        `attention_mask` [batch, cached + new] marks real tokens (1) and padding (0); None means
        a single unpadded sequence; a 4-D mask [batch, 1, new, cache slots] (True: may attend) is
        used as it is (the static-cache decoder builds its own). `additions` (for the same tokens
        as `hidden`) are added after the layers below `layout.addition_layers`."""

    @abstractmethod
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head."""

    def next_token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [batch, vocab] of the token after each sequence: the head on the last position only."""
        return self.logits(hidden[:, -1])

    @abstractmethod
    def memory_per_token(self) -> int:
        """Device bytes one prompt token costs in a batch: its keys and values in every layer (twice:
        the prefill's cache and the static decode copy) and one layer's prefill activations."""

    @property
    @abstractmethod
    def decoder_layers(self) -> nn.ModuleList:
        """The base model's decoder layers (shared, never copied, by training-free zoom)."""

    @abstractmethod
    def new_decoder_layer(self, layer_idx: int) -> nn.Module:
        """A fresh decoder layer of the family's stock class, as if it sat at `layer_idx`."""

    @abstractmethod
    def run_modules(self, modules: list[nn.Module], hidden: torch.Tensor, positions: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder layers outside the base stack (zoom branches) on `hidden`, causal, no cache."""

    @abstractmethod
    def query_key(self, layer: nn.Module, hidden: torch.Tensor, positions: torch.Tensor, rotary: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention queries and keys `layer` would compute on `hidden`: rotary applied (unless
        `rotary` is False), keys repeated to one per query head; both [batch, heads, seq, head_dim]."""

    @abstractmethod
    def new_norm(self) -> nn.Module:
        """A fresh RMS norm of the decoder's kind (SD-RPN's LLaVA region head has one of its own)."""

    @abstractmethod
    def query_key_modules(self, layer: nn.Module) -> list[nn.Module]:
        """The parts of `layer` that `query_key` uses (the rest of a region head's last layer is dead)."""

    def freeze(self) -> None:
        """No gradient for any base weight (training only learns attached modules)."""
        self.model.requires_grad_(False)

    def image_grid(self, size: tuple[int, int], budget: VisualBudget) -> tuple[int, int]:
        """(rows, cols) of tokens an image of `size` (w, h) gets under `budget` (a fixed-grid family:
        its grid, whatever the budget)."""
        return self.layout.fixed_grid or token_grid(size[1], size[0], self.layout.patch_factor, budget)

    def grid_pixels(self, grid: tuple[int, int]) -> tuple[int, int]:
        """(w, h) in pixels of an image encoded as `grid` (rows, cols)."""
        return grid[1] * self.layout.patch_factor, grid[0] * self.layout.patch_factor

    def read_budget(self, budget: VisualBudget) -> VisualBudget:
        """The budget an image is actually read at: `budget`, or a fixed-grid family's grid."""
        grid = self.layout.fixed_grid
        return budget if grid is None else VisualBudget(grid[0] * grid[1], grid[0] * grid[1])

    def detail_view(self, image: Image.Image, tokens: int) -> Image.Image:
        """The image read with `tokens` tokens' worth of detail (the gate's answer ladders): fitted to
        that budget; a fixed-grid family sees it shrunk to that detail first, then at its grid."""
        grid = self.layout.fixed_grid
        if grid is None or tokens >= grid[0] * grid[1]:
            return self.fit_image(image, VisualBudget(tokens, tokens))
        side = max(1, math.isqrt(tokens)) * self.layout.patch_factor
        scale = side / max(self.layout.canvas.size(*image.size))
        small = bicubic(image.convert("RGB"), (max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        return self.fit_image(small, VisualBudget(tokens, tokens))

    def fit_image(self, image: Image.Image, budget: VisualBudget) -> Image.Image:
        """`image` resized to the exact token grid `budget` allows (a fixed-grid family: padded onto
        its canvas, then resized to the grid)."""
        if self.layout.fixed_grid is not None:
            return resize_canvas(image, self.grid_pixels(self.layout.fixed_grid), self.layout.canvas)
        return resize_to_budget(image, self.layout.patch_factor, budget)

    def prepare_inputs(self, prompt: Prompt, encodings: list[ImageEncoding]) -> ModelInputs:
        """The prompt's embeddings (image blocks replaced by their features), positions and additions."""
        embeds = self.embed_tokens(prompt.input_ids.to(self.device)).clone()
        for block, encoding in zip(prompt.images, encodings, strict=True):
            if encoding.tokens != block.length:
                raise IncompatibleCheckpoint(f"image block of {block.length} tokens got {encoding.tokens} features")
            embeds[0, block.start:block.stop] = encoding.features.to(embeds.dtype)
        additions = None
        if any(encoding.additions is not None for encoding in encodings):
            mask = torch.zeros(1, prompt.length, dtype=torch.bool, device=self.device)
            ordered = sorted(zip(prompt.images, encodings, strict=True), key=lambda pair: pair[0].start)
            for block, _ in ordered:
                mask[0, block.start:block.stop] = True
            values = torch.cat([encoding.additions for _, encoding in ordered], dim=1).to(self.device)
            additions = VisualAdditions(mask, values)
        return ModelInputs(embeds, self.position_ids(prompt), additions)

    def decode_text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()

    def split_reasoning(self, token_ids: list[int], finished: bool) -> tuple[list[int] | None, list[int]]:
        """(reasoning, answer) token ids. A thinking checkpoint's reasoning ends at its closing token;
        cut off before it, everything so far is reasoning and there is no answer yet (an answer that
        ended without reasoning is all answer). Other checkpoints: (None, all)."""
        end = self.reasoning_end_id
        if end is None:
            return None, token_ids
        if end in token_ids:
            cut = token_ids.index(end)
            return token_ids[:cut], token_ids[cut + 1:]
        return (None, token_ids) if finished else (token_ids, [])


def unreadable(exc: BaseException) -> bool:
    """Whether a file was found but could not be parsed (transformers reports bad JSON as an OSError)."""
    return not isinstance(exc, OSError) or isinstance(exc.__cause__ or exc.__context__, ValueError)
