"""LoRA weights on the decoder layers (what `qzoom train sft` tunes), kept in the adapter folder in
peft's own format (`lora/`), loaded with the adapter and merged into the base weights for speed."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..backbones import Backbone
from ..errors import AdapterMismatch, EnvironmentProblem

LORA_FOLDER = "lora"
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: tuple[str, ...] = DECODER_LINEARS  # linear layers inside each decoder layer, by name


def decoder_pattern(backbone: Backbone, targets: tuple[str, ...]) -> str:
    """A regex matching exactly the `targets` linear layers of the base decoder layers (never the
    vision tower's, never the zoom branches', which live outside the base model)."""
    prefix = next((name for name, module in backbone.model.named_modules() if module is backbone.decoder_layers), None)
    if prefix is None:
        raise AdapterMismatch(f"{backbone.family}: the decoder layers are not part of the model")
    leaves = "|".join(re.escape(t) for t in targets)
    return rf"{re.escape(prefix)}\.\d+\.(?:.*\.)?(?:{leaves})"


def attach_lora(backbone: Backbone, settings: LoraSettings) -> nn.Module:
    """The base model with fresh LoRA layers on its decoder (B = 0: it still answers as before);
    returns peft's wrapper, whose `save_pretrained` writes the LoRA weights."""
    peft = _peft()
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=decoder_pattern(backbone, settings.targets))
    return peft.get_peft_model(backbone.model, config)


def load_lora(backbone: Backbone, adapter_dir: str | Path, merge: bool = True) -> None:
    """Attach the LoRA weights an adapter folder holds (if any), merged into the base weights unless
    `merge` is False."""
    folder = Path(adapter_dir) / LORA_FOLDER
    if not folder.is_dir():
        return
    peft = _peft()
    try:
        wrapped = peft.PeftModel.from_pretrained(backbone.model, folder, is_trainable=False)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise AdapterMismatch(f"the LoRA weights in {folder} do not fit {backbone.model_id}: {exc}") from None
    if merge:
        wrapped.merge_and_unload()


def _peft():
    try:
        import peft
    except ImportError:
        raise EnvironmentProblem("LoRA weights need peft (a qzoom dependency): pip install 'peft>=0.17,<1'") from None
    return peft
