"""Time the zoom engine against the plain baseline on one page, in one run, without downloads.

Builds a Qwen2.5-VL architecture with random weights (speed does not depend on weight values
once the answer length is fixed, so every answer is forced to --new-tokens tokens) and a random
zoom adapter with a gate, then times on the same page and question:

    baseline       --zoom never at 256-4096 visual tokens (the published baseline's best budget)
    coarse         --zoom never at the coarse budget (what the skip path must not exceed by much)
    qzoom-skip     gate says no: coarse pass + the gate's T layers, then the rest of the model
    qzoom-zoom     gate says yes: coarse pass to K + gate + region + crop/encode + fused prefill

    python benchmarks/bench_engine.py --arch 7b --device cuda      # real size, needs a GPU
    python benchmarks/bench_engine.py --arch small --device cpu    # a CPU-sized stand-in

Writes a JSON report (--out) and prints a markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

from qzoom_cli.api import QZoom
from qzoom_cli.backbones.qwen2_5_vl import Qwen2_5_VLBackbone
from qzoom_cli.budget import VisualBudget
from qzoom_cli.documents import open_document
from qzoom_cli.runtime import resolve_runtime
from qzoom_cli.testing import make_tokenizer, qwen2_5_vl_config
from qzoom_cli.zoom.adapter import AdapterConfig, ZoomAdapter
from qzoom_cli.zoom.pipeline import ZoomSettings

# Public Qwen2.5-VL configs (text: hidden, MLP, heads, KV heads, head dim, M-RoPE sections).
ARCHS = {
    "7b": dict(layers=28, branch=18, vocab=152064,
               text={"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                     "num_key_value_heads": 4, "head_dim": 128, "mrope_section": [16, 24, 24]},
               vision={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                       "fullatt_block_indexes": [7, 15, 23, 31]}),
    "3b": dict(layers=36, branch=24, vocab=151936,
               text={"hidden_size": 2048, "intermediate_size": 11008, "num_attention_heads": 16,
                     "num_key_value_heads": 2, "head_dim": 128, "mrope_section": [16, 24, 24]},
               vision={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                       "fullatt_block_indexes": [7, 15, 23, 31]}),
    "small": dict(layers=12, branch=8, vocab=32000,
                  text={"hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8,
                        "num_key_value_heads": 2, "head_dim": 64, "mrope_section": [8, 12, 12]},
                  vision={"depth": 4, "hidden_size": 256, "intermediate_size": 768, "num_heads": 4,
                          "fullatt_block_indexes": [1, 3]}),
}


def build(arch: str, device: str, dtype: str, attn: str) -> QZoom:
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    spec = ARCHS[arch]
    runtime = resolve_runtime(device, dtype, attn)
    tokenizer = make_tokenizer()
    config = qwen2_5_vl_config(tokenizer, spec["layers"], spec["text"], spec["vision"], vocab_size=spec["vocab"],
                               init_std=0.02)
    config._attn_implementation = runtime.attn
    config.text_config._attn_implementation = runtime.attn
    config.vision_config._attn_implementation = runtime.attn
    torch.manual_seed(0)
    with torch.device(runtime.device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(runtime.dtype).eval()
    backbone = Qwen2_5_VLBackbone(model, tokenizer, Qwen2VLImageProcessorPil(patch_size=14, merge_size=2),
                                  model_id=f"random-qwen2.5-vl-{arch}", revision=None, attn=runtime.attn)
    backbone._eos = [-1]  # never stop early: every answer has exactly --new-tokens tokens
    adapter = ZoomAdapter.initialized_from_base(
        AdapterConfig(branch_layer=spec["branch"], depth=3, family=backbone.family, hidden_size=backbone.hidden_size),
        backbone)
    return QZoom(backbone, runtime, None, adapter)


def measure(qz: QZoom, doc, page: str, budget: VisualBudget, settings: ZoomSettings, new_tokens: int,
            repeats: int) -> dict:
    runs = []
    for _ in range(repeats + 1):  # the first run warms kernels and allocator up and is dropped
        start = time.perf_counter()
        [result] = qz.ask(doc, "What is the total due?", pages=page, budget=budget, zoom=settings,
                          max_new_tokens=new_tokens)
        runs.append((time.perf_counter() - start, result))
    walls = [wall for wall, _ in runs[1:]]
    result = runs[-1][1]
    return {"wall_s": statistics.median(walls), "wall_runs_s": walls, "zoomed": result.zoom.zoomed,
            "visual_tokens": result.stats.visual_tokens, "prompt_tokens": result.stats.prompt_tokens,
            "output_tokens": result.stats.output_tokens, "peak_mem_gib": result.stats.peak_mem_gib,
            "time": vars(result.stats.time)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="7b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--page", default=str(Path(__file__).parent.parent / "samples" / "invoice.pdf"))
    parser.add_argument("--page-number", default="2", help="which page of --page (the totals page)")
    parser.add_argument("--dpi", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the JSON report here")
    args = parser.parse_args()
    transformers.utils.logging.set_verbosity_error()

    qz = build(args.arch, args.device, args.dtype, args.attn)
    coarse = VisualBudget(256, 576)
    cases = {
        "baseline@4096": (VisualBudget(256, 4096), ZoomSettings("never")),
        "coarse@576": (coarse, ZoomSettings("never")),
        "qzoom-skip": (coarse, ZoomSettings("auto", gate_threshold=1.01)),
        "qzoom-zoom": (coarse, ZoomSettings("auto", gate_threshold=0.0, roi_threshold=0.0)),
    }
    with open_document(args.page, dpi=args.dpi) as doc:
        doc_pages = doc.page_count
        report = {name: measure(qz, doc, args.page_number, budget, settings, args.new_tokens, args.repeats)
                  for name, (budget, settings) in cases.items()}
    device = qz.runtime.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    meta = {"arch": args.arch, "device": str(device), "device_name": name, "dtype": qz.runtime.dtype_name,
            "attn": qz.runtime.attn, "torch": torch.__version__, "transformers": transformers.__version__,
            "page": f"{Path(args.page).name} page {args.page_number} of {doc_pages} at {args.dpi} dpi", "new_tokens": args.new_tokens,
            "repeats": args.repeats}
    base = report["baseline@4096"]["wall_s"]
    for row in report.values():
        row["speedup_vs_baseline"] = base / row["wall_s"]
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "cases": report}, indent=2))
    print(f"{meta['arch']} on {meta['device_name']} ({meta['device']}, {meta['dtype']}, {meta['attn']}), "
          f"torch {meta['torch']}, transformers {meta['transformers']}; {meta['page']}, "
          f"{args.new_tokens} new tokens, median of {args.repeats}\n")
    print("| case | visual tokens | prompt tokens | wall s | vs baseline | render | encode | coarse prefill | gate | "
          "region | crop+encode | fused prefill | decode |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case, row in report.items():
        t = row["time"]
        print(f"| {case} | {row['visual_tokens']} | {row['prompt_tokens']} | {row['wall_s']:.3f} | "
              f"{row['speedup_vs_baseline']:.2f}x | {t['render_s']:.3f} | {t['preprocess_s']:.3f} | "
              f"{t['coarse_prefill_s']:.3f} | {t['gate_s']:.3f} | "
              f"{t['region_s']:.3f} | {t['region_encode_s']:.3f} | {t['fused_prefill_s']:.3f} | {t['decode_s']:.3f} |")


if __name__ == "__main__":
    main()
