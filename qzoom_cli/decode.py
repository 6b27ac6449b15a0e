"""Prefill and greedy decoding over a backbone's steps, with a KV cache.

Written out instead of calling `generate()` so every stage can be timed, per-token
log-probabilities come for free (they score multi-page candidates), and the zoom engine can
stop the prefill at a chosen layer and resume it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import Cache

from .backbones import Backbone
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


def truncate_cache(cache: Cache, length: int, layers: range) -> None:
    """Keep only the first `length` positions of the given layers' keys and values."""
    for index in layers:
        extra = cache.layers[index].get_seq_length() - length
        if extra > 0:
            cache.layers[index].crop(-extra)


def copy_cache(cache: Cache, empty: Cache, layers: range) -> Cache:
    """`empty` filled with copies of the given layers' keys and values from `cache`."""
    for index in layers:
        layer = cache.layers[index]
        if layer.get_seq_length() > 0:
            empty.update(layer.keys.clone(), layer.values.clone(), index)
    return empty


@torch.inference_mode()
def prefill(backbone: Backbone, embeds: torch.Tensor, positions: torch.Tensor, cache: Cache) -> torch.Tensor:
    """Run the whole prompt through every layer, filling `cache`; returns next-token logits [1, vocab]."""
    hidden = backbone.run_layers(embeds, positions, cache, 0, backbone.num_layers)
    return backbone.logits(hidden[:, -1:])[:, -1]


@torch.inference_mode()
def greedy_decode(backbone: Backbone, first_logits: torch.Tensor, cache: Cache, positions: torch.Tensor,
                  max_new_tokens: int) -> Generation:
    """Pick the most likely token until an end token or `max_new_tokens`; `positions` are the prompt's."""
    device = first_logits.device
    eos = set(backbone.eos_token_ids)
    out = Generation()
    logits = first_logits
    start = time.perf_counter()
    for step in range(max_new_tokens):
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        token = int(logprobs.argmax(dim=-1))
        out.token_ids.append(token)
        out.logprobs.append(float(logprobs[0, token]))
        if token in eos:
            out.finished = True
            break
        if step + 1 == max_new_tokens:
            break
        embeds = backbone.embed_tokens(torch.tensor([[token]], device=device))
        hidden = backbone.run_layers(embeds, backbone.next_position_ids(positions, step), cache, 0,
                                     backbone.num_layers)
        logits = backbone.logits(hidden)[:, -1]
    synchronize(device)
    out.decode_s = time.perf_counter() - start
    return out
