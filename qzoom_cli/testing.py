"""Tiny checkpoints built offline: a complete model directory that loads exactly like a real one.

Random seeded weights, a few small layers, a byte-level BPE tokenizer trained on a few lines of
text that carries the family's real special tokens and chat template, and the family's real
image processor config (Qwen2.5-VL: 14 px patches; Qwen3-VL: 16 px patches and deepstack; Qwen3.5:
16 px patches and a hybrid decoder, linear-attention layers between full-attention ones; all
merged 2x2), so every code path of qzoom runs on CPU in seconds. Its answers are meaningless;
its shapes, tokens and control flow are the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    LlavaConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2Tokenizer,
    Qwen3_5Config,
    Qwen3_5MoeConfig,
    Qwen3VLConfig,
    Qwen3VLMoeConfig,
)
from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer

from .backbones.llava import LLAVA_CHAT_TEMPLATE
from .backbones.qwen2_5_vl import QWEN_VL_CHAT_TEMPLATE
from .backbones.qwen3_5 import QWEN3_5_CHAT_TEMPLATE
from .backbones.qwen3_vl import QWEN3_VL_CHAT_TEMPLATE
from .errors import UsageError

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

TRAINING_TEXT = [
    "What is the total due on this invoice? Answer the question using a single word or phrase.",
    "Invoice number, date, due date, bill to, ship to, description, quantity, unit price, amount.",
    "Subtotal tax total balance due payment terms net 30 bank account IBAN receipt store cashier.",
    "0123456789 $ . , : - / # % USD EUR page of the a an is what which who when where how much",
    "You are a helpful assistant. system user assistant",
]

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "llava")
THINK_TOKENS = ["<think>", "</think>"]  # Qwen3 vocabularies carry them as ordinary added tokens
# Qwen3-VL Thinking checkpoints open the answer with a reasoning block.
QWEN3_VL_THINKING_TEMPLATE = QWEN3_VL_CHAT_TEMPLATE.replace("'<|im_start|>assistant\\n'",
                                                            "'<|im_start|>assistant\\n<think>\\n'")
# Wider than the usual 0.02 so a random model's greedy answer depends on the page and question.
INIT_STD = 0.2


def make_tokenizer(vocab_size: int = 400, template: str = QWEN_VL_CHAT_TEMPLATE,
                   extra_tokens: tuple[str, ...] = (), tokenizer_class: type = Qwen2Tokenizer) -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer (of `tokenizer_class`, Qwen3.5's has its own) with Qwen's special
    tokens, `extra_tokens` and chat `template`."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TRAINING_TEXT * 4, trainer)
    spec = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    tokenizer = tokenizer_class(vocab=spec["vocab"], merges=merges, eos_token="<|im_end|>",
                                pad_token="<|endoftext|>", unk_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    tokenizer.add_tokens(list(extra_tokens))
    tokenizer.chat_template = template
    return tokenizer


TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "mrope_section": [2, 3, 3]}
TINY_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "fullatt_block_indexes": [1]}


def qwen2_5_vl_config(tokenizer: Qwen2Tokenizer, num_layers: int, text: dict = TINY_TEXT,
                      vision: dict = TINY_VISION, vocab_size: int | None = None,
                      init_std: float = INIT_STD) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config of any size whose special-token ids are `tokenizer`'s.

    `text` sets hidden_size, intermediate_size, num_attention_heads, num_key_value_heads,
    head_dim and mrope_section; `vision` sets depth, hidden_size, intermediate_size, num_heads
    and fullatt_block_indexes. Patches (14 px, 2x2 merge, 112 px windows) are the real ones.
    """
    tokens, text_config = _text_config(tokenizer, num_layers, text, vocab_size, init_std, {"rope_theta": 1_000_000.0})
    vision_config = {
        **vision, "out_hidden_size": text["hidden_size"], "patch_size": 14, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "window_size": 112, "in_channels": 3, "initializer_range": init_std,
    }
    return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, tie_word_embeddings=True,
                            initializer_range=init_std, **tokens)


def _text_config(tokenizer: Qwen2Tokenizer, num_layers: int, text: dict, vocab_size: int | None, init_std: float,
                 rope: dict) -> tuple[dict, dict]:
    """The token ids a Qwen-VL config names at its top, and its text config (tied embeddings, M-RoPE)."""
    ids = dict(zip(QWEN_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS), strict=True))
    special = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
               "pad_token_id": ids["<|endoftext|>"]}
    text = dict(text)
    rope = {"rope_type": "default", "mrope_section": text.pop("mrope_section"), **rope}
    text_config = {
        **text, "vocab_size": vocab_size or len(tokenizer), "num_hidden_layers": num_layers, "rope_parameters": rope,
        "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "initializer_range": init_std, **special,
    }
    tokens = {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
              "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"], **special}
    return tokens, text_config


TINY_QWEN3_VISION = {"depth": 3, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                     "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1, 2]}
TINY_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1,
            "mlp_only_layers": []}


def qwen3_vl_config(tokenizer: Qwen2Tokenizer, num_layers: int, moe: bool = False, text: dict = TINY_TEXT,
                    vision: dict = TINY_QWEN3_VISION, vocab_size: int | None = None,
                    init_std: float = INIT_STD) -> Qwen3VLConfig | Qwen3VLMoeConfig:
    """A Qwen3-VL config (MoE with `moe`) of any size whose special-token ids are `tokenizer`'s.

    `text` as for `qwen2_5_vl_config`; `vision` sets depth, hidden_size, intermediate_size,
    num_heads, num_position_embeddings and deepstack_visual_indexes. Patches (16 px, 2x2 merge),
    interleaved M-RoPE and tied embeddings are the real ones.
    """
    tokens, text_config = _text_config(tokenizer, num_layers, text, vocab_size, init_std,
                                       {"rope_theta": 5_000_000.0, "mrope_interleaved": True})
    text_config.update(TINY_MOE if moe else {})
    return _merged_32px_config(Qwen3VLMoeConfig if moe else Qwen3VLConfig, tokens, text_config, vision, init_std)


def _merged_32px_config(config_class, tokens: dict, text_config: dict, vision: dict, init_std: float):
    """A config whose vision tower cuts 16 px patches merged 2x2 (32 px per LLM token), with tied
    embeddings: Qwen3-VL's and Qwen3.5's."""
    vision_config = {
        **vision, "out_hidden_size": text_config["hidden_size"], "patch_size": 16, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "in_channels": 3, "initializer_range": init_std,
    }
    return config_class(text_config=text_config, vision_config=vision_config, tie_word_embeddings=True,
                        initializer_range=init_std, **tokens)


# Qwen3.5's attention is 'gated' (queries projected with an output gate) and rotates a quarter of
# each head; its linear-attention layers have heads of their own. Weights narrower than the other
# families' (0.1): the chunked delta rule in float32 drifts on wider random ones, which would hide
# real errors in the 1e-4 comparisons.
TINY_QWEN3_5_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "head_dim": 32, "mrope_section": [2, 1, 1], "linear_conv_kernel_dim": 4,
                     "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2,
                     "linear_num_value_heads": 4}
TINY_QWEN3_5_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "num_position_embeddings": 64}
TINY_QWEN3_5_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                    "shared_expert_intermediate_size": 32}
QWEN3_5_INIT_STD = 0.1


def qwen3_5_tokenizer() -> Qwen3_5Tokenizer:
    """A tokenizer of Qwen3.5's class with its special tokens, thinking tokens and chat template."""
    return make_tokenizer(template=QWEN3_5_CHAT_TEMPLATE, extra_tokens=tuple(THINK_TOKENS),
                          tokenizer_class=Qwen3_5Tokenizer)


def hybrid_layer_types(num_layers: int, interval: int) -> list[str]:
    """Qwen3.5's layer pattern: `interval - 1` linear-attention layers, then a full-attention one."""
    return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)]


def qwen3_5_config(tokenizer, num_layers: int, moe: bool = False, text: dict = TINY_QWEN3_5_TEXT,
                   vision: dict = TINY_QWEN3_5_VISION, vocab_size: int | None = None,
                   init_std: float = QWEN3_5_INIT_STD, interval: int = 2,
                   experts: dict = TINY_QWEN3_5_MOE) -> Qwen3_5Config | Qwen3_5MoeConfig:
    """A Qwen3.5 config (MoE with `moe`, its `experts`) of any size whose special-token ids are
    `tokenizer`'s.

    `text` as for `qwen2_5_vl_config` plus the linear-attention dimensions (`linear_*`); `vision`
    sets depth, hidden_size, intermediate_size, num_heads and num_position_embeddings. A full-
    attention layer every `interval` layers (4 in the real checkpoints; 2 gives a tiny model several).
    16 px patches, 2x2 merge, interleaved M-RoPE on a quarter of each head, as released."""
    tokens, text_config = _text_config(tokenizer, num_layers, text, vocab_size, init_std,
                                       {"rope_theta": 10_000_000.0, "mrope_interleaved": True,
                                        "partial_rotary_factor": 0.25})
    text_config.update({**(experts if moe else {}), "layer_types": hybrid_layer_types(num_layers, interval)})
    return _merged_32px_config(Qwen3_5MoeConfig if moe else Qwen3_5Config, tokens, text_config, vision, init_std)


LLAMA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
LLAVA_TEXT = ["USER: \nWhat is it?\nAnswer ASSISTANT: A chat between a curious human and an artificial intelligence "
              "assistant. The assistant gives helpful, detailed, and polite answers to the human's questions."]


def make_llama_tokenizer(vocab_size: int = 400, template: str = LLAVA_CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """A sentencepiece-style BPE tokenizer as llava-hf's Llama one behaves: <s> opens every text,
    </s> ends an answer, `<image>` and `<pad>` are added tokens."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    bpe.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=LLAMA_SPECIAL_TOKENS)
    bpe.train_from_iterator((TRAINING_TEXT + LLAVA_TEXT) * 4, trainer)
    bos = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = template
    return tokenizer


TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
              "head_dim": 16}
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def llava_config(tokenizer: PreTrainedTokenizerFast, num_layers: int, text: dict = TINY_LLAMA,
                 vision: dict = TINY_CLIP, vocab_size: int | None = None, init_std: float = INIT_STD) -> LlavaConfig:
    """A LLaVA-1.5 config of any size whose special-token ids are `tokenizer`'s: CLIP at 336 px in
    14 px patches (the real 24 x 24 grid), read at its second-to-last layer without CLS, a
    two-layer GELU projector and a Llama decoder (rope theta 10000, untied head) as in llava-hf."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("bos_token_id", "<s>"), ("eos_token_id", "</s>"), ("pad_token_id", "<pad>"))}
    text_config = {**text, "vocab_size": vocab_size or len(tokenizer), "num_hidden_layers": num_layers,
                   "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "initializer_range": init_std,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0}, "model_type": "llama", **ids}
    vision_config = {**vision, "image_size": 336, "patch_size": 14, "projection_dim": text["hidden_size"],
                     "model_type": "clip_vision_model", "initializer_range": init_std}
    return LlavaConfig(vision_config=vision_config, text_config=text_config,
                       image_token_id=tokenizer.convert_tokens_to_ids("<image>"), projector_hidden_act="gelu",
                       vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576,
                       tie_word_embeddings=False, **ids)


def make_tiny(directory: str | Path, family: str = "qwen2_5_vl", seed: int = 0, num_layers: int = 4,
              thinking: bool = False) -> Path:
    """Write a tiny random checkpoint of `family` to `directory` and return its path; `thinking`
    gives a Qwen3-VL one the chat template of the Thinking checkpoints (Qwen3.5 thinks on request,
    whatever this says)."""
    if family not in FAMILIES:
        raise UsageError(f"no tiny model for family {family!r}; available: {', '.join(FAMILIES)}")
    if num_layers < 1:
        raise UsageError("a tiny model needs at least one layer")
    if thinking and family not in ("qwen3_vl", "qwen3_vl_moe"):
        raise UsageError("thinking checkpoints are Qwen3-VL ones: use --family qwen3_vl")
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from .backbones import FAMILIES as BACKBONES

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if family == "qwen2_5_vl":
        tokenizer = make_tokenizer()
        config = qwen2_5_vl_config(tokenizer, num_layers)
        processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                             min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28)
    elif family in ("qwen3_5", "qwen3_5_moe"):
        tokenizer = qwen3_5_tokenizer()
        config = qwen3_5_config(tokenizer, num_layers, moe=family == "qwen3_5_moe")
        processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                             image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                             min_pixels=4 * 32 * 32, max_pixels=16384 * 32 * 32)
    elif family == "llava":
        tokenizer = make_llama_tokenizer()
        config = llava_config(tokenizer, num_layers)
        processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    else:
        template = QWEN3_VL_THINKING_TEMPLATE if thinking else QWEN3_VL_CHAT_TEMPLATE
        tokenizer = make_tokenizer(template=template, extra_tokens=tuple(THINK_TOKENS))
        config = qwen3_vl_config(tokenizer, num_layers, moe=family == "qwen3_vl_moe")
        processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                             image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                             min_pixels=4 * 32 * 32, max_pixels=16384 * 32 * 32)
    torch.manual_seed(seed)
    model = BACKBONES[family].model_class(config).eval()
    if family == "llava":
        model.generation_config = GenerationConfig(eos_token_id=config.text_config.eos_token_id,
                                                   pad_token_id=config.text_config.pad_token_id, do_sample=False)
    else:
        im_end, eot = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
        model.generation_config = GenerationConfig(eos_token_id=[im_end, eot], pad_token_id=eot, do_sample=False)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
