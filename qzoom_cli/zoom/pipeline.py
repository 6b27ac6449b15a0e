"""Q-Zoom on one page: coarse pass -> gate -> region -> fused high-resolution pass -> answer.

Family-agnostic: everything model-specific goes through the Backbone interface.

    coarse prompt ── layers 0..K-1 (cache) ── h_K ─┬─ gate (T layers + head) ── p < threshold ─┐
                                                   │                                           │
                                                   └─ region head (T layers, q.k) ── box ─┐    │
    direct: layers K..L-1 on h_K, same cache, decode  <─────────── no box / skipped ────────┼────┘
    zoom:   crop the page at the box, encode, splice after the page image, keep the cache
            of the unchanged prefix, replay the new suffix through 0..K-1, run K..L-1 over
            the fused sequence, decode.

Without a trained gate, `auto` zooms when the region map is concentrated: the attention share
inside the box divided by the box's share of the page (its "lift") reaches the threshold.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image

from ..backbones import Backbone, Prompt
from ..budget import VisualBudget, token_grid
from ..decode import Generation, copy_cache, greedy_decode, prefill, truncate_cache
from ..errors import UsageError
from ..results import Timings, ZoomInfo
from ..runtime import synchronize
from .adapter import ZoomAdapter
from .fuse import FusedInputs, fuse_region
from .gate import gate_probability
from .geometry import (
    Box,
    attention_lift,
    equivalent_page_tokens,
    foreground_box,
    grid_box_to_pixels,
    normalized,
    relative_region_map,
    sigmoid_region_map,
)
from .region import region_logits

MODES = ("auto", "always", "never")
TRAINED_GATE_THRESHOLD = 0.05
TRAINED_ROI_THRESHOLD = 0.125
LIFT_THRESHOLD = 2.0
RELATIVE_ROI_THRESHOLD = 0.5


@dataclass
class ZoomSettings:
    """Per-call zoom options; None thresholds mean the engine's defaults."""

    mode: str = "auto"
    gate_threshold: float | None = None
    roi_threshold: float | None = None
    region_budget: VisualBudget | None = None
    explain: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise UsageError(f"unknown zoom mode {self.mode!r}: use {', '.join(MODES)}")


@dataclass
class PageView:
    """A page as the engine sees it: its coarse encoding, its size, and how to crop it sharply."""

    number: int
    size: tuple[int, int]
    grid: tuple[int, int]
    features: torch.Tensor
    budget: VisualBudget
    crop: Callable[[Box, tuple[int, int]], Image.Image]
    coord_space: str


@dataclass
class PageAnswer:
    generation: Generation
    prompt_tokens: int
    coarse_tokens: int
    region_tokens: int
    baseline_tokens: int
    zoom: ZoomInfo
    time: Timings
    region_map: torch.Tensor | None = None
    direct: Generation | None = None


class ZoomEngine:
    """Answers questions on encoded pages with the Q-Zoom pipeline."""

    def __init__(self, backbone: Backbone, branch_layer: int, depth: int, adapter: ZoomAdapter | None = None,
                 reuse_src_pos: bool = False, gate_threshold: float | None = None,
                 roi_threshold: float | None = None):
        self.backbone = backbone
        self.branch_layer = branch_layer
        self.depth = depth
        self.adapter = adapter
        self.reuse_src_pos = reuse_src_pos
        trained_region = adapter is not None and adapter.config.region_head
        self.has_gate = adapter is not None and adapter.config.gate
        self.region_head = "trained" if trained_region else "base_layers"
        self.region_layers = list(adapter.twig_layers) if trained_region else \
            list(backbone.decoder_layers[branch_layer:branch_layer + depth])
        self.gate_threshold = gate_threshold if gate_threshold is not None else \
            (TRAINED_GATE_THRESHOLD if self.has_gate else LIFT_THRESHOLD)
        self.roi_threshold = roi_threshold if roi_threshold is not None else \
            (TRAINED_ROI_THRESHOLD if trained_region else RELATIVE_ROI_THRESHOLD)

    def answer(self, page: PageView, text: str, settings: ZoomSettings, max_new_tokens: int) -> PageAnswer:
        bb = self.backbone
        timings = Timings()
        clock = _Clock(timings, bb.device)
        prompt = bb.build_prompt(text, [page.grid])
        embeds = bb.embed_prompt(prompt, [page.features])
        positions = bb.position_ids(prompt)
        cache = bb.new_cache()
        info = ZoomInfo(mode=settings.mode)
        coarse_tokens = page.grid[0] * page.grid[1]
        answer = PageAnswer(Generation(), prompt.length, coarse_tokens, 0, coarse_tokens, info, timings)

        if settings.mode == "never":
            with clock("coarse_prefill_s"):
                logits = prefill(bb, embeds, positions, cache)
            answer.generation = greedy_decode(bb, logits, cache, positions, max_new_tokens)
            timings.decode_s = answer.generation.decode_s
            return answer

        info.region_head = self.region_head
        gate_threshold = _pick(settings.gate_threshold, self.gate_threshold)
        roi_threshold = _pick(settings.roi_threshold, self.roi_threshold)
        with clock("coarse_prefill_s"):
            hidden_k = bb.run_layers(embeds, positions, cache, 0, self.branch_layer)

        if settings.mode == "auto" and self.has_gate:
            with clock("gate_s"):
                score = gate_probability(bb, self.adapter.high_res_layers, self.adapter.high_res_head,
                                         hidden_k, positions)
            info.gate = {"kind": "trained", "score": round(score, 6), "threshold": gate_threshold}
            if score < gate_threshold:
                return self._direct(answer, clock, hidden_k, positions, cache, max_new_tokens,
                                    "gate score below threshold")

        with clock("region_s"):
            logits = region_logits(bb, self.region_layers, hidden_k, positions, prompt.images[0])
            prob = sigmoid_region_map(logits) if self.region_head == "trained" else relative_region_map(logits)
            box = foreground_box(prob, roi_threshold)
        answer.region_map = prob.cpu()
        if box is None:
            return self._direct(answer, clock, hidden_k, positions, cache, max_new_tokens,
                                "no region above the region threshold")
        if settings.mode == "auto" and not self.has_gate:
            lift = attention_lift(prob, box)
            info.gate = {"kind": "attention_lift", "score": round(lift, 6), "threshold": gate_threshold}
            if lift < gate_threshold:
                return self._direct(answer, clock, hidden_k, positions, cache, max_new_tokens,
                                    "attention too spread out for a region to help")

        if settings.explain:  # the answer without the region, on a copy of the cache (not timed)
            spare = copy_cache(cache, bb.new_cache(), range(self.branch_layer))
            answer.direct = self._finish_direct(hidden_k, positions, spare, max_new_tokens, _Clock(Timings(), bb.device))
        return self._zoom(answer, page, text, prompt, box, roi_threshold, settings, clock, hidden_k, cache,
                          max_new_tokens)

    def _finish_direct(self, hidden_k: torch.Tensor, positions: torch.Tensor, cache, max_new_tokens: int,
                       clock: _Clock) -> Generation:
        """Finish the coarse prefill through the upper layers with the same cache, then decode."""
        bb = self.backbone
        with clock("coarse_prefill_s"):
            hidden = bb.run_layers(hidden_k, positions, cache, self.branch_layer, bb.num_layers)
            logits = bb.logits(hidden[:, -1:])[:, -1]
        return greedy_decode(bb, logits, cache, positions, max_new_tokens)

    def _direct(self, answer: PageAnswer, clock: _Clock, hidden_k: torch.Tensor, positions: torch.Tensor,
                cache, max_new_tokens: int, reason: str) -> PageAnswer:
        answer.generation = self._finish_direct(hidden_k, positions, cache, max_new_tokens, clock)
        answer.time.decode_s += answer.generation.decode_s
        answer.zoom.skipped_reason = reason
        return answer

    def _zoom(self, answer: PageAnswer, page: PageView, text: str, prompt: Prompt, box: Box, roi_threshold: float,
              settings: ZoomSettings, clock: _Clock, hidden_k: torch.Tensor, cache,
              max_new_tokens: int) -> PageAnswer:
        bb = self.backbone
        factor = bb.patch_factor
        region_px = grid_box_to_pixels(box, page.grid, page.size)
        budget = settings.region_budget or page.budget
        with clock("region_encode_s"):
            rows, cols = token_grid(int(region_px.height), int(region_px.width), factor, budget)
            region_features = bb.encode_image(page.crop(region_px, (cols * factor, rows * factor)))
        with clock("fused_prefill_s"):
            fused = fuse_region(bb, text, prompt, page.features, region_features, (rows, cols), box,
                                aligned=self.reuse_src_pos)
            logits = self.fused_prefill(fused, hidden_k, cache)
        answer.generation = greedy_decode(bb, logits, cache, fused.positions, max_new_tokens)
        answer.time.decode_s += answer.generation.decode_s
        answer.prompt_tokens = fused.prompt.length
        answer.region_tokens = rows * cols
        answer.baseline_tokens = max(answer.coarse_tokens, equivalent_page_tokens(rows * cols, region_px, page.size))
        answer.zoom.zoomed = True
        answer.zoom.positions = "aligned" if self.reuse_src_pos else "second_image"
        answer.zoom.roi = {
            "page": page.number,
            "bbox_xyxy": [int(v) for v in region_px.as_list()],
            "bbox_norm": normalized(region_px, page.size),
            "coord_space": page.coord_space,
            "threshold": roi_threshold,
            "grid_box": [int(v) for v in box.as_list()],
            "grid": list(page.grid),
            "tokens": rows * cols,
        }
        return answer


    def fused_prefill(self, fused: FusedInputs, hidden_k: torch.Tensor, cache) -> torch.Tensor:
        """Prefill the fused sequence reusing the coarse pass: the unchanged prefix keeps its cache
        and layer-K states; only the new suffix runs through layers 0..K-1, then layers K..L-1 run
        over the whole fused sequence. Returns next-token logits; `cache` ends up holding it all."""
        bb = self.backbone
        keep = fused.reused
        truncate_cache(cache, keep, range(self.branch_layer))
        replay = bb.run_layers(fused.embeds[:, keep:], fused.positions[..., keep:], cache, 0, self.branch_layer)
        hidden = torch.cat([hidden_k[:, :keep], replay], dim=1)
        hidden = bb.run_layers(hidden, fused.positions, cache, self.branch_layer, bb.num_layers)
        return bb.logits(hidden[:, -1:])[:, -1]


def _pick(value: float | None, default: float) -> float:
    return default if value is None else value


class _Clock:
    """Adds the wall time of a block (GPU work included) to a Timings field."""

    def __init__(self, timings: Timings, device: torch.device):
        self.timings = timings
        self.device = device

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        synchronize(self.device)
        setattr(self.timings, name, getattr(self.timings, name) + time.perf_counter() - start)
