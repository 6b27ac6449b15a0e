"""Where a model or an adapter named by the user is: a local folder or a hub id, cached or not,
and the one-line answer when it cannot be had. Light (no torch), so a command refuses a mistyped
folder or an uncached model offline before it imports the ML libraries."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants

from .errors import ModelNotAvailable

log = logging.getLogger("qzoom")
TRIAL = "to try qzoom without a download: `qzoom models make-tiny DIR` and --model DIR"
_went_offline = False  # set when qzoom, not the user, switched the hub off


def resolve_model_ref(ref: str) -> str:
    """A local directory as an absolute path, a hub id unchanged; a missing directory is an error."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ModelNotAvailable(f"model directory {ref} does not exist")
    return ref


def check_local_refs(model: str, adapter: str | None = None, revision: str | None = None) -> None:
    """What can be known without the ML libraries: the folders given exist, a model folder holds a
    config, and a hub model is in the cache when the hub is off or out of reach."""
    from huggingface_hub import try_to_load_from_cache

    source = resolve_model_ref(model)
    if Path(source).is_dir():
        if not (Path(source) / "config.json").is_file():
            raise not_available(model, revision, FileNotFoundError("it has no config.json"))
    elif not isinstance(try_to_load_from_cache(source, "config.json", revision=revision), str):
        use_cache_when_hub_unreachable()
        if constants.HF_HUB_OFFLINE:
            raise not_available(model, revision, FileNotFoundError("not cached"))
    if adapter is not None and not Path(adapter).expanduser().is_dir():
        raise ModelNotAvailable(f"adapter folder {adapter} does not exist")


def display_name(model_id: str) -> str:
    """A model's name for people and clients: a hub id as it is, a local folder (which qzoom holds
    by its absolute path) by its own name, never the path of a machine's files."""
    return Path(model_id).name if Path(model_id).is_absolute() else model_id


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


def not_available(ref: str, revision: str | None, exc: Exception) -> ModelNotAvailable:
    """One line that says what failed and what fixes it: a local folder that is not a checkpoint,
    a hub model that is not cached offline, a hub that cannot be reached, or an id the hub refuses."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    at = f"@{revision}" if revision else ""
    pull = f"`qzoom models pull {ref}{f' --revision {revision}' if revision else ''}`"
    if Path(ref).expanduser().is_dir():
        return ModelNotAvailable(f"model folder {ref} is not a loadable checkpoint (a config.json and the weights "
                                 f"are needed): {reason}")
    if constants.HF_HUB_OFFLINE and not _went_offline:
        return ModelNotAvailable(f"{ref}{at} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: download it "
                                 f"where there is network ({pull}), or pass --model a local folder; {TRIAL}")
    if _went_offline or _unreachable(exc):
        return ModelNotAvailable(f"cannot reach the Hugging Face hub for {ref}{at}, and it is not in the local cache: "
                                 f"fetch it where there is network ({pull}); from then on it loads from the cache; "
                                 f"{TRIAL}")
    return ModelNotAvailable(f"cannot load model {ref}{at}: check the id and revision, and your access to it "
                             f"(`hf auth login` for gated models) ({reason})")
