"""`qzoom serve`: one loaded model answering over HTTP (`/v1/ask`, an OpenAI-compatible
`/v1/chat/completions`, `/health`, `/metrics`) and a page (`/`) that shows where it looked.

Needs the `serve` extra (`pip install "qzoom[serve]"`).
"""

from .app import create_app
from .options import AskOptions, ServeSettings

__all__ = ["AskOptions", "ServeSettings", "create_app"]
