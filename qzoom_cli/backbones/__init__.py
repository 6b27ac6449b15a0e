"""Model families behind one interface, and the loader that picks the family from a checkpoint."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig

from ..errors import ModelError, UnsupportedModel, one_line
from ..refs import not_available, resolve_model_ref, use_cache_when_hub_unreachable
from ..runtime import Runtime
from .base import (
    Backbone,
    FamilyLayout,
    ImageBlock,
    ImageEncoding,
    ModelInputs,
    Prompt,
    VisualAdditions,
    unreadable,
)
from .llava import LlavaBackbone
from .qwen2_5_vl import Qwen2_5_VLBackbone
from .qwen3_5 import Qwen3_5Backbone, Qwen3_5MoeBackbone
from .qwen3_vl import Qwen3VLBackbone, Qwen3VLMoeBackbone

FAMILIES: dict[str, type[Backbone]] = {cls.family: cls for cls in (Qwen2_5_VLBackbone, Qwen3VLBackbone,
                                                                    Qwen3VLMoeBackbone, Qwen3_5Backbone,
                                                                    Qwen3_5MoeBackbone, LlavaBackbone)}

__all__ = ["Backbone", "FamilyLayout", "ImageBlock", "ImageEncoding", "ModelInputs", "Prompt", "VisualAdditions",
           "FAMILIES", "load_backbone", "detect_family"]


def detect_family(ref: str, revision: str | None = None) -> str:
    """The checkpoint's `model_type`, loading only its config."""
    source = resolve_model_ref(ref)
    if not Path(source).is_dir():
        use_cache_when_hub_unreachable()
    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
    except Exception as exc:
        if not (Path(source) / "config.json").is_file() or (isinstance(exc, OSError) and not unreadable(exc)):
            raise not_available(ref, revision, exc) from exc
        raise ModelError(f"the config.json of {ref} is not a valid model config ({one_line(exc)})") from None
    return config.model_type


TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))
IMAGE_PROCESSOR_FILES = (("preprocessor_config.json",), ("processor_config.json",))


def check_processor_files(folder: Path) -> None:
    """A local folder the tokenizer and image processor load from must have their files: without
    them transformers builds an empty tokenizer and the question never reaches the model."""
    missing = []
    for what, choices in (("tokenizer", TOKENIZER_FILES), ("image processor", IMAGE_PROCESSOR_FILES)):
        if not any(all((folder / name).is_file() for name in choice) for choice in choices):
            missing.append(f"{what} ({' or '.join(' + '.join(choice) for choice in choices)})")
    if missing:
        raise ModelError(f"model folder {folder} has no {' and no '.join(missing)}; copy them from the base "
                         "model's repository")


def load_backbone(ref: str, runtime: Runtime, revision: str | None = None, processor: str | None = None,
                  thinking: bool = False) -> Backbone:
    """Load a checkpoint (hub id or local directory) into the backbone of its family; the
    tokenizer and image processor come from `processor` when given (a base repo whose chat
    template is known good), else from the checkpoint. `thinking` asks a checkpoint that reasons
    on request (the chat template's enable_thinking) to do so."""
    family = detect_family(ref, revision)
    if family not in FAMILIES:
        raise UnsupportedModel(f"model family {family!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    source = Path(resolve_model_ref(processor or ref))
    if source.is_dir():
        check_processor_files(source)
    try:
        return FAMILIES[family].from_pretrained(resolve_model_ref(ref), revision=revision, device=runtime.device,
                                                dtype=runtime.dtype, attn=runtime.attn,
                                                processor=resolve_model_ref(processor) if processor else None,
                                                thinking=thinking)
    except OSError as exc:
        raise not_available(ref, revision, exc) from exc
