"""`qzoom serve`: one loaded model answering over HTTP (`/v1/ask`, an OpenAI-compatible
`/v1/chat/completions`, `/health`, `/metrics`).

Needs the `serve` extra (`pip install "qzoom[serve]"`).
"""

from .app import create_app
from .options import AskOptions, ServeSettings

__all__ = ["AskOptions", "ServeSettings", "create_app"]
