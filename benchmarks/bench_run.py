"""Batch throughput: `qzoom run` over a manifest of mixed documents against stock batched `generate()`.

The manifest: --docs documents of different page sizes (vector PDFs written here, plus the
sample receipt scan), --per-doc questions each, one page per row. Random real-size weights
(bench_engine.build), every answer forced to --new-tokens tokens, one warm-up batch first.

    stock        transformers' generate() on --batch-size rows at a time (left-padded prompts) at
                 256-4096 visual tokens, the published baseline budget
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
from bench_engine import build, engines, model_parser, stock_vision

from qzoom_cli.batch import RunOptions, answer_rows
from qzoom_cli.budget import VisualBudget
from qzoom_cli.documents import open_document
from qzoom_cli.manifest import ManifestRow
from qzoom_cli.runtime import synchronize
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


def run_qzoom(qz, rows, options: RunOptions) -> float:
    done = []
    answer_rows(qz, rows[:options.batch_size], options, lambda index, result: None)  # warm-up
    synchronize(qz.runtime.device)
    start = time.perf_counter()
    answer_rows(qz, rows, options, lambda index, result: done.append(result))
    synchronize(qz.runtime.device)
    wall = time.perf_counter() - start
    failed = [r for r in done if r.status == "error"]
    if failed:
        raise RuntimeError(f"{len(failed)} rows failed: {failed[0].error}")
    return wall


def left_padded(samples: list[dict], pad: int) -> dict:
    """One batch of single-sample stock inputs: the per-token entries (ids, mask, token types) padded
    on the left, the image entries stacked, whatever the family's processor returns."""
    width = max(sample["input_ids"].shape[1] for sample in samples)
    batch = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        if values[0].shape != samples[0]["input_ids"].shape:
            batch[key] = torch.cat(values)
            continue
        fill = pad if key == "input_ids" else 0
        batch[key] = torch.stack([torch.nn.functional.pad(v[0], (width - v.shape[1], 0), value=fill) for v in values])
    return batch


def run_stock(backbone, rows, budget: VisualBudget, batch_size: int, new_tokens: int) -> float:
    """Every row through render, resize, the stock processor and one batched generate() per batch."""
    device = backbone.device
    pad = backbone.tokenizer.pad_token_id

    def batch(chunk):
        samples = []
        for row in chunk:
            with open_document(row.file) as doc:
                image = backbone.fit_image(doc.render(1), budget)
            prompt = backbone.build_prompt(row.question, [backbone.image_grid(image.size, budget)])
            samples.append(backbone.stock_inputs(prompt, [image]))
        with torch.inference_mode():
            backbone.model.generate(**left_padded(samples, pad), max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)

    with stock_vision(backbone):
        batch(rows[:batch_size])  # warm-up
        synchronize(device)
        start = time.perf_counter()
        for first in range(0, len(rows), batch_size):
            batch(rows[first:first + batch_size])
        synchronize(device)
        return time.perf_counter() - start


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
    with tempfile.TemporaryDirectory() as folder:
        rows = manifest(write_documents(Path(folder), args.docs), args.per_doc)
        report["stock@4096"] = run_stock(backbone, rows, VisualBudget(256, 4096), args.batch_size, args.new_tokens)
        for path, settings in (("skip", ZoomSettings("auto", gate_threshold=1.01)),
                               ("zoom", ZoomSettings("auto", gate_threshold=0.0, roi_threshold=0.0))):
            for name, qz in qzooms.items():
                options = RunOptions(zoom=settings, budget=VisualBudget(256, 576), max_new_tokens=args.new_tokens,
                                     batch_size=args.batch_size)
                report[f"qzoom {path} {name}"] = run_qzoom(qz, rows, options)
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
