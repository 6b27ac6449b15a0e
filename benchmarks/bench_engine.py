"""Time the zoom engine against stock `generate()` on one page, in one run, without downloads.

Builds a Qwen2.5-VL, Qwen3-VL, Qwen3.5 or LLaVA architecture with random weights (speed does not
depend on weight values once the answer length is fixed, so every answer is forced to --new-tokens
tokens) and a random zoom adapter with a gate, then times on the same page and question:

    stock@4096       transformers' generate() at 256-4096 visual tokens (the published baseline)
    stock@576        generate() at the coarse budget
    never@4096       qzoom --zoom never at 256-4096, eager decode loop and fast path
    never@576        qzoom --zoom never at the coarse budget, eager and fast
    skip             gate says no: coarse pass + the gate's T layers, then the rest; eager and fast
    zoom             gate says yes: coarse pass to K + gate + region + crop/encode + fused prefill

Per case: visual tokens, time to first token, per-token decode time, total, peak memory, and
the ratio of the total to stock generate() at 4096. The decode floor (the language model's
weight bytes over the measured copy bandwidth) is printed beside the per-token times.

    python benchmarks/bench_engine.py --arch 7b --device cuda      # real size, needs a GPU
    python benchmarks/bench_engine.py --arch qwen3vl-4b --device cuda
    python benchmarks/bench_engine.py --arch qwen3.5-9b --device cuda  # the hybrid generation (qwen3.5-35b-a3b too)
    python benchmarks/bench_engine.py --arch small --device cpu    # a CPU-sized stand-in (qwen3vl-, qwen3.5-small too)

Writes a JSON report (--out) and prints a markdown table for benchmarks/RESULTS.md. `--profile
fast,fast+inductor` also breaks the skip case's decode step down kernel by kernel, per decoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

from qzoom_cli.api import QZoom
from qzoom_cli.backbones import FAMILIES, Backbone
from qzoom_cli.budget import VisualBudget
from qzoom_cli.documents import open_document
from qzoom_cli.runtime import Runtime, reset_peak_memory, resolve_runtime, synchronize
from qzoom_cli.static_decode import StaticDecoder
from qzoom_cli.testing import (
    llava_config,
    make_llama_tokenizer,
    make_tokenizer,
    qwen2_5_vl_config,
    qwen3_5_config,
    qwen3_5_tokenizer,
    qwen3_vl_config,
)
from qzoom_cli.zoom.adapter import AdapterConfig, ZoomAdapter
from qzoom_cli.zoom.pipeline import ZoomSettings

QUESTION = "What is the total due?"
QWEN3_5_LINEAR = {"linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                  "linear_num_key_heads": 16, "linear_num_value_heads": 32}
QWEN3_5_VISION = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                  "num_position_embeddings": 2304}

# Public Qwen2.5-VL, Qwen3-VL, Qwen3.5 and LLaVA-1.5 configs (text: hidden, MLP, heads, KV heads, head dim,
# M-RoPE sections; Qwen3.5: its linear-attention heads, three such layers to one full-attention layer, and
# the MoE's experts; LLaVA's CLIP-L/336 tower, its grid fixed at 576 tokens whatever the budget).
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
    "qwen3vl-4b": dict(family="qwen3_vl", layers=36, branch=24, vocab=151936,
                       text={"hidden_size": 2560, "intermediate_size": 9728, "num_attention_heads": 32,
                             "num_key_value_heads": 8, "head_dim": 128, "mrope_section": [24, 20, 20]},
                       vision={"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
                               "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17]}),
    "qwen3vl-8b": dict(family="qwen3_vl", layers=36, branch=24, vocab=151936,
                       text={"hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32,
                             "num_key_value_heads": 8, "head_dim": 128, "mrope_section": [24, 20, 20]},
                       vision={"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                               "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]}),
    "llava-7b": dict(family="llava", layers=32, branch=15, vocab=32064,
                     text={"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                           "num_key_value_heads": 32, "head_dim": 128},
                     vision={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                             "num_attention_heads": 16}),
    "llava-13b": dict(family="llava", layers=40, branch=19, vocab=32064,
                      text={"hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
                            "num_key_value_heads": 40, "head_dim": 128},
                      vision={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                              "num_attention_heads": 16}),
    "llava-small": dict(family="llava", layers=12, branch=6, vocab=32000,
                        text={"hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8,
                              "num_key_value_heads": 8, "head_dim": 64},
                        vision={"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
                                "num_attention_heads": 4}),
    "qwen3.5-9b": dict(family="qwen3_5", layers=32, branch=21, vocab=248320,
                       text={"hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 16,
                             "num_key_value_heads": 4, "head_dim": 256, "mrope_section": [11, 11, 10],
                             **QWEN3_5_LINEAR},
                       vision=QWEN3_5_VISION),
    "qwen3.5-35b-a3b": dict(family="qwen3_5_moe", layers=40, branch=25, vocab=248320,
                            text={"hidden_size": 2048, "num_attention_heads": 16,
                                  "num_key_value_heads": 2, "head_dim": 256, "mrope_section": [11, 11, 10],
                                  **QWEN3_5_LINEAR},
                            experts={"num_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 512,
                                 "shared_expert_intermediate_size": 512},
                            vision=QWEN3_5_VISION),
    "qwen3.5-small": dict(family="qwen3_5", layers=12, branch=5, vocab=32000,
                          text={"hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8,
                                "num_key_value_heads": 2, "head_dim": 64, "mrope_section": [3, 3, 2],
                                "linear_conv_kernel_dim": 4, "linear_key_head_dim": 32, "linear_value_head_dim": 32,
                                "linear_num_key_heads": 4, "linear_num_value_heads": 8},
                          vision={"depth": 4, "hidden_size": 256, "intermediate_size": 768, "num_heads": 4,
                                  "num_position_embeddings": 2304}),
    "qwen3vl-small": dict(family="qwen3_vl", layers=12, branch=8, vocab=32000,
                          text={"hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8,
                                "num_key_value_heads": 2, "head_dim": 64, "mrope_section": [12, 10, 10]},
                          vision={"depth": 4, "hidden_size": 256, "intermediate_size": 768, "num_heads": 4,
                                  "num_position_embeddings": 2304, "deepstack_visual_indexes": [0, 1, 2]}),
}


def build(arch: str, device: str, dtype: str, attn: str) -> tuple[Backbone, Runtime, ZoomAdapter]:
    """The architecture with seeded random weights, answers that never end early, and a random adapter."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    spec = ARCHS[arch]
    family = spec.get("family", "qwen2_5_vl")
    runtime = resolve_runtime(device, dtype, attn, compile="off")
    tokenizer = {"llava": make_llama_tokenizer, "qwen3_5": qwen3_5_tokenizer,
                 "qwen3_5_moe": qwen3_5_tokenizer}.get(family, make_tokenizer)()
    if family == "llava":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        config = llava_config(tokenizer, spec["layers"], text=spec["text"], vision=spec["vision"],
                              vocab_size=spec["vocab"], init_std=0.02)
        processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    elif family in ("qwen3_5", "qwen3_5_moe"):
        config = qwen3_5_config(tokenizer, spec["layers"], moe="experts" in spec, text=spec["text"],
                                vision=spec["vision"], vocab_size=spec["vocab"], init_std=0.02, interval=4,
                                **({"experts": spec["experts"]} if "experts" in spec else {}))
        processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    elif family == "qwen3_vl":
        config = qwen3_vl_config(tokenizer, spec["layers"], text=spec["text"], vision=spec["vision"],
                                 vocab_size=spec["vocab"], init_std=0.02)
        processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    else:
        config = qwen2_5_vl_config(tokenizer, spec["layers"], spec["text"], spec["vision"],
                                   vocab_size=spec["vocab"], init_std=0.02)
        processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2)
    for part in (config, config.text_config, config.vision_config):
        part._attn_implementation = runtime.attn
    backbone_class = FAMILIES[family]
    torch.manual_seed(0)
    with torch.device(runtime.device), default_dtype(runtime.dtype):
        model = backbone_class.model_class(config).eval()
    backbone = backbone_class(model, tokenizer, processor, model_id=f"random-{family}-{arch}", revision=None,
                              attn=runtime.attn)
    backbone._eos = [-1]  # never stop early: every answer has exactly --new-tokens tokens
    adapter = ZoomAdapter.initialized_from_base(
        AdapterConfig(branch_layer=spec["branch"], depth=3, family=backbone.family, hidden_size=backbone.hidden_size),
        backbone)
    return backbone, runtime, adapter


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Build weights directly in `dtype`: a 7B model built in float32 first needs twice the memory."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def engines(backbone, runtime: Runtime, adapter, fuse: bool, tune: bool = False) -> dict[str, QZoom]:
    """The same model and adapter behind each decoder: eager loop, and the fast path of this device
    (with `fuse`, also fused by inductor; with `tune`, also with the GEMV kernels' coordinate-descent
    tuning, gpt-fast's setting, a candidate for `--compile max`)."""
    fast = "cuda_graphs" if runtime.device.type == "cuda" else "static_cache"
    kinds = {"eager": "eager", "fast": fast, **({"fast+inductor": fast + "+inductor"} if fuse else {}),
             **({"fast+tuned": fast + "+inductor"} if tune else {})}
    qzooms = {name: QZoom(backbone, dataclasses.replace(runtime, decoder=kind), None, adapter)
              for name, kind in kinds.items()}
    if tune:
        qzooms["fast+tuned"].engine.decode = StaticDecoder(backbone, capture=fast == "cuda_graphs", fuse=True,
                                                           inductor_options={"coordinate_descent_tuning": True})
    return qzooms


def weight_bytes(backbone) -> int:
    """Bytes a decode step must read: every decoder layer, the final norm and the LM head."""
    lm = backbone.language_model
    modules = [lm.layers, lm.norm, backbone.model.lm_head]
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def copy_bandwidth(device: torch.device) -> float | None:
    """Device memory bandwidth in bytes/s from a large device-to-device copy (read + write)."""
    if device.type != "cuda":
        return None
    src = torch.randn(2**28, device=device)  # 1 GiB of float32
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * src.numel() * src.element_size() * 20 / (start.elapsed_time(end) / 1000)


def timed(fn, repeats: int) -> tuple[float, object, float]:
    """Median wall time of `fn` over `repeats` runs after one warm-up run, the last result, and
    the warm-up's time (graph capture and compilation happen there)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    walls, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        walls.append(time.perf_counter() - start)
    return statistics.median(walls), result, first


def qzoom_case(qz: QZoom, doc, page: int, budget: VisualBudget, settings: ZoomSettings, new_tokens: int,
               repeats: int) -> dict:
    wall, [result], first = timed(lambda: qz.ask(doc, QUESTION, pages=str(page), budget=budget, zoom=settings,
                                                 max_new_tokens=new_tokens), repeats)
    t = result.stats.time
    steps = max(1, result.stats.output_tokens - 1)
    return {"wall_s": wall, "ttft_s": wall - t.decode_s, "decode_per_token_s": t.decode_s / steps,
            "first_call_s": first, "zoomed": result.zoom.zoomed, "visual_tokens": result.stats.visual_tokens,
            "prompt_tokens": result.stats.prompt_tokens, "output_tokens": result.stats.output_tokens,
            "peak_mem_gib": result.stats.peak_mem_gib, "time": vars(t)}


# Kernel kinds by name, first match wins: cuBLAS/CUTLASS/flash kernels and inductor's Triton ones on
# CUDA, aten and inductor's C++ ops on CPU.
KERNEL_KINDS = (
    ("attention", ("attention", "fmha", "flash", "softmax")),
    ("matmul", ("gemv", "gemm", "mm", "matmul", "linear", "cublas", "cutlass", "xmma")),
    ("copy/index", ("copy", "cat", "index", "scatter", "gather", "memcpy", "memset", "fill", "clone")),
    ("inductor fused", ("triton", "cpp_fused")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, words in KERNEL_KINDS if any(w in lowered for w in words)), "other")


class ProfiledDecoder:
    """A decoder run under torch.profiler, keeping (name, calls, self time in us) of every kernel
    (CUDA) or op (CPU) its last call ran."""

    def __init__(self, inner):
        self.inner, self.name, self.kernels = inner, inner.name, []

    def __call__(self, first_logits, *args, **kwargs):
        cuda = first_logits.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as profile:
            generations = self.inner(first_logits, *args, **kwargs)
        kind = DeviceType.CUDA if cuda else DeviceType.CPU
        self.kernels = [(e.key, e.count, e.self_device_time_total if cuda else e.self_cpu_time_total)
                        for e in profile.key_averages() if e.device_type == kind]
        return generations


def profile_decode(qz: QZoom, doc, page: int, budget: VisualBudget, settings: ZoomSettings, new_tokens: int,
                   top: int = 12) -> dict:
    """Where the decode step's time goes: the step run uncaptured (the kernels a graph replay runs,
    each launched and timed on its own) under torch.profiler; times per generated token."""
    engine_decoder = qz.engine.decode
    inner = engine_decoder
    if isinstance(inner, StaticDecoder):
        inner = StaticDecoder(qz.backbone, capture=False, fuse=inner.fuse, inductor_options=inner.inductor_options)
    profiled = ProfiledDecoder(inner)
    qz.engine.decode = profiled
    try:
        for _ in range(2):  # the first call compiles (inductor) and warms the allocator up
            qz.ask(doc, QUESTION, pages=str(page), budget=budget, zoom=settings, max_new_tokens=new_tokens)
    finally:
        qz.engine.decode = engine_decoder
    steps = max(1, new_tokens - 1)  # the first token comes from the prefill
    per_token = 1e3 * steps  # us -> ms per generated token
    by_kind: dict[str, float] = {}
    for name, _, micros in profiled.kernels:
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + micros / per_token
    heaviest = sorted(profiled.kernels, key=lambda k: -k[2])[:top]
    return {"decoder": inner.name, "kernel_ms_per_token": sum(by_kind.values()),
            "by_kind_ms_per_token": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "top": [{"kernel": name, "calls_per_token": calls / steps, "ms_per_token": micros / per_token}
                    for name, calls, micros in heaviest]}


def print_profile(case: str, profile: dict, timed_row: dict | None) -> None:
    """The kernel breakdown beside the timed decode step: the difference is launch and idle time."""
    timed_step = f"; timed: {timed_row['decode_per_token_s'] * 1e3:.2f} ms/token" if timed_row else ""
    print(f"\n{case}, decode profile of {profile['decoder']} (each kernel launched and timed on its own): "
          f"kernels {profile['kernel_ms_per_token']:.2f} ms/token{timed_step}\n")
    print("| kind | ms/token |\n|---|---|")
    for kind, ms in profile["by_kind_ms_per_token"].items():
        print(f"| {kind} | {ms:.3f} |")
    print("\n| kernel | calls/token | ms/token |\n|---|---|---|")
    for row in profile["top"]:
        print(f"| `{row['kernel'][:90]}` | {row['calls_per_token']:.1f} | {row['ms_per_token']:.3f} |")


def stock_case(backbone, doc, page: int, budget: VisualBudget, new_tokens: int, repeats: int) -> dict:
    """Render, resize, the stock image processor and `generate()`: what a transformers user runs."""
    device = backbone.device

    def run(tokens: int):
        image = backbone.fit_image(doc.render(page), budget)
        grid = backbone.image_grid(image.size, budget)
        prompt = backbone.build_prompt(QUESTION, [grid])
        with torch.inference_mode():
            out = backbone.model.generate(**backbone.stock_inputs(prompt, [image]), max_new_tokens=tokens,
                                          min_new_tokens=tokens, do_sample=False)
        synchronize(device)
        return grid[0] * grid[1], prompt.length, out.shape[1] - prompt.length

    with backbone.stock_attention():
        first, _, _ = timed(lambda: run(1), repeats)
        reset_peak_memory(device)
        wall, (visual, prompt_tokens, produced), warm_up = timed(lambda: run(new_tokens), repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"wall_s": wall, "ttft_s": first, "decode_per_token_s": (wall - first) / max(1, produced - 1),
            "first_call_s": warm_up, "zoomed": False, "visual_tokens": visual, "prompt_tokens": prompt_tokens,
            "output_tokens": produced, "peak_mem_gib": peak}


def record(report: dict, case: str, value, shown: str, out: str | None, field: str) -> None:
    """Add one measured case, log it, and save the report so far under `field` of `out`: a run
    stopped by a time limit keeps what it measured (the finished report replaces it)."""
    report[case] = value
    print(f"{case}: {shown}", file=sys.stderr, flush=True)
    if out:
        Path(out).write_text(json.dumps({"partial": True, field: report}, indent=2))


def model_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: which architecture, where and how it runs."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="7b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--attn", default="sdpa")
    return parser


def main() -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--page", default=str(Path(__file__).parent.parent / "samples" / "invoice.pdf"))
    parser.add_argument("--page-number", type=int, default=2, help="which page of --page (the totals page)")
    parser.add_argument("--dpi", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fuse", action="store_true", help="also time the fast path with inductor-fused kernels")
    parser.add_argument("--tune", action="store_true",
                        help="also time it fused with coordinate-descent tuning of the kernels (slow to compile)")
    parser.add_argument("--profile", default="",
                        help="decoders (comma list, e.g. fast,fast+inductor) whose decode step on the skip case "
                             "is broken down kernel by kernel")
    parser.add_argument("--cases", default="", help="only the cases whose name contains one of these (comma list)")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    args = parser.parse_args()
    transformers.utils.logging.set_verbosity_error()

    backbone, runtime, adapter = build(args.arch, args.device, args.dtype, args.attn)
    qzooms = engines(backbone, runtime, adapter, args.fuse, args.tune)
    profiled = [name for name in args.profile.split(",") if name]
    if unknown := sorted(set(profiled) - set(qzooms)):
        parser.error(f"--profile: no decoder {', '.join(unknown)} in this run (there are {', '.join(qzooms)})")
    wanted = [c for c in args.cases.split(",") if c]

    def chosen(case: str) -> bool:
        return case == "stock@4096" or not wanted or any(w in case for w in wanted)

    baseline, coarse = VisualBudget(256, 4096), VisualBudget(256, 576)
    settings = {"never": ZoomSettings("never"), "skip": ZoomSettings("auto", gate_threshold=1.01),
                "zoom": ZoomSettings("auto", gate_threshold=0.0, roi_threshold=0.0)}
    report, profiles = {}, {}

    def measure(case: str, run, *run_args) -> None:
        if chosen(case):
            row = run(*run_args, args.new_tokens, args.repeats)
            record(report, case, row, f"{row['wall_s'] * 1e3:.1f} ms", args.out, "cases")

    with open_document(args.page, dpi=args.dpi) as doc:
        doc_pages = doc.page_count
        for label, budget in (("4096", baseline), ("576", coarse)):
            measure(f"stock@{label}", stock_case, backbone, doc, args.page_number, budget)
            for name, qz in qzooms.items():
                measure(f"never@{label} {name}", qzoom_case, qz, doc, args.page_number, budget, settings["never"])
        for path in ("skip", "zoom"):
            for name, qz in qzooms.items():
                measure(f"{path} {name}", qzoom_case, qz, doc, args.page_number, coarse, settings[path])
        for name in profiled:
            profiles[f"skip {name}"] = profile_decode(qzooms[name], doc, args.page_number, coarse, settings["skip"],
                                                      args.new_tokens)
    device = runtime.device
    bandwidth = copy_bandwidth(device)
    weights = weight_bytes(backbone)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    meta = {"arch": args.arch, "device": str(device), "device_name": name, "dtype": runtime.dtype_name,
            "attn": runtime.attn, "torch": torch.__version__, "transformers": transformers.__version__,
            "page": f"{Path(args.page).name} page {args.page_number} of {doc_pages} at {args.dpi} dpi",
            "new_tokens": args.new_tokens, "repeats": args.repeats, "lm_weight_bytes": weights,
            "copy_bandwidth_bytes_per_s": bandwidth,
            "decode_floor_s": weights / bandwidth if bandwidth else None}
    base = report["stock@4096"]["wall_s"]
    for row in report.values():
        row["vs_stock_4096"] = row["wall_s"] / base
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "cases": report, "profiles": profiles}, indent=2))
    print(f"{meta['arch']} on {meta['device_name']} ({meta['device']}, {meta['dtype']}, {meta['attn']}), "
          f"torch {meta['torch']}, transformers {meta['transformers']}; {meta['page']}, "
          f"{args.new_tokens} new tokens, median of {args.repeats}")
    if bandwidth:
        print(f"decode floor: {weights / 1e9:.2f} GB of LM weights / {bandwidth / 1e12:.2f} TB/s copy bandwidth = "
              f"{meta['decode_floor_s'] * 1e3:.2f} ms/token")
    print("\n| case | visual tokens | prompt tokens | TTFT ms | decode ms/token | total ms | x stock@4096 | "
          "peak GiB | first call s | encode | coarse | gate | region | crop+enc | fused | decode |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case, row in report.items():
        t = row.get("time")
        stages = " | ".join(f"{t[k] * 1e3:.1f}" for k in ("preprocess_s", "coarse_prefill_s", "gate_s", "region_s",
                                                         "region_encode_s", "fused_prefill_s", "decode_s")) \
            if t else " | ".join(["-"] * 7)
        peak = f"{row['peak_mem_gib']:.2f}" if row["peak_mem_gib"] is not None else "-"
        print(f"| {case} | {row['visual_tokens']} | {row['prompt_tokens']} | {row['ttft_s'] * 1e3:.1f} | "
              f"{row['decode_per_token_s'] * 1e3:.2f} | {row['wall_s'] * 1e3:.1f} | {row['vs_stock_4096']:.3f} | "
              f"{peak} | {row['first_call_s']:.2f} | {stages} |")
    for case, profile in profiles.items():
        print_profile(case, profile, report.get(case))


if __name__ == "__main__":
    main()
