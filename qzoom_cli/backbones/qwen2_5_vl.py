"""Qwen2.5-VL over the stock transformers classes (no forked model file).

Inputs are built from the tokenizer's chat template and the image processor directly, not from
`AutoProcessor`: qzoom resizes images itself, splices image blocks itself, and so never needs
the video processor that would pull in torchvision.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer

from ..errors import IncompatibleCheckpoint
from .attention import WINDOWED_SDPA
from .base import FamilyLayout, ImageBlock, ImageEncoding, Prompt
from .stock import StockBackbone

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


class Qwen2_5_VLBackbone(StockBackbone):
    family = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    decoder_layer_class = Qwen2_5_VLDecoderLayer
    default_system_prompt: str | None = None  # the chat template adds "You are a helpful assistant."
    fallback_chat_template = QWEN_VL_CHAT_TEMPLATE
    windowed_vision = True  # vision attention in windows: on CUDA, one sdpa call for all of them
    min_region_side = 28
    attention_sink = "corner"

    def __init__(self, model, tokenizer, image_processor, *, model_id: str, revision: str | None, attn: str,
                 thinking: bool = False):
        super().__init__(model, tokenizer, image_processor, model_id=model_id, revision=revision, attn=attn,
                         thinking=thinking)
        vision = self.config.vision_config
        self._loaded_vision_attn = vision._attn_implementation
        if self.windowed_vision and self.device.type == "cuda" and vision._attn_implementation == "sdpa":
            vision._attn_implementation = WINDOWED_SDPA  # one call for all windows

    @contextmanager
    def stock_attention(self) -> Iterator[None]:
        vision = self.config.vision_config
        chosen, vision._attn_implementation = vision._attn_implementation, self._loaded_vision_attn
        try:
            yield
        finally:
            vision._attn_implementation = chosen

    def make_layout(self) -> FamilyLayout:
        vision = self.config.vision_config
        return FamilyLayout(patch_factor=vision.patch_size * vision.spatial_merge_size, position_rows=3,
                            spatial_rows=(1, 2), min_region_side=self.min_region_side,
                            addition_layers=self._addition_layers(), attention_sink=self.attention_sink)

    def _addition_layers(self) -> int:
        return 0

    def build_prompt(self, question: str, image_grids: list[tuple[int, int]]) -> Prompt:
        content = [{"type": "image"} for _ in image_grids] + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=self.thinking)
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

    def stock_inputs(self, prompt: Prompt, images: list[Image.Image]) -> dict:
        pixels = self.image_processor(images=images, do_resize=False, return_tensors="pt")
        ids = prompt.input_ids.to(self.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": pixels["pixel_values"].to(self.device),
                "image_grid_thw": pixels["image_grid_thw"].to(self.device),
                "mm_token_type_ids": (ids == self.config.image_token_id).int()}

    def _encoding(self, output, grid: tuple[int, int]) -> ImageEncoding:
        return ImageEncoding(output.pooler_output[0], grid)

    def position_ids(self, prompt: Prompt) -> torch.Tensor:
        return mrope_position_ids(prompt.length, prompt.images).to(self.device)
