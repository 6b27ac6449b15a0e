"""`qzoom serve`: one loaded model answering over HTTP (`/v1/ask`, an OpenAI-compatible
`/v1/chat/completions`, `/health`, `/metrics`) and a page (`/`) that shows where it looked.

Needs the `serve` extra (`pip install "qzoom[serve]"`). The app (and with it torch) is imported
when first asked for, so `qzoom serve` checks its settings before the ML libraries load.
"""

from .options import AskOptions, ServeSettings

__all__ = ["AskOptions", "ServeSettings", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
