"""What the engine does to a cache, whatever its layers hold.

transformers' caches (built from a config) hold per layer either keys and values, one slot per
token, or, for a linear-attention layer (Qwen3.5's Gated DeltaNet), a short convolution window
and a recurrent state of fixed size. Keys and values can be cut back to any length; a recurrent
state cannot, it can only be saved where the prompt passed a point and put back later. So the
zoom engine rewinds a cache to the end of a page's image with a `CacheMark` taken there, and
copies, loads and snapshots caches through these functions, never by reading `keys` itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import Cache
from transformers.cache_utils import LinearAttentionCacheLayerMixin


def is_recurrent(layer) -> bool:
    """Whether a cache layer holds a recurrent state (a linear-attention layer) rather than keys."""
    return isinstance(layer, LinearAttentionCacheLayerMixin)


def has_recurrent_layers(cache: Cache, layers: range) -> bool:
    return any(is_recurrent(cache.layers[index]) for index in layers)


def recurrent_state(layer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A recurrent layer's (conv window, recurrent state), or None before it has seen a token."""
    if not layer.has_previous_state[0]:
        return None
    return layer.conv_states[0], layer.recurrent_states[0]


def set_recurrent_state(layer, conv: torch.Tensor, recurrent: torch.Tensor) -> None:
    """Give a recurrent layer these states (copied in, so a captured graph keeps its addresses), as
    if a prefill had left them."""
    if not layer.is_conv_states_initialized[0]:
        layer.lazy_initialization(conv_states=conv, recurrent_states=recurrent, conv_kernel_size=conv.shape[-1])
    layer.conv_states[0].copy_(conv)
    layer.recurrent_states[0].copy_(recurrent)
    layer.has_previous_state[0] = True


@dataclass
class CacheMark:
    """Where a cache can be rewound to: its first `length` positions, and the recurrent layers'
    states (copies) as they were there."""

    length: int
    states: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def rows(self, rows: list[int]) -> CacheMark:
        """The mark of batch rows `rows` only."""
        return CacheMark(self.length, {index: (conv[rows], state[rows])
                                       for index, (conv, state) in self.states.items()})


def mark_cache(cache: Cache, length: int, layers: range) -> CacheMark:
    """A mark at `length`, the number of positions `cache` holds now."""
    states = {}
    for index in layers:
        layer = cache.layers[index]
        if is_recurrent(layer):
            conv, state = recurrent_state(layer)
            states[index] = conv.clone(), state.clone()
    return CacheMark(length, states)


def rewind_cache(cache: Cache, mark: CacheMark, layers: range) -> None:
    """Put the given layers back as they were at `mark`: keys and values cut to its length, recurrent
    states restored (a recurrent layer without a saved state cannot be rewound)."""
    for index in layers:
        layer = cache.layers[index]
        if is_recurrent(layer):
            if index not in mark.states:
                raise ValueError(f"layer {index} holds a recurrent state the mark did not save")
            set_recurrent_state(layer, *mark.states[index])
        else:
            layer.crop(mark.length - layer.get_seq_length())


def copy_cache(cache: Cache, empty: Cache, layers: range, rows: list[int] | None = None) -> Cache:
    """`empty` filled with copies of the given layers' contents (of batch `rows`, or all)."""
    picked = slice(None) if rows is None else rows
    for index in layers:
        layer = cache.layers[index]
        if is_recurrent(layer):
            conv, state = recurrent_state(layer)
            set_recurrent_state(empty.layers[index], conv[picked].clone(), state[picked].clone())
        else:
            empty.update(layer.keys[picked].clone(), layer.values[picked].clone(), index)
    return empty


def allocate_static(static: Cache, like: Cache) -> None:
    """Allocate a static cache's buffers for the batch, heads and dtypes of `like`."""
    for source, layer in zip(like.layers, static.layers, strict=True):
        if is_recurrent(source):
            conv, state = recurrent_state(source)
            set_recurrent_state(layer, torch.zeros_like(conv), torch.zeros_like(state))
        else:
            layer.lazy_initialization(source.keys, source.values)


def load_static(static: Cache, cache: Cache) -> None:
    """Copy a prompt's cache into a static one allocated for it, in place (fixed addresses)."""
    length = cache.get_seq_length()
    for source, layer in zip(cache.layers, static.layers, strict=True):
        if is_recurrent(source):
            set_recurrent_state(layer, *recurrent_state(source))
        else:
            layer.keys[:, :, :length].copy_(source.keys)
            layer.values[:, :, :length].copy_(source.values)
            layer.cumulative_length.fill_(length)


def static_cursor(static: Cache) -> torch.Tensor:
    """[] the slot a static cache's next token is written to (its first key/value layer's count)."""
    return next(layer.cumulative_length for layer in static.layers if not is_recurrent(layer))


def static_step_state(static: Cache) -> list[torch.Tensor]:
    """What a decode step advances in a static cache: the key/value layers' counts (slots past them
    are written before they are read) and the recurrent layers' states."""
    tensors = []
    for layer in static.layers:
        if is_recurrent(layer):
            tensors.extend(recurrent_state(layer))
        else:
            tensors.append(layer.cumulative_length)
    return tensors
