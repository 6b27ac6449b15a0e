"""Hard-sample mining rules for targeted fine-tuning, on constructed answer pairs."""

import pytest

from qzoom_cli.training.mining import (
    JUDGE_REQUEST,
    Mined,
    is_right,
    judge_verdicts,
    kind_of,
    mining_report,
    training_set,
)


@pytest.mark.parametrize("plain_right, zoomed_right, kind", [
    (True, False, "regression"), (False, True, "improvement"), (True, True, "both right"),
    (False, False, "both wrong")])
def test_each_pair_is_a_regression_an_improvement_or_neither(plain_right, zoomed_right, kind):
    assert kind_of(plain_right, zoomed_right) == kind


@pytest.mark.parametrize("prediction, references, metric, right", [
    ("$1,234.50", ["1234.5"], "relaxed", True),          # numbers within 5%
    ("1300", ["1234.5"], "relaxed", False),
    ("Total due", ["total due"], "anls", True),
    ("Totl due", ["total due"], "anls", True),            # ANLS 0.89: right
    ("net 30 days", ["net 60"], "anls", False),
    ("42", ["42"] * 3 + ["41"] * 7, "vqa", True),         # three annotators agree: (nearly) full credit
    ("42", ["42"] + ["41"] * 9, "vqa", False),            # one of ten: 0.3
    ("42", ["42", "42", "41", "41"], "vqa", True),        # exactly 0.5: right
    ("Paris", ["paris."], "exact", True),
])
def test_right_means_what_eval_scores_as_right(prediction, references, metric, right):
    from qzoom_cli.evaluate import score

    assert is_right(prediction, references, metric) is right
    assert (score(metric, prediction, references) >= 0.5) is right


def test_auto_metric_follows_the_dataset_as_eval_does():
    assert is_right("1300", ["1234.5"], dataset="chartqa") is False       # relaxed: 5% at most
    assert is_right("1290", ["1234.5"], dataset="chartqa") is True


@pytest.mark.parametrize("reply, verdicts", [
    ("A: Yes\nB: No", (True, False)), ("a: no\nb: yes", (False, True)), ("A: [Yes]\nB: [Yes]", (True, True)),
    ("Reasoning first.\nA: No\nB: No\n", (False, False)), ("A: Yes", None), ("Both are right.", None),
    ("A: Yes\nB: No\nA: No", (True, False)),             # the first verdict for each model counts
    ("A: Yesterday\nB: No", None)])
def test_judge_replies_are_read_strictly(reply, verdicts):
    assert judge_verdicts(reply) == verdicts


def test_the_judge_is_asked_about_both_answers_against_the_reference():
    request = JUDGE_REQUEST.format(question="Total?", reference="$42", plain="42", zoomed="$24")
    assert "Total?" in request and "$42" in request and "A answered: 42" in request and "B answered: $24" in request
    assert request.rstrip().endswith("A: Yes or No\nB: Yes or No")


def _mined(kind, i):
    return Mined(f"{kind}{i}", "q?", "a", "b", ("a",), "references", kind)


def test_the_training_set_is_every_regression_and_mix_improvements_per_regression():
    mined = [_mined("regression", i) for i in range(4)] + [_mined("improvement", i) for i in range(10)] + \
        [_mined("both right", i) for i in range(3)] + [_mined("both wrong", i) for i in range(2)]
    assert [m.key for m in training_set(mined, 0.0, seed=1)] == [f"regression{i}" for i in range(4)]
    half = training_set(mined, 0.5, seed=1)
    assert [m.kind for m in half] == ["regression"] * 4 + ["improvement"] * 2
    assert half == training_set(mined, 0.5, seed=1) and half != training_set(mined, 0.5, seed=2)
    assert len(training_set(mined, 5.0, seed=1)) == 4 + 10  # no more improvements than there are
    report = mining_report(mined, half)
    assert report == {"pairs": 19, "by_kind": {"regression": 4, "improvement": 10, "both right": 3, "both wrong": 2},
                      "judged_by": {"references": 19}, "training_samples": 6, "label_free": False}
    pseudo = [Mined("p", "q?", "a", "b", ("a",), "pseudo-reference", "both right")]
    assert mining_report(pseudo, [])["label_free"] is True


def _samples(tmp_path, answers):
    import json

    from trainkit import red_square_pages

    from qzoom_cli.manifest import read_manifest
    from qzoom_cli.training.data import expand_samples

    tmp_path.mkdir(exist_ok=True)
    manifest, _ = red_square_pages(tmp_path, len(answers), seed=11)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row, refs in zip(rows, answers, strict=True):
        row["answers"] = refs
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return expand_samples(read_manifest(manifest))


def _settings():
    from qzoom_cli.budget import VisualBudget
    from qzoom_cli.training.mining import MiningSettings

    return MiningSettings(budget=VisualBudget(16, 36), pseudo_budget=VisualBudget(64, 64), max_new_tokens=3, dpi=72)


def test_mining_answers_each_pair_both_ways_and_classifies_it(qz, tmp_path, monkeypatch):
    from qzoom_cli.training.data import ArtefactStore
    from qzoom_cli.training.mining import is_right, kind_of, mine

    settings = _settings()
    probe = _samples(tmp_path / "probe", [[], []])
    plain = [qz.ask(s.file, s.question, zoom="never", budget=settings.budget, max_new_tokens=3)[0].answer
             for s in probe.samples]
    samples = _samples(tmp_path, [[plain[0]], ["not what it says"]])
    store = ArtefactStore(tmp_path / "mined")
    mined = mine(qz, samples, settings, store)
    assert [m.key for m in mined] == [s.key for s in samples.samples]
    for pair, sample in zip(mined, samples.samples, strict=True):
        [zoomed] = qz.ask(sample.file, sample.question, zoom="always", budget=settings.budget, max_new_tokens=3)
        assert pair.zoomed == zoomed.answer and pair.box == tuple(zoomed.zoom.roi["grid_box"])
        assert pair.references == sample.answers and pair.judged_by == "references"
        assert pair.kind == kind_of(is_right(pair.plain, list(sample.answers)), is_right(pair.zoomed,
                                                                                        list(sample.answers)))
    assert mined[0].plain == plain[0] and mined[0].kind in ("regression", "both right")
    assert mined[1].kind in ("improvement", "both wrong")

    def never(*args, **kwargs):
        raise AssertionError("a cached pair was answered again")

    monkeypatch.setattr(qz, "ask", never)
    assert mine(qz, samples, settings, store) == mined


def test_without_references_the_models_own_highest_resolution_answer_decides(qz, tmp_path):
    from qzoom_cli.training.data import ArtefactStore
    from qzoom_cli.training.mining import mine

    settings = _settings()
    samples = _samples(tmp_path, [[]])
    [pair] = mine(qz, samples, settings, ArtefactStore(tmp_path / "mined"))
    sample = samples.samples[0]
    high = qz.ask(sample.file, sample.question, zoom="never", budget=settings.pseudo_budget, max_new_tokens=3)[0]
    assert pair.references == (high.answer,) and pair.judged_by == "pseudo-reference"


def test_a_judge_decides_when_given_and_an_unreadable_verdict_leaves_the_pair_out(qz, tmp_path):
    from types import SimpleNamespace

    from qzoom_cli.training.data import ArtefactStore
    from qzoom_cli.training.mining import mine

    asked = []

    def judge(reply):
        def ask(doc, request, **options):
            asked.append((request, options))
            return [SimpleNamespace(answer=reply)]
        return SimpleNamespace(ask=ask)

    samples = _samples(tmp_path, [["red"]])
    [pair] = mine(qz, samples, _settings(), ArtefactStore(tmp_path / "a"), judge=judge("A: Yes\nB: No"))
    assert pair.kind == "regression" and pair.judged_by == "judge" and pair.target == pair.plain
    request, options = asked[0]
    assert f"Model A answered: {pair.plain}\n" in request and "Ground truth: red\n" in request
    assert options["instruction"] == "" and options["zoom"] == "never"
    assert mine(qz, samples, _settings(), ArtefactStore(tmp_path / "b"), judge=judge("maybe")) == []


def test_each_process_mines_its_share_then_reads_every_pair(qz, tmp_path, monkeypatch):
    """With several processes, rank r answers every world-th sample (the others' answers arrive in
    the shared cache before the barrier); progress counts the samples this process handled."""
    import qzoom_cli.training.mining as mining
    from qzoom_cli.training.data import ArtefactStore, Shard

    samples = _samples(tmp_path, [["a"], ["b"], ["c"], ["d"]])
    store = ArtefactStore(tmp_path / "mined")
    other = {"plain": "x", "zoomed": "y", "references": ["x"], "judged_by": "references", "verdicts": [True, False],
             "box": [0, 0, 1, 1]}
    for sample in samples.samples[1::2]:  # what the other process wrote
        store.save(sample.judged_key, {}, other)
    answered, seen = [], []

    def answer(qz, sample, settings, judge):
        answered.append(sample.key)
        return {**other, "verdicts": [False, True]}

    monkeypatch.setattr(mining, "_answer_both", answer)
    mined = mining.mine(qz, samples, _settings(), store, on_sample=seen.append, shard=Shard(0, 2))
    assert answered == [s.key for s in samples.samples[0::2]] and seen == samples.samples[0::2]
    assert [m.kind for m in mined] == ["improvement", "regression"] * 2


def test_each_pair_is_asked_on_its_page_with_the_mining_settings(tmp_path):
    """Plain, zoomed, pseudo-reference and judge reads all go to the sample's own page of its
    (here encrypted) document at the mining dpi, with the settings' budgets, instruction and
    answer length; the settings' metric decides right and wrong for both answers."""
    from types import SimpleNamespace

    from docmaker import make_encrypted_pdf

    from qzoom_cli.budget import VisualBudget
    from qzoom_cli.results import ZoomInfo
    from qzoom_cli.training.data import ArtefactStore, SampleSet, TrainSample
    from qzoom_cli.training.mining import JUDGE_REPLY_TOKENS, MiningSettings, mine
    from qzoom_cli.training.rpn import answer_instruction

    pdf = tmp_path / "locked.pdf"
    pdf.write_bytes(make_encrypted_pdf("pw"))
    settings = MiningSettings(budget=VisualBudget(16, 36), pseudo_budget=VisualBudget(64, 64), max_new_tokens=5,
                              dpi=50, metric="relaxed", free_answers=True)

    class Recorder:
        def __init__(self, answers):
            self.answers, self.calls = answers, []

        def ask(self, document, question, **options):
            self.calls.append({"page_count": document.page_count, "dpi": document.dpi, "question": question,
                               **options})
            zoomed = options["zoom"] == "always"
            zoom = ZoomInfo(zoomed=zoomed, roi={"grid_box": [1, 2, 3, 4]} if zoomed else None)
            return [SimpleNamespace(answer=self.answers[len(self.calls) - 1], zoom=zoom)]

    def sample(answers):
        return TrainSample("s", str(pdf), "pw", 2, "Total?", "sha", answers)

    qz = Recorder(["total $1,200 usd", "about 1,250 eur", "1234.5"])  # plain, zoomed, pseudo-reference
    [pair] = mine(qz, SampleSet([sample(())]), settings, ArtefactStore(tmp_path / "a"))
    common = {"page_count": 2, "dpi": 50, "question": "Total?", "pages": "2", "max_new_tokens": 5,
              "instruction": answer_instruction(True)}
    assert qz.calls == [{**common, "zoom": "never", "budget": settings.budget},
                        {**common, "zoom": "always", "budget": settings.budget},
                        {**common, "zoom": "never", "budget": settings.pseudo_budget}]
    assert (pair.plain, pair.zoomed, pair.references, pair.box) == ("total $1,200 usd", "about 1,250 eur",
                                                                    ("1234.5",), (1, 2, 3, 4))
    assert pair.kind == "both right"  # within 5% by the relaxed metric asked for (ANLS would call both wrong)

    judge = Recorder(["A: No\nB: Yes"])
    [judged] = mine(Recorder(["41", "42"]), SampleSet([sample(("42", "forty-two"))]), settings,
                    ArtefactStore(tmp_path / "b"), judge=judge)
    [call] = judge.calls
    assert (call["page_count"], call["dpi"], call["pages"], call["max_new_tokens"]) == (2, 50, "2", JUDGE_REPLY_TOKENS)
    assert call["question"] == JUDGE_REQUEST.format(question="Total?", reference="42 / forty-two", plain="41",
                                                    zoomed="42")
    assert judged.kind == "improvement" and judged.judged_by == "judge"


def test_a_pair_whose_zoomed_read_found_no_region_is_left_out(tmp_path):
    from types import SimpleNamespace

    from docmaker import make_image

    from qzoom_cli.results import ZoomInfo
    from qzoom_cli.training.data import ArtefactStore, SampleSet, TrainSample
    from qzoom_cli.training.mining import mine

    image = tmp_path / "page.png"
    image.write_bytes(make_image("PNG"))

    class SkipsTotals:
        def ask(self, document, question, **options):
            zoom = ZoomInfo(mode=options["zoom"], skipped_reason="no region") if question == "Total?" else \
                ZoomInfo(mode=options["zoom"], zoomed=options["zoom"] == "always", roi={"grid_box": [0, 0, 1, 1]})
            return [SimpleNamespace(answer="42", zoom=zoom)]

    samples = SampleSet([TrainSample("s", str(image), None, 1, "Total?", "sha", ("42",)),
                         TrainSample("t", str(image), None, 1, "Due?", "sha", ("42",))])
    [pair] = mine(SkipsTotals(), samples, _settings(), ArtefactStore(tmp_path / "mined"))
    assert (pair.key, pair.question, pair.kind) == (samples.samples[1].key, "Due?", "both right")


def test_reference_answers_changed_in_the_manifest_are_judged_again(qz, tmp_path, monkeypatch):
    """A verdict depends on the references: the cache answers for the same ones only."""
    from dataclasses import replace

    import qzoom_cli.training.mining as mining
    from qzoom_cli.training.data import ArtefactStore, SampleSet

    answered = []

    def answer(qz, sample, settings, judge):
        answered.append(sample.answers)
        return {"plain": "red", "zoomed": "blue", "references": list(sample.answers), "judged_by": "references",
                "verdicts": ["red" in sample.answers, "blue" in sample.answers], "box": [0, 0, 1, 1]}

    monkeypatch.setattr(mining, "_answer_both", answer)
    samples, store = _samples(tmp_path, [["red"]]), ArtefactStore(tmp_path / "mined")
    assert [m.kind for m in mining.mine(qz, samples, _settings(), store)] == ["regression"]
    assert [m.kind for m in mining.mine(qz, samples, _settings(), store)] == ["regression"]  # from the cache
    changed = SampleSet([replace(sample, answers=("blue",)) for sample in samples.samples])
    [pair] = mining.mine(qz, changed, _settings(), store)
    assert answered == [("red",), ("blue",)] and pair.kind == "improvement" and pair.references == ("blue",)
    assert pair.key == samples.samples[0].key  # the pair is still its sample's
