"""qzoom: answer questions about documents with a local vision-language model, fast.

Heavy modules (torch, transformers) load on first use of the names below, so `qzoom --help`
stays quick.
"""

from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {
    "QZoom": "api",
    "ZoomSettings": "options",
    "ZoomAdapter": "zoom.adapter",
    "Result": "results",
    "VisualBudget": "budget",
    "open_document": "documents",
    "make_tiny": "testing",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
