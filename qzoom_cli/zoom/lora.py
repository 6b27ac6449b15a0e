"""LoRA weights on the decoder layers (what `qzoom train sft` tunes), kept in the adapter folder in
peft's own format (`lora/`), loaded with the adapter and merged into the base weights for speed."""

from __future__ import annotations

from pathlib import Path

from ..backbones import Backbone
from ..errors import AdapterMismatch, EnvironmentProblem, UsageError

LORA_FOLDER = "lora"


def check_untuned(backbone: Backbone) -> None:
    """Refuse to tune a decoder already tuned: new LoRA weights learned on merged ones would not fit
    the base they are loaded onto."""
    if backbone.lora_dir is not None:
        raise UsageError(f"the model already carries LoRA weights ({backbone.lora_dir}): fine-tune from an "
                         "adapter without them (the one `train rpn` wrote)")


def load_lora(backbone: Backbone, adapter_dir: str | Path, *, merge: bool) -> None:
    """Attach the LoRA weights an adapter folder holds (if any), merged into the base weights when
    `merge` (faster; unmerged they are exact: `--no-merge`)."""
    folder = Path(adapter_dir) / LORA_FOLDER
    if not folder.is_dir():
        return
    peft = import_peft()
    try:
        wrapped = peft.PeftModel.from_pretrained(backbone.model, folder)  # frozen: peft's default
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise AdapterMismatch(f"the LoRA weights in {folder} do not fit {backbone.model_id}: {exc}") from None
    if merge:
        wrapped.merge_and_unload()
    backbone.lora_dir = folder


def import_peft():
    try:
        import peft
    except ImportError:
        raise EnvironmentProblem("LoRA weights need peft (a qzoom dependency): pip install 'peft>=0.17,<1'") from None
    return peft
