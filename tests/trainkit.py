"""A synthetic collection for training tests: pages with a red square somewhere, and teacher maps
that point at it (written into the label cache as a finished teacher pass would)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from qzoom_cli.manifest import read_manifest
from qzoom_cli.training.data import ArtefactStore, expand_samples
from qzoom_cli.training.pseudo_labels import padding_cells, pseudo_labels

SIDE = 8          # 8 x 8 = 64-token square views keep the tests fast
PIXELS = SIDE * 28


def red_square_pages(folder: Path, count: int, seed: int = 0) -> tuple[Path, list[tuple[int, int]]]:
    """`count` pages with a 2x2-cell red square at a random cell, and their manifest."""
    rng = random.Random(seed)
    rows, cells = [], []
    for i in range(count):
        x, y = rng.randrange(SIDE - 1), rng.randrange(SIDE - 1)
        image = Image.new("RGB", (PIXELS, PIXELS), "white")
        draw = ImageDraw.Draw(image)
        draw.rectangle([x * 28, y * 28, x * 28 + 55, y * 28 + 55], fill=(220, 20, 20))
        draw.point((PIXELS - 1 - i % PIXELS, PIXELS - 1), fill=(250, 250, 250))  # every page distinct
        image.save(folder / f"page{i}.png")
        rows.append({"id": f"s{i}", "file": f"page{i}.png", "question": "Where is the red square?"})
        cells.append((x, y))
    manifest = folder / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest, cells


def seed_teacher_labels(manifest: Path, cells: list[tuple[int, int]], store_dir: Path):
    """Teacher maps pointing at each page's square, cached as the teacher pass would cache them."""
    samples = expand_samples(read_manifest(manifest))
    store = ArtefactStore(store_dir)
    padding = padding_cells(SIDE, PIXELS, PIXELS)
    for sample, (x, y) in zip(samples.samples, cells, strict=True):
        grounding = torch.full((SIDE, SIDE), 0.001)
        grounding[y:y + 2, x:x + 2] = 0.2
        labels = pseudo_labels(grounding, torch.zeros(SIDE, SIDE), padding)
        store.save(sample.key, {"grounding": grounding, "sink": torch.zeros(SIDE, SIDE), "padding": padding,
                                "labels": labels.labels}, {"skipped": labels.skipped, "answer": "seeded"})
    return samples


def seed_mined(manifest: Path, store_dir: Path, plain: str, zoomed: str, kind: str = "regression",
               judged_by: str = "references", box=(1, 1, 3, 3)):
    """Mined pairs cached as a finished mining pass would cache them: every sample answered `plain`
    without the region and `zoomed` with it, the reference being the right one of the two."""
    verdicts = {"regression": [True, False], "improvement": [False, True], "both right": [True, True],
                "both wrong": [False, False]}[kind]
    reference = plain if verdicts[0] else zoomed if verdicts[1] else "neither"
    store = ArtefactStore(store_dir)
    samples = expand_samples(read_manifest(manifest))
    for sample in samples.samples:
        store.save(sample.judged_key, {}, {"plain": plain, "zoomed": zoomed, "references": [reference],
                                           "judged_by": judged_by, "verdicts": verdicts, "box": list(box)})
    return samples


def stop_at(step: int):
    """An on_step that interrupts a run when it reports `step` (before that step's checkpoint)."""
    def stop(report):
        if report.step == step:
            raise KeyboardInterrupt
    return stop


def mined_pairs(manifest: Path, box=(1, 1, 3, 3)):
    """(samples by key, their mined pairs): each a regression (plain 'top left' right, zoomed
    'bottom' wrong) read at `box`, as fine-tuning takes them after mining."""
    from qzoom_cli.training.mining import Mined

    samples = {s.key: s for s in expand_samples(read_manifest(manifest)).samples}
    return samples, [Mined(key, s.question, "top left", "bottom", ("top left",), "references", "regression", box)
                     for key, s in samples.items()]


def seed_ladders(manifest: Path, store_dir: Path, ladder, questions_answers: dict[str, list[str]]):
    """Answer ladders cached as the gate's ladder pass would cache them, by question."""
    samples = expand_samples(read_manifest(manifest))
    store = ArtefactStore(store_dir)
    for sample in samples.samples:
        store.save(sample.key, {"ladder": torch.tensor(ladder)}, {"answers": questions_answers[sample.question]})
    return samples
