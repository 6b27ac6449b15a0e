"""Qwen2.5-VL over the stock transformers classes (no forked model file).

Inputs are built from the tokenizer's chat template and the image processor directly, not from
`AutoProcessor`: qzoom resizes images itself, splices image blocks itself, and so never needs
the video processor that would pull in torchvision.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    Cache,
    DynamicCache,
    GenerationConfig,
    Qwen2_5_VLForConditionalGeneration,
    StaticCache,
)
from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLDecoderLayer,
    apply_rotary_pos_emb,
    repeat_kv,
)
from transformers.utils import cached_file

from ..errors import IncompatibleCheckpoint
from .attention import WINDOWED_SDPA
from .base import (
    Backbone,
    FamilyLayout,
    ImageBlock,
    ImageEncoding,
    Prompt,
    VisualAdditions,
)

IMAGE_PLACEHOLDER = "<|image_pad|>"

# Same conversation format as the Qwen2.5-VL instruct checkpoints: a default system turn, images
# as <|vision_start|><|image_pad|><|vision_end|>, and an assistant header as generation prompt.
QWEN_VL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def chat_template(tokenizer, ref: str, revision: str | None, fallback: str = QWEN_VL_CHAT_TEMPLATE) -> str:
    """The checkpoint's chat template: the tokenizer's, else the processor's file (older repos keep
    it in chat_template.json), else the family's standard conversation format."""
    if tokenizer.chat_template:
        return tokenizer.chat_template
    for name in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(ref, name, revision=revision, _raise_exceptions_for_missing_entries=False)
        if path:
            text = open(path, encoding="utf-8").read()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return fallback


def mrope_position_ids(length: int, images: list[ImageBlock]) -> torch.Tensor:
    """Qwen M-RoPE positions [3, 1, length] for text with still-image blocks.

    Text advances all three rows by one per token. An image block starting at position p gets
    temporal p, height p + row, width p + col; the text after it resumes at p + max(rows, cols).
    """
    rows_out = torch.empty(3, length, dtype=torch.long)
    index, position = 0, 0
    for block in sorted(images, key=lambda b: b.start):
        span = block.start - index
        rows_out[:, index:block.start] = torch.arange(position, position + span)
        position += span
        r = torch.arange(block.rows).repeat_interleave(block.cols)
        c = torch.arange(block.cols).repeat(block.rows)
        rows_out[0, block.start:block.stop] = position
        rows_out[1, block.start:block.stop] = position + r
        rows_out[2, block.start:block.stop] = position + c
        position += max(block.rows, block.cols)
        index = block.stop
    rows_out[:, index:] = torch.arange(position, position + length - index)
    return rows_out.unsqueeze(1)


def pixel_patches(image: Image.Image, processor, device: torch.device) -> torch.Tensor:
    """The numpy (PIL backend) Qwen-VL image processor's `pixel_values` for one image already at
    its size, computed as tensors on `device` with that processor's own rounding: each byte rescaled in float64 and
    stored as float32 (a 256-entry table), then (x - mean) / std in float32, then the patch layout
    [merged rows, merged cols, merge, merge, channel, time, patch, patch] flattened per patch."""
    patch, merge, frames = processor.patch_size, processor.merge_size, processor.temporal_patch_size
    scale = processor.rescale_factor if processor.do_rescale else 1.0
    table = torch.from_numpy((np.arange(256, dtype=np.float64) * scale).astype(np.float32)).to(device)
    x = table[torch.from_numpy(np.array(image.convert("RGB"))).to(device).long()]  # [H, W, C]
    if processor.do_normalize:
        mean = torch.tensor(processor.image_mean, dtype=torch.float32, device=device)
        std = torch.tensor(processor.image_std, dtype=torch.float32, device=device)
        x = (x - mean) / std
    rows, cols = image.height // patch, image.width // patch
    x = x.permute(2, 0, 1).reshape(3, rows // merge, merge, patch, cols // merge, merge, patch)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)[:, :, :, :, :, None].expand(-1, -1, -1, -1, -1, frames, -1, -1)
    return x.reshape(rows * cols, 3 * frames * patch * patch)


class Qwen2_5_VLBackbone(Backbone):
    family = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    decoder_layer_class = Qwen2_5_VLDecoderLayer
    default_system_prompt: str | None = None  # the chat template adds "You are a helpful assistant."
    fallback_chat_template = QWEN_VL_CHAT_TEMPLATE
    windowed_vision = True  # vision attention in windows: on CUDA, one sdpa call for all of them
    min_region_side = 28
    attention_sink = "corner"

    def __init__(self, model, tokenizer, image_processor, *, model_id: str, revision: str | None, attn: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_id = model_id
        self.revision = revision
        self.attn = attn
        self.config = model.config
        self.text_config = model.config.text_config
        self.language_model = model.model.language_model
        self.device = model.device
        self.dtype = model.dtype
        self.system_prompt = self.default_system_prompt
        vision = self.config.vision_config
        self._layout = FamilyLayout(
            patch_factor=vision.patch_size * vision.spatial_merge_size, position_rows=3, spatial_rows=(1, 2),
            min_region_side=self.min_region_side, addition_layers=self._addition_layers(),
            attention_sink=self.attention_sink)
        if self.windowed_vision and self.device.type == "cuda" and self.config.vision_config._attn_implementation == "sdpa":
            self.config.vision_config._attn_implementation = WINDOWED_SDPA  # one call for all windows
        self._eos = _eos_token_ids(model, tokenizer)
        self.reasoning_end_id = _reasoning_end_id(tokenizer)

    @classmethod
    def from_pretrained(cls, ref: str, *, revision: str | None, device: torch.device, dtype: torch.dtype,
                        attn: str, processor: str | None = None) -> Qwen2_5_VLBackbone:
        model = cls.model_class.from_pretrained(
            ref, revision=revision, dtype=dtype, attn_implementation=attn, device_map=str(device)
        )
        source, source_revision = (processor, None) if processor else (ref, revision)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=source_revision)
        tokenizer.chat_template = chat_template(tokenizer, source, source_revision, cls.fallback_chat_template)
        image_processor = AutoImageProcessor.from_pretrained(source, revision=source_revision)
        return cls(model, tokenizer, image_processor, model_id=ref, revision=revision, attn=attn)

    def _addition_layers(self) -> int:
        return 0

    @property
    def layout(self) -> FamilyLayout:
        return self._layout

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def eos_token_ids(self) -> list[int]:
        return self._eos

    @property
    def num_attention_heads(self) -> int:
        return self.text_config.num_attention_heads

    def checkpoint_setting(self, name: str, default=None):
        return getattr(self.config, name, default)

    def build_prompt(self, question: str, image_grids: list[tuple[int, int]]) -> Prompt:
        content = [{"type": "image"} for _ in image_grids] + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        pieces = text.split(IMAGE_PLACEHOLDER)
        if len(pieces) != len(image_grids) + 1:
            raise IncompatibleCheckpoint(f"chat template of {self.model_id} did not place {len(image_grids)} image(s)")
        pad_id = self.config.image_token_id
        ids: list[int] = []
        images: list[ImageBlock] = []
        for i, piece in enumerate(pieces):
            ids.extend(self.tokenizer.encode(piece, add_special_tokens=False))
            if i < len(image_grids):
                rows, cols = image_grids[i]
                images.append(ImageBlock(len(ids), rows, cols))
                ids.extend([pad_id] * (rows * cols))
        return Prompt(torch.tensor([ids], dtype=torch.long), images)

    @torch.inference_mode()
    def encode_image(self, image: Image.Image) -> ImageEncoding:
        factor, merge = self.layout.patch_factor, self.config.vision_config.spatial_merge_size
        if image.width % factor or image.height % factor:
            raise ValueError(f"image {image.size} is not a multiple of {factor} pixels; resize it to its budget first")
        cells = (image.height // factor, image.width // factor)
        expected = [1, cells[0] * merge, cells[1] * merge]
        # a 4k-token page is ~19M floats: on a GPU, normalise and patchify them where they are used
        if self.device.type == "cuda" and isinstance(self.image_processor, PilBackend):
            pixels, grid = pixel_patches(image, self.image_processor, self.device), torch.tensor([expected])
        else:
            on_device = {"device": self.device} if isinstance(self.image_processor, TorchvisionBackend) else {}
            batch = self.image_processor(images=[image], do_resize=False, return_tensors="pt", **on_device)
            pixels, grid = batch["pixel_values"], batch["image_grid_thw"]
            if grid[0].tolist() != expected:
                raise IncompatibleCheckpoint(f"the image processor of {self.model_id} produced grid "
                                             f"{grid[0].tolist()}, expected {expected}")
        pixels = pixels.to(self.device, self.model.model.visual.dtype)
        return self._encoding(self.model.model.get_image_features(pixels, grid.to(self.device), return_dict=True),
                              cells)

    def _encoding(self, output, grid: tuple[int, int]) -> ImageEncoding:
        return ImageEncoding(output.pooler_output[0], grid)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)

    def position_ids(self, prompt: Prompt) -> torch.Tensor:
        return mrope_position_ids(prompt.length, prompt.images).to(self.device)

    def next_position_ids(self, positions: torch.Tensor, step: int) -> torch.Tensor:
        next_pos = positions.amax(dim=(0, 2)) + 1 + step  # per sample; padding sits at 0
        return next_pos.view(1, -1, 1).expand(3, -1, 1)

    def new_cache(self) -> Cache:
        return DynamicCache(config=self.text_config)

    def new_static_cache(self, max_length: int) -> Cache:
        return StaticCache(config=self.text_config, max_cache_len=max_length)

    def run_layers(self, hidden: torch.Tensor, positions: torch.Tensor, cache: Cache | None,
                   start: int, stop: int, attention_mask: torch.Tensor | None = None,
                   additions: VisualAdditions | None = None) -> torch.Tensor:
        return self._forward(self.language_model.layers[start:stop], hidden, positions, cache, start, attention_mask,
                             additions)

    def run_modules(self, modules, hidden: torch.Tensor, positions: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._forward(modules, hidden, positions, None, 0, attention_mask, None)

    def _forward(self, layers, hidden, positions, cache, first_layer, attention_mask, additions):
        mask = create_causal_mask(config=self.text_config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  past_key_values=cache, layer_idx=first_layer)
        rotary = self.language_model.rotary_emb(hidden, positions)
        for index, layer in enumerate(layers, start=first_layer):
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary,
                           past_key_values=cache, use_cache=cache is not None)
            if additions is not None and index < additions.levels:
                hidden = additions.apply(hidden, index)
        return hidden

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    def memory_per_token(self) -> int:
        c = self.text_config
        cache = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim
        activations = (4 + self.layout.addition_layers) * c.hidden_size + 3 * c.intermediate_size
        return (2 * cache + activations) * (torch.finfo(self.dtype).bits // 8)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    def new_decoder_layer(self, layer_idx: int) -> nn.Module:
        return self.decoder_layer_class(self.text_config, layer_idx).to(self.device, self.dtype)

    def query_key(self, layer, hidden, positions):
        attn = layer.self_attn
        batch, length, _ = hidden.shape
        x = layer.input_layernorm(hidden)
        q, k = self._project_query_key(attn, x, (batch, length, -1, attn.head_dim))
        cos, sin = self.language_model.rotary_emb(hidden, positions)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q, repeat_kv(k, q.shape[1] // k.shape[1])

    def _project_query_key(self, attn, x, shape) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head queries and keys [batch, seq, heads, head_dim] before the rotary embedding."""
        return attn.q_proj(x).view(shape), attn.k_proj(x).view(shape)

    def query_key_modules(self, layer: nn.Module) -> list[nn.Module]:
        return [layer.input_layernorm, layer.self_attn.q_proj, layer.self_attn.k_proj]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.language_model.norm(hidden))


def _reasoning_end_id(tokenizer) -> int | None:
    """`</think>`'s id when the chat template opens the answer with a reasoning block (Thinking
    checkpoints), else None."""
    header = tokenizer.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False,
                                           add_generation_prompt=True)
    if "<think>" not in header.rsplit("<|im_start|>", 1)[-1]:
        return None
    end = tokenizer.convert_tokens_to_ids("</think>")
    return end if isinstance(end, int) and end != tokenizer.unk_token_id else None


def _eos_token_ids(model, tokenizer) -> list[int]:
    """End-of-answer ids: the generation config's (instruct checkpoints list <|im_end|>), else the tokenizer's."""
    config = getattr(model, "generation_config", None) or GenerationConfig()
    eos = config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids:
        raise IncompatibleCheckpoint("the checkpoint defines no end-of-sequence token")
    return ids
