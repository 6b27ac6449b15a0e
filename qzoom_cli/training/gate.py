"""Stage 3, the dynamic gate: learn when the coarse view is not enough.

1. Ladder: the frozen model answers each (page, question) at a ladder of visual-token budgets
   (no square padding); answers are cached per sample.
2. Consistency-aware filtering (spec: training.md 4.2): answers are normalised (lower-case, no
   ASCII punctuation) and two answers match when one contains the other (neither empty). The two highest rungs
   must agree (their answer is the consensus); with a reference answer the consensus must match
   it (without one, the consensus is trusted); a ladder whose wrong rungs are not all below its
   right ones is dropped. "easy" ladders (right everywhere) are sampled down to the number of
   "transition" ladders (wrong, then right).
3. Labels, drawn again each epoch (training.md 4.3): easy -> a random rung below the top two,
   label 0; transition -> with p=0.9 one of the two highest wrong rungs, label 1, with p=0.1 a
   right rung below the top two, label 0 (or ignored when there is none).
4. Gate: T layers (copies of base layers K..K+T-1) and a linear head on the last prompt token,
   BCE on the labelled samples; a batch with no label contributes zero (not NaN).
"""

from __future__ import annotations

import logging
import random
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..backbones import Backbone
from ..decode import answer_plainly
from ..errors import NothingToLearn, ResumeMismatch, UsageError
from ..options import TRAINED_GATE_THRESHOLD
from ..zoom.adapter import AdapterConfig, ZoomAdapter
from ..zoom.gate import gate_logits
from .data import ArtefactStore, SampleSet, Shard
from .loop import (
    StepReport,
    Trainer,
    TrainOptions,
    enable_gradient_checkpointing,
    latest_checkpoint,
    options_dict,
    reading_checkpoint,
)
from .pseudo_labels import IGNORE
from .rpn import _Pages, branch_inputs, prompt_text
from .saved import writing
from .settings import DEFAULT_LADDER, SEED

TOP_RUNGS = 2
log = logging.getLogger("qzoom")


def normalize(answer: str) -> str:
    return answer.lower().strip().translate(str.maketrans("", "", string.punctuation))


def match(a: str, b: str) -> bool:
    """One answer contains the other; an empty answer matches nothing (a deviation: the reference's
    bare containment test lets an answer of only punctuation match every answer)."""
    return bool(a) and bool(b) and (a in b or b in a)


def consensus(answers: list[str]) -> str | None:
    """The answer the two highest rungs agree on, or None."""
    top = {normalize(a) for a in answers[-TOP_RUNGS:]}
    return top.pop() if len(top) == 1 and len(answers) >= TOP_RUNGS else None


def classify(answers: list[str], references: list[str]) -> str:
    """'easy', 'transition', or the reason the ladder is dropped."""
    target = consensus(answers)
    if target is None:
        return "top two rungs disagree"
    if references and not any(match(target, r.lower().strip()) for r in references):
        return "consensus contradicts the reference answer"
    wrong = [i for i, a in enumerate(answers) if not match(normalize(a), target)]
    if not wrong:
        return "easy"
    if wrong == list(range(len(wrong))):
        return "transition"
    return "not monotonic"


def build_pool(ladders: dict[str, tuple[list[str], list[str]]], seed: int) -> tuple[list[str], Counter]:
    """Keys kept for training: every transition plus as many easy ladders; and why others went."""
    kinds = {key: classify(answers, refs) for key, (answers, refs) in ladders.items()}
    transitions = [k for k, kind in kinds.items() if kind == "transition"]
    easy = [k for k, kind in kinds.items() if kind == "easy"]
    kept = transitions + random.Random(seed).sample(easy, min(len(transitions), len(easy)))
    reasons = Counter(kind for kind in kinds.values() if kind not in ("easy", "transition"))
    reasons["easy beyond balance"] = len(easy) - (len(kept) - len(transitions))
    return sorted(kept), reasons


_IGNORED = (IGNORE, 0)  # (label, rung) of a visit not learned from: its rung never matters


def draw_label(answers: list[str], references: list[str], rng: random.Random) -> tuple[int, int]:
    """(label, rung index) for one visit of a ladder; label IGNORE means: do not learn from it."""
    target = consensus(answers)
    if target is None:
        return _IGNORED
    correct = [i for i, a in enumerate(answers) if match(normalize(a), target)]
    wrong = [i for i in range(len(answers)) if i not in correct]
    below_top = correct[:-TOP_RUNGS]
    if not wrong:
        return (0, rng.choice(below_top)) if below_top else _IGNORED
    if wrong != list(range(len(wrong))):
        return _IGNORED
    if rng.random() < 0.9:  # pragma: no mutate (`<=` differs with probability zero)
        if references and not any(match(target, r.lower().strip()) for r in references):
            return _IGNORED
        return 1, rng.choice(wrong[-2:])
    return (0, rng.choice(below_top)) if len(correct) > TOP_RUNGS else _IGNORED


@dataclass
class GateSettings:
    ladder: tuple[int, ...] = DEFAULT_LADDER
    free_answers: bool = False
    max_new_tokens: int = 32
    dpi: int = 200
    seed: int = SEED
    gate_threshold: float = TRAINED_GATE_THRESHOLD
    extra: dict = field(default_factory=dict)


def ladder_for(backbone: Backbone, ladder: tuple[int, ...]) -> tuple[int, ...]:
    """The rungs the model can read: a fixed-grid family sees no more detail than its grid holds,
    so rungs above it are left out (and said so)."""
    grid = backbone.layout.fixed_grid
    if grid is None:
        return ladder
    kept = tuple(tokens for tokens in ladder if tokens <= grid[0] * grid[1])
    if len(kept) < 3:
        raise UsageError(f"{backbone.family} reads at most {grid[0] * grid[1]} tokens of detail: give --ladder at "
                         "least three budgets up to that, e.g. 64,144,256,400,576")
    if kept != ladder:
        log.warning("%s reads at most %d tokens of detail: the ladder is %s", backbone.family, grid[0] * grid[1],
                    ",".join(map(str, kept)))
    return kept


@torch.inference_mode()
def answer_ladder(backbone: Backbone, image, text: str, ladder: tuple[int, ...], max_new_tokens: int) -> list[str]:
    answers = []
    for tokens in ladder:
        encoding = backbone.encode_image(backbone.detail_view(image, tokens))
        prompt = backbone.build_prompt(text, [encoding.grid])
        generation = answer_plainly(backbone, backbone.prepare_inputs(prompt, [encoding]), max_new_tokens)
        ids = generation.token_ids[:-1] if generation.finished else generation.token_ids
        answers.append(backbone.decode_text(ids))
    return answers


def make_ladders(backbone: Backbone, samples: SampleSet, settings: GateSettings, store: ArtefactStore, shard: Shard,
                 on_sample: Callable = lambda sample: None) -> dict[str, tuple[list[str], list[str]]]:
    pages, ladders = _Pages(settings.dpi), {}
    try:
        for index, sample in enumerate(samples.samples):
            if shard.owns(index) and sample.key not in store:
                answers = answer_ladder(backbone, pages.render(sample), prompt_text(sample.question,
                                        settings.free_answers), settings.ladder, settings.max_new_tokens)
                store.save(sample.key, {"ladder": torch.tensor(settings.ladder)}, {"answers": answers})
        shard.barrier()
        for sample in samples.samples:
            tensors, meta = store.load(sample.key)
            if tuple(tensors["ladder"].tolist()) != tuple(settings.ladder):
                raise ResumeMismatch(f"cached answers in {store.folder} were made with another ladder; "
                                 "use another --output or the same --ladder")
            ladders[sample.key] = (meta["answers"], list(sample.answers))
            on_sample(sample)
    finally:
        pages.close()
    return ladders


class GateStudent(nn.Module):
    def __init__(self, adapter: ZoomAdapter, backbone: Backbone):
        super().__init__()
        self.high_res_layers = adapter.high_res_layers
        self.high_res_head = adapter.high_res_head
        self.__dict__["backbone"] = backbone

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, mask) -> torch.Tensor:
        return gate_logits(self.backbone, list(self.high_res_layers), self.high_res_head, hidden, positions, mask)


def gate_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE with logits over labelled samples; zero, with a graph, when none is labelled."""
    labels = labels.to(logits.device)  # pragma: no mutate (one device in the tests; a GPU needs it)
    valid = labels != IGNORE
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[valid], labels[valid].float())


def with_gate(adapter: ZoomAdapter | None, backbone: Backbone, branch_layer: int, depth: int) -> ZoomAdapter:
    """The adapter with a fresh gate: layers copied from base K..K+T-1, head ~ N(0, 0.02), bias 0;
    an existing region head is kept."""
    base = adapter.config if adapter is not None else AdapterConfig(branch_layer, depth, region_head=False)
    config = AdapterConfig(**{**vars(base), "gate": True, "family": backbone.family,
                              "hidden_size": backbone.hidden_size, "base_model": base.base_model or backbone.model_id})
    fresh = ZoomAdapter.initialized_from_base(config, backbone)
    if config.region_head:  # only an adapter given has one
        fresh.twig_layers.load_state_dict(adapter.twig_layers.state_dict())
    with torch.no_grad():
        fresh.high_res_head.weight.normal_(0.0, 0.02)
        fresh.high_res_head.bias.zero_()
    return fresh


@torch.no_grad()
def gate_inputs(backbone: Backbone, branch_layer: int, views: list[tuple[Image.Image, int]], texts: list[str]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Layer-K states, positions and padding mask of each (page, visual tokens) and prompt text,
    padded into one batch: what the gate reads at inference after the coarse pass."""
    fitted = [backbone.detail_view(page, tokens) for page, tokens in views]
    hidden, positions, mask, _ = branch_inputs(backbone, fitted, texts, branch_layer)
    return hidden, positions, mask


def train_gate(backbone: Backbone, adapter: ZoomAdapter | None, samples: SampleSet, settings: GateSettings,
               options: TrainOptions, out_dir: Path, branch_layer: int, depth: int,
               on_ladder: Callable = lambda sample: None,
               on_step: Callable[[StepReport], None] = lambda report: None) -> tuple[ZoomAdapter, dict]:
    settings = replace(settings, ladder=ladder_for(backbone, settings.ladder))
    store = ArtefactStore(out_dir / "ladders")
    ladders = make_ladders(backbone, samples, settings, store, Shard.current(), on_ladder)
    kept, dropped = build_pool(ladders, settings.seed)
    if not kept:
        raise NothingToLearn(f"no ladder survived the consistency filter ({dict(dropped)}); add questions "
                         "whose answers change with resolution")
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is None:
        gated = with_gate(adapter, backbone, branch_layer, depth)
    else:
        with reading_checkpoint(checkpoint):
            gated = ZoomAdapter.from_pretrained(checkpoint, backbone)
    backbone.freeze()
    if options.gradient_checkpointing:
        enable_gradient_checkpointing(gated.high_res_layers)
    by_key = {s.key: s for s in samples.samples}
    pages = _Pages(settings.dpi)

    def loss_fn(module, batch, epoch):
        views, texts, labels = [], [], []
        for key in batch:
            sample = by_key[key]
            label, rung = draw_label(*ladders[key], random.Random(f"{settings.seed}|{key}|{epoch}"))
            views.append((pages.render(sample), settings.ladder[rung]))
            texts.append(prompt_text(sample.question, settings.free_answers))
            labels.append(label)
        hidden, positions, mask = gate_inputs(backbone, gated.config.branch_layer, views, texts)
        return gate_bce(module(hidden, positions, mask), torch.tensor(labels))

    student = GateStudent(gated, backbone)
    trainer = Trainer(student, options, out_dir, gated.save_pretrained,
                      backbone.dtype)  # pragma: no mutate (the base dtype matters only on a GPU: autocast)
    losses = trainer.train(kept, loss_fn, on_step)
    pages.close()
    kinds = Counter(classify(*ladders[k]) for k in kept)
    report = {"stage": "gate", "samples": len(samples.samples), "kept": len(kept), "transitions": kinds["transition"],
              "easy": kinds["easy"], "dropped": dict(dropped), "skipped": samples.skipped, "steps": len(losses),
              "first_loss": losses[0], "last_loss": losses[-1],
              "reference_answers": any(s.answers for s in samples.samples)}
    gated.config.gate_threshold = settings.gate_threshold
    gated.config.training = {**gated.config.training, "gate": {**report, "data_fingerprint": samples.fingerprint(),
                             "ladder": list(settings.ladder), "options": options_dict(options)}}
    if trainer.is_main:
        with writing(out_dir):
            gated.save_pretrained(out_dir)
    return gated, report
