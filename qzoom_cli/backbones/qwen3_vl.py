"""Qwen3-VL, dense and MoE, over the stock transformers classes: only what differs from Qwen2.5-VL.

- 16 px patches merged 2x2: 32 px per LLM token (read from the config, as for Qwen2.5-VL).
- Deepstack: the vision tower taps a few of its blocks, and the text model adds each level to
  the image tokens' hidden states after decoder layers 0, 1, 2. Encodings carry those levels as
  `ImageEncoding.additions`; `run_layers` adds them wherever the stock model would.
- q/k RMS norms per head before the (interleaved M-RoPE) rotary embedding; the rotary module is
  the model's own, fed the three spatial rows [t, h, w] (the extra text row the stock model may
  prepend only feeds flash-attention's packed-sequence detection, which qzoom never triggers).
- Attention sinks are the cells the first prompt token attends to (the reference's rule).
- The chat template has no default system turn; Q-Zoom's evaluation adds "You are a helpful
  assistant.", which is also what the Qwen2.5-VL template adds, so both families see one prompt.
- Q-Zoom keys may sit in config.json's top level or in its `text_config` (top level first).
- MoE decoder layers take their arguments in another order: every call passes keywords.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextDecoderLayer
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import (
    Qwen3VLMoeTextDecoderLayer,
)

from .base import ImageEncoding
from .qwen2_5_vl import Qwen2_5_VLBackbone

# The Qwen3-VL instruct conversation format for still images (used when a checkpoint ships none).
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class Qwen3VLBackbone(Qwen2_5_VLBackbone):
    family = "qwen3_vl"
    model_class = Qwen3VLForConditionalGeneration
    decoder_layer_class = Qwen3VLTextDecoderLayer
    default_system_prompt = "You are a helpful assistant."
    fallback_chat_template = QWEN3_VL_CHAT_TEMPLATE
    windowed_vision = False
    attention_sink = "first_token"

    def _addition_layers(self) -> int:
        return len(self.config.vision_config.deepstack_visual_indexes)

    def _encoding(self, output, grid: tuple[int, int]) -> ImageEncoding:
        levels = torch.stack([per_image[0] for per_image in output.deepstack_features])
        return ImageEncoding(output.pooler_output[0], grid, levels)

    def checkpoint_setting(self, name: str, default=None):
        for config in (self.config, self.text_config):
            if name in vars(config):  # keys the checkpoint set, not class defaults
                return getattr(config, name)
        return default

    def _project_query_key(self, attn, x, shape) -> tuple[torch.Tensor, torch.Tensor]:
        return attn.q_norm(attn.q_proj(x).view(shape)), attn.k_norm(attn.k_proj(x).view(shape))

    def query_key_modules(self, layer: nn.Module) -> list[nn.Module]:
        return [*super().query_key_modules(layer), layer.self_attn.q_norm, layer.self_attn.k_norm]


class Qwen3VLMoeBackbone(Qwen3VLBackbone):
    family = "qwen3_vl_moe"
    model_class = Qwen3VLMoeForConditionalGeneration
    decoder_layer_class = Qwen3VLMoeTextDecoderLayer
