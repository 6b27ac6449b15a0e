"""`qzoom doctor`: what this machine offers qzoom, gathered in one dict (also the JSON output)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

from packaging.specifiers import SpecifierSet

from .errors import EnvironmentProblem

# The transformers releases qzoom is tested against: it drives model internals whose
# signatures moved between 5.x minor releases.
SUPPORTED_TRANSFORMERS = SpecifierSet(">=5.23,<5.24")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_transformers() -> None:
    """Raise EnvironmentProblem (exit 4) when the installed transformers is outside the tested range."""
    installed = package_version("transformers")
    if installed is None or installed not in SUPPORTED_TRANSFORMERS:
        raise EnvironmentProblem(
            f"transformers {installed or 'is not installed'}: qzoom needs transformers{SUPPORTED_TRANSFORMERS} "
            "(reinstall qzoom, and see `qzoom doctor`)"
        )


def collect_report() -> dict:
    import torch
    from huggingface_hub import constants

    from . import __version__

    devices = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append({"device": f"cuda:{index}", "name": props.name,
                            "memory_gib": round(props.total_memory / 2**30, 1),
                            "capability": f"{props.major}.{props.minor}",
                            "bf16": torch.cuda.is_bf16_supported()})
    if torch.backends.mps.is_available():
        devices.append({"device": "mps", "name": "Apple MPS"})
    devices.append({"device": "cpu", "name": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads()})
    transformers_version = package_version("transformers")
    return {
        "qzoom": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: package_version(name) for name in
                     ("torch", "transformers", "accelerate", "tokenizers", "safetensors", "huggingface-hub",
                      "pymupdf", "pillow", "typer", "rich", "flash-attn", "torchvision",
                      "flash-linear-attention", "causal-conv1d")},
        "transformers_supported": str(SUPPORTED_TRANSFORMERS),
        "transformers_ok": transformers_version is not None and transformers_version in SUPPORTED_TRANSFORMERS,
        "cuda": {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda},
        "devices": devices,
        "flash_attention": _flash_attention_available(),
        "hub": {"cache": str(constants.HF_HUB_CACHE),
                "offline": bool(constants.HF_HUB_OFFLINE),
                "endpoint": constants.ENDPOINT,
                "token_set": bool(os.environ.get("HF_TOKEN"))},
        "qzoom_device_env": os.environ.get("QZOOM_DEVICE"),
    }


def _flash_attention_available() -> bool:
    from .runtime import flash_attention_available  # imports torch: only for the report

    return flash_attention_available()
