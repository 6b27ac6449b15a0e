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
    with pytest.raises(ValueError):
        training_set(mined, -1, seed=1)
    report = mining_report(mined, half)
    assert report == {"pairs": 19, "by_kind": {"regression": 4, "improvement": 10, "both right": 3, "both wrong": 2},
                      "judged_by": {"references": 19}, "training_samples": 6, "label_free": False}
    pseudo = [Mined("p", "q?", "a", "b", ("a",), "pseudo-reference", "both right")]
    assert mining_report(pseudo, [])["label_free"] is True
