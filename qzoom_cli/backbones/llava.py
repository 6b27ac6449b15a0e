"""LLaVA-1.5 (the llava-hf layout) over the stock transformers classes: a CLIP vision tower read
at its second-to-last layer without the CLS token, the projector, a Llama decoder with 1-D
positions.

Every image is read the way the published LLaVA-1.5 setup reads it: padded to a square in the
image processor's mean colour (content centred), resized to the tower's 336 x 336: a fixed
24 x 24 grid of 576 tokens, whatever the budget. The images of a prompt sit back to back where
its one image placeholder was (the region block follows the page's tokens directly, as SD-RPN
inserts it), and positions continue 1-D through them.

Prompts are LLaVA's own, whatever the checkpoint ships (llava-hf's template drops system text):
the vicuna_v1 conversation LLaVA-1.5 was trained (`--version v1`) and evaluated with, tokenized
the way LLaVA's `tokenizer_image_token` does, each side of `<image>` on its own (so the text after
the image opens with its own word-start piece), later sides without their BOS.
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
# LLaVA's conv_vicuna_v1 (llava/conversation.py): its system text, roles and separators.
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions.")

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
    default_system_prompt = VICUNA_V1_SYSTEM

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
        user = f"{IMAGE_PLACEHOLDER}\n{question}" if image_grids else question
        system = f"{self.system_prompt} " if self.system_prompt else ""
        sides = [self.tokenizer(side).input_ids for side in f"{system}USER: {user} ASSISTANT:".split(IMAGE_PLACEHOLDER)]
        if sides[0][:1] == [self.tokenizer.bos_token_id]:  # tokenizer_image_token: one BOS, at the start
            sides[1:] = [side[1:] for side in sides[1:]]
        ids, images = list(sides[0]), []
        for rows, cols in image_grids:  # the images back to back where the placeholder was
            images.append(ImageBlock(len(ids), rows, cols))
            ids.extend([self.config.image_token_id] * (rows * cols))
        for side in sides[1:]:
            ids.extend(side)
        if ids.count(self.config.image_token_id) != sum(block.length for block in images):
            raise IncompatibleCheckpoint(f"the tokenizer of {self.model_id} makes image tokens of the prompt's text")
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
