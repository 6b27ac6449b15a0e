"""Training samples: one (document page, question) each, from a manifest.

A row with `pages` gives one sample per listed page; a row without gives one per page of its
document (a single image is one page). Unreadable documents and bad rows are skipped and
counted, never fatal.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..documents import open_document, parse_page_spec
from ..errors import QZoomError, ResumeMismatch
from ..manifest import ManifestRow, RowError
from ..options import changed_settings
from .saved import read_json, reading_back, write_whole, writing


@dataclass(frozen=True)
class TrainSample:
    id: str
    file: str
    password: str | None
    page: int
    question: str
    sha256: str
    answers: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """Stable name of this sample's cached artefacts (independent of the manifest's order)."""
        digest = hashlib.sha256(f"{self.sha256}|{self.page}|{self.question}".encode()).hexdigest()
        return digest[:32]

    @property
    def judged_key(self) -> str:
        """The name of what is judged against the sample's reference answers too (mined verdicts):
        references changed in the manifest are judged again, not read from the cache."""
        return hashlib.sha256(f"{self.key}|{json.dumps(self.answers)}".encode()).hexdigest()[:32]


def skipped_text(skipped: dict[str, int]) -> str:
    """'2 answer too short for a map, 1 unreadable document', or 'none'."""
    return ", ".join(f"{n} {reason}" for reason, n in skipped.items()) or "none"


@dataclass
class SampleSet:
    samples: list[TrainSample]
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def fingerprint(self) -> str:
        """sha256 of the (document, page, question) triples: which data an adapter was trained on."""
        digest = hashlib.sha256()
        for sample in sorted(self.samples, key=lambda s: s.key):
            digest.update(f"{sample.sha256}|{sample.page}|{sample.question}\n".encode())
        return digest.hexdigest()


def expand_samples(rows: list[ManifestRow | RowError], max_samples: int | None = None) -> SampleSet:
    out = SampleSet([])
    for row in rows:
        if isinstance(row, RowError):
            out.skip(f"bad manifest row ({row.code})")
            continue
        try:
            with open_document(row.file, password=row.password) as doc:
                pages = parse_page_spec(row.pages, doc.page_count)
                digest = doc.sha256
        except QZoomError as exc:
            out.skip(f"unreadable document ({exc.code})")
            continue
        for page in pages:
            out.samples.append(TrainSample(row.id if len(pages) == 1 else f"{row.id}#p{page}", row.file,
                                           row.password, page, row.question, digest, tuple(row.answers)))
        if max_samples is not None and len(out.samples) >= max_samples:
            out.samples = out.samples[:max_samples]
            break
    return out


@dataclass(frozen=True)
class Shard:
    """This process's share of the samples when several run (accelerate launch), and a barrier."""

    rank: int = 0
    world: int = 1
    state: object = None

    def owns(self, index: int) -> bool:
        return index % self.world == self.rank

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    @classmethod
    def current(cls) -> Shard:
        import os

        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        return cls(state.process_index, state.num_processes, state)


class ArtefactStore:
    """One safetensors file of tensors (+ JSON metadata) per sample, in a folder: resumable caches.

    With `settings` (what the artefacts depend on), a folder made with other settings is refused
    rather than mixed with new work."""

    SETTINGS = "settings.json"

    def __init__(self, folder: str | Path, settings: dict | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if settings is not None:
            self._check(json.loads(json.dumps(settings)))

    def _check(self, settings: dict) -> None:
        path = self.folder / self.SETTINGS
        if path.exists():
            saved = read_json(path, f"delete {self.folder} to compute its work afresh, or write to another --output")
            changed = changed_settings(saved, settings)
            if changed:
                raise ResumeMismatch(f"{self.folder} holds work done with other settings ({', '.join(changed)}): "
                                     "rerun with the same options, or write to another --output")
        else:
            write_whole(path, json.dumps(settings, indent=2))

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).exists()

    def save(self, key: str, tensors: dict, meta: dict) -> None:
        temporary = self.folder / f".{key}.tmp"
        with writing(self.path(key)):
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, temporary,
                      metadata={"meta": json.dumps(meta)})
            temporary.replace(self.path(key))

    def load(self, key: str) -> tuple[dict, dict]:
        from safetensors import safe_open

        path = self.path(key)
        with reading_back(path, "delete it and rerun: only its sample is computed again"):
            with safe_open(path, framework="pt") as handle:
                meta = json.loads(handle.metadata()["meta"])
            return load_file(path), meta
