"""Metrics against hand-computed values; `qzoom eval` and `qzoom bench` end to end on the tiny model."""

import json

import pytest
from docmaker import make_pdf
from PIL import Image
from typer.testing import CliRunner

from qzoom_cli import cli
from qzoom_cli.errors import EXIT_USAGE, UsageError
from qzoom_cli.evaluate import (
    anls,
    check_metric,
    choose_metric,
    exact_match,
    percentile,
    relaxed_accuracy,
    to_number,
    vqa_accuracy,
    vqa_normalize,
)

runner = CliRunner()


@pytest.mark.parametrize("prediction,references,expected", [
    ("INV-2024-0815", ["INV-2024-0815"], 1.0),
    ("  inv-2024-0815 ", ["INV-2024-0815"], 1.0),              # case and spacing ignored
    ("Jan 8 1993", ["1/8/93", "january 8, 1993"], 1 - 5 / 15),  # closest reference counts
    ("INV-2024-0816", ["INV-2024-0815"], 1 - 1 / 13),
    ("abc", ["abcdef"], 0.0),                                    # distance 0.5: at tau, scores 0
    ("abcd", ["abcdef"], 1 - 2 / 6),                             # distance 1/3 < tau
    ("", ["x"], 0.0),
    ("", [""], 1.0),
])
def test_anls(prediction, references, expected):
    assert anls(prediction, references) == pytest.approx(expected)


@pytest.mark.parametrize("prediction,reference,expected", [
    ("4.9", "5", 1.0), ("5.25", "5", 1.0), ("5.26", "5", 0.0), ("5.3", "5", 0.0),
    ("45%", "0.46", 1.0), ("45%", "45", 0.0),                  # percentages are fractions, as in ChartQA
    ("$1,050", "1000", 1.0), ("1,060", "1000", 0.0), ("12 kg", "12.5", 1.0), ("12.5 million", "12", 1.0),
    ("-3.1", "-3", 1.0), ("yes", "Yes", 1.0), ("no", "yes", 0.0), ("0", "0", 1.0), ("0.01", "0", 0.0),
    ("2019", "2019.", 1.0),
])
def test_relaxed_accuracy(prediction, reference, expected):
    assert relaxed_accuracy(prediction, [reference]) == expected


def test_to_number():
    assert [to_number(t) for t in ("$1,234.5", "45 %", ".5", "1/8/93", "abc", "12 kg")] == [1234.5, 0.45, 0.5,
                                                                                            None, None, 12.0]


def test_to_number_reads_one_number_only():
    assert [to_number(t) for t in ("1 2", "12 500", "- 5", "5 %", "+7.", "1.5e3")] == [None, None, None, 0.05, 7.0,
                                                                                       None]


@pytest.mark.parametrize("answer, normalized", [
    ("1,000 dogs", "1000 dogs"),          # a thousands comma: every punctuation mark is dropped
    ("x -y z-w", "x y zw"),               # a mark after a space is dropped everywhere ...
    ("x- y z-w", "x y zw"),               # ... and so is one before a space
    ("p/q r/s", "p q r s"),               # elsewhere a mark splits words
    ("x,\na,b", "x ab"),                 # newlines and tabs count as spaces
    ("x,\ta,b", "x ab"),
    ("3.5 kg.", "3.5 kg"),                # a decimal point stays, other periods go
])
def test_vqa_normalization_follows_the_official_scorer(answer, normalized):
    assert vqa_normalize(answer) == normalized


def test_vqa_accuracy_and_normalization():
    assert vqa_normalize("The  two dogs, 1,000.") == "2 dogs 1000"
    assert vqa_normalize("Hello-world (yes)") == "hello world yes" and vqa_normalize("dont") == "don't"
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)   # leave-one-out: (3*2/3 + 7*1)/10
    assert vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)     # (2*1/3 + 8*2/3)/10
    assert vqa_accuracy("3", ["3"] * 10) == 1.0 and vqa_accuracy("4", ["3"] * 10) == 0.0
    assert vqa_accuracy("A cat", ["cat"]) == 1.0


def test_exact_match_and_metric_choice():
    assert exact_match("Paris.", ["paris"]) == 1.0 and exact_match("Paris, France", ["paris"]) == 0.0
    assert choose_metric("exact", "anls", "chartqa", ["1"]) == "exact"
    assert choose_metric("auto", "relaxed", None, ["1"]) == "relaxed"
    assert choose_metric("auto", None, "ChartQA-test", ["1"]) == "relaxed"
    assert choose_metric("auto", None, "docvqa_val", ["1"]) == "anls"
    assert choose_metric("auto", None, "textvqa", ["1"]) == "vqa"
    assert choose_metric("auto", None, "Chart-QA", ["1"]) == "relaxed"  # separators inside the name too
    assert choose_metric("auto", None, "Info_VQA", ["1"]) == "anls"
    assert choose_metric("auto", None, None, ["1"] * 10) == "vqa"
    assert choose_metric("auto", None, None, ["1"]) == "anls"
    assert percentile([4, 1, 3, 2], 0.5) == 2.5 and percentile([1, 2, 3, 4, 5], 0.95) == pytest.approx(4.8)
    assert percentile([3, 1, 2], 1.0) == 3 and percentile([3, 1, 2], 0.0) == 1 and percentile([], 0.5) == 0.0
    assert check_metric("auto") == "auto" and check_metric("vqa") == "vqa"
    with pytest.raises(UsageError, match=r"^unknown metric 'bleu': use auto, anls, relaxed, vqa, exact$"):
        check_metric("bleu")


@pytest.fixture
def manifest(tmp_path, qz):
    """Rows whose references are the tiny model's own answers (so accuracy is 1) plus wrong ones."""
    (tmp_path / "a.pdf").write_bytes(make_pdf(2))
    questions = ["total?", "date?", "number?"]
    results = qz.ask(tmp_path / "a.pdf", questions, zoom="never", max_new_tokens=3, dpi=72,
                     budget=qz.resolve_budget(16, 48, "never"))
    rows = [{"id": f"r{i}", "file": "a.pdf", "question": q, "answers": [r.answer], "metric": "exact"}
            for i, (q, r) in enumerate(zip(questions, results))]
    rows.append({"id": "wrong", "file": "a.pdf", "question": "total?", "answers": ["certainly not this"]})
    rows.append({"id": "noref", "file": "a.pdf", "question": "what?"})
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def common(tiny_dir):
    return ["--model", str(tiny_dir), "--device", "cpu", "--max-new-tokens", "3", "--dpi", "72", "--max-visual-tokens",
            "48", "--min-visual-tokens", "16"]


def test_eval_compare_end_to_end(manifest, tiny_dir, tmp_path):
    result = runner.invoke(cli.app, ["eval", str(manifest), *common(tiny_dir), "--compare", "never,always", "--json",
                                     "-o", str(tmp_path / "scores.jsonl")])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    never, always = summary["modes"]
    assert (never["mode"], always["mode"]) == ("never", "always")
    assert never["rows"] == 5 and never["scored"] == 4 and never["accuracy"] == pytest.approx(0.75)
    assert never["zoom_rate"] == 0 and always["zoom_rate"] == 1.0
    assert always["mean_visual_tokens"] > never["mean_visual_tokens"]
    assert never["samples_per_s"] > 0 and never["p95_latency_s"] >= never["p50_latency_s"] > 0
    assert 0 < never["mean_ttft_s"] < never["p95_latency_s"] and never["mean_decode_per_token_s"] > 0
    scores = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    for mode in ("never", "always"):
        mine = [s for s in scores if s["mode"] == mode and s["score"] is not None]
        expected = summary["modes"][0 if mode == "never" else 1]["accuracy"]
        assert sum(s["score"] for s in mine) / len(mine) == pytest.approx(expected)
    assert next(s for s in scores if s["id"] == "wrong")["metric"] == "anls"
    table = runner.invoke(cli.app, ["eval", str(manifest), *common(tiny_dir), "--compare", "never"])
    assert table.exit_code == 0 and "75.0% (4)" in table.stdout


def test_eval_shows_each_modes_progress_row_by_row(manifest, qz):
    from contextlib import contextmanager

    from qzoom_cli.batch import RunOptions
    from qzoom_cli.bench import compare_modes
    from qzoom_cli.manifest import read_manifest
    from qzoom_cli.zoom.pipeline import ZoomSettings

    rows, seen = read_manifest(manifest), []

    @contextmanager
    def progress(mode):
        seen.append(mode)
        yield (lambda result: seen.append(result.id)), (lambda total: seen.append(total))

    options = {mode: RunOptions(zoom=ZoomSettings(mode), dpi=72, max_new_tokens=2) for mode in ("never", "always")}
    compare_modes(qz, rows, options, "auto", progress)
    ids = ["r0", "r1", "r2", "wrong", "noref"]
    assert seen[:2] == ["never", 5] and sorted(seen[2:7]) == sorted(ids)
    assert seen[7:9] == ["always", 5] and sorted(seen[9:]) == sorted(ids)


def test_bench_end_to_end(manifest, tiny_dir, tmp_path):
    out = tmp_path / "bench"
    result = runner.invoke(cli.app, ["bench", str(manifest), "--model", str(tiny_dir), "--device", "cpu",
                                     "--max-new-tokens", "2", "--dpi", "72", "--budgets", "32,64", "--modes",
                                     "never,always", "--out", str(out), "--limit", "3"])
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "bench.json").read_text())
    points = report["points"]
    assert [(p["mode"], p["max_tokens"]) for p in points] == [("never", 32), ("never", 64), ("always", 32),
                                                              ("always", 64)]
    assert all(p["rows"] == 3 and p["samples_per_s"] > 0 and p["accuracy"] is not None for p in points)
    assert all(p["mean_visual_tokens"] <= p["max_tokens"] for p in points if p["mode"] == "never")
    assert report["meta"]["device"] == "cpu" and report["meta"]["warmup_rows"] == 1
    with Image.open(out / "pareto.png") as plot:
        assert plot.size == (960, 620)


@pytest.mark.parametrize("args", [["--compare", "never,sometimes"], ["--metric", "bleu"]])
def test_eval_usage_errors(manifest, tiny_dir, args):
    assert runner.invoke(cli.app, ["eval", str(manifest), *common(tiny_dir), *args]).exit_code == EXIT_USAGE


def test_bench_bad_budgets(manifest, tiny_dir):
    result = runner.invoke(cli.app, ["bench", str(manifest), "--model", str(tiny_dir), "--budgets", "a,b"])
    assert result.exit_code == EXIT_USAGE


def _failing_write(monkeypatch, name):
    """Writing a file called `name` fails as a full disk would, once the work is done."""
    import errno
    from pathlib import Path

    original = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def test_eval_scores_that_cannot_be_written_go_to_stdout(manifest, tiny_dir, tmp_path, monkeypatch):
    from qzoom_cli.errors import EXIT_OUTPUT

    _failing_write(monkeypatch, "scores.jsonl")
    result = runner.invoke(cli.app, ["eval", str(manifest), *common(tiny_dir), "--compare", "never", "--json",
                                     "-o", str(tmp_path / "scores.jsonl")])
    assert result.exit_code == EXIT_OUTPUT
    lines = result.stdout.strip().splitlines()
    assert json.loads(lines[0])["modes"][0]["rows"] == 5
    assert [json.loads(line)["mode"] for line in lines[1:]] == ["never"] * 5
    assert "No space left on device" in result.stderr and "went to stdout" in result.stderr


def test_bench_report_that_cannot_be_written_goes_to_stdout(manifest, tiny_dir, tmp_path, monkeypatch):
    from qzoom_cli.errors import EXIT_OUTPUT

    _failing_write(monkeypatch, "bench.json")
    result = runner.invoke(cli.app, ["bench", str(manifest), "--model", str(tiny_dir), "--device", "cpu",
                                     "--max-new-tokens", "2", "--dpi", "72", "--budgets", "32", "--modes", "never",
                                     "--out", str(tmp_path / "bench"), "--limit", "2"])
    assert result.exit_code == EXIT_OUTPUT
    assert json.loads(result.stdout)["points"][0]["rows"] == 2


@pytest.mark.parametrize("a, b, distance", [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3),
                                            ("abc", "ac", 1), ("ac", "abc", 1), ("ab", "ba", 2), ("flaw", "lawn", 2),
                                            ("same", "same", 0)])
def test_levenshtein_counts_insertions_deletions_and_substitutions(a, b, distance):
    from qzoom_cli.evaluate import levenshtein

    assert levenshtein(a, b) == distance


def test_a_failed_row_scores_zero():
    from qzoom_cli.evaluate import score

    assert score("anls", None, ["42"]) == 0.0 and score("exact", "42", ["42"]) == 1.0


def _row(status="ok", zoomed=False, latency=1.0, decode=0.4, tokens=5, visual=100, memory=1.5, pages=1):
    """A record's summary fields; `tokens` and `decode` over all its `pages`."""
    from types import SimpleNamespace

    stats = SimpleNamespace(latency_s=latency, visual_tokens=visual, total_output_tokens=tokens, peak_mem_gib=memory,
                            time=SimpleNamespace(decode_s=decode))
    return SimpleNamespace(status=status, zoom=SimpleNamespace(zoomed=zoomed), stats=stats, candidates=[None] * pages)


def test_a_mode_summary_counts_answered_rows_and_reports_failures_apart():
    from qzoom_cli.evaluate import summarize

    rows = [_row(zoomed=True, latency=1.0, decode=0.4, tokens=5, visual=300, memory=2.0),
            _row(latency=3.0, decode=1.0, tokens=1, visual=100, memory=1.0),
            _row(status="error", zoomed=True, latency=99, decode=99, tokens=99, visual=9999, memory=99)]
    summary = summarize("auto", rows, [1.0, None, 0.5], wall_s=2.0)
    assert (summary.mode, summary.rows, summary.scored, summary.failed) == ("auto", 3, 2, 1)
    assert summary.accuracy == 0.75 and summary.zoom_rate == 0.5 and summary.mean_visual_tokens == 200
    assert summary.samples_per_s == 1.5 and summary.peak_mem_gib == 2.0
    assert (summary.p50_latency_s, summary.p95_latency_s) == (2.0, pytest.approx(2.9))
    assert summary.mean_ttft_s == pytest.approx((0.6 + 2.0) / 2)
    assert summary.mean_decode_per_token_s == pytest.approx((0.4 / 4 + 1.0 / 1) / 2)  # tokens after the first
    two_pages = summarize("auto", [_row(decode=0.6, tokens=8, pages=2)], [None], wall_s=1.0)
    assert two_pages.mean_decode_per_token_s == pytest.approx(0.6 / 6)  # each page's first token: its prefill's

    failed = summarize("never", [_row(status="error")], [None], wall_s=0.0)
    assert (failed.accuracy, failed.zoom_rate, failed.mean_visual_tokens, failed.samples_per_s) == (None, 0, 0, 0)
    assert (failed.mean_ttft_s, failed.mean_decode_per_token_s, failed.peak_mem_gib, failed.failed) == (0, 0, 0, 1)


def test_the_pareto_plot_reads_accuracy_in_percent_and_shows_overlapping_modes(tmp_path):
    """Every mode at 0% and the same speed (a tiny model's plot): the axis still spans percentages,
    and both modes' markers are visible, one drawn over the other."""
    from qzoom_cli.bench import PALETTE, BenchPoint, _nice_ticks, pareto_png, pareto_title, y_range
    from qzoom_cli.evaluate import ModeSummary

    assert y_range([0.0, 0.0], accuracy=True) == (0.0, 10.0) and _nice_ticks(0.0, 10.0) == [0, 2, 4, 6, 8, 10]
    assert y_range([100.0], accuracy=True) == (90.0, 100.0)
    assert y_range([40.0, 60.0], accuracy=True) == (38.0, 62.0)
    assert y_range([100.0, 300.0], accuracy=False) == (80.0, 320.0)

    def point(mode, budget):
        summary = ModeSummary(mode=mode, rows=2, scored=2, accuracy=0.0, zoom_rate=0.0, mean_visual_tokens=50,
                              samples_per_s=1.0 + budget / 1000, p50_latency_s=1, p95_latency_s=1, mean_ttft_s=0.5,
                              mean_decode_per_token_s=0.1, peak_mem_gib=0, failed=0)
        return BenchPoint(mode, 16, budget, summary)

    path = pareto_png([point(m, b) for m in ("never", "auto") for b in (64, 256)], tmp_path / "p.png", "title")
    with Image.open(path) as plot:
        colours = set(plot.crop((0, 120, 960, 620)).getdata())  # below the legend
    assert PALETTE[0] in colours and PALETTE[1] in colours
    report = {"meta": {"model": "/home/me/models/tiny-qwen", "device_name": "cpu", "dtype": "float32",
                       "attn": "sdpa"}}
    assert pareto_title(report) == "tiny-qwen on cpu (float32, sdpa)"
    report["meta"]["model"] = "Qwen/Qwen2.5-VL-7B-Instruct"
    assert pareto_title(report).startswith("Qwen/Qwen2.5-VL-7B-Instruct on cpu")
