"""Stage 2, targeted fine-tuning end to end: mine the pairs the zoomed input answers worse than
the plain one, hold some out, measure them, tune LoRA weights on the rest, measure again, and
report what happened (including when nothing improved, or when no label was used).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from ..api import QZoom
from ..budget import VisualBudget
from ..errors import NothingToLearn, UsageError
from ..runtime import release_memory
from ..zoom.adapter import ZoomAdapter
from ..zoom.lora import check_untuned
from .data import ArtefactStore, SampleSet, Shard, TrainSample
from .loop import StepReport, TrainOptions, options_dict
from .mining import JUDGE_SYSTEM, RIGHT_AT, Mined, MiningSettings, mine, mining_report, training_set
from .saved import writing
from .settings import FineTuneSettings
from .sft import SftSettings, held_out_accuracy, split_held_out, train_sft


def budgets(settings: FineTuneSettings, qz: QZoom) -> tuple[VisualBudget, VisualBudget]:
    """(the coarse page's budget, the pseudo-reference's): the model's own unless set."""
    tokens = settings.pseudo_reference_tokens
    return (qz.resolve_budget(settings.min_visual_tokens, settings.max_visual_tokens),  # the zoom's coarse read
            qz.default_budget("never") if tokens is None else VisualBudget(tokens, tokens))


def mining_settings(settings: FineTuneSettings, budget: VisualBudget, pseudo_budget: VisualBudget) -> MiningSettings:
    return MiningSettings(budget, pseudo_budget, settings.max_new_tokens, settings.dpi, settings.metric,
                          settings.free_answers)


def sft_settings(settings: FineTuneSettings, budget: VisualBudget) -> SftSettings:
    return SftSettings(budget, lora=settings.lora, box_noise=settings.box_noise, free_answers=settings.free_answers,
                       dpi=settings.dpi, seed=settings.seed)


def fine_tune(qz: QZoom, samples: SampleSet, settings: FineTuneSettings, options: TrainOptions, out_dir: Path,
              load_judge: Callable[[str], QZoom] | None = None,
              on_pair: Callable[[TrainSample], None] = lambda sample: None,
              on_step: Callable[[StepReport], None] = lambda report: None) -> tuple[ZoomAdapter, dict]:
    """Mine (cached under out_dir/mined), then train; writes the adapter with its `lora/` into
    `out_dir`. `qz` carries the region head the pairs are zoomed with (`train rpn`'s adapter); the
    judge, when `settings.judge` names one, is loaded with `load_judge` only while pairs remain to
    be judged."""
    adapter = qz.adapter
    if adapter is None or not adapter.config.region_head:
        raise UsageError("targeted fine-tuning zooms with a trained region head: give the adapter `qzoom train "
                         "rpn` wrote")
    check_untuned(qz.backbone)
    spatial = qz.backbone.layout.spatial_rows is not None
    if settings.aligned and not spatial:
        raise UsageError(f"{qz.backbone.family} has 1-D positions: its region cannot be aligned inside the page's "
                         "grid (--second-image)")
    settings = replace(settings, aligned=spatial if settings.aligned is None else settings.aligned)
    budget, pseudo_budget = budgets(settings, qz)
    adapter.config.reuse_src_pos = qz.engine.reuse_src_pos = settings.aligned  # mined, trained and asked alike
    mined = _mine(qz, samples, settings, mining_settings(settings, budget, pseudo_budget), out_dir, load_judge,
                  on_pair)
    chosen = training_set(mined, settings.mix, settings.seed)
    train, held = split_held_out(chosen, settings.held_out, settings.seed)
    mining = {**mining_report(mined, chosen), "left_out": len(samples.samples) - len(mined)}
    if not train:
        raise NothingToLearn(f"nothing to fine-tune on: {mining['pairs']} pairs mined ({_kinds(mining)}); the zoomed "
                         "read answered no pair worse than the plain one" +
                         ("" if settings.mix else " (--mix also trains on improvements)"))
    by_key = {s.key: s for s in samples.samples}
    sft = sft_settings(settings, budget)
    before = held_out_accuracy(qz, held, by_key, sft, settings.max_new_tokens, settings.metric)
    _, losses = train_sft(qz, adapter, by_key, train, sft, options, out_dir, on_step)
    after = held_out_accuracy(qz, held, by_key, sft, settings.max_new_tokens, settings.metric)
    report = {"stage": "sft", "samples": len(samples.samples), "skipped": samples.skipped, "mining": mining,
              "trained_on": len(train), "held_out": len(held), "steps": len(losses),
              "first_loss": losses[0], "last_loss": losses[-1],
              "held_out_accuracy_before": before, "held_out_accuracy_after": after,
              "held_out_metric": f"{settings.metric}: a score of at least {RIGHT_AT} against the pair's references "
                                 "counts as right (as `qzoom eval` scores)",
              "label_free": mining["label_free"], "notes": _notes(mining, settings, pseudo_budget, before, after)}
    adapter.config.training = {**adapter.config.training, "sft": {
        **report, "data_fingerprint": samples.fingerprint(), "lora": asdict(settings.lora),
        "aligned": settings.aligned, "mix": settings.mix, "box_noise": settings.box_noise,
        "options": options_dict(options)}}
    if Shard.current().rank == 0:
        with writing(out_dir):
            adapter.save_config(out_dir)
    return adapter, report


def _mine(qz: QZoom, samples: SampleSet, settings: FineTuneSettings, mining: MiningSettings, out_dir: Path,
          load_judge: Callable[[str], QZoom] | None, on_pair: Callable[[TrainSample], None]) -> list[Mined]:
    store = ArtefactStore(out_dir / "mined", {**asdict(mining), "model": qz.backbone.model_id,
                                              "aligned": settings.aligned, "judge": settings.judge})
    judge = None
    if settings.judge is not None and any(s.judged_key not in store for s in samples.samples):
        if load_judge is None:
            raise ValueError("a judge is named but no way to load it was given")
        judge = load_judge(settings.judge)
        judge.backbone.system_prompt = JUDGE_SYSTEM
    try:
        return mine(qz, samples, mining, store, judge, on_pair, Shard.current())
    finally:
        if judge is not None:  # its memory goes back before training needs it
            del judge
            release_memory()


def _kinds(mining: dict) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in mining["by_kind"].items())


def _notes(mining: dict, settings: FineTuneSettings, pseudo_budget: VisualBudget, before: float | None,
           after: float | None) -> list[str]:
    notes = []
    if mining["label_free"]:
        notes.append(f"label-free: without reference answers, right and wrong were judged against the model's own "
                     f"answer at {pseudo_budget.max_tokens} visual tokens (pseudo-reference), and held-out "
                     "accuracy measures agreement with it")
    if settings.judge is not None:
        notes.append(f"pairs were classified by the judge {settings.judge}; held-out accuracy uses the metric")
    if before is None:
        notes.append("no pair was held out (too few were mined): held-out accuracy was not measured")
    elif after <= before:
        notes.append(f"held-out accuracy did not rise ({before:.3f} before, {after:.3f} after)")
    return notes
