"""`qzoom run`: manifests, ordered resumable output, render-once grouping, sharding across processes."""

import io
import json
import os
import subprocess
import sys

import pytest
from docmaker import make_image, make_pdf
from typer.testing import CliRunner

from qzoom_cli import cli
from qzoom_cli.batch import OrderedWriter, document_groups, shard, shard_path
from qzoom_cli.errors import EXIT_INTERRUPTED, EXIT_OUTPUT, EXIT_PARTIAL, EXIT_USAGE, UsageError
from qzoom_cli.manifest import ManifestRow, RowError, read_manifest

runner = CliRunner()


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "a.pdf").write_bytes(make_pdf(2))
    (tmp_path / "b.png").write_bytes(make_image("PNG"))
    (tmp_path / "c.pdf").write_bytes(make_pdf(1))
    return tmp_path


def write_manifest(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


ROWS = [
    {"id": "a1", "file": "a.pdf", "question": "total?", "answers": ["$100.00"]},
    {"question_id": "b1", "image": "b.png", "query": "what?"},
    {"id": "a2", "path": "a.pdf", "question": "date?", "pages": "2"},
    {"id": "c1", "images": ["c.pdf"], "question": "who?", "answer": "nobody"},
    {"id": "a3", "file": "a.pdf", "question": "page?"},
]


def run(tmp, *args, **kwargs):
    common = ["--model", str(kwargs.pop("tiny")), "--device", "cpu", "--max-new-tokens", "3",
              "--max-visual-tokens", "48", "--min-visual-tokens", "16", "--dpi", "72"]
    return runner.invoke(cli.app, ["run", *common, *args], **kwargs)


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_manifest_aliases_layouts_and_bad_rows(tmp_path):
    m = write_manifest(tmp_path / "m.jsonl", [
        *ROWS,
        {"id": "x", "question": "no file"},
        {"id": "y", "file": "a.pdf"},
        {"id": "z", "images": ["a.pdf", "b.png"], "question": "two?"},
        "not json at all",
        [1, 2],
        {"id": "a1", "file": "a.pdf", "question": "again"},
        {"file": "c.pdf", "question": "no id?", "task": "docvqa"},
    ])
    rows = read_manifest(m)
    good = [r for r in rows if isinstance(r, ManifestRow)]
    assert [r.id for r in good] == ["a1", "b1", "a2", "c1", "a3", "row12"]
    assert good[5].dataset == "docvqa"  # lmms-eval's name for it
    assert good[0].file == str(tmp_path / "a.pdf") and good[0].answers == ["$100.00"]
    assert good[1].question == "what?" and good[2].pages == "2" and good[3].answers == ["nobody"]
    bad = {r.id: r.code for r in rows if isinstance(r, RowError)}
    assert bad == {"x": "bad_row", "y": "bad_row", "z": "bad_row", "row9": "bad_row", "row10": "bad_row",
                   "a1@row11": "duplicate_id"}
    assert [r.index for r in rows] == list(range(12))
    messages = {r.id: r.message for r in rows if isinstance(r, RowError)}
    assert messages["row9"].startswith(f"{m} line 9 is not JSON") and messages["row10"] == "row 10 is not a JSON object"
    assert messages["x"] == "row 6: no document (keys: file, path, image, images, image_path)"
    assert messages["y"] == "row 7: no question (keys: question, query)"
    assert messages["z"] == "row 8: exactly one file per row, got 2"
    assert next(r for r in rows if r.id == "x").question == "no file"  # kept for the error record
    duplicate = next(r for r in rows if r.id == "a1@row11")
    assert (duplicate.message, duplicate.question) == ("row 11: id 'a1' is used by an earlier row", "again")
    rooted = read_manifest(m, root="/data")
    assert rooted[0].file == "/data/a.pdf"
    absolute = write_manifest(tmp_path / "abs.jsonl", [{"id": "p", "file": str(tmp_path / "a.pdf"), "question": "q?"}])
    assert read_manifest(absolute, root="/data")[0].file == str(tmp_path / "a.pdf")  # not moved under the root


def test_docvqa_and_lmms_eval_layouts(tmp_path):
    docvqa = {"dataset_name": "docvqa", "data": [
        {"questionId": 337, "question": "what is the date?", "image": "documents/x_1.png", "docId": 279,
         "answers": ["1/8/93", "january 8, 1993"]}]}
    (tmp_path / "val.json").write_text(json.dumps(docvqa))
    [row] = read_manifest(tmp_path / "val.json")
    assert (row.id, row.file, row.answers) == ("337", str(tmp_path / "documents/x_1.png"), ["1/8/93", "january 8, 1993"])
    lmms = [{"doc_id": 0, "doc": {"question": "total?", "image_path": "p.png", "answers": ["5"]}, "target": "5",
             "resps": [["5"]]},
            {"doc_id": 1, "doc": {"question": "name?", "image": "q.png"}, "target": "Ann", "pages": "2",
             "password": "pw", "metric": "exact", "dataset": "chartqa"}]
    write_manifest(tmp_path / "samples.jsonl", lmms)
    rows = read_manifest(tmp_path / "samples.jsonl")
    assert [(r.id, r.answers) for r in rows] == [("0", ["5"]), ("1", ["Ann"])]
    assert (rows[1].pages, rows[1].password, rows[1].metric, rows[1].dataset) == ("2", "pw", "exact", "chartqa")
    [row] = read_manifest(write_manifest(tmp_path / "empty.jsonl", [{"id": "", "question_id": "q7", "question": "",
                                                                      "query": "what?", "file": "a.pdf"}]))
    assert (row.id, row.question) == ("q7", "what?")  # an empty value falls through to the next alias
    with pytest.raises(UsageError, match=f"^no such manifest: {tmp_path / 'missing.jsonl'}$"):
        read_manifest(tmp_path / "missing.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n")
    with pytest.raises(UsageError, match=f"^manifest {tmp_path / 'blank.jsonl'} has no rows$"):
        read_manifest(tmp_path / "blank.jsonl")


def test_stdin_manifest(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    stdin = io.TextIOWrapper(io.BytesIO((json.dumps(ROWS[0]) + "\n").encode()))
    monkeypatch.setattr(sys, "stdin", stdin)
    [row] = read_manifest("-")
    assert row.file == str(tmp_path / "a.pdf")


def test_byte_order_mark_and_lines_that_are_not_utf8(tmp_path):
    """A BOM is not part of the first row; a line of other bytes is a bad row and the rest go on."""
    lines = [json.dumps(ROWS[0]).encode(), b'{"id": "latin", "file": "caf\xe9.pdf", "question": "q?"}',
             json.dumps(ROWS[3]).encode()]
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    first, bad, last = read_manifest(path)
    assert isinstance(first, ManifestRow) and first.id == "a1"
    assert isinstance(bad, RowError) and bad.code == "bad_row" and "line 2 is not UTF-8" in bad.message
    assert isinstance(last, ManifestRow) and last.id == "c1"
    for byte in (b"\x80", b"\xff"):  # the first and last bytes that are never UTF-8 on their own
        path.write_bytes(b'{"id": "x", "file": "a' + byte + b'.pdf", "question": "q?"}\n')
        [alone] = read_manifest(path)
        assert isinstance(alone, RowError) and "line 1 is not UTF-8" in alone.message
    whole = tmp_path / "docvqa.json"
    whole.write_bytes(b"\xef\xbb\xbf" + json.dumps({"data": [ROWS[0]]}).encode())
    assert [r.id for r in read_manifest(whole)] == ["a1"]


def test_ordered_writer_waits_for_earlier_rows():
    out = io.StringIO()
    writer = OrderedWriter(out, [0, 2, 5])
    writer.add(5, "five")
    writer.add(2, "two")
    assert out.getvalue() == ""
    writer.add(0, "zero")
    assert out.getvalue() == "zero\ntwo\nfive\n" and writer.complete


def test_documents_are_grouped_and_sharded_whole(workdir):
    rows = [r for r in read_manifest(write_manifest(workdir / "m.jsonl", ROWS)) if isinstance(r, ManifestRow)]
    groups = document_groups(rows)
    assert [[r.id for r in g] for g in groups] == [["a1", "a2", "a3"], ["b1"], ["c1"]]
    assert [[r.id for g in shard(groups, rank, 2) for r in g] for rank in (0, 1)] == [["a1", "a2", "a3", "c1"], ["b1"]]


def test_run_to_stdout_in_order_with_error_rows(workdir, tiny_dir):
    m = write_manifest(workdir / "m.jsonl", [*ROWS, {"id": "gone", "file": "gone.pdf", "question": "q?"},
                                             {"id": "p9", "file": "c.pdf", "question": "q?", "pages": "9"}, "{oops"])
    result = run(workdir, str(m), tiny=tiny_dir)
    assert result.exit_code == EXIT_PARTIAL, result.stderr
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in out] == ["a1", "b1", "a2", "c1", "a3", "gone", "p9", "row8"]
    codes = {r["id"]: (r["error"] or {}).get("code") for r in out}
    assert codes["gone"] == "file_not_found" and codes["p9"] == "page_out_of_range" and codes["row8"] == "bad_row"
    assert all(r["status"] in ("ok", "truncated") for r in out[:5]) and out[2]["input"]["pages"] == [2]
    assert "qzoom: 5 rows answered (0 zoomed), 3 failed\n" in result.stderr  # of 8 rows


def test_each_document_is_rendered_once(workdir, tiny_dir, monkeypatch):
    from qzoom_cli.documents import Document

    calls = []
    original = Document.render
    monkeypatch.setattr(Document, "render", lambda self, n: calls.append((self.source, n)) or original(self, n))
    m = write_manifest(workdir / "m.jsonl", [ROWS[0], ROWS[4], ROWS[1]])  # two rows about a.pdf, one image
    result = run(workdir, str(m), "--zoom", "never", tiny=tiny_dir)
    assert result.exit_code == 0, result.stderr
    assert sorted(calls) == sorted([(str(workdir / "a.pdf"), 1), (str(workdir / "a.pdf"), 2),
                                    (str(workdir / "b.png"), 1)])


def test_output_file_resume_after_crash_and_interrupt(workdir, tiny_dir, monkeypatch):
    m = write_manifest(workdir / "m.jsonl", [*ROWS, {"id": "gone", "file": "gone.pdf", "question": "q?"}])
    out = workdir / "out.jsonl"
    fresh = run(workdir, str(m), "-o", str(out), tiny=tiny_dir)
    assert fresh.exit_code == EXIT_PARTIAL and fresh.stdout == ""
    reference = records(out)
    assert [r["id"] for r in reference] == ["a1", "b1", "a2", "c1", "a3", "gone"]

    again = run(workdir, str(m), "-o", str(out), tiny=tiny_dir)
    assert again.exit_code == EXIT_USAGE and "--resume" in again.stderr

    # a crash mid-write: three whole records, a torn fourth line
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])
    resumed = run(workdir, str(m), "-o", str(out), "--resume", tiny=tiny_dir)
    assert resumed.exit_code == EXIT_PARTIAL and "3 kept from before" in resumed.stderr
    assert [(r["id"], r["answer"]) for r in records(out)] == [(r["id"], r["answer"]) for r in reference]

    # Ctrl-C while the second document is answered: a valid file, then --resume finishes it
    from qzoom_cli import api

    original, seen = api._Batcher._finish, []

    def interrupted(self, flight):
        seen.append(1)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return original(self, flight)

    monkeypatch.setattr(api._Batcher, "_finish", interrupted)
    stopped = run(workdir, str(m), "-o", str(out), "--force", tiny=tiny_dir)
    assert stopped.exit_code == EXIT_INTERRUPTED
    partial = records(out)
    assert 0 < len(partial) < len(reference) and len({r["id"] for r in partial}) == len(partial)
    monkeypatch.setattr(api._Batcher, "_finish", original)
    finished = run(workdir, str(m), "-o", str(out), "--resume", tiny=tiny_dir)
    assert finished.exit_code == EXIT_PARTIAL
    assert [(r["id"], r["answer"]) for r in records(out)] == [(r["id"], r["answer"]) for r in reference]


def test_resume_keeps_finished_records_and_retries_failed_ones(workdir, tiny_dir):
    """A row that failed (its file was missing) is answered once the file is there; finished rows
    are kept byte for byte, not answered again; records of rows no longer in the manifest are dropped."""
    m = write_manifest(workdir / "m.jsonl", [ROWS[0], {"id": "late", "file": "late.pdf", "question": "total?"},
                                             ROWS[1]])
    out = workdir / "out.jsonl"
    assert run(workdir, str(m), "-o", str(out), tiny=tiny_dir).exit_code == EXIT_PARTIAL
    first = {r["id"]: r for r in records(out)}
    assert first["late"]["status"] == "error" and first["late"]["error"]["code"] == "file_not_found"
    stale = json.dumps({**first["a1"], "id": "gone-from-manifest"})
    out.write_text(out.read_text() + stale + "\n")
    (workdir / "late.pdf").write_bytes(make_pdf(1))
    resumed = run(workdir, str(m), "-o", str(out), "--resume", tiny=tiny_dir)
    assert resumed.exit_code == 0 and "2 kept from before" in resumed.stderr
    after = records(out)
    assert [r["id"] for r in after] == ["a1", "late", "b1"]
    assert after[1]["status"] in ("ok", "truncated") and after[1]["answer"] is not None
    assert after[0] == first["a1"] and after[2] == first["b1"]  # same latency: not answered again


def test_resume_needs_an_output_file(workdir, tiny_dir):
    m = write_manifest(workdir / "m.jsonl", ROWS[:1])
    result = run(workdir, str(m), "--resume", tiny=tiny_dir)
    assert result.exit_code == EXIT_USAGE and "-o" in result.stderr


@pytest.mark.processes
def test_two_processes_merge_into_one_ordered_file(workdir, tiny_dir):
    """torchrun starts two processes (as `accelerate launch` does on GPUs); they split the documents
    and the merged file equals a single-process run."""
    m = write_manifest(workdir / "m.jsonl", [*ROWS, {"id": "gone", "file": "gone.pdf", "question": "q?"}])
    single = run(workdir, str(m), "-o", str(workdir / "single.jsonl"), tiny=tiny_dir)
    assert single.exit_code == EXIT_PARTIAL
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29651",
               "-m", "qzoom_cli", "run", str(m), "-o", str(workdir / "multi.jsonl"), "--model", str(tiny_dir),
               "--device", "cpu", "--max-new-tokens", "3", "--max-visual-tokens", "48", "--min-visual-tokens", "16",
               "--dpi", "72", "-q"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=workdir)
    merged = records(workdir / "multi.jsonl")
    assert [(r["id"], r["answer"], r["status"]) for r in merged] == \
        [(r["id"], r["answer"], r["status"]) for r in records(workdir / "single.jsonl")], done.stderr[-2000:]
    assert not list(workdir.glob("multi.jsonl.rank*"))


def test_gpus_relaunches_under_accelerate(workdir, tiny_dir, monkeypatch):
    launched = []
    monkeypatch.setattr("subprocess.call", lambda command: launched.append(command) or 0)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)  # as on a machine with four GPUs
    monkeypatch.setattr(sys, "argv", ["qzoom", "run", "m.jsonl", "-o", "out.jsonl", "--gpus", "0,2", "--zoom", "never"])
    result = runner.invoke(cli.app, sys.argv[1:])
    assert result.exit_code == 0
    [command] = launched
    assert command[1:] == ["-m", "accelerate.commands.launch", "--num_processes", "2", "--gpu_ids", "0,2", "-m",
                           "qzoom_cli", "run", "m.jsonl", "-o", "out.jsonl", "--zoom", "never"]
    bad = runner.invoke(cli.app, ["run", "m.jsonl", "--gpus", "first"])
    assert bad.exit_code == EXIT_USAGE


def test_progress_on_stderr(workdir, tiny_dir):
    m = write_manifest(workdir / "m.jsonl", [*ROWS[:2], {"id": "gone", "file": "gone.pdf", "question": "q?"}])
    result = run(workdir, str(m), "--progress", tiny=tiny_dir)
    assert result.exit_code == EXIT_PARTIAL
    assert "3/3" in result.stderr and "rows/s" in result.stderr and "failed 1" in result.stderr
    assert len(result.stdout.splitlines()) == 3  # progress never reaches stdout


def _rows(tmp):
    manifest = write_manifest(tmp / "m.jsonl", ROWS + [{"id": "x1", "file": "missing.pdf", "question": "q?"},
                                                       {"id": "c2", "file": "c.pdf", "question": "when?",
                                                        "pages": "5"}])
    return read_manifest(str(manifest), None)


def _answer(qz, rows, batch_size, zoom="always"):
    from qzoom_cli.batch import RunOptions, answer_rows
    from qzoom_cli.budget import VisualBudget
    from qzoom_cli.zoom.pipeline import ZoomSettings

    options = RunOptions(zoom=ZoomSettings(zoom), budget=VisualBudget(16, 48), dpi=72, max_new_tokens=4,
                         batch_size=batch_size)
    out = {}
    answer_rows(qz, rows, options, lambda index, result: out.__setitem__(index, result))
    return [out[i] for i in sorted(out)]


def test_questions_are_batched_across_documents(qz, workdir, monkeypatch):
    """Pairs from different documents share a batch, answers equal one at a time, and a bad row
    (missing file, page out of range) fails alone."""
    rows = _rows(workdir)
    single = _answer(qz, rows, 1)
    sizes = []
    original = qz.engine.answer_batch

    def counting(items, *args):
        sizes.append(len({id(page) for page, _ in items}))
        return original(items, *args)

    monkeypatch.setattr(qz.engine, "answer_batch", counting)
    batched = _answer(qz, rows, 4)
    assert max(sizes) > 1  # one batch held pages of several documents
    assert [r.status for r in batched] == [r.status for r in single]
    assert [r.error.code for r in batched if r.error] == ["file_not_found", "page_out_of_range"]
    for a, b in zip(single, batched, strict=True):
        assert (a.id, a.answer, a.page) == (b.id, b.answer, b.page)
        if a.candidates:
            assert [c.score for c in a.candidates] == pytest.approx([c.score for c in b.candidates], abs=1e-4)


def test_out_of_memory_fails_only_the_requests_of_that_batch(qz, workdir, monkeypatch):
    import torch

    rows = _rows(workdir)[:4]  # a.pdf (3 questions), b.png, a.pdf page 2, c.pdf
    original = qz.engine.answer_batch

    def tight(items, *args):
        if any(text.startswith("what?") for _, text in items):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return original(items, *args)

    monkeypatch.setattr(qz.engine, "answer_batch", tight)
    results = {r.id: r for r in _answer(qz, rows, 1)}
    assert results["b1"].status == "error" and results["b1"].error.code == "oom"
    assert all(results[i].status in ("ok", "truncated") for i in ("a1", "a2", "c1"))


def test_automatic_batch_size_from_free_memory(qz, monkeypatch):
    import dataclasses

    import torch

    from qzoom_cli.budget import VisualBudget

    budget = VisualBudget(256, 576)
    assert qz.resolve_batch_size("auto", budget, 64) == 1  # off CUDA
    assert qz.resolve_batch_size(3, budget, 64) == 3
    gpu = type(qz)(qz.backbone, dataclasses.replace(qz.runtime, device=torch.device("cuda")))
    pair = (2 * 576 + 256 + 64) * qz.backbone.memory_per_token()
    for free, expected in ((2 * 5 * pair + 1, 5), (10**15, 64), (pair, 1)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 2 * free))
        assert gpu.resolve_batch_size("auto", budget, 64) == expected
    page_only = (576 + 256 + 64) * qz.backbone.memory_per_token()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * 10 * page_only, 0))
    assert gpu.resolve_batch_size("auto", budget, 64, zoom_mode="never") == 10  # no region to make room for
    assert gpu.resolve_batch_size("auto", budget, 64) == 10 * page_only // pair


def test_batch_size_flag(workdir, tiny_dir):
    m = write_manifest(workdir / "m.jsonl", ROWS[:2])
    assert run(workdir, str(m), "--batch-size", "auto", tiny=tiny_dir).exit_code == 0
    bad = run(workdir, str(m), "--batch-size", "lots", tiny=tiny_dir)
    assert bad.exit_code == EXIT_USAGE and "--batch-size" in bad.stderr


def test_output_never_replaces_the_manifest(workdir, tiny_dir):
    m = write_manifest(workdir / "m.jsonl", ROWS[:2])
    before = m.read_bytes()
    for extra in ([], ["--resume"], ["--force"]):
        result = run(workdir, str(m), "-o", str(m), *extra, tiny=tiny_dir)
        assert result.exit_code == EXIT_USAGE and "also an input" in result.stderr
    assert m.read_bytes() == before


def test_a_second_writer_of_one_output_is_refused(workdir, tiny_dir):
    from qzoom_cli.outputs import sole_writer

    m = write_manifest(workdir / "m.jsonl", ROWS[:2])
    out = workdir / "out.jsonl"
    with sole_writer(out):  # another run is writing it
        result = run(workdir, str(m), "-o", str(out), tiny=tiny_dir)
        assert result.exit_code == EXIT_USAGE and "being written by another qzoom run" in result.stderr
        assert not out.exists()
    assert run(workdir, str(m), "-o", str(out), tiny=tiny_dir).exit_code == 0
    assert len(records(out)) == 2 and (workdir / "out.jsonl.lock").read_bytes() == b""  # kept: see sole_writer


@pytest.mark.parametrize("command", ["run", "eval", "bench", "ask", "ask-missing"])
def test_bad_output_locations_are_refused_before_any_work(workdir, tiny_dir, command):
    m = write_manifest(workdir / "m.jsonl", ROWS[:1])
    (workdir / "a-file").write_text("x")
    target = {"run": ["-o", str(workdir / "missing" / "out.jsonl")], "eval": ["-o", str(workdir)],
              "bench": ["-o", str(workdir / "a-file")], "ask": ["--overlay", str(workdir / "a-file")],
              "ask-missing": ["--overlay", str(workdir / "missing" / "overlays")]}[command]
    command = command.removesuffix("-missing")
    source = [str(workdir / "a.pdf"), "total?"] if command == "ask" else [str(m)]
    result = runner.invoke(cli.app, [command, *source, *target, "--model", str(workdir / "no-model")])
    assert result.exit_code == EXIT_USAGE, result.stderr  # the model folder is never reached
    assert "output" in result.stderr and not (workdir / "missing").exists()


def test_resume_with_other_settings_is_refused(workdir, tiny_dir):
    m = write_manifest(workdir / "m.jsonl", ROWS[:3])
    out = workdir / "out.jsonl"
    assert run(workdir, str(m), "-o", str(out), tiny=tiny_dir).exit_code == 0
    first = out.read_bytes()
    assert records(out)[0]["run"]["max_new_tokens"] == 3
    other = run(workdir, str(m), "-o", str(out), "--resume", "--zoom", "never", tiny=tiny_dir)
    assert other.exit_code == EXIT_USAGE and f"{out} holds answers made with other settings (zoom)" in other.stderr
    assert out.read_bytes() == first
    assert run(workdir, str(m), "-o", str(out), "--resume", tiny=tiny_dir).exit_code == 0
    assert run(workdir, str(m), "-o", str(out), "--force", "--zoom", "never", tiny=tiny_dir).exit_code == 0
    assert {r["run"]["zoom"] for r in records(out)} == {"never"}


def test_ordered_writer_falls_back_when_its_file_fails():
    """A full disk mid-run: the record that failed and every later one go to the fallback stream."""
    import errno
    import io

    class FullAfterOne(io.StringIO):
        def write(self, text):
            if self.getvalue():
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(text)

    file, fallback = FullAfterOne(), io.StringIO()
    writer = OrderedWriter(file, [0, 1, 2], fallback=fallback)
    for index in (2, 0, 1):
        writer.add(index, f"r{index}")
    assert file.getvalue() == "r0\n" and fallback.getvalue() == "r1\nr2\n"
    assert writer.write_error.errno == errno.ENOSPC
    full = FullAfterOne()
    for nowhere_else in (OrderedWriter(full, [0, 1]), OrderedWriter(full, [0, 1], fallback=full)):
        with pytest.raises(OSError, match="No space left"):  # nothing to fall back to: the failure is reported
            for index in (0, 1):
                nowhere_else.add(index, f"r{index}")


def test_run_manifest_keeps_results_unless_told_and_needs_a_file_for_resume_or_shards(qz, workdir):
    from qzoom_cli.batch import RunOptions, run_manifest
    from qzoom_cli.zoom.pipeline import ZoomSettings

    rows, options = _rows(workdir)[:2], RunOptions(zoom=ZoomSettings("never"), dpi=72, max_new_tokens=2)
    out = workdir / "out.jsonl"
    out.touch()  # an empty file holds nothing to lose
    assert run_manifest(lambda: qz, rows, options, output=out, stdout=io.StringIO()).done == 2
    before = out.read_bytes()
    for content in (before, b"{"):
        out.write_bytes(content)
        with pytest.raises(UsageError) as refused:
            run_manifest(lambda: qz, rows, options, output=out, stdout=io.StringIO())
        assert refused.value.message == f"{out} already has results: --resume to continue it or --force to overwrite it"
    from qzoom_cli.outputs import sole_writer

    with sole_writer(workdir / "other.jsonl"), pytest.raises(UsageError, match="being written by another qzoom run"):
        run_manifest(lambda: qz, rows, options, output=workdir / "other.jsonl", stdout=io.StringIO())
    for needs_a_file in ({"resume": True}, {"world": 2}):
        with pytest.raises(UsageError) as refused:
            run_manifest(lambda: qz, rows, options, output=None, stdout=io.StringIO(), **needs_a_file)
        assert refused.value.message == "--resume and several processes need an output file (-o)"


def test_the_run_summary_counts_what_was_answered_zoomed_and_failed(qz, workdir):
    """The summary `qzoom run` ends with: every row done, the zoomed ones and the failed ones
    counted as their records say; a run of bad rows only never loads the model."""
    from qzoom_cli.batch import RunOptions, run_manifest
    from qzoom_cli.manifest import RowError
    from qzoom_cli.zoom.pipeline import ZoomSettings

    rows = _rows(workdir)
    options = RunOptions(zoom=ZoomSettings("always", roi_threshold=0.0), dpi=72, max_new_tokens=2)
    summary = run_manifest(lambda: qz, rows, options, output=workdir / "out.jsonl", stdout=io.StringIO())
    written = records(workdir / "out.jsonl")
    assert summary.done == summary.total == len(rows) == len(written)
    assert summary.zoomed == sum(r["zoom"]["zoomed"] for r in written) > 0
    assert summary.failed == sum(r["status"] == "error" for r in written) > 0
    assert summary.line() == f"{summary.done - summary.failed} rows answered ({summary.zoomed} zoomed), " \
                             f"{summary.failed} failed"

    def no_model():
        raise AssertionError("the model was loaded for rows that need none")

    bad = [RowError(0, "bad", "bad_row", "row 1: no question")]
    assert run_manifest(no_model, bad, options, output=None, stdout=io.StringIO()).failed == 1


def test_a_resume_names_every_setting_that_changed():
    from qzoom_cli.batch import check_same_settings
    from qzoom_cli.errors import ResumeMismatch

    now = {"zoom": "auto", "dpi": 200}
    check_same_settings([{"run": dict(now)}], now, "out.jsonl")
    with pytest.raises(ResumeMismatch, match=r"other settings \(dpi, instruction\)"):  # one only in the old file
        check_same_settings([{"run": {"zoom": "auto", "dpi": 100, "instruction": ""}}], now, "out.jsonl")
    with pytest.raises(ResumeMismatch) as refused:
        check_same_settings([{"id": "a"}], now, "out.jsonl")
    assert refused.value.message == ("out.jsonl holds answers made with other settings ((not recorded)); resume with "
                                     "the same options, or --force to start afresh, or -o another file")


def test_failures_outside_the_library_become_named_record_errors():
    import torch

    from qzoom_cli.batch import error_fields
    from qzoom_cli.errors import PageOutOfRange

    assert error_fields(PageOutOfRange("page 9 of 2"), False) == ("page_out_of_range", "page 9 of 2")
    assert error_fields(torch.OutOfMemoryError("CUDA out of memory"), False) == ("oom", "out of GPU memory")
    assert error_fields(KeyError("x"), False) == ("internal", "KeyError: 'x'")


def test_error_records_keep_the_question_and_say_why():
    from qzoom_cli.batch import error_result

    row = ManifestRow(index=0, id="q1", file="a.pdf", question="total?")
    failed = error_result(row, "file_not_found", "a.pdf: no such file").to_dict()
    assert failed["question"] == "total?"
    assert failed["error"] == {"code": "file_not_found", "message": "a.pdf: no such file"}
    bad_line = RowError(index=3, id="line-4", code="bad_manifest", message="not JSON", question="who?")
    assert error_result(bad_line, bad_line.code, bad_line.message).to_dict()["question"] == "who?"


def test_result_files_round_trip_text_as_written_and_skip_what_is_not_a_record(tmp_path):
    from qzoom_cli.batch import read_records, write_records

    out = tmp_path / "out.jsonl"
    records = [{"id": "a", "answer": "Größe 5 €"}, {"id": "b", "answer": "東京"}]
    write_records(out, records)
    assert "Größe 5 €" in out.read_text(encoding="utf-8")  # readable UTF-8, not \u escapes
    assert read_records(out) == records and os.listdir(tmp_path) == ["out.jsonl"]

    lines = ['{"id": "a", "answer": "1"}', "", '{"id": "b", "answ', '["id"]', '{"no": "id"}', '"id"',
             '{"id": "c", "answer": "3"}']
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert [r["id"] for r in read_records(out)] == ["a", "c"]


def test_a_verbose_run_prints_the_traceback_of_a_bug(capsys):
    from qzoom_cli.batch import error_fields

    def broken():
        raise KeyError("x")

    try:
        broken()
    except KeyError as exc:
        assert error_fields(exc, True) == ("internal", "KeyError: 'x'")
    assert "in broken" in capsys.readouterr().err


def test_processes_sharing_one_output_write_shards_that_rank_0_merges(qz, workdir, monkeypatch):
    """Two ranks (threads here, processes in `--gpus`) answer whole documents each into their own
    shard file; rank 0 merges them into the output, in manifest order, and removes the shards."""
    import threading

    from qzoom_cli.batch import RunOptions, run_manifest
    from qzoom_cli.manifest import RowError
    from qzoom_cli.zoom.pipeline import ZoomSettings

    rows = _rows(workdir)
    rows.append(RowError(len(rows), "bad", "bad_row", "row 9: no question"))  # a bad line: rank 0 records it
    options = RunOptions(zoom=ZoomSettings("never"), dpi=72, max_new_tokens=3)
    lock, original, answered = threading.Lock(), qz.engine.answer_batch, []

    def one_at_a_time(items, *args):
        with lock:
            answered.extend(items)
            return original(items, *args)

    monkeypatch.setattr(qz.engine, "answer_batch", one_at_a_time)
    single = workdir / "single.jsonl"
    run_manifest(lambda: qz, rows, options, output=single, stdout=io.StringIO())
    alone = len(answered)
    out, barrier, failures, totals = workdir / "out.jsonl", threading.Barrier(2, timeout=60), [], {}

    own_shard_there = []

    def rank(r):
        try:
            totals[r] = run_manifest(lambda: qz, rows, options, output=out, stdout=io.StringIO(), rank=r, world=2,
                                     barrier=barrier.wait,
                                     on_result=lambda _, r=r: own_shard_there.append(shard_path(out, r).exists())).total
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert len(answered) == 2 * alone  # each question answered once more in all, not once per rank
    assert totals[0] + totals[1] == len(rows) and totals[0] > 0 and totals[1] > 0  # every row, by one rank
    merged = records(out)
    assert [r["id"] for r in merged] == [row.id for row in rows]
    assert [(r["id"], r["answer"], r["status"]) for r in merged] == [(r["id"], r["answer"], r["status"])
                                                                      for r in records(single)]
    assert len(own_shard_there) == len(rows) and all(own_shard_there)  # each rank wrote into its own shard
    assert not list(workdir.glob("out.jsonl.rank*"))


@pytest.mark.parametrize("fails_on", ["write", "close"])
def test_a_full_disk_mid_run_loses_nothing_and_resume_completes_the_file(qz, workdir, monkeypatch, fails_on):
    """The disk fills after the first record (or at the last flush on close): what the file could
    not take goes to stdout, the run ends with an output error (exit 6) that says so, and
    `--resume` completes the file without answering again what it holds."""
    import errno

    from qzoom_cli import batch
    from qzoom_cli.batch import RunOptions, run_manifest
    from qzoom_cli.errors import EXIT_OUTPUT, OutputError
    from qzoom_cli.zoom.pipeline import ZoomSettings

    rows = _rows(workdir)[:3]
    options = RunOptions(zoom=ZoomSettings("never"), dpi=72, max_new_tokens=2)
    out, stdout = workdir / "out.jsonl", io.StringIO()

    class FullDisk:
        def __init__(self, stream):
            self.stream, self.written = stream, 0

        def write(self, text):
            if fails_on == "write" and self.written:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += 1
            return self.stream.write(text)

        def flush(self):
            self.stream.flush()

        def close(self):
            self.stream.close()
            if fails_on == "close":
                raise OSError(errno.ENOSPC, "No space left on device")

    def opened(path, mode, **kwargs):  # the results file as the run appends to it
        stream = open(path, mode, **kwargs)
        return FullDisk(stream) if mode == "a" else stream

    monkeypatch.setattr(batch, "open", opened, raising=False)
    with pytest.raises(OutputError) as failed:
        run_manifest(lambda: qz, rows, options, output=out, stdout=stdout)
    assert failed.value.exit_code == EXIT_OUTPUT
    assert failed.value.message == (f"could not write {out} (No space left on device); the records from there on "
                                    "went to stdout; --resume redoes the ones missing from the file")
    in_file, on_stdout = records(out), [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert len(in_file) == (1 if fails_on == "write" else 3) and len(in_file) + len(on_stdout) == 3
    assert sorted(r["id"] for r in in_file + on_stdout) == sorted(row.id for row in rows)  # in finishing order
    monkeypatch.undo()
    again = run_manifest(lambda: qz, rows, options, output=out, stdout=io.StringIO(), resume=True)
    assert (again.kept, again.done) == (len(in_file), 3 - len(in_file))
    assert [r["id"] for r in records(out)] == [row.id for row in rows] and records(out)[0] == in_file[0]


def test_rows_open_their_documents_with_their_password_and_the_run_dpi(qz, workdir):
    """A row's password opens its PDF; every document is read at the run's --dpi; a row that
    cannot be answered carries the error that stopped it, message and all."""
    from docmaker import make_encrypted_pdf

    from qzoom_cli.batch import RunOptions, run_manifest
    from qzoom_cli.zoom.pipeline import ZoomSettings

    (workdir / "locked.pdf").write_bytes(make_encrypted_pdf("s3cret"))
    manifest = write_manifest(workdir / "m.jsonl", [
        {"id": "open", "file": "locked.pdf", "password": "s3cret", "question": "total?", "pages": "1"},
        {"id": "shut", "file": "locked.pdf", "question": "total?"},
        {"id": "gone", "file": "missing.pdf", "question": "total?"},
        {"id": "bad"},
    ])
    rows = read_manifest(str(manifest), None)
    stdout = io.StringIO()
    run_manifest(lambda: qz, rows, RunOptions(zoom=ZoomSettings("never"), dpi=50, max_new_tokens=2),
                 output=None, stdout=stdout)
    by_id = {r["id"]: r for r in map(json.loads, stdout.getvalue().splitlines())}
    assert by_id["open"]["status"] in ("ok", "truncated") and by_id["open"]["input"]["dpi"] == 50
    locked = f"{workdir / 'locked.pdf'} is encrypted: pass its password with --password"
    assert by_id["shut"]["error"] == {"code": "pdf_encrypted", "message": locked}
    assert by_id["gone"]["error"] == {"code": "file_not_found", "message": f"no such file: {workdir / 'missing.pdf'}"}
    [bad] = [row for row in rows if isinstance(row, RowError)]
    assert by_id["bad"]["error"] == {"code": bad.code, "message": bad.message} and bad.message


def test_rows_are_asked_with_the_run_instruction_and_a_verbose_run_shows_a_bug(qz, workdir, monkeypatch, capsys):
    """The run's answer instruction reaches every prompt; a bug answering one batch fails its rows
    as internal errors, with the traceback on stderr under --verbose."""
    from qzoom_cli.batch import RunOptions, answer_rows
    from qzoom_cli.zoom.pipeline import ZoomSettings

    prompts = []

    def broken(items, *args):
        prompts.extend(text for _, text in items)
        raise KeyError("x")

    monkeypatch.setattr(qz.engine, "answer_batch", broken)
    rows = _rows(workdir)[:3]
    options = RunOptions(zoom=ZoomSettings("never"), dpi=72, max_new_tokens=2, instruction="Answer in Latin.",
                         verbose=True)
    results = {}
    answer_rows(qz, rows, options, lambda index, result: results.setdefault(index, result))
    assert prompts and all(text.endswith("Answer in Latin.") for text in prompts)
    assert {(r.error.code, r.error.message) for r in results.values()} == {("internal", "KeyError: 'x'")}
    assert len(results) == 3 and "Traceback" in capsys.readouterr().err


def test_each_document_is_closed_once_its_rows_are_answered(qz, workdir, monkeypatch):
    from qzoom_cli import batch
    from qzoom_cli.batch import RunOptions, answer_rows
    from qzoom_cli.zoom.pipeline import ZoomSettings

    opened, closes = [], []

    def tracked(*args, **kwargs):
        doc = batch_open(*args, **kwargs)
        real_close = doc.close
        doc.close = lambda: (closes.append(doc.source), real_close())
        opened.append(doc.source)
        return doc

    batch_open = batch.open_document
    monkeypatch.setattr(batch, "open_document", tracked)
    rows = _rows(workdir)  # a.pdf's rows make two requests (every page, page 2); it is closed after both
    answer_rows(qz, rows, RunOptions(zoom=ZoomSettings("never"), dpi=72, max_new_tokens=2, batch_size=2),
                lambda index, result: None)
    assert len(opened) == 3 and sorted(closes) == sorted(opened)


# --- outputs that are not plain files, and files that change under the run --------------------------------

def test_a_device_or_pipe_output_is_written_in_place_never_replaced(workdir, tiny_dir):
    import stat
    import threading

    m = write_manifest(workdir / "m.jsonl", ROWS[:2])
    result = run(workdir, str(m), "-o", "/dev/null", tiny=tiny_dir)
    assert result.exit_code == 0, result.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    full = run(workdir, str(m), "-o", "/dev/full", tiny=tiny_dir)  # a device that takes nothing: stdout has all
    assert full.exit_code == EXIT_OUTPUT and "could not write /dev/full (No space left on device)" in full.stderr
    assert [json.loads(line)["id"] for line in full.stdout.splitlines()] == ["a1", "b1"]
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    fifo = workdir / "answers.fifo"
    os.mkfifo(fifo)
    nobody = run(workdir, str(m), "-o", str(fifo), tiny=tiny_dir)
    assert nobody.exit_code == EXIT_USAGE and f"cannot write {fifo} (no program is reading it)" in nobody.stderr
    resumed = run(workdir, str(m), "-o", str(fifo), "--resume", tiny=tiny_dir)
    assert resumed.exit_code == EXIT_USAGE and "--resume and several processes need a result file" in resumed.stderr
    read = []
    reader = threading.Thread(target=lambda: read.append(open(fifo, encoding="utf-8").read()))  # noqa: SIM115
    reader.start()
    while True:  # a writer's end opens once the reader waits; held, the reader sees no end before the run's
        try:
            held = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            continue
    written = run(workdir, str(m), "-o", str(fifo), tiny=tiny_dir)
    os.close(held)
    reader.join(30)
    assert written.exit_code == 0, written.stderr
    assert [json.loads(line)["id"] for line in read[0].splitlines()] == ["a1", "b1"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_linked_output_is_written_at_its_target_whose_lock_it_shares(workdir, tiny_dir):
    from qzoom_cli.outputs import sole_writer

    m = write_manifest(workdir / "m.jsonl", ROWS[:2])
    (workdir / "results").mkdir()
    target, link = workdir / "results" / "out.jsonl", workdir / "out.jsonl"
    link.symlink_to(target)
    with sole_writer(target):  # another run writes the file the link names
        refused = run(workdir, str(m), "-o", str(link), tiny=tiny_dir)
        assert refused.exit_code == EXIT_USAGE and "being written by another qzoom run" in refused.stderr
    assert run(workdir, str(m), "-o", str(link), tiny=tiny_dir).exit_code == 0
    assert link.is_symlink() and [r["id"] for r in records(target)] == ["a1", "b1"]


def test_no_document_of_the_manifest_is_ever_an_output(workdir, tiny_dir):
    m = write_manifest(workdir / "m.jsonl", ROWS[:2])
    (workdir / "doc-link.pdf").symlink_to(workdir / "a.pdf")
    before = (workdir / "a.pdf").read_bytes()
    for output in ("a.pdf", "doc-link.pdf"):
        for extra in ([], ["--force"]):
            result = run(workdir, str(m), "-o", str(workdir / output), *extra, tiny=tiny_dir)
            assert result.exit_code == EXIT_USAGE and "is also an input of this command" in result.stderr
    assert (workdir / "a.pdf").read_bytes() == before
    both = run(workdir, str(m), "-o", str(workdir / "out.jsonl"), "--resume", "--force", tiny=tiny_dir)
    assert both.exit_code == EXIT_USAGE and not (workdir / "out.jsonl").exists()


@pytest.mark.parametrize("gone", ["file", "folder"])
def test_an_output_deleted_or_moved_mid_run_sends_every_record_to_stdout(qz, workdir, gone):
    import shutil

    from qzoom_cli.batch import RunOptions, run_manifest
    from qzoom_cli.errors import EXIT_OUTPUT, OutputError
    from qzoom_cli.zoom.pipeline import ZoomSettings

    rows = _rows(workdir)[:3]
    (workdir / "results").mkdir()
    out, stdout = workdir / "results" / "out.jsonl", io.StringIO()

    def vanish(result):
        if out.exists():
            out.unlink() if gone == "file" else shutil.move(workdir / "results", workdir / "moved")

    with pytest.raises(OutputError) as failed:
        run_manifest(lambda: qz, rows, RunOptions(zoom=ZoomSettings("never"), dpi=72, max_new_tokens=2), output=out,
                     stdout=stdout, on_result=vanish)
    assert failed.value.exit_code == EXIT_OUTPUT
    assert failed.value.message == (f"{out} was deleted or moved while the run wrote it; every record it held and "
                                    "the rest went to stdout")
    assert sorted(json.loads(line)["id"] for line in stdout.getvalue().splitlines()) == sorted(r.id for r in rows)


def test_an_interrupted_run_keeps_every_finished_answer_not_only_those_in_manifest_order(qz, workdir):
    """Rows are answered a document at a time: a2 finishes before b1, which comes first in the
    manifest. Stopped after a2, the file keeps a1 and a2; the resume answers only b1."""
    from qzoom_cli.batch import RunOptions, run_manifest
    from qzoom_cli.zoom.pipeline import ZoomSettings

    rows = read_manifest(str(write_manifest(workdir / "m.jsonl", [ROWS[0], ROWS[1], ROWS[2]])), None)
    options, out, finished = RunOptions(zoom=ZoomSettings("never"), dpi=72, max_new_tokens=2), workdir / "o.jsonl", []

    def stop_after_two(result):
        finished.append(result.id)
        if len(finished) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_manifest(lambda: qz, rows, options, output=out, stdout=io.StringIO(), on_result=stop_after_two)
    assert finished == ["a1", "a2"] and [r["id"] for r in records(out)] == ["a1", "a2"]
    again = run_manifest(lambda: qz, rows, options, output=out, stdout=io.StringIO(), resume=True)
    assert (again.kept, again.done) == (2, 1) and [r["id"] for r in records(out)] == ["a1", "b1", "a2"]


def test_line_separators_inside_a_record_survive_the_file_and_a_resume(qz, workdir):
    """U+2028, U+2029 and U+0085 are line breaks to str.splitlines, not to JSON Lines: a manifest
    string holding them raw is one row, and a record holding them is one line, read back whole."""
    from qzoom_cli.batch import RunOptions, run_manifest
    from qzoom_cli.zoom.pipeline import ZoomSettings

    question = "total\u2028due\u2029on\x85page?"
    m = workdir / "m.jsonl"
    m.write_text(json.dumps({"id": "odd\u2028id", "file": "a.pdf", "question": question}, ensure_ascii=False)
                 + "\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    rows = read_manifest(str(m), None)
    assert [(r.id, r.question) for r in rows] == [("odd\u2028id", question), ("b1", "what?")]
    options, out = RunOptions(zoom=ZoomSettings("never"), dpi=72, max_new_tokens=2), workdir / "o.jsonl"
    run_manifest(lambda: qz, rows, options, output=out, stdout=io.StringIO())
    assert len(out.read_bytes().split(b"\n")) == 3  # two lines and the end
    assert [(r["id"], r["question"]) for r in records(out)] == [("odd\u2028id", question), ("b1", "what?")]
    again = run_manifest(lambda: qz, rows, options, output=out, stdout=io.StringIO(), resume=True)
    assert (again.kept, again.done) == (2, 0)


def test_a_resume_reads_only_records_and_refuses_a_file_that_is_not_text(workdir, tiny_dir):
    from qzoom_cli.batch import read_records

    m = write_manifest(workdir / "m.jsonl", ROWS[:2])
    out = workdir / "out.jsonl"
    out.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    refused = run(workdir, str(m), "-o", str(out), "--resume", tiny=tiny_dir)
    assert refused.exit_code == EXIT_USAGE and f"{out} is not a qzoom result file (not UTF-8 text)" in refused.stderr
    assert out.read_bytes() == b"\x89PNG\r\n\x1a\n\xff\xfe"
    out.write_text('{"id": ["a1"], "status": "ok"}\n{"id": 7}\n{"id": "b1", "status": "ok"}\n')
    assert read_records(out) == [{"id": "b1", "status": "ok"}]


def test_a_bad_password_value_or_a_torn_last_character_fails_only_its_row(tmp_path):
    rows = [{"id": f"p{i}", "file": "a.pdf", "question": "q?", "password": value}
            for i, value in enumerate([7, True, {"pw": "x"}, ["x"], "secret", None])]
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows)
                     + '{"id": "torn", "file": "a.pdf", "question": "caf\u00e9'.encode()[:-1])
    read = read_manifest(path)
    assert [type(r).__name__ for r in read] == ["RowError"] * 4 + ["ManifestRow"] * 2 + ["RowError"]
    assert [r.message for r in read[:4]] == [f"row {i + 1}: password must be a string, not {kind}"
                                             for i, kind in enumerate(["int", "bool", "dict", "list"])]
    assert (read[4].password, read[5].password) == ("secret", None)
    assert "line 7 is not UTF-8" in read[6].message


def test_the_time_left_is_what_the_shown_rate_says():
    """Both from the first finished row on: loading the model is not a row."""
    from qzoom_cli.cli.progress import Throughput, clock

    pace = Throughput(total=11)
    pace.finished(now=100.0)  # after a minute and a half of loading
    assert pace.rate(100.0) is None and pace.left_s(100.0) is None and clock(None) == "-:--:--"
    pace.finished(now=102.0)
    pace.finished(now=104.0)
    assert pace.rate(104.0) == 0.5 and pace.left_s(104.0) == 16.0  # 8 rows at 2 s each
    assert clock(pace.left_s(104.0)) == "0:00:16" and clock(3725) == "1:02:05"
