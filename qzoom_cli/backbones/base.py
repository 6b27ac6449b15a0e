"""The one interface the answering and zoom code talk to, whatever the model family.

A backbone exposes the model as a pipeline of small steps (prompt -> vision features ->
embeddings -> positions -> decoder layers i..j with a cache -> logits) so qzoom can run its own
prefill and decode, stop after a chosen layer, and later splice in a region block, without
forking any transformers model file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from PIL import Image
from torch import nn
from transformers import Cache


@dataclass(frozen=True)
class ImageBlock:
    """A run of `rows * cols` image tokens starting at sequence index `start`."""

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


class Backbone(ABC):
    """A loaded vision-language model seen as steps; see module docstring."""

    family: ClassVar[str]

    model_id: str
    revision: str | None
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    attn: str

    @property
    @abstractmethod
    def patch_factor(self) -> int:
        """Side in pixels of the square that becomes one LLM token."""

    @property
    @abstractmethod
    def num_layers(self) -> int: ...

    @property
    @abstractmethod
    def eos_token_ids(self) -> list[int]: ...

    @abstractmethod
    def build_prompt(self, question: str, image_grids: list[tuple[int, int]]) -> Prompt:
        """Chat prompt with one image per grid (rows, cols) followed by the question."""

    @abstractmethod
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """LLM-ready features [rows * cols, hidden] of an image already resized to the token grid."""

    @abstractmethod
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [batch, seq, hidden]."""

    @abstractmethod
    def position_ids(self, prompt: Prompt) -> torch.Tensor:
        """Position ids of the prompt in the family's layout (e.g. 3 x 1 x S for M-RoPE)."""

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
                   start: int, stop: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder layers [start, stop) on `hidden`, appending to `cache` when one is given.

        `attention_mask` [batch, cached + new] marks real tokens (1) and padding (0); None means
        a single unpadded sequence; a 4-D mask [batch, 1, new, cache slots] (True: may attend) is
        used as it is (the static-cache decoder builds its own)."""

    @abstractmethod
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head."""

    @property
    @abstractmethod
    def hidden_size(self) -> int: ...

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
    def query_key(self, layer: nn.Module, hidden: torch.Tensor, positions: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention queries and keys `layer` would compute on `hidden`: rotary applied, keys
        repeated to one per query head; both [batch, heads, seq, head_dim]."""

    @abstractmethod
    def query_key_modules(self, layer: nn.Module) -> list[nn.Module]:
        """The parts of `layer` that `query_key` uses (the rest of a region head's last layer is dead)."""

    @property
    def spatial_position_rows(self) -> tuple[int, int] | None:
        """Rows of the position ids that carry an image token's (height, width), if the family's
        positions are spatial (M-RoPE); None for 1-D positions."""
        return None

    def embed_prompt(self, prompt: Prompt, image_features: list[torch.Tensor]) -> torch.Tensor:
        """Prompt embeddings with each image block replaced by its vision features."""
        embeds = self.embed_tokens(prompt.input_ids.to(self.device)).clone()
        for block, features in zip(prompt.images, image_features, strict=True):
            if features.shape[0] != block.length:
                raise ValueError(f"image block of {block.length} tokens got {features.shape[0]} features")
            embeds[0, block.start:block.stop] = features.to(embeds.dtype)
        return embeds

    def decode_text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()
