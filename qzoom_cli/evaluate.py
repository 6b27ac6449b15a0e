"""Answer metrics of the document-QA benchmarks, and summaries of a run.

- ANLS (DocVQA, InfoVQA): 1 - normalised Levenshtein distance to the closest reference,
  0 when that distance is tau (0.5) or more; case and spacing ignored.
- Relaxed accuracy (ChartQA): numbers within 5% of the reference count as right ("45%" is
  0.45, as in ChartQA's own scorer); currency signs, thousands separators and a trailing unit
  word are ignored; anything else must match exactly (case ignored). A reference of 0 needs an
  exact match.
- VQA accuracy (TextVQA, VQAv2): min(1, matching humans / 3), averaged over the leave-one-out
  subsets of the references, after the VQA answer normalisation (punctuation, number words,
  articles); one reference: exact match after normalisation.
- Exact match: equal after lower-casing and collapsing spaces, a final period dropped.

`auto` picks per row: the row's own `metric`, else its dataset name (docvqa/infovqa -> anls,
chartqa -> relaxed, textvqa/vqav2 -> vqa), else vqa when it has 10 references, else anls.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from .errors import UsageError

METRICS = ("anls", "relaxed", "vqa", "exact")
DATASET_METRICS = {"docvqa": "anls", "infovqa": "anls", "infographicvqa": "anls", "chartqa": "relaxed",
                   "textvqa": "vqa", "vqav2": "vqa", "vqa": "vqa"}


def _plain(text: str) -> str:
    return " ".join(str(text).strip().lower().split())


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: list[str], tau: float = 0.5) -> float:
    best = 0.0
    pred = _plain(prediction)
    for reference in references:
        ref = _plain(reference)
        longest = max(len(pred), len(ref))
        distance = levenshtein(pred, ref) / longest if longest else 0.0
        best = max(best, 1.0 - distance if distance < tau else 0.0)
    return best


_NUMBER = re.compile(r"^[^\d+\-.]*?([-+]?(?:\d[\d,]*)?\.?\d+)\s*(%|[a-z]+)?\.?$")


def to_number(text: str) -> float | None:
    """'$1,234.5' -> 1234.5, '45%' -> 0.45, '12 kg' -> 12.0; None when it is not a number."""
    match = _NUMBER.match(_plain(text))
    if not match:
        return None
    try:
        value = float(match.group(1).replace(",", ""))
    except ValueError:
        return None
    return value / 100 if match.group(2) == "%" else value


def relaxed_accuracy(prediction: str, references: list[str], tolerance: float = 0.05) -> float:
    pred = to_number(prediction)
    for reference in references:
        target = to_number(reference)
        if pred is not None and target:
            if abs(pred - target) / abs(target) <= tolerance:
                return 1.0
        elif _plain(prediction) == _plain(reference):
            return 1.0
    return 0.0


_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "didnt": "didn't", "im": "i'm", "ive": "i've", "its": "it's", "whats": "what's"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def vqa_normalize(answer: str) -> str:
    """The VQA scorer's answer normalisation: punctuation next to a space (or any, in a text with
    a thousands comma) is dropped, elsewhere it splits words; periods that are not decimal points
    go; number words become digits; articles go; common contractions get their apostrophe."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    drop_all = re.search(r"\d,\d", text) is not None
    out = text
    for mark in _PUNCTUATION:
        out = out.replace(mark, "" if drop_all or f"{mark} " in text or f" {mark}" in text else " ")
    out = re.sub(r"\.(?!\d)", "", out)
    words = [_NUMBER_WORDS.get(w, w) for w in out.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    pred = vqa_normalize(prediction)
    refs = [vqa_normalize(r) for r in references]
    if len(refs) == 1:
        return float(pred == refs[0])
    scores = [min(1.0, sum(r == pred for j, r in enumerate(refs) if j != i) / 3) for i in range(len(refs))]
    return sum(scores) / len(scores)


def exact_match(prediction: str, references: list[str]) -> float:
    def clean(text: str) -> str:
        return _plain(text).rstrip(".")  # pragma: no mutate (lowercased: an "XX.XX" mutant strips the same)

    return float(any(clean(prediction) == clean(r) for r in references))


SCORERS: dict[str, Callable[[str, list[str]], float]] = {
    "anls": anls, "relaxed": relaxed_accuracy, "vqa": vqa_accuracy, "exact": exact_match,
}


def check_metric(metric: str) -> str:
    """--metric: auto or one of METRICS."""
    if metric != "auto" and metric not in METRICS:
        raise UsageError(f"unknown metric {metric!r}: use auto, {', '.join(METRICS)}")
    return metric


def choose_metric(requested: str, row_metric: str | None, dataset: str | None, references: list[str]) -> str:
    if requested != "auto":
        return requested
    if row_metric in METRICS:
        return row_metric
    for name, metric in DATASET_METRICS.items():
        if dataset and name in dataset.lower().replace("-", "").replace("_", ""):
            return metric
    return "vqa" if len(references) >= 10 else "anls"


def score(metric: str, prediction: str | None, references: list[str]) -> float:
    """A row's score in [0, 1]; a failed row (no prediction) scores 0."""
    if prediction is None:
        return 0.0
    return SCORERS[metric](prediction, references)


@dataclass
class ModeSummary:
    """What one mode did on the rows: the table `qzoom eval --compare` prints."""

    mode: str
    rows: int
    scored: int
    accuracy: float | None
    zoom_rate: float
    mean_visual_tokens: float
    samples_per_s: float
    p50_latency_s: float
    p95_latency_s: float
    mean_ttft_s: float              # latency before the first answer token
    mean_decode_per_token_s: float  # decode time per generated token after the first
    peak_mem_gib: float
    failed: int


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(mode: str, results: list, scores: list[float | None], wall_s: float) -> ModeSummary:
    """`results`: Result records of every row (errors included); `scores`: None for rows without references."""
    answered = [r for r in results if r.status != "error"]
    latencies = [r.stats.latency_s for r in answered]
    scored = [s for s in scores if s is not None]
    return ModeSummary(
        mode=mode, rows=len(results), scored=len(scored),
        accuracy=statistics.fmean(scored) if scored else None,
        zoom_rate=sum(r.zoom.zoomed for r in answered) / len(answered) if answered else 0.0,
        mean_visual_tokens=statistics.fmean(r.stats.visual_tokens for r in answered) if answered else 0.0,
        samples_per_s=len(results) / wall_s if wall_s > 0 else 0.0,
        p50_latency_s=percentile(latencies, 0.5), p95_latency_s=percentile(latencies, 0.95),
        mean_ttft_s=statistics.fmean(r.stats.latency_s - r.stats.time.decode_s for r in answered) if answered else 0.0,
        mean_decode_per_token_s=statistics.fmean(  # each page's first token comes with its prefill
            r.stats.time.decode_s / max(1, r.stats.total_output_tokens - len(r.candidates))
            for r in answered) if answered else 0.0,
        peak_mem_gib=max((r.stats.peak_mem_gib for r in answered), default=0.0),
        failed=len(results) - len(answered),
    )
