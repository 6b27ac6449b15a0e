"""`qzoom models pull` and what `models list` says of the cache: a checkpoint fetched into the
Hugging Face cache ahead of its first use (with progress, resumable), and what is there already."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants

from .errors import ModelNotAvailable, UnsupportedModel, UsageError

# what loading a checkpoint reads: configs, weights, tokenizer and processor files, chat templates
NEEDED = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")
LEGACY_WEIGHTS = "*.bin"  # pulled only where a repository has no safetensors weights


def pull_patterns(files: list[str]) -> list[str]:
    """The file patterns to fetch from a repository holding `files`: what a checkpoint needs, the
    old pickled weights only when there are no safetensors (never both: half the download)."""
    safetensors = any(fnmatch.fnmatch(name, "*.safetensors") for name in files)
    return list(NEEDED) + ([] if safetensors else [LEGACY_WEIGHTS])


@dataclass
class PullPlan:
    files: int
    total_bytes: int
    download_bytes: int


def gigabytes(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def pull(ref: str, revision: str | None = None, on_plan=lambda plan: None) -> Path:
    """Fetch checkpoint `ref` (a hub id) into the Hugging Face cache; returns its snapshot folder.
    The config is read first, so a family qzoom cannot run is refused before the weights come; a
    pull stopped half way resumes where it stopped."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    from .backbones import FAMILIES, not_available

    if Path(ref).expanduser().is_dir():
        raise UsageError(f"{ref} is a local folder: there is nothing to pull, pass it as --model")
    if constants.HF_HUB_OFFLINE:
        raise ModelNotAvailable(f"cannot pull {ref} while HF_HUB_OFFLINE=1: unset it where there is network")
    try:
        files = HfApi().list_repo_files(ref, revision=revision)
        config = Path(hf_hub_download(ref, "config.json", revision=revision))
    except Exception as exc:  # the hub's failures (not found, gated, unreachable) each become one line
        raise not_available(ref, revision, exc) from exc
    family = _model_type(config)
    if family not in FAMILIES:
        raise UnsupportedModel(f"{ref} is a {family!r} model, which qzoom does not run; supported: "
                               f"{', '.join(sorted(FAMILIES))}")
    patterns = pull_patterns(files)
    planned = snapshot_download(ref, revision=revision, allow_patterns=patterns, dry_run=True)
    on_plan(PullPlan(len(planned), sum(f.file_size for f in planned),
                     sum(f.file_size for f in planned if f.will_download)))
    return Path(snapshot_download(ref, revision=revision, allow_patterns=patterns))


def _model_type(config: Path) -> str:
    import json

    try:
        return str(json.loads(config.read_text(encoding="utf-8")).get("model_type"))
    except (ValueError, AttributeError) as exc:
        raise ModelNotAvailable(f"{config} is not a model config: {exc}") from None


def cached_sizes() -> dict[str, int]:
    """{hub id: bytes on disk} of the models in the Hugging Face cache (nothing when there is none)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(constants.HF_HUB_CACHE)
    except CacheNotFound:
        return {}
    return {repo.repo_id: repo.size_on_disk for repo in info.repos if repo.repo_type == "model"}
