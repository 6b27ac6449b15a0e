"""Prefill and greedy decoding over a backbone's steps, with a KV cache.

Written out instead of calling `generate()` so every stage can be timed, per-token
log-probabilities come for free (they score multi-page candidates), and the zoom engine can
stop the prefill at a chosen layer and resume it. Batches are padded; an attention mask marks
the real tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import Cache

from .backbones import Backbone, ModelInputs, VisualAdditions
from .backbones.caches import CacheMark, has_recurrent_layers, mark_cache
from .runtime import synchronize


@dataclass
class Generation:
    """Greedy output: token ids, their log-probabilities, and whether an end token stopped it."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False
    decode_s: float = 0.0

    @property
    def score(self) -> float:
        """Mean natural-log probability of the generated tokens, the end token included."""
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else float("-inf")


def until_end(tokens: list[int], logprobs: list[float], eos: set[int], decode_s: float) -> Generation:
    """A sample's tokens up to and including its first end token (a batch decodes past it)."""
    end = next((i + 1 for i, token in enumerate(tokens) if token in eos), None)
    stop = end or len(tokens)
    return Generation(token_ids=tokens[:stop], logprobs=logprobs[:stop], finished=end is not None, decode_s=decode_s)


def pick_tokens(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy token of each row of `logits` [batch, vocab] and its log-probability (in float32)."""
    logprobs = torch.log_softmax(logits.float(), dim=1)
    tokens = logprobs.argmax(dim=1)
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]


@torch.inference_mode()
def prefill(backbone: Backbone, embeds: torch.Tensor, positions: torch.Tensor, cache: Cache,
            attention_mask: torch.Tensor | None = None, additions: VisualAdditions | None = None) -> torch.Tensor:
    """Run the whole prompt through every layer, filling `cache`; returns next-token logits [batch, vocab]."""
    hidden = backbone.run_layers(embeds, positions, cache, 0, backbone.num_layers, attention_mask, additions)
    return backbone.next_token_logits(hidden)


def run_marked(backbone: Backbone, embeds: torch.Tensor, positions: torch.Tensor, cache: Cache, stop: int,
               attention_mask: torch.Tensor | None, additions: VisualAdditions | None, at: int
               ) -> tuple[torch.Tensor, CacheMark]:
    """Layers [0, stop) over a prompt, filling `cache`, and a mark to rewind those layers to
    position `at`. Keys and values are cut back later, so one pass does; a recurrent layer's state
    at `at` exists only while the prompt passes it, so with such layers the prompt runs in two
    chunks split there (exact: the second continues from the first's states)."""
    if not has_recurrent_layers(cache, range(stop)):
        return backbone.run_layers(embeds, positions, cache, 0, stop, attention_mask, additions), CacheMark(at)
    head_mask = None if attention_mask is None else attention_mask[:, :at]
    head = backbone.run_layers(embeds[:, :at], positions[..., :at], cache, 0, stop, head_mask,
                               None if additions is None else additions.tokens(0, at))
    mark = mark_cache(cache, at, range(stop))
    tail = backbone.run_layers(embeds[:, at:], positions[..., at:], cache, 0, stop, attention_mask,
                               None if additions is None else additions.tokens(at))
    return torch.cat([head, tail], dim=1), mark


@torch.inference_mode()
def greedy_decode_batch(backbone: Backbone, first_logits: torch.Tensor, cache: Cache, positions: torch.Tensor,
                        max_new_tokens: int, attention_mask: torch.Tensor | None = None) -> list[Generation]:
    """Most likely tokens for every sample until each ends or `max_new_tokens`; `positions` are
    the prompts' and `attention_mask` their padding (None for one unpadded sequence). Decode
    time is shared evenly between the samples."""
    device = first_logits.device
    batch = first_logits.shape[0]
    eos = set(backbone.eos_token_ids)
    outs = [Generation() for _ in range(batch)]
    logits = first_logits
    start = time.perf_counter()
    for step in range(max_new_tokens):
        tokens, picked = pick_tokens(logits)
        for out, token, logprob in zip(outs, tokens.tolist(), picked.tolist(), strict=True):
            if not out.finished:
                out.token_ids.append(token)
                out.logprobs.append(logprob)
                out.finished = token in eos
        if all(out.finished for out in outs) or step + 1 == max_new_tokens:
            break
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        embeds = backbone.embed_tokens(tokens[:, None])
        hidden = backbone.run_layers(embeds, backbone.next_position_ids(positions, step), cache, 0,
                                     backbone.num_layers, attention_mask)
        logits = backbone.next_token_logits(hidden)
    synchronize(device)
    elapsed = (time.perf_counter() - start) / batch
    for out in outs:
        out.decode_s = elapsed
    return outs


class Decoder(Protocol):
    """Greedy decoding after a prefill, one `Generation` per sample (see `greedy_decode_batch`)."""

    name: str

    def __call__(self, first_logits: torch.Tensor, cache: Cache, positions: torch.Tensor, max_new_tokens: int,
                 attention_mask: torch.Tensor | None = None) -> list[Generation]: ...


class EagerDecoder:
    """The reference loop: every step launched from Python over the growing cache."""

    name = "eager"

    def __init__(self, backbone: Backbone):
        self.backbone = backbone

    def __call__(self, first_logits, cache, positions, max_new_tokens, attention_mask=None) -> list[Generation]:
        return greedy_decode_batch(self.backbone, first_logits, cache, positions, max_new_tokens, attention_mask)


def greedy_decode(backbone: Backbone, first_logits: torch.Tensor, cache: Cache, positions: torch.Tensor,
                  max_new_tokens: int) -> Generation:
    """`greedy_decode_batch` for one unpadded sequence."""
    return greedy_decode_batch(backbone, first_logits, cache, positions, max_new_tokens)[0]


def answer_plainly(backbone: Backbone, inputs: ModelInputs, max_new_tokens: int) -> Generation:
    """Prefill one unpadded sequence and decode it greedily (no zoom)."""
    cache = backbone.new_cache()
    logits = prefill(backbone, inputs.embeds, inputs.positions, cache, None, inputs.additions)
    return greedy_decode(backbone, logits, cache, inputs.positions, max_new_tokens)
