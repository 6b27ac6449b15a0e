"""Batch throughput: `qzoom run` over a manifest of mixed documents against stock batched `generate()`.

The manifest: --docs documents of different page sizes (vector PDFs written here, plus the
sample receipt scan), --per-doc questions each, one page per row. Random real-size weights
(bench_engine.build), every answer forced to --new-tokens tokens, one warm-up batch first.

    stock        transformers' generate() on --batch-size rows at a time (left-padded prompts) at
                 256-4096 visual tokens, the published baseline budget (`qzoom bench`'s stock mode)
    qzoom skip   `qzoom run` at the 256-576 coarse budget, the gate answering every row directly
    qzoom zoom   the same with every row zoomed (gate 0), the slowest case
    (each qzoom case with the eager loop and the fast decode path)

    python benchmarks/bench_run.py --arch 7b --device cuda --batch-size 8
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pymupdf
import torch
import transformers
from bench_engine import build, engines, model_parser, record

from qzoom_cli.batch import RunOptions, answer_rows
from qzoom_cli.budget import VisualBudget
from qzoom_cli.manifest import ManifestRow
from qzoom_cli.runtime import synchronize
from qzoom_cli.stock import stock_rows
from qzoom_cli.zoom.pipeline import ZoomSettings

SAMPLES = Path(__file__).parent.parent / "samples"
SIZES = [(595, 842), (612, 792), (842, 595), (420, 595), (595, 842), (1191, 842), (612, 1008)]
QUESTIONS = ["What is the total due?", "What is the invoice number?", "Who is the customer?", "What is the date?",
             "Which item costs the most?", "What is the tax rate?", "How many lines are listed?",
             "What is the payment term?"]


def write_documents(folder: Path, count: int) -> list[Path]:
    """`count` documents: the sample receipt scan and one-page PDFs of assorted sizes full of small text."""
    paths = [SAMPLES / "receipt.png"]
    for index in range(count - 1):
        width, height = SIZES[index % len(SIZES)]
        pdf = pymupdf.open()
        page = pdf.new_page(width=width, height=height)
        y = 40
        line = 0
        while y < height - 40:
            page.insert_text((36, y), f"Item {index}-{line}: part {line * 37 % 1000:03d}, qty {line % 9 + 1}, "
                                      f"unit {line * 3.17 % 90:.2f}, amount {line * 11.3 % 700:.2f} EUR", fontsize=8)
            y += 12
            line += 1
        path = folder / f"doc{index}.pdf"
        pdf.save(path)
        paths.append(path)
    return paths


def manifest(documents: list[Path], per_doc: int) -> list[ManifestRow]:
    rows = []
    for path in documents:
        for q in range(per_doc):
            rows.append(ManifestRow(index=len(rows), id=f"r{len(rows)}", file=str(path),
                                    question=QUESTIONS[q % len(QUESTIONS)], pages="1"))
    return rows


def run_rows(qz, rows, options: RunOptions, answer=answer_rows) -> float:
    """Wall time of `answer` (qzoom's `answer_rows` or stock `generate()`'s `stock_rows`) over
    every row, after a warm-up batch; a failed row stops the benchmark."""
    done = []
    answer(qz, rows[:options.batch_size], options, lambda index, result: None)
    synchronize(qz.runtime.device)
    start = time.perf_counter()
    answer(qz, rows, options, lambda index, result: done.append(result))
    synchronize(qz.runtime.device)
    wall = time.perf_counter() - start
    failed = [r for r in done if r.status == "error"]
    if failed:
        raise RuntimeError(f"{len(failed)} rows failed: {failed[0].error}")
    return wall


def main() -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--per-doc", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    transformers.utils.logging.set_verbosity_error()

    backbone, runtime, adapter = build(args.arch, args.device, args.dtype, args.attn)
    qzooms = engines(backbone, runtime, adapter, fuse=False)
    report = {}

    def measure(case: str, *run_args) -> None:
        wall = run_rows(*run_args)
        record(report, case, wall, f"{wall:.2f} s", args.out, "wall_s")

    with tempfile.TemporaryDirectory() as folder:
        rows = manifest(write_documents(Path(folder), args.docs), args.per_doc)
        baseline = RunOptions(zoom=ZoomSettings("never"), budget=VisualBudget(256, 4096),
                              max_new_tokens=args.new_tokens, batch_size=args.batch_size)
        measure("stock@4096", qzooms["eager"], rows, baseline, stock_rows)
        for path, settings in (("skip", ZoomSettings("auto", gate_threshold=1.01)),
                               ("zoom", ZoomSettings("auto", gate_threshold=0.0, roi_threshold=0.0))):
            for name, qz in qzooms.items():
                options = RunOptions(zoom=settings, budget=VisualBudget(256, 576), max_new_tokens=args.new_tokens,
                                     batch_size=args.batch_size)
                measure(f"qzoom {path} {name}", qz, rows, options)
    meta = {"arch": args.arch, "device": str(runtime.device), "dtype": runtime.dtype_name, "rows": len(rows),
            "docs": args.docs, "batch_size": args.batch_size, "new_tokens": args.new_tokens,
            "torch": torch.__version__, "transformers": transformers.__version__}
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "wall_s": report}, indent=2))
    print(f"\n{len(rows)} rows, {args.docs} documents, batch {args.batch_size}, {args.new_tokens} new tokens, "
          f"{meta['arch']} {meta['dtype']} on {meta['device']}")
    print("| case | wall s | samples/s | x stock |\n|---|---|---|---|")
    base = report["stock@4096"]
    for case, wall in report.items():
        print(f"| {case} | {wall:.2f} | {len(rows) / wall:.2f} | {base / wall:.2f} |")


if __name__ == "__main__":
    main()
