"""Qwen3.5 and Qwen3.6 (dense and MoE) over the stock transformers classes: what differs from Qwen3-VL.

- Natively multimodal, one checkpoint for thinking and non-thinking answers (the chat template's
  `enable_thinking`); no deepstack; no default system turn.
- A hybrid decoder (`text_config.layer_types`): Gated DeltaNet linear-attention layers (a causal
  conv window and a recurrent state per layer, no per-token keys) between gated full-attention
  layers (queries projected together with an output gate, per-head q/k norms, rotary on a quarter
  of each head). Only full-attention layers can score a region or give a teacher's attention map
  (`key_layers`).
- Padding: a recurrent layer reads every token it is given, so a padded token between real ones
  (the engine's two-segment batches, a fused suffix after a cached prefix) would leak into its
  state. Rows are therefore run through a linear-attention layer on their real tokens only,
  gathered into dense groups of equal length (one call for an unpadded batch), each group
  continuing from its rows' own states: a batch equals its rows run alone.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer
from transformers.models.qwen3_5.modeling_qwen3_5 import apply_rotary_pos_emb as partial_rotary
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeDecoderLayer

from .base import ImageEncoding
from .caches import recurrent_state, set_recurrent_state
from .qwen3_vl import QWEN3_VL_CHAT_TEMPLATE, Qwen3VLBackbone

FULL_ATTENTION = "full_attention"

# The Qwen3.5 conversation format for still images, as its checkpoints' template renders it (used
# when a checkpoint ships none): Qwen3-VL's, the assistant header opening a reasoning block, or an
# empty one with enable_thinking=false.
QWEN3_5_CHAT_TEMPLATE = QWEN3_VL_CHAT_TEMPLATE.replace(
    "{{- '<|im_start|>assistant\\n' -}}",
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- else -%}{{- '<think>\\n' -}}{%- endif -%}")


class Qwen3_5Backbone(Qwen3VLBackbone):
    family = "qwen3_5"
    model_class = Qwen3_5ForConditionalGeneration
    decoder_layer_class = Qwen3_5DecoderLayer
    default_system_prompt = None
    fallback_chat_template = QWEN3_5_CHAT_TEMPLATE
    rotary_function = staticmethod(partial_rotary)

    def _addition_layers(self) -> int:
        return 0

    def _encoding(self, output, grid: tuple[int, int]) -> ImageEncoding:
        return ImageEncoding(output.pooler_output[0], grid)

    @property
    def key_layers(self) -> tuple[int, ...]:
        return tuple(i for i, kind in enumerate(self.text_config.layer_types) if kind == FULL_ATTENTION)

    def _project_query_key(self, attn, x, shape) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, _, dim = shape
        query = attn.q_proj(x).view(batch, length, -1, 2 * dim)[..., :dim]  # the rest gates the attention output
        return attn.q_norm(query), attn.k_norm(attn.k_proj(x).view(shape))

    def memory_per_token(self) -> int:
        """Keys and values of the full-attention layers only (a recurrent state does not grow)."""
        c = self.text_config
        cache = 2 * len(self.key_layers) * c.num_key_value_heads * c.head_dim
        mlp = c.intermediate_size if not hasattr(c, "num_experts") else \
            c.num_experts_per_tok * c.moe_intermediate_size + c.shared_expert_intermediate_size
        activations = 4 * c.hidden_size + 3 * mlp
        return (2 * cache + activations) * (torch.finfo(self.dtype).bits // 8)

    def _forward(self, layers, hidden, positions, cache, first_layer, attention_mask, additions):
        kinds = [layer.block_type for layer in layers]
        full = [first_layer + i for i, kind in enumerate(kinds) if kind == FULL_ATTENTION]
        mask = None if not full else create_causal_mask(
            config=self.text_config, inputs_embeds=hidden, attention_mask=attention_mask, past_key_values=cache,
            layer_idx=full[0])
        rotary = self.language_model.rotary_emb(hidden, self.rotary_positions(positions)) if full else None
        groups = _real_token_groups(attention_mask, hidden.shape[1])
        for index, (layer, kind) in enumerate(zip(layers, kinds, strict=True), start=first_layer):
            if kind == FULL_ATTENTION:
                hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, past_key_values=cache,
                               use_cache=cache is not None)
            elif groups is None:
                hidden = layer(hidden, position_embeddings=None, past_key_values=cache, use_cache=cache is not None)
            else:
                hidden = self._recurrent_by_group(layer, index, hidden, cache, groups)
        return hidden

    def _recurrent_by_group(self, layer: nn.Module, index: int, hidden: torch.Tensor, cache, groups) -> torch.Tensor:
        """A linear-attention layer on each group of rows' real tokens (dense, equal lengths), each
        continuing from and updating its rows' states in `cache`."""
        state = None if cache is None else recurrent_state(cache.layers[index])
        index_rows, index_cols, outputs = [], [], []
        states = []
        for rows, cols in groups:
            own = None
            if cache is not None:
                own = DynamicCache(config=self.text_config)
                if state is not None:
                    set_recurrent_state(own.layers[index], state[0][rows], state[1][rows])
            tokens = hidden[rows[:, None], cols]
            outputs.append(layer(tokens, position_embeddings=None, past_key_values=own, use_cache=own is not None))
            index_rows.append(rows[:, None].expand_as(cols))
            index_cols.append(cols)
            if own is not None:
                states.append((rows, recurrent_state(own.layers[index])))
        if states:
            conv, recurrent = state if state is not None else _zero_states(states[0][1], hidden.shape[0])
            for rows, (group_conv, group_recurrent) in states:
                conv[rows], recurrent[rows] = group_conv, group_recurrent
            set_recurrent_state(cache.layers[index], conv, recurrent)
        where = (torch.cat([r.flatten() for r in index_rows]), torch.cat([c.flatten() for c in index_cols]))
        return hidden.index_put(where, torch.cat([o.flatten(0, 1) for o in outputs]))


class Qwen3_5MoeBackbone(Qwen3_5Backbone):
    family = "qwen3_5_moe"
    model_class = Qwen3_5MoeForConditionalGeneration
    decoder_layer_class = Qwen3_5MoeDecoderLayer


def _real_token_groups(attention_mask: torch.Tensor | None, length: int
                       ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """For a padded chunk of `length` new tokens: (rows, their real tokens' columns [rows, n]) for
    each real length n, or None when every new token is real (one batched call is exact). A
    one-token step (decoding) is never padding, and a 4-D mask is the static decoder's step: both
    are answered without reading the mask back from the device."""
    if attention_mask is None or attention_mask.dim() != 2 or length == 1:
        return None
    real = attention_mask[:, -length:].bool()
    if bool(real.all()):
        return None
    counts = real.sum(dim=1)
    groups = []
    for n in sorted(set(counts.tolist())):
        if n == 0:
            continue
        rows = torch.nonzero(counts == n).flatten()
        cols = torch.nonzero(real[rows])[:, 1].view(len(rows), n)
        groups.append((rows, cols))
    return groups


def _zero_states(like: tuple[torch.Tensor, torch.Tensor], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(t.new_zeros(batch, *t.shape[1:]) for t in like)
