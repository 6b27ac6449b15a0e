"""Original-layout LLaVA-1.5 checkpoints (LlavaLlamaForCausalLM, the layout SD-RPN publishes its
region heads in) to the llava-hf layout transformers loads, with the region head as a qzoom
adapter in the same folder (`QZoom.from_pretrained` then loads both).

Every source tensor is accounted for: mapped into the llava-hf model, mapped into the adapter, or
dropped for a stated reason; anything else is an error, and so is any llava-hf weight left
without a source. SD-RPN's region score normalises the head's hidden states with its own RMS
norm (`twig_norm`) and scores queries against keys without the rotary embedding, and its map
becomes a region by SD-RPN's own rule (`zoom/sd_rpn.py`); the adapter records all three
(`region_norm`, `region_rotary`, `region_rule`).
"""

from __future__ import annotations

import json
import pickle
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import IncompatibleCheckpoint, ModelError, ModelNotAvailable, UsageError
from .zoom.adapter import ADAPTER_CONFIG, ADAPTER_FORMAT, ADAPTER_WEIGHTS, SD_RPN_RULE, AdapterConfig

# source key -> llava-hf key (None: the adapter's), in order; the first match wins
_BASE_RULES = [
    (r"^model\.embed_tokens\.(.+)$", r"model.language_model.embed_tokens.\1"),
    (r"^model\.layers\.(.+)$", r"model.language_model.layers.\1"),
    (r"^model\.norm\.(.+)$", r"model.language_model.norm.\1"),
    (r"^lm_head\.(.+)$", r"lm_head.\1"),
    (r"^model\.mm_projector\.0\.(.+)$", r"model.multi_modal_projector.linear_1.\1"),
    (r"^model\.mm_projector\.2\.(.+)$", r"model.multi_modal_projector.linear_2.\1"),
    (r"^model\.vision_tower\.vision_tower\.vision_model\.(.+)$", r"model.vision_tower.\1"),
]
_ADAPTER_RULES = [
    (r"^model\.twig_layers\.(.+)$", r"twig_layers.\1"),
    (r"^model\.twig_norm\.(.+)$", r"twig_norm.\1"),
]
_DROPPED = [
    (r"\.rotary_emb\.inv_freq$", "rotary frequencies, recomputed from the config"),
    (r"^twig_head\.weight$", "SD-RPN's training-only copy of the LM head"),
]
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
VOCAB_MULTIPLE = 64  # llava-hf pads the grown vocabulary to a multiple of 64
SD_RPN_ROI_THRESHOLD = 0.15  # SD-RPN's LLaVA cut-off on the sigmoid region map


def convert_llava(source: str | Path, destination: str | Path, vision_tower: str | None = None) -> dict:
    """Write `destination` (a llava-hf checkpoint, plus the adapter when the source has a region
    head) from the original-layout checkpoint folder `source`; returns what was done."""
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        CLIPVisionConfig,
        CLIPVisionModel,
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from .backbones.llava import LLAVA_CHAT_TEMPLATE

    source, destination = Path(source), Path(destination)
    original = _original_config(source)
    tensors = _read_tensors(source)
    base, adapter, dropped = _split(tensors)
    tower_ref = vision_tower or original.get("mm_vision_tower")
    if not tower_ref:
        raise UsageError(f"{source} names no vision tower (mm_vision_tower): give --vision-tower")
    with _loading(f"the vision tower {tower_ref}"):
        vision_config = CLIPVisionConfig.from_pretrained(tower_ref)
        if not any(key.startswith("model.vision_tower.") for key in base):  # original checkpoints keep it apart
            tower = CLIPVisionModel.from_pretrained(tower_ref)
            base.update({f"model.vision_tower.{key}": value for key, value in tower.state_dict().items()})
        image_processor = AutoImageProcessor.from_pretrained(tower_ref)
    with _loading(f"the tokenizer of {source}"):
        tokenizer = AutoTokenizer.from_pretrained(source)
    added = [token for token in (IMAGE_TOKEN, PAD_TOKEN) if token not in tokenizer.get_vocab()]
    if IMAGE_TOKEN in added:
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if PAD_TOKEN in added:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.chat_template = tokenizer.chat_template or LLAVA_CHAT_TEMPLATE
    rows = base["model.language_model.embed_tokens.weight"].shape[0]
    vocab = rows if len(tokenizer) <= rows else -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        base[key] = _grown(base[key], vocab)

    config = LlavaConfig(
        text_config=_text_config(original, vocab, tokenizer), vision_config=vision_config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), projector_hidden_act="gelu",
        vision_feature_layer=original.get("mm_vision_select_layer", -2), vision_feature_select_strategy="default",
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    _check_complete(base, model.state_dict(), "the llava-hf model")
    model.load_state_dict(base, assign=True)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    destination.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(destination)  # transformers' own layout and sharding
    tokenizer.save_pretrained(destination)
    image_processor.save_pretrained(destination)
    report = {"checkpoint": str(destination), "tensors": len(base), "added_tokens": added, "vocab": vocab,
              "dropped": dropped, "adapter": None}
    if original.get("enable_twig"):
        report["adapter"] = _write_adapter(original, adapter, config, destination)
    elif adapter:
        raise IncompatibleCheckpoint(f"{source} holds region-head tensors but its config does not enable them")
    return report


def _original_config(source: Path) -> dict:
    path = source / "config.json"
    if not path.is_file():
        raise ModelNotAvailable(f"{source} is not a checkpoint folder (no config.json)")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("model_type") not in ("llava", "llava_llama") or "mm_projector_type" not in config:
        raise IncompatibleCheckpoint(f"{source} is not an original-layout LLaVA checkpoint (model_type "
                                     f"{config.get('model_type')!r}, no mm_projector_type)")
    unsupported = {key: config.get(key) for key, wanted in (("mm_projector_type", "mlp2x_gelu"),
                                                            ("mm_vision_select_feature", "patch"),
                                                            ("image_aspect_ratio", "pad"),
                                                            ("roi_source", "qk"), ("roi_super_type", "v1"))
                   if config.get(key, wanted) != wanted}
    if config.get("enable_twig") and not config.get("roi_multi_head", False):
        unsupported["roi_multi_head"] = False
    if unsupported:
        raise IncompatibleCheckpoint(f"{source}: unsupported LLaVA settings {unsupported} (qzoom converts "
                                     "LLaVA-1.5 with the two-layer projector, padded images and SD-RPN's "
                                     "multi-head q.k region head)")
    return config


@contextmanager
def _loading(what: str):
    """Loading failures (not cached offline, unreachable, damaged) as one clear model error."""
    try:
        yield
    except (OSError, ValueError) as exc:
        raise ModelNotAvailable(f"cannot load {what}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}"
                                ) from None


def _read_tensors(source: Path) -> dict[str, torch.Tensor]:
    files = sorted(source.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as handle:
                tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{path} is damaged: {exc}") from None
    if not files:
        for path in sorted(source.glob("pytorch_model*.bin")):
            try:
                tensors.update(torch.load(path, map_location="cpu", weights_only=True))
            except (RuntimeError, OSError, pickle.UnpicklingError) as exc:
                raise ModelError(f"{path} is damaged or not a weights file: {exc}") from None
    if not tensors:
        raise ModelNotAvailable(f"{source} holds no weights (*.safetensors or pytorch_model*.bin)")
    return tensors


def _split(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """(llava-hf tensors, adapter tensors, {dropped kind: count}); an unknown key is an error."""
    base, adapter, dropped, unknown = {}, {}, {}, []
    for key, tensor in tensors.items():
        reason = next((why for pattern, why in _DROPPED if re.search(pattern, key)), None)
        if reason is not None:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        for rules, into in ((_BASE_RULES, base), (_ADAPTER_RULES, adapter)):
            target = next((re.sub(pattern, repl, key) for pattern, repl in rules if re.match(pattern, key)), None)
            if target is not None:
                into[target] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise IncompatibleCheckpoint(f"{len(unknown)} source tensors map to nothing (e.g. {sorted(unknown)[0]}): "
                                     "not an LLaVA-1.5 / SD-RPN checkpoint qzoom knows")
    return base, adapter, dropped


def _text_config(original: dict, vocab: int, tokenizer) -> dict:
    heads = original["num_attention_heads"]
    return {"model_type": "llama", "vocab_size": vocab, "hidden_size": original["hidden_size"],
            "intermediate_size": original["intermediate_size"], "num_hidden_layers": original["num_hidden_layers"],
            "num_attention_heads": heads, "num_key_value_heads": original.get("num_key_value_heads", heads),
            "head_dim": original.get("head_dim", original["hidden_size"] // heads),
            "max_position_embeddings": original.get("max_position_embeddings", 4096),
            "rms_norm_eps": original.get("rms_norm_eps", 1e-5),
            "rope_parameters": {"rope_type": "default", "rope_theta": original.get("rope_theta", 10_000.0)},
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "tie_word_embeddings": False}


def _grown(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` with rows added up to `rows`, each the mean of the existing ones."""
    if weight.shape[0] == rows:
        return weight
    extra = weight.float().mean(dim=0, keepdim=True).to(weight.dtype).expand(rows - weight.shape[0], -1)
    return torch.cat([weight, extra])


def _check_complete(tensors: dict, expected: dict, what: str) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshapen = sorted(key for key in set(tensors) & set(expected) if tensors[key].shape != expected[key].shape)
    problems = [f"{label} {len(keys)} (e.g. {keys[0]})" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if keys]
    if problems:
        raise IncompatibleCheckpoint(f"the converted weights do not fit {what}: {'; '.join(problems)}")


def _write_adapter(original: dict, tensors: dict, config, destination: Path) -> str:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

    k, t = original.get("twig_K"), original.get("twig_T")
    if not isinstance(k, int) or not isinstance(t, int):
        raise IncompatibleCheckpoint("the source enables its region head but gives no integer twig_K/twig_T")
    text = config.text_config
    with torch.device("meta"):
        expected = {f"twig_layers.{i}.{key}": value for i in range(t)
                    for key, value in LlamaDecoderLayer(text, k + i).state_dict().items()}
        expected.update({f"twig_norm.{key}": value for key, value in
                         LlamaRMSNorm(text.hidden_size, eps=text.rms_norm_eps).state_dict().items()})
    _check_complete(tensors, expected, f"a region head of {t} layers after layer {k} with its norm")
    adapter = AdapterConfig(branch_layer=k, depth=t, region_head=True, gate=False, region_norm=True,
                            region_rotary=False, region_rule=SD_RPN_RULE, roi_threshold=SD_RPN_ROI_THRESHOLD,
                            family="llava", hidden_size=text.hidden_size,
                            training={"converted": {"from": "SD-RPN original-layout LLaVA checkpoint"}})
    save_file({key: value.contiguous() for key, value in tensors.items()}, destination / ADAPTER_WEIGHTS,
              metadata={"format": ADAPTER_FORMAT})
    (destination / ADAPTER_CONFIG).write_text(adapter.to_json())
    return str(destination)
