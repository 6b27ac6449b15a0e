"""Hard-sample mining for targeted fine-tuning: which (page, question) pairs the zoomed input
answers worse than the plain one.

Each pair is answered twice, plain (the coarse page) and zoomed (page + region). Right or wrong
comes from the manifest's reference answers (scored as `qzoom eval` scores them), else from a
pseudo-reference (the model's own answer at its highest resolution: label-free), or from a judge
model's yes/no verdicts. "Regressions" (plain right, zoomed wrong) are what the fine-tuning
teaches; `mix` adds some "improvements" (plain wrong, zoomed right) so it does not forget those.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ..api import QZoom
from ..budget import VisualBudget
from ..documents import open_document
from ..evaluate import choose_metric, score
from ..results import Result
from .data import ArtefactStore, SampleSet, Shard, TrainSample
from .rpn import answer_instruction

RIGHT_AT = 0.5  # a metric score at least this counts as right (ANLS and VQA give partial credit)
KINDS = ("regression", "improvement", "both right", "both wrong")

JUDGE_SYSTEM = ("You are a fair and robust evaluator. You focus on semantic correctness over strict "
                "string matching.")
JUDGE_REQUEST = (
    "Question: {question}\nGround truth: {reference}\nModel A answered: {plain}\nModel B answered: {zoomed}\n\n"
    "Is each model's answer correct? Count an answer as correct when it contains the ground truth, says "
    "the same thing in other words, or differs only in formatting (case, units, punctuation, number "
    "style); count it as wrong when it contradicts the ground truth or misses it. Reply with exactly two "
    "lines:\nA: Yes or No\nB: Yes or No")
JUDGE_REPLY_TOKENS = 16  # room for the two "X: Yes" lines the judge is asked for
_VERDICT = re.compile(r"^\s*([AB])\s*:\s*\[?\s*(yes|no)\b", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Mined:
    """One (page, question) pair answered both ways, and what that makes it."""

    key: str
    question: str
    plain: str
    zoomed: str
    references: tuple[str, ...]
    judged_by: str   # "references", "pseudo-reference" or "judge"
    kind: str
    box: tuple[int, ...] | None = None  # the region read (token grid cells of the page), None if none was

    @property
    def target(self) -> str:
        """What the fine-tuning teaches for this pair: the answer that was right."""
        return self.plain if self.kind == "regression" else self.zoomed


def is_right(prediction: str, references: list[str], metric: str = "auto", dataset: str | None = None) -> bool:
    return score(choose_metric(metric, None, dataset, references), prediction, references) >= RIGHT_AT


def kind_of(plain_right: bool, zoomed_right: bool) -> str:
    if plain_right and not zoomed_right:
        return "regression"
    if zoomed_right and not plain_right:
        return "improvement"
    return "both right" if plain_right else "both wrong"


def judge_verdicts(reply: str) -> tuple[bool, bool] | None:
    """(A right, B right) from a judge's reply, or None when it did not answer in the asked form."""
    found: dict[str, bool] = {}
    for model, verdict in _VERDICT.findall(reply):
        found.setdefault(model.upper(), verdict.lower() == "yes")
    return (found["A"], found["B"]) if set(found) == {"A", "B"} else None


def training_set(mined: list[Mined], mix: float, seed: int) -> list[Mined]:
    """Every regression, and `mix` (at least 0: FineTuneSettings checks it) improvements per
    regression (at most all of them), drawn with `seed`."""
    regressions = [m for m in mined if m.kind == "regression"]
    improvements = [m for m in mined if m.kind == "improvement"]
    wanted = min(len(improvements), round(mix * len(regressions)))
    return regressions + random.Random(seed).sample(improvements, wanted)


def mining_report(mined: list[Mined], chosen: list[Mined]) -> dict:
    """Pairs by kind, how right and wrong were decided, and what the fine-tuning will see."""
    return {"pairs": len(mined), "by_kind": {kind: Counter(m.kind for m in mined)[kind] for kind in KINDS},
            "judged_by": dict(Counter(m.judged_by for m in mined)), "training_samples": len(chosen),
            "label_free": any(m.judged_by == "pseudo-reference" for m in mined)}


@dataclass(frozen=True)
class MiningSettings:
    budget: VisualBudget                 # the coarse page read, both ways
    pseudo_budget: VisualBudget          # the model's own highest-resolution read, without references
    max_new_tokens: int = 32
    dpi: int = 200
    metric: str = "auto"
    free_answers: bool = False


def mine(qz: QZoom, samples: SampleSet, settings: MiningSettings, store: ArtefactStore,
         judge: QZoom | None = None, on_sample: Callable[[TrainSample], None] = lambda sample: None,
         shard: Shard = Shard()) -> list[Mined]:
    """Answer each sample plain and zoomed (cached in `store`, so a rerun resumes; each process of a
    multi-GPU run answers its share) and classify the pair. Pairs whose zoomed read found no
    region, or whose judge reply could not be read, are left out."""
    for index, sample in enumerate(samples.samples):
        if shard.owns(index):
            if sample.judged_key not in store:
                store.save(sample.judged_key, {}, _answer_both(qz, sample, settings, judge))
            on_sample(sample)
    shard.barrier()
    mined = []
    for sample in samples.samples:
        record = store.load(sample.judged_key)[1]
        if record["box"] is None or record["verdicts"] is None:
            continue
        plain_right, zoomed_right = record["verdicts"]
        mined.append(Mined(sample.key, sample.question, record["plain"], record["zoomed"],
                           tuple(record["references"]), record["judged_by"], kind_of(plain_right, zoomed_right),
                           tuple(record["box"])))
    return mined


def _answer_both(qz: QZoom, sample: TrainSample, settings: MiningSettings, judge: QZoom | None) -> dict:
    def ask(document, question: str, **options) -> Result:
        return qz.ask(document, question, pages=str(sample.page), max_new_tokens=settings.max_new_tokens,
                      instruction=answer_instruction(settings.free_answers), **options)[0]

    with open_document(sample.file, password=sample.password, dpi=settings.dpi) as doc:
        plain = ask(doc, sample.question, zoom="never", budget=settings.budget)
        zoomed = ask(doc, sample.question, zoom="always", budget=settings.budget)
        references, judged_by = list(sample.answers), "references"
        if not references:
            references = [ask(doc, sample.question, zoom="never", budget=settings.pseudo_budget).answer]
            judged_by = "pseudo-reference"
        if judge is not None:
            request = JUDGE_REQUEST.format(question=sample.question, reference=" / ".join(references),
                                           plain=plain.answer, zoomed=zoomed.answer)
            reply = judge.ask(doc, request, pages=str(sample.page), instruction="", zoom="never",
                              max_new_tokens=JUDGE_REPLY_TOKENS)[0].answer
            verdicts, judged_by = judge_verdicts(reply), "judge"
        else:
            verdicts = (is_right(plain.answer, references, settings.metric),
                        is_right(zoomed.answer, references, settings.metric))
    box = zoomed.zoom.roi["grid_box"] if zoomed.zoom.zoomed else None
    return {"plain": plain.answer, "zoomed": zoomed.answer, "references": references, "judged_by": judged_by,
            "verdicts": None if verdicts is None else list(verdicts), "box": box}
