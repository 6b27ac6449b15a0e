"""Model families behind one interface, and the loader that picks the family from a checkpoint."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants
from transformers import AutoConfig

from ..errors import ModelError, ModelNotAvailable, UnsupportedModel, one_line
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


TRIAL = "to try qzoom without a download: `qzoom models make-tiny DIR` and --model DIR"
log = logging.getLogger("qzoom")
_went_offline = False  # set when qzoom, not the user, switched the hub off


def use_cache_when_hub_unreachable() -> None:
    """Without a resolvable hub host, go offline for this process: a cached model then loads at
    once instead of after half a minute of retries, and a missing one fails with one line."""
    if constants.HF_HUB_OFFLINE:
        return
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
    except OSError:
        log.info("the Hugging Face hub cannot be reached: using the local cache only")
        constants.HF_HUB_OFFLINE = True
        global _went_offline
        _went_offline = True


def _unreachable(exc: BaseException) -> bool:
    """Whether loading failed for want of the hub (no network, or offline and not cached)."""
    while exc is not None:
        name = type(exc).__name__
        if "Connect" in name or "Timeout" in name or name == "LocalEntryNotFoundError" or \
                "couldn't connect" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _not_available(ref: str, revision: str | None, exc: Exception) -> ModelNotAvailable:
    """One line that says what failed and what fixes it: a local folder that is not a checkpoint,
    a hub model that is not cached offline, a hub that cannot be reached, or an id the hub refuses."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    at = f"@{revision}" if revision else ""
    if Path(ref).is_dir():
        return ModelNotAvailable(f"model folder {ref} is not a loadable checkpoint (a config.json and the weights "
                                 f"are needed): {reason}")
    if constants.HF_HUB_OFFLINE and not _went_offline:
        return ModelNotAvailable(f"{ref}{at} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: download it "
                                 f"where there is network (`hf download {ref}`), or pass --model a local folder; "
                                 f"{TRIAL}")
    if _went_offline or _unreachable(exc):
        return ModelNotAvailable(f"cannot reach the Hugging Face hub for {ref}{at}: download it where there is "
                                 f"network (`hf download {ref}`) and pass --model the folder, or set HF_HUB_OFFLINE=1 "
                                 f"if it is cached; {TRIAL}")
    return ModelNotAvailable(f"cannot load model {ref}{at}: check the id and revision, and your access to it "
                             f"(`hf auth login` for gated models) ({reason})")


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
    source = resolve_model_ref(ref)
    if not Path(source).is_dir():
        use_cache_when_hub_unreachable()
    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
    except Exception as exc:
        if not (Path(source) / "config.json").is_file() or (isinstance(exc, OSError) and not unreadable(exc)):
            raise _not_available(ref, revision, exc) from exc
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
        raise _not_available(ref, revision, exc) from exc
