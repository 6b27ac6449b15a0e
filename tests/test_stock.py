"""The stock `generate()` baseline of `qzoom bench --modes stock`: the same answers as `--zoom never`."""

import json

import pytest
import torch
from docmaker import make_pdf
from typer.testing import CliRunner

from qzoom_cli import cli
from qzoom_cli.batch import RunOptions, answer_rows
from qzoom_cli.errors import EXIT_USAGE
from qzoom_cli.manifest import ManifestRow, RowError
from qzoom_cli.options import ZoomSettings
from qzoom_cli.stock import _FirstToken, stock_rows

runner = CliRunner()


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stock")
    (folder / "a.pdf").write_bytes(make_pdf(2))
    (folder / "b.pdf").write_bytes(make_pdf(1))
    a, b = str(folder / "a.pdf"), str(folder / "b.pdf")
    return [ManifestRow(0, "all-pages", a, "total?"), ManifestRow(1, "page-2", a, "date?", pages="2"),
            ManifestRow(2, "too-far", a, "x?", pages="9"), ManifestRow(3, "other-doc", b, "number?"),
            ManifestRow(4, "missing", str(folder / "none.pdf"), "x?"),
            RowError(5, "broken", "bad_json", "line 6 is not JSON", "")]


def _options(qz, batch_size):
    return RunOptions(zoom=ZoomSettings("never"), budget=qz.resolve_budget(16, 48, "never"), dpi=72,
                      max_new_tokens=6, batch_size=batch_size)


def _answers(answer, qz, rows, options):
    found = {}
    answer(qz, rows, options, lambda index, result: found.setdefault(index, []).append(result))
    assert all(len(results) == 1 for results in found.values())  # one record per row
    return {index: results[0] for index, results in found.items()}


@pytest.mark.parametrize("batch_size", [1, 3])
def test_stock_generate_answers_as_never_does(qz, rows, batch_size):
    """Every page of a row answered, the likeliest kept, left-padded batches: `never`'s answers,
    pages, scores and token counts; bad rows fail with `never`'s errors."""
    options = _options(qz, batch_size)
    never, stock = _answers(answer_rows, qz, rows, options), _answers(stock_rows, qz, rows, options)
    assert sorted(stock) == sorted(never) == list(range(6))
    for index, want in never.items():
        got = stock[index]
        assert (got.status, got.answer, got.page, got.error) == (want.status, want.answer, want.page, want.error)
        assert [(c.page, c.answer, c.output_tokens, c.visual_tokens, c.truncated) for c in got.candidates] == \
            [(c.page, c.answer, c.output_tokens, c.visual_tokens, c.truncated) for c in want.candidates]
        assert [c.score for c in got.candidates] == pytest.approx([c.score for c in want.candidates], abs=1e-5)
        if want.stats is not None:
            assert (got.stats.visual_tokens, got.stats.prompt_tokens, got.stats.output_tokens,
                    got.stats.total_visual_tokens) == (want.stats.visual_tokens, want.stats.prompt_tokens,
                                                       want.stats.output_tokens, want.stats.total_visual_tokens)
            assert got.input == want.input and got.budget.max_tokens == want.budget.max_tokens
            assert got.model.decoder == "generate" and not got.zoom.zoomed
            time = got.stats.time
            assert time.render_s > 0 and time.preprocess_s > 0 and time.coarse_prefill_s > 0 and time.decode_s > 0
            assert got.stats.latency_s == pytest.approx(time.total, abs=1e-5)
    assert len(never[0].candidates) == 2 and never[2].error.code == "page_out_of_range"


def test_stock_switches_the_checkpoints_sampling_off(qz, rows, monkeypatch):
    """A checkpoint's sampling and repetition penalty (Qwen2.5-VL ships both) do not reach the baseline."""
    config = qz.backbone.model.generation_config
    monkeypatch.setattr(config, "do_sample", True)
    monkeypatch.setattr(config, "repetition_penalty", 50.0)
    monkeypatch.setattr(config, "temperature", 5.0)
    options = _options(qz, 1)
    chosen = rows[:2]
    never, stock = _answers(answer_rows, qz, chosen, options), _answers(stock_rows, qz, chosen, options)
    assert [stock[i].answer for i in (0, 1)] == [never[i].answer for i in (0, 1)]


def test_stock_runs_transformers_own_vision_attention(qz, rows, monkeypatch):
    """On CUDA qzoom encodes pages with its one-call windowed attention; the baseline must not:
    `generate()` runs with the attention the model was loaded with, and qzoom's comes back after."""
    from qzoom_cli.backbones.attention import WINDOWED_SDPA

    vision = qz.backbone.config.vision_config
    monkeypatch.setattr(vision, "_attn_implementation", WINDOWED_SDPA)  # as the backbone sets it on CUDA
    generate, seen = qz.backbone.model.generate, []

    def spy(*args, **kwargs):
        seen.append(vision._attn_implementation)
        return generate(*args, **kwargs)

    monkeypatch.setattr(qz.backbone.model, "generate", spy)
    stock = _answers(stock_rows, qz, rows[:1], _options(qz, 1))
    assert stock[0].error is None and seen == ["sdpa", "sdpa"]
    assert vision._attn_implementation == WINDOWED_SDPA


def test_a_failed_stock_batch_fails_only_its_rows(qz, rows, monkeypatch):
    """Both pages of the first row fail, one batch each: the row fails once, the rest are answered."""
    generate = qz.backbone.model.generate
    calls = []

    def out_of_memory_twice(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return generate(*args, **kwargs)

    monkeypatch.setattr(qz.backbone.model, "generate", out_of_memory_twice)
    stock = _answers(stock_rows, qz, rows, _options(qz, 1))
    assert (stock[0].error.code, stock[0].error.message) == ("oom", "out of GPU memory")
    assert stock[1].error is None and stock[3].error is None and len(calls) == 4


def test_the_first_token_is_timed_at_its_arrival_not_the_prompts():
    """`generate()` hands the streamer the prompt first, then each new token."""
    timer = _FirstToken()
    timer.put(torch.tensor([[1, 2, 3]]))
    assert timer.at is None
    timer.put(torch.tensor([4]))
    first = timer.at
    timer.put(torch.tensor([5]))
    assert first is not None and timer.at == first


@pytest.fixture
def manifest(tmp_path):
    (tmp_path / "a.pdf").write_bytes(make_pdf(2))
    rows = [{"id": "r0", "file": "a.pdf", "question": "total?", "answers": ["x"]},
            {"id": "r1", "file": "a.pdf", "question": "date?", "pages": "1"}]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bench_times_every_point_against_stock(manifest, tiny_dir, tmp_path):
    """Stock runs first, largest budget first: that point is the yardstick of every point's time."""
    out = tmp_path / "bench"
    result = runner.invoke(cli.app, ["bench", str(manifest), "--model", str(tiny_dir), "--device", "cpu",
                                     "--max-new-tokens", "2", "--dpi", "72", "--budgets", "32,64", "--modes",
                                     "never,stock", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    points = json.loads((out / "bench.json").read_text())["points"]
    assert [(p["mode"], p["max_tokens"]) for p in points] == [("stock", 64), ("stock", 32), ("never", 32),
                                                              ("never", 64)]
    yardstick = points[0]["samples_per_s"]
    assert [p["time_vs_stock"] for p in points] == pytest.approx([yardstick / p["samples_per_s"] for p in points])
    assert points[0]["time_vs_stock"] == 1.0 and points[0]["mean_visual_tokens"] == points[3]["mean_visual_tokens"]
    assert "stock generate()" in result.stderr and "x stock's time" in result.stderr
    plain = runner.invoke(cli.app, ["bench", str(manifest), "--model", str(tiny_dir), "--device", "cpu",
                                    "--max-new-tokens", "2", "--dpi", "72", "--budgets", "32", "--modes", "never",
                                    "--out", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.stderr
    assert [p["time_vs_stock"] for p in json.loads((tmp_path / "plain" / "bench.json").read_text())["points"]] == [None]


def test_bench_modes_name_stock(manifest, tiny_dir, tmp_path):
    result = runner.invoke(cli.app, ["bench", str(manifest), "--modes", "never,generate", "--out", str(tmp_path)])
    assert result.exit_code == EXIT_USAGE
    assert "modes are a comma list of auto, always, never, stock; got 'never,generate'" in result.stderr
    compare = runner.invoke(cli.app, ["eval", str(manifest), "--compare", "stock"])
    assert compare.exit_code == EXIT_USAGE and "auto, always, never; got 'stock'" in compare.stderr
