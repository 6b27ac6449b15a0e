"""What every family built on transformers' stock classes shares: loading, the decoder run layer
by layer (rotary embedding and causal mask made once, as the stock text model makes them), the
query/key projection of one layer, the LM head, caches and end-of-answer tokens.

A family subclass says only what is its own: the layout, the prompt, the image encoding, the
position ids, and how its rotary embedding takes them (`rotary_positions`).
"""

from __future__ import annotations

import json
import re
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from jinja2 import TemplateError
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    Cache,
    DynamicCache,
    GenerationConfig,
    StaticCache,
)
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv
from transformers.utils import cached_file

from ..errors import IncompatibleCheckpoint, ModelError, UsageError, first_line, one_line
from .base import Backbone, FamilyLayout, VisualAdditions, unreadable


def chat_template(tokenizer, ref: str, revision: str | None, fallback: str) -> str:
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


class StockBackbone(Backbone):
    """A `...ForConditionalGeneration` whose `.model.language_model` holds embed_tokens, layers,
    norm and rotary_emb, with `lm_head` on top."""

    model_class: type
    decoder_layer_class: type
    fallback_chat_template: str
    default_system_prompt: str | None = None
    rotary_function = staticmethod(apply_rotary_pos_emb)  # (q, k, cos, sin) -> rotated q, k

    def __init__(self, model, tokenizer, image_processor, *, model_id: str, revision: str | None, attn: str,
                 thinking: bool = False):
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
        self.thinking = thinking
        self.reasoning_end_id = _reasoning_end_id(tokenizer, thinking)
        if thinking and self.reasoning_end_id is None:
            raise UsageError(f"{model_id} cannot be asked to reason first: its chat template has no thinking switch "
                             "(enable_thinking); --think is for checkpoints that reason on request, such as Qwen3.5")
        self._layout = self.make_layout()
        self._eos = _eos_token_ids(model, tokenizer)

    @classmethod
    def from_pretrained(cls, ref: str, *, revision: str | None, device: torch.device, dtype: torch.dtype,
                        attn: str, processor: str | None = None, thinking: bool = False) -> StockBackbone:
        """Load the checkpoint, refusing what would run with random or wrong weights: a missing,
        unexpected or misshapen tensor, a damaged weights, tokenizer or processor file, a chat
        template that does not parse (each named; OSError, a checkpoint not found, passes through)."""
        try:
            model, report = cls.model_class.from_pretrained(  # misshapen tensors reported, then refused
                ref, revision=revision, dtype=dtype, attn_implementation=attn, device_map=str(device),
                output_loading_info=True, ignore_mismatched_sizes=True)
        except SafetensorError as exc:
            raise ModelError(f"the weights of {ref} are damaged ({_damaged_weights(ref) or exc}); download or "
                             "convert them again") from None
        _check_loaded(ref, report)
        source, source_revision = (processor, None) if processor else (ref, revision)
        with _reading(f"the tokenizer of {source}"):
            tokenizer = AutoTokenizer.from_pretrained(source, revision=source_revision)
            tokenizer.chat_template = chat_template(tokenizer, source, source_revision, cls.fallback_chat_template)
        with _reading(f"the image processor of {source}"):
            image_processor = AutoImageProcessor.from_pretrained(source, revision=source_revision)
        try:
            return cls(model, tokenizer, image_processor, model_id=ref, revision=revision, attn=attn,
                       thinking=thinking)
        except TemplateError as exc:
            raise ModelError(f"the chat template of {source} does not work ({first_line(exc)}); fix it or pass "
                             "a base model's processor") from None

    @abstractmethod
    def make_layout(self) -> FamilyLayout:
        """What the family declares about itself, from the loaded config and processor."""

    def rotary_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """What the model's rotary embedding takes, from positions in the family's layout."""
        return positions

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

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    def checkpoint_setting(self, name: str, default=None):
        return getattr(self.config, name, default)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)

    def next_position_ids(self, positions: torch.Tensor, step: int) -> torch.Tensor:
        next_pos = positions.amax(dim=(0, 2)) + 1 + step  # per sample; padding sits at 0
        return next_pos.view(1, -1, 1).expand(self.layout.position_rows, -1, 1)

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
        rotary = self.language_model.rotary_emb(hidden, self.rotary_positions(positions))
        for index, layer in enumerate(layers, start=first_layer):
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary,
                           past_key_values=cache, use_cache=cache is not None)
            if additions is not None and index < additions.levels:
                hidden = additions.apply(hidden, index)
        return hidden

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

    def new_norm(self) -> nn.Module:
        norm = self.language_model.norm
        return type(norm)(self.text_config.hidden_size, eps=norm.variance_epsilon).to(self.device, self.dtype)

    def query_key(self, layer, hidden, positions, rotary: bool = True):
        attn = layer.self_attn
        batch, length, _ = hidden.shape
        x = layer.input_layernorm(hidden)
        q, k = self._project_query_key(attn, x, (batch, length, -1, attn.head_dim))
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if rotary:
            cos, sin = self.language_model.rotary_emb(hidden, self.rotary_positions(positions))
            q, k = self.rotary_function(q, k, cos, sin)
        return q, repeat_kv(k, q.shape[1] // k.shape[1])

    def _project_query_key(self, attn, x, shape) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head queries and keys [batch, seq, heads, head_dim] before the rotary embedding."""
        return attn.q_proj(x).view(shape), attn.k_proj(x).view(shape)

    def query_key_modules(self, layer: nn.Module) -> list[nn.Module]:
        return [layer.input_layernorm, layer.self_attn.q_proj, layer.self_attn.k_proj]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.language_model.norm(hidden))


ZOOM_TENSORS = re.compile(r"(?:^|\.)(?:twig_layers|twig_norm|high_res_layers|high_res_head)\.")  # Q-Zoom's own


def _check_loaded(ref: str, report: dict) -> None:
    """Refuse a model some of whose weights the checkpoint did not give (they would be random), or
    that left checkpoint tensors unused (the config describes another model); a released Q-Zoom
    checkpoint's zoom modules are loaded apart, so they are not unused."""
    problems = []
    for kind, keys in (("missing", report.get("missing_keys", [])),
                       ("unexpected", [k for k in report.get("unexpected_keys", []) if not ZOOM_TENSORS.search(k)]),
                       ("misshapen", [k[0] if isinstance(k, tuple) else k for k in report.get("mismatched_keys", [])])):
        if keys:
            keys = sorted(keys)
            problems.append(f"{len(keys)} {kind} (e.g. {keys[0]})")
    if problems:
        raise IncompatibleCheckpoint(f"the weights of {ref} do not match its config.json: {'; '.join(problems)}; "
                                     "qzoom never runs a model with random weights")


def _damaged_weights(ref: str) -> str | None:
    """The first weights file of a local checkpoint that cannot be read, by name."""
    for path in sorted(Path(ref).glob("*.safetensors")) if Path(ref).is_dir() else []:
        try:
            with safe_open(path, framework="pt") as weights:
                for key in weights.keys():
                    weights.get_slice(key)
        except (SafetensorError, OSError) as exc:
            return f"{path.name}: {first_line(exc)}"
    return None


@contextmanager
def _reading(what: str) -> Iterator[None]:
    """A damaged file (not a missing one: OSError passes through) as one model error."""
    try:
        yield
    except Exception as exc:
        if not unreadable(exc):
            raise
        raise ModelError(f"{what} is damaged ({one_line(exc)}); download it again or pass a base model's "
                         "processor") from None


def _reasoning_end_id(tokenizer, thinking: bool) -> int | None:
    """`</think>`'s id when the chat template opens the answer with a reasoning block left open
    (Thinking checkpoints; checkpoints asked to think), else None."""
    header = tokenizer.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=thinking)
    opening = header.rsplit("<|im_start|>", 1)[-1]
    if "<think>" not in opening or "</think>" in opening:
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
