"""Windowed vision attention in one SDPA call, for GPUs without the flash-attn package.

Qwen-VL vision towers attend within windows (and, in a few blocks, over the whole image).
With transformers' sdpa path each window is a separate kernel launch, with a host sync per
block: a 4k-token page is ~250 windows x 28 blocks of tiny launches, which is most of the
page's encoding time on a GPU. transformers hands implementations whose name contains "flash"
the packed sequence and its window boundaries (`cu_seq_lens_*`, flash-attn's varlen calling
convention), so this one, registered under such a name, pads the windows to the longest one and
attends over all of them in one call (keys beyond a window's length masked out).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers import AttentionInterface

WINDOWED_SDPA = "qzoom_sdpa_flash_varlen"


def windowed_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask=None,
                  scaling: float | None = None, dropout: float = 0.0, cu_seq_lens_q: torch.Tensor | None = None,
                  max_length_q: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """[1, heads, seq, dim] inputs split at `cu_seq_lens_q`, each window attending to itself only;
    returns [1, seq, heads, dim] like the flash-attn varlen kernels."""
    if attention_mask is not None or kwargs.get("is_causal"):
        raise ValueError(f"{WINDOWED_SDPA} serves only non-causal attention within packed windows")
    length = query.shape[2]
    bounds = cu_seq_lens_q if cu_seq_lens_q is not None else torch.tensor([0, length], device=query.device)
    sizes = bounds[1:] - bounds[:-1]
    if sizes.numel() == 1:  # the whole image: one unmasked call (flash kernel)
        out = F.scaled_dot_product_attention(query, key, value, scale=scaling, dropout_p=dropout)
        return out.transpose(1, 2), None
    longest = int(max_length_q) if max_length_q is not None else int(sizes.max())
    offsets = torch.arange(longest, device=query.device)
    valid = offsets < sizes[:, None]                                  # [windows, longest]
    index = (bounds[:-1, None] + offsets).clamp(max=length - 1)

    def windows(t: torch.Tensor) -> torch.Tensor:                     # -> [windows, heads, longest, dim]
        return t[0][:, index].transpose(0, 1)

    out = F.scaled_dot_product_attention(windows(query), windows(key), windows(value),
                                         attn_mask=valid[:, None, None, :], scale=scaling, dropout_p=dropout)
    return out.transpose(1, 2)[valid].unsqueeze(0), None


AttentionInterface.register(WINDOWED_SDPA, windowed_sdpa)
