"""Stage 1, SD-RPN self-distillation: teach the region head where the model looks when it answers.

1. Teacher: for each (page, question), the frozen model answers on the square view and its
   grounding/sink attention maps are turned into tri-state labels (`pseudo_labels.py`); maps,
   labels and the reason a sample was skipped are cached on disk, one file per sample, so the
   pass resumes where it stopped.
2. Student: the twig layers start as copies of base layers K..K+T-1 and score every image cell
   from the last prompt token (`zoom/region.py`); selective BCE on the valid cells, pooled over
   the batch. Base layers 0..K-1 run without gradients, nothing above the branch runs at all.

Reported quality: the ROC AUC of the student's cell scores at separating the teacher's
foreground from background cells, on held-out samples, before and after training.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..api import QZoom
from ..backbones import Backbone, ImageBlock
from ..documents import Document, open_document
from ..errors import NothingToLearn, UsageError
from ..options import SHORT_ANSWER_INSTRUCTION, with_instruction
from ..padding import pad_segments
from ..zoom.adapter import AdapterConfig, ZoomAdapter
from ..zoom.region import region_logits, scoring_layer_problem
from .data import ArtefactStore, SampleSet, Shard, TrainSample, skipped_text
from .loop import (
    StepReport,
    Trainer,
    TrainOptions,
    enable_gradient_checkpointing,
    latest_checkpoint,
    options_dict,
    reading_checkpoint,
)
from .pseudo_labels import IGNORE, LabelSettings, padding_cells, pseudo_labels
from .saved import read_json, reading_back, write_whole, writing
from .teacher import HeadTable, square_view, teacher_heads, teacher_maps


@dataclass
class RpnSettings:
    branch_layer: int
    depth: int
    heads: HeadTable
    view_side: int = 24
    free_answers: bool = False
    teacher_max_new_tokens: int = 128
    labels: LabelSettings = field(default_factory=LabelSettings)
    held_out: float = 0.1
    dpi: int = 200


def rpn_settings(qz: QZoom, branch_layer: int | None = None, depth: int | None = None, **settings) -> RpnSettings:
    """Settings for `qz`: K and T as given, else the adapter's or the model card's; the teacher
    heads of the card's published table, else the fallback."""
    grid = qz.backbone.layout.fixed_grid
    side = settings.get("view_side", RpnSettings.view_side)
    if grid is not None and (side, side) != grid:
        raise UsageError(f"{qz.backbone.family} reads every page as its fixed {'x'.join(map(str, grid))} grid: "
                         f"train the region head on that view (--view-tokens {math.prod(grid)})")
    k, t = branch_layer or qz.engine.branch_layer, depth or qz.engine.depth
    problem = scoring_layer_problem(qz.backbone, k, t)
    if problem:
        raise UsageError(f"{problem} (--branch-layer, --depth)")
    heads = teacher_heads(qz.card.training if qz.card else None, k, qz.backbone.num_attention_heads,
                          qz.backbone.key_layers)
    return RpnSettings(branch_layer=k, depth=t, heads=heads, **settings)


def answer_instruction(free_answers: bool) -> str:
    """The instruction training asks with: inference's short-answer one, or none for free answers."""
    return "" if free_answers else SHORT_ANSWER_INSTRUCTION


def prompt_text(question: str, free_answers: bool) -> str:
    """Teacher and student read the question as inference will (short-answer instruction included)."""
    return with_instruction(question, answer_instruction(free_answers))


class _Pages:
    """Renders pages of the most recently used document (samples come grouped by document)."""

    def __init__(self, dpi: int):
        self.dpi, self.doc, self.password = dpi, None, None

    def render(self, sample: TrainSample):
        return self.document(sample).render(sample.page)

    def document(self, sample: TrainSample) -> Document:
        """The sample's document, open (the previous one is closed when another is needed)."""
        if self.doc is None or (self.doc.source, self.password) != (sample.file, sample.password):
            self.close()
            self.doc: Document = open_document(sample.file, password=sample.password, dpi=self.dpi)
            self.password = sample.password
        return self.doc

    def close(self) -> None:
        if self.doc is not None:
            self.doc.close()
            self.doc = None


def make_labels(backbone: Backbone, samples: SampleSet, settings: RpnSettings, store: ArtefactStore, shard: Shard,
                on_sample: Callable[[TrainSample, str | None], None] = lambda sample, skipped: None
                ) -> list[TrainSample]:
    """Teacher maps and labels for every sample not yet in `store` (this process's share of them);
    returns the usable samples."""
    pages, usable = _Pages(settings.dpi), []
    try:
        for index, sample in enumerate(samples.samples):
            if shard.owns(index) and sample.key not in store:
                image = pages.render(sample)
                view = square_view(backbone, image, settings.view_side)
                maps = teacher_maps(backbone, view, prompt_text(sample.question, settings.free_answers),
                                    settings.heads, settings.teacher_max_new_tokens)
                meta = {"id": sample.id, "question": sample.question, "page": sample.page,
                        "answer": backbone.decode_text(maps.answer_ids), "steps": maps.steps}
                if maps.grounding is None:
                    store.save(sample.key, {}, {**meta, "skipped": "answer too short for a map"})
                else:
                    padding = padding_cells(settings.view_side, *image.size)
                    labels = pseudo_labels(maps.grounding, maps.sink, padding, settings.labels)
                    store.save(sample.key, {"grounding": maps.grounding, "sink": maps.sink, "padding": padding,
                                            "labels": labels.labels}, {**meta, "skipped": labels.skipped})
        shard.barrier()
        for sample in samples.samples:
            _, meta = store.load(sample.key)
            if meta["skipped"]:
                samples.skip(meta["skipped"])
            else:
                usable.append(sample)
            on_sample(sample, meta["skipped"])
    finally:
        pages.close()
    return usable


class RegionStudent(nn.Module):
    """The twig layers as one trainable module (what data parallelism wraps); the frozen backbone
    is held outside the module tree."""

    def __init__(self, adapter: ZoomAdapter, backbone: Backbone):
        super().__init__()
        self.head = adapter.region()  # scores; the head's modules are registered below for the optimiser
        self.twig_layers = adapter.twig_layers
        self.twig_norm = self.head.norm
        self.__dict__["backbone"] = backbone
        last = self.twig_layers[-1]  # only lends its queries and keys: the rest gets no gradient
        last.requires_grad_(False)
        for module in backbone.query_key_modules(last):
            module.requires_grad_(True)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, mask, blocks: list[ImageBlock]):
        return [scores.logits for scores in region_logits(self.backbone, self.head, hidden, positions, blocks, mask)]


@torch.no_grad()
def branch_inputs(backbone: Backbone, views: list, texts: list[str], branch_layer: int):
    """Layer-K hidden states of a padded batch of (square view, prompt text), and where the images are."""
    segments, blocks = [], []
    for view, text in zip(views, texts, strict=True):
        encoding = backbone.encode_image(view)
        prompt = backbone.build_prompt(text, [encoding.grid])
        segments.append([backbone.prepare_inputs(prompt, [encoding])])
        blocks.append(prompt.images[0])
    batch = pad_segments(segments)
    mask = batch.mask_or_none()
    hidden = backbone.run_layers(batch.embeds, batch.positions, None, 0, branch_layer, mask, batch.additions)
    shifted = [ImageBlock(batch.index(i, 0, b.start), b.rows, b.cols) for i, b in enumerate(blocks)]
    return hidden, batch.positions, mask, shifted


def selective_bce(logits: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
    """BCE with logits over the valid cells of all samples pooled; 0 (with a graph) if none is valid."""
    flat_logits = torch.cat([l.flatten() for l in logits])
    flat_labels = torch.cat([l.flatten() for l in labels]).to(
        flat_logits.device)  # pragma: no mutate (CPU: every tensor is there)
    valid = flat_labels != IGNORE
    if not bool(valid.any()):
        return flat_logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(flat_logits[valid], flat_labels[valid].float())


def label_auc(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Probability that a random foreground cell outscores a random background cell (ties count half)."""
    scores, target = logits.flatten().float().cpu(), labels.flatten().cpu()
    positive, negative = scores[target == 1], scores[target == 0]
    if positive.numel() == 0 or negative.numel() == 0:
        return None
    wins = (positive[:, None] > negative[None, :]).float() + 0.5 * (positive[:, None] == negative[None, :]).float()
    return float(wins.mean())


class RpnData:
    """Renders views and loads labels for batches of samples."""

    def __init__(self, backbone: Backbone, store: ArtefactStore, settings: RpnSettings):
        self.backbone, self.store, self.settings = backbone, store, settings
        self.pages = _Pages(settings.dpi)

    def batch(self, samples: list[TrainSample]):
        views = [square_view(self.backbone, self.pages.render(s), self.settings.view_side) for s in samples]
        texts = [prompt_text(s.question, self.settings.free_answers) for s in samples]
        labels = [self.store.load(s.key)[0]["labels"] for s in samples]
        return branch_inputs(self.backbone, views, texts, self.settings.branch_layer), labels


def mean_auc(student: RegionStudent, data: RpnData, samples: list[TrainSample]) -> float | None:
    scores = []
    with torch.no_grad():
        for sample in samples:
            (hidden, positions, _, blocks), [labels] = data.batch([sample])
            [logits] = student(hidden, positions, None, blocks)  # one sample: nothing is padded
            auc = label_auc(logits, labels)
            if auc is not None:
                scores.append(auc)
    return sum(scores) / len(scores) if scores else None


def train_rpn(backbone: Backbone, samples: SampleSet, settings: RpnSettings, options: TrainOptions, out_dir: Path,
              on_label: Callable = lambda sample, skipped: None,
              on_step: Callable[[StepReport], None] = lambda report: None,
              start: ZoomAdapter | None = None) -> tuple[ZoomAdapter, dict]:
    """Labels (cached under out_dir/labels), then the student; writes the adapter to out_dir.

    The student starts as copies of base layers K..K+T-1, or with `start`'s region head (the
    published stage 2.5: the head trained again, with the fine-tuned model as its teacher; the
    adapter keeps `start`'s position scheme and history)."""
    if start is not None and not start.config.region_head:
        raise UsageError("the adapter has no region head to train again: give the one `train sft` wrote")
    if start is not None and (start.config.branch_layer, start.config.depth) != (settings.branch_layer, settings.depth):
        raise UsageError(f"the adapter's region head branches at K={start.config.branch_layer} with "
                         f"T={start.config.depth} layers: train it again with those (or without an adapter)")
    store = ArtefactStore(out_dir / "labels")  # makes out_dir too
    usable = make_labels(backbone, samples, settings, store, Shard.current(), on_label)
    if not usable:
        raise NothingToLearn(f"no usable training sample (skipped: {skipped_text(samples.skipped)})")
    train, held = held_out_samples(usable, settings.held_out)
    config = AdapterConfig(branch_layer=settings.branch_layer, depth=settings.depth, gate=False,
                           family=backbone.family, hidden_size=backbone.hidden_size, base_model=backbone.model_id,
                           base_revision=backbone.revision)
    if start is not None:
        config = replace(config, reuse_src_pos=start.config.reuse_src_pos, roi_threshold=start.config.roi_threshold,
                         training=dict(start.config.training))
    adapter = _start_adapter(config, backbone, out_dir, start)
    backbone.freeze()
    if options.gradient_checkpointing:
        enable_gradient_checkpointing(adapter.twig_layers)
    student = RegionStudent(adapter, backbone)
    data = RpnData(backbone, store, settings)
    auc_before = _before_training(out_dir, lambda: mean_auc(student, data, held))

    def loss_fn(module, batch, epoch):
        (hidden, positions, mask, blocks), labels = data.batch(batch)
        return selective_bce(module(hidden, positions, mask, blocks), labels)

    trainer = Trainer(student, options, out_dir, adapter.save_pretrained,
                      backbone.dtype)  # pragma: no mutate (the base dtype matters only on a GPU: autocast)
    losses = trainer.train(train, loss_fn, on_step)
    auc_after = mean_auc(student, data, held)
    data.pages.close()
    stage = "rpn" if start is None else "rpn_again"
    report = {"stage": stage, "samples": len(samples.samples), "usable": len(usable), "trained_on": len(train),
              "held_out": len(held), "skipped": samples.skipped, "steps": len(losses),
              "first_loss": losses[0], "last_loss": losses[-1],
              "held_out_auc_before": auc_before, "held_out_auc_after": auc_after}
    adapter.config.training = {**adapter.config.training, stage: {
        **report, "data_fingerprint": samples.fingerprint(), "heads": settings.heads.to_dict(),
        "view_tokens": settings.view_side ** 2, "labels": vars(settings.labels), "options": options_dict(options)}}
    if trainer.is_main:
        with writing(out_dir):
            adapter.save_pretrained(out_dir)
    return adapter, report


def held_out_samples(usable: list[TrainSample], fraction: float) -> tuple[list[TrainSample], list[TrainSample]]:
    """(to train on, held out): the first `fraction` of the samples, at least one, kept apart to
    measure; a lone sample is trained on and nothing is measured."""
    if len(usable) < 2:
        return usable, []
    cut = max(1, int(len(usable) * fraction))
    return usable[cut:], usable[:cut]


def _before_training(out_dir: Path, measure: Callable[[], float | None]) -> float | None:
    """A held-out measure of the weights training starts from: taken when the run starts afresh
    and kept beside its checkpoints, so a resumed run reports it too (not its checkpoint's)."""
    kept = out_dir / "held_out_before.json"  # pragma: no mutate (any name: written and read here only)
    if latest_checkpoint(out_dir) is not None and kept.exists():
        remedy = "delete it and rerun: the measure is taken again"
        with reading_back(kept, remedy):
            value = read_json(kept, remedy)["value"]
            return None if value is None else float(value)
    value = measure()
    write_whole(kept, json.dumps({"value": value}))
    return value


def _start_adapter(config: AdapterConfig, backbone: Backbone, out_dir: Path, start: ZoomAdapter | None
                   ) -> ZoomAdapter:
    """The newest checkpoint's weights when resuming, else `start`'s region head, else fresh copies
    of base layers K..K+T-1."""
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is not None:
        with reading_checkpoint(checkpoint):
            return ZoomAdapter.from_pretrained(checkpoint, backbone)
    if start is None:
        return ZoomAdapter.initialized_from_base(config, backbone)
    adapter = ZoomAdapter(config, backbone)
    adapter.twig_layers.load_state_dict(start.twig_layers.state_dict())
    return adapter
