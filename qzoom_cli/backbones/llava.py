"""LLaVA-1.5 (the llava-hf layout) over the stock transformers classes: a CLIP vision tower read
at its second-to-last layer without the CLS token, the projector, a Llama decoder with 1-D
positions.

Every image is read the way the published LLaVA-1.5 setup reads it: padded to a square in the
image processor's mean colour (content centred), resized to the tower's 336 x 336: a fixed
24 x 24 grid of 576 tokens, whatever the budget. The images of a prompt sit back to back where
its one image placeholder was (the region block follows the page's tokens directly, as SD-RPN
inserts it), and positions continue 1-D through them.
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from ..budget import Canvas
from ..errors import IncompatibleCheckpoint
from .base import FamilyLayout, ImageBlock, ImageEncoding, Prompt
from .stock import StockBackbone

IMAGE_PLACEHOLDER = "<image>"

# The llava-hf conversation format: an optional system text, "USER: <image>\n{question} ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if message['content'] is string -%}{{- message['content'] + ' ' -}}"
    "{%- else -%}{%- for part in message['content'] -%}{{- part['text'] + ' ' -}}{%- endfor -%}{%- endif -%}"
    "{%- else -%}{{- message['role'].upper() + ': ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] + ' ' -}}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] + ' ' -}}{%- endfor -%}"
    "{%- endif -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


class LlavaBackbone(StockBackbone):
    family = "llava"
    model_class = LlavaForConditionalGeneration
    decoder_layer_class = LlamaDecoderLayer
    fallback_chat_template = LLAVA_CHAT_TEMPLATE

    def make_layout(self) -> FamilyLayout:
        vision = self.config.vision_config
        crop = getattr(self.image_processor, "crop_size", None) or {}
        if crop and (crop.get("height"), crop.get("width")) != (vision.image_size, vision.image_size):
            raise IncompatibleCheckpoint(f"the image processor of {self.model_id} crops to {crop}, the vision tower "
                                         f"reads {vision.image_size} px squares")
        side = vision.image_size // vision.patch_size
        fill = tuple(int(mean * 255) for mean in self.image_processor.image_mean)
        return FamilyLayout(patch_factor=vision.patch_size, position_rows=1, spatial_rows=None,
                            min_region_side=vision.patch_size, addition_layers=0, attention_sink="corner",
                            canvas=Canvas(square=True, centred=True, fill=fill), fixed_grid=(side, side))

    def rotary_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return positions[0]

    def build_prompt(self, question: str, image_grids: list[tuple[int, int]]) -> Prompt:
        content = ([{"type": "image"}] if image_grids else []) + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(IMAGE_PLACEHOLDER) != (1 if image_grids else 0):
            raise IncompatibleCheckpoint(f"chat template of {self.model_id} did not place one image")
        tokens = sum(rows * cols for rows, cols in image_grids)
        ids = self.tokenizer(text.replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * tokens)).input_ids  # as llava-hf does
        images: list[ImageBlock] = []
        if image_grids:
            start = ids.index(self.config.image_token_id)
            for rows, cols in image_grids:
                images.append(ImageBlock(start, rows, cols))
                start += rows * cols
            if ids.count(self.config.image_token_id) != tokens or ids[start - 1] != self.config.image_token_id:
                raise IncompatibleCheckpoint(f"the tokenizer of {self.model_id} split the image placeholder")
        return Prompt(torch.tensor([ids], dtype=torch.long), images)

    @torch.inference_mode()
    def encode_image(self, image: Image.Image) -> ImageEncoding:
        grid = self.layout.fixed_grid
        if image.size != self.grid_pixels(grid):
            raise ValueError(f"image {image.size} is not the tower's {self.grid_pixels(grid)}; fit it first")
        pixels = self.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        output = self.model.model.get_image_features(
            pixel_values=pixels.to(self.device, self.model.model.vision_tower.dtype),
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy, return_dict=True)
        features = output.pooler_output[0]
        if features.shape[0] != grid[0] * grid[1]:
            raise IncompatibleCheckpoint(f"the vision tower of {self.model_id} gave {features.shape[0]} features, "
                                         f"expected {grid[0] * grid[1]}")
        return ImageEncoding(features, grid)

    def stock_inputs(self, prompt: Prompt, images: list[Image.Image]) -> dict:
        ids = prompt.input_ids.to(self.device)
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels.to(self.device)}

    def position_ids(self, prompt: Prompt) -> torch.Tensor:
        return torch.arange(prompt.length, device=self.device).view(1, 1, -1)
