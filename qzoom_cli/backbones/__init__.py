"""Model families behind one interface, and the loader that picks the family from a checkpoint."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import constants
from transformers import AutoConfig

from ..errors import ModelError, ModelNotAvailable, UnsupportedModel
from ..runtime import Runtime
from .base import (
    Backbone,
    FamilyLayout,
    ImageBlock,
    ImageEncoding,
    ModelInputs,
    Prompt,
    VisualAdditions,
)
from .qwen2_5_vl import Qwen2_5_VLBackbone
from .qwen3_vl import Qwen3VLBackbone, Qwen3VLMoeBackbone

FAMILIES: dict[str, type[Backbone]] = {cls.family: cls for cls in (Qwen2_5_VLBackbone, Qwen3VLBackbone,
                                                                    Qwen3VLMoeBackbone)}
PLANNED_FAMILIES = ("llava",)

__all__ = ["Backbone", "FamilyLayout", "ImageBlock", "ImageEncoding", "ModelInputs", "Prompt", "VisualAdditions",
           "FAMILIES", "load_backbone", "detect_family"]


def _not_available(ref: str, revision: str | None, exc: Exception) -> ModelNotAvailable:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    at = f"@{revision}" if revision else ""
    if constants.HF_HUB_OFFLINE:
        hint = (f"it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; download it first "
                f"(`hf download {ref}`) or pass --model a local directory")
    else:
        hint = "check the id or path, your network, and access rights"
    return ModelNotAvailable(f"cannot load model {ref}{at}: {hint} ({reason})")


def resolve_model_ref(ref: str) -> str:
    """A local directory as an absolute path, a hub id unchanged; a missing directory is an error."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ModelNotAvailable(f"model directory {ref} does not exist")
    return ref


def detect_family(ref: str, revision: str | None = None) -> str:
    """The checkpoint's `model_type`, loading only its config."""
    try:
        config = AutoConfig.from_pretrained(resolve_model_ref(ref), revision=revision)
    except (OSError, ValueError) as exc:
        raise _not_available(ref, revision, exc) from exc
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


def load_backbone(ref: str, runtime: Runtime, revision: str | None = None, processor: str | None = None) -> Backbone:
    """Load a checkpoint (hub id or local directory) into the backbone of its family; the
    tokenizer and image processor come from `processor` when given (a base repo whose chat
    template is known good), else from the checkpoint."""
    family = detect_family(ref, revision)
    if family not in FAMILIES:
        planned = " (planned, not implemented yet)" if family in PLANNED_FAMILIES else ""
        raise UnsupportedModel(
            f"model family {family!r}{planned} is not supported; supported: {', '.join(sorted(FAMILIES))}"
        )
    source = Path(resolve_model_ref(processor or ref))
    if source.is_dir():
        check_processor_files(source)
    try:
        return FAMILIES[family].from_pretrained(resolve_model_ref(ref), revision=revision, device=runtime.device,
                                                dtype=runtime.dtype, attn=runtime.attn,
                                                processor=resolve_model_ref(processor) if processor else None)
    except OSError as exc:
        raise _not_available(ref, revision, exc) from exc
