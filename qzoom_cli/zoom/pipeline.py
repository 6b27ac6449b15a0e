"""Q-Zoom on pages: coarse pass -> gate -> region -> fused high-resolution pass -> answer.

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

Questions are answered in batches (one question is a batch of one): prompts are padded in two
segments split after each page's last image token (`padding.py`), so every sample's reusable
prefix ends at the same index; after the gate and region decisions the batch splits into a
direct group and a zoom group, each continuing with its own rows of the cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image

from ..backbones import Backbone, ImageBlock, ImageEncoding, VisualAdditions
from ..backbones.caches import CacheMark, copy_cache, rewind_cache
from ..budget import VisualBudget
from ..decode import Decoder, EagerDecoder, Generation, prefill, run_marked
from ..errors import UsageError
from ..options import (
    LIFT_THRESHOLD,
    RELATIVE_ROI_THRESHOLD,
    TRAINED_GATE_THRESHOLD,
    TRAINED_ROI_THRESHOLD,
    ZoomSettings,
)
from ..padding import PaddedBatch, pad_segments
from ..results import Timings
from ..runtime import synchronize
from .adapter import QZOOM_RULE, SD_RPN_RULE, ZoomAdapter
from .fuse import FusedInputs, fuse_region
from .gate import gate_probabilities
from .geometry import (
    Box,
    attention_lift,
    equivalent_page_tokens,
    foreground_box,
    page_cells,
    region_on_page,
    relative_region_map,
    sigmoid_region_map,
)
from .region import RegionHead, region_logits, scoring_layer_problem
from .sd_rpn import SdRpnRegion, sd_rpn_region


@dataclass
class PageView:
    """A page as the engine sees it: its coarse encoding, its size, and how to crop it sharply."""

    number: int
    size: tuple[int, int]
    encoding: ImageEncoding
    budget: VisualBudget
    crop: Callable[[Box, tuple[int, int]], Image.Image]
    coord_space: str
    pixels: Callable[[Box], Image.Image] | None = None  # the page's own pixels in a box (SD-RPN's crop)

    @property
    def grid(self) -> tuple[int, int]:
        return self.encoding.grid

    @staticmethod
    def native_tokens(region_px: Box, backbone: Backbone) -> int:
        """Tokens the region has at its source resolution (what `--roi-native` caps its budget at)."""
        return round(region_px.area / backbone.layout.patch_factor ** 2)

    def read_region(self, region_px: Box, budget: VisualBudget, backbone: Backbone) -> ImageEncoding:
        """The region (page pixels) cropped sharply at the size its token grid under `budget` needs,
        padded to that grid and encoded: the high-resolution block zoom splices in."""
        size, canvas = (int(region_px.width), int(region_px.height)), backbone.layout.canvas
        pixels = backbone.grid_pixels(backbone.image_grid(size, budget))
        return backbone.encode_image(canvas.place(self.crop(region_px, canvas.content_size(size, pixels)), pixels))

    def read_stretched(self, region_px: Box, keep: torch.Tensor | None, backbone: Backbone) -> ImageEncoding:
        """SD-RPN's read: the region cut from the page's own pixels, stretched (bilinear) to the
        fixed grid's square and encoded; with `keep`, only those grid tokens, in order."""
        grid = backbone.layout.fixed_grid
        crop = self.pixels(region_px).resize(backbone.grid_pixels(grid), Image.Resampling.BILINEAR)
        encoding = backbone.encode_image(crop)
        if keep is None:
            return encoding
        kept = keep.flatten().to(encoding.features.device)
        return ImageEncoding(encoding.features[kept], (1, int(kept.sum())))


@dataclass(frozen=True)
class GateReading:
    """What decided whether to zoom: the trained gate's probability ('trained') or, without one, the
    region map's attention share inside the box over the box's share of the page ('attention_lift')."""

    kind: str
    score: float
    threshold: float


@dataclass(frozen=True)
class RegionRead:
    """The region that was read again: its box on the coarse grid and in page pixels, the cut-off
    that drew it, its own token grid, the budget maximum it was read under, and its positions."""

    grid_box: Box
    page_box: Box
    threshold: float
    grid: tuple[int, int]
    max_tokens: int
    positions: str

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass
class ZoomTrace:
    """What the zoom stage did for one (page, question); the user-facing record is built from it."""

    mode: str
    region_head: str | None = None
    region_rule: str | None = None
    gate: GateReading | None = None
    region: RegionRead | None = None
    skipped_reason: str | None = None

    @property
    def zoomed(self) -> bool:
        return self.region is not None


@dataclass
class PageAnswer:
    generation: Generation
    prompt_tokens: int
    coarse_tokens: int
    baseline_tokens: int
    trace: ZoomTrace
    time: Timings
    region_map: torch.Tensor | None = None
    direct: Generation | None = None

    @property
    def region_tokens(self) -> int:
        return self.trace.region.tokens if self.trace.region is not None else 0

    @property
    def visual_tokens(self) -> int:
        return self.coarse_tokens + self.region_tokens


@dataclass
class _Group:
    """Some rows of the coarse batch continuing together, with their own cache."""

    rows: list[int]
    hidden_k: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor | None
    cache: object
    additions: VisualAdditions | None
    mark: CacheMark


class ZoomEngine:
    """Answers questions on encoded pages with the Q-Zoom pipeline."""

    def __init__(self, backbone: Backbone, branch_layer: int, depth: int, adapter: ZoomAdapter | None = None,
                 reuse_src_pos: bool = False, gate_threshold: float | None = None,
                 roi_threshold: float | None = None, decode: Decoder | None = None):
        self.backbone = backbone
        self.decode = decode or EagerDecoder(backbone)
        self.branch_layer = branch_layer
        self.depth = depth
        self.adapter = adapter
        self.reuse_src_pos = reuse_src_pos
        trained_region = adapter is not None and adapter.config.region_head
        problem = None if trained_region else scoring_layer_problem(backbone, branch_layer, depth)
        if problem:
            raise UsageError(problem)
        self.has_gate = adapter is not None and adapter.config.gate
        self.region_head = "trained" if trained_region else "base_layers"
        self.region_rule = adapter.config.region_rule if trained_region else QZOOM_RULE
        self.region = adapter.region() if trained_region else \
            RegionHead(list(backbone.decoder_layers[branch_layer:branch_layer + depth]))
        self.gate_threshold = gate_threshold if gate_threshold is not None else \
            (TRAINED_GATE_THRESHOLD if self.has_gate else LIFT_THRESHOLD)
        self.roi_threshold = roi_threshold if roi_threshold is not None else \
            (TRAINED_ROI_THRESHOLD if trained_region else RELATIVE_ROI_THRESHOLD)

    def answer(self, page: PageView, text: str, settings: ZoomSettings, max_new_tokens: int) -> PageAnswer:
        return self.answer_batch([(page, text)], settings, max_new_tokens)[0]

    @torch.inference_mode()
    def answer_batch(self, items: list[tuple[PageView, str]], settings: ZoomSettings,
                     max_new_tokens: int) -> list[PageAnswer]:
        """Answer each (page, prompt text); equal to answering them one by one."""
        bb = self.backbone
        prompts = [bb.build_prompt(text, [page.grid]) for page, text in items]
        segments = []
        for (page, _), prompt in zip(items, prompts, strict=True):
            inputs, split = bb.prepare_inputs(prompt, [page.encoding]), prompt.images[0].stop
            segments.append([inputs.tokens(0, split), inputs.tokens(split)])
        batch = pad_segments(segments)
        answers = [PageAnswer(Generation(), prompt.length, page.grid[0] * page.grid[1], page.grid[0] * page.grid[1],
                              ZoomTrace(settings.mode), Timings())
                   for (page, _), prompt in zip(items, prompts, strict=True)]
        clock = _Clock([a.time for a in answers], bb.device)
        everyone = list(range(len(items)))
        cache = bb.new_cache()
        mask = batch.mask_or_none()

        if settings.mode == "never":
            with clock("coarse_prefill_s", everyone):
                logits = prefill(bb, batch.embeds, batch.positions, cache, mask, batch.additions)
            self._decode(answers, everyone, logits, cache, batch.positions, mask, max_new_tokens)
            return answers

        for answer in answers:
            answer.trace.region_head, answer.trace.region_rule = self.region_head, self.region_rule
        gate_threshold = _pick(settings.gate_threshold, self.gate_threshold)
        roi_threshold = _pick(settings.roi_threshold, self.roi_threshold)
        with clock("coarse_prefill_s", everyone):
            hidden_k, mark = run_marked(bb, batch.embeds, batch.positions, cache, self.branch_layer, mask,
                                        batch.additions, batch.boundaries[1])

        candidates = everyone
        if settings.mode == "auto" and self.has_gate:
            with clock("gate_s", everyone):
                scores = gate_probabilities(bb, self.adapter.high_res_layers, self.adapter.high_res_head,
                                            hidden_k, batch.positions, mask)
            for answer, score in zip(answers, scores, strict=True):
                answer.trace.gate = GateReading("trained", score, gate_threshold)
                if score < gate_threshold:
                    answer.trace.skipped_reason = "gate score below threshold"
            candidates = [i for i in everyone if scores[i] >= gate_threshold]

        boxes: dict[int, tuple[Box, Box]] = {}  # row -> (grid box, the same in page pixels)
        kept: dict[int, torch.Tensor | None] = {}  # row -> SD-RPN's region tokens under its mask (None: all)
        if candidates:
            with clock("region_s", candidates):
                blocks = [ImageBlock(batch.index(i, 0, prompts[i].images[0].start), *items[i][0].grid)
                          for i in candidates]
                maps = region_logits(bb, self.region, hidden_k[candidates], batch.positions[:, candidates],
                                     blocks, _rows(mask, candidates))
            for i, scores in zip(candidates, maps, strict=True):
                page = items[i][0]
                if self.region_rule == SD_RPN_RULE:
                    found = self._sd_rpn_region(answers[i], page, scores.logits, roi_threshold)
                    if found is not None:
                        boxes[i], kept[i] = (found.grid_box, found.page_box), found.keep
                    continue
                on_page = page_cells(page.grid, page.size, bb.layout.canvas).to(scores.keep.device)
                keep = scores.keep & on_page
                prob = sigmoid_region_map(scores.logits, keep) if self.region_head == "trained" \
                    else relative_region_map(scores.logits, keep)
                answers[i].region_map = prob.cpu()
                box = foreground_box(prob, roi_threshold)
                if box is None:
                    answers[i].trace.skipped_reason = "no region above the region threshold"
                    continue
                if settings.mode == "auto" and not self.has_gate:
                    lift = attention_lift(prob, box, on_page)
                    answers[i].trace.gate = GateReading("attention_lift", lift, gate_threshold)
                    if lift < gate_threshold:
                        answers[i].trace.skipped_reason = "attention too spread out for a region to help"
                        continue
                region_px = region_on_page(box, page.grid, page.size, bb.layout.min_region_side, bb.layout.canvas)
                if region_px is None:
                    answers[i].trace.skipped_reason = "the region lies in the padding around the page"
                    continue
                boxes[i] = box, region_px

        zoom_rows = sorted(boxes)
        direct_rows = [i for i in everyone if i not in boxes]
        groups = {}
        for name, rows in (("zoom", zoom_rows), ("direct", direct_rows)):
            if rows:
                own = cache if len(rows) == len(everyone) else \
                    copy_cache(cache, bb.new_cache(), range(self.branch_layer), rows)
                additions = batch.additions.rows(rows) if batch.additions is not None else None
                groups[name] = _Group(rows, hidden_k[rows], batch.positions[:, rows], _rows(mask, rows), own,
                                      additions, mark.rows(rows))
        if settings.explain and "zoom" in groups:  # the zoom group's answers without the region (untimed)
            group = groups["zoom"]
            spare = copy_cache(group.cache, bb.new_cache(), range(self.branch_layer))
            silent = _Clock([Timings() for _ in everyone], bb.device)
            for i, generation in zip(group.rows, self._finish_direct(
                    _Group(group.rows, group.hidden_k, group.positions, group.mask, spare, group.additions,
                           group.mark), silent,
                    max_new_tokens),
                    strict=True):
                answers[i].direct = generation
        if "direct" in groups:
            _keep(answers, direct_rows, self._finish_direct(groups["direct"], clock, max_new_tokens))
        if "zoom" in groups:
            self._zoom(groups["zoom"], batch, items, prompts, answers, boxes, kept, roi_threshold, settings, clock,
                       max_new_tokens)
        return answers

    def _sd_rpn_region(self, answer: PageAnswer, page: PageView, logits: torch.Tensor,
                       threshold: float) -> SdRpnRegion | None:
        """SD-RPN's region of a page (its heads zoom whenever their rule finds one, as evaluated:
        no gate, no lift), or None with the reason in the trace."""
        bb = self.backbone
        found, blurred = sd_rpn_region(logits, threshold, page.size, bb.grid_pixels(page.grid)[0],
                                       bb.layout.fixed_grid)
        answer.region_map = blurred.cpu()
        if found is None:
            answer.trace.skipped_reason = "no region above the region threshold"
        elif found.page_box.width <= 0 or found.page_box.height <= 0:
            answer.trace.skipped_reason = "the region lies in the padding around the page"
        elif found.keep is not None and not bool(found.keep.any()):
            answer.trace.skipped_reason = "no region token lies under the region's mask"
        else:
            return found
        return None

    def _decode(self, answers, rows, logits, cache, positions, mask, max_new_tokens) -> None:
        _keep(answers, rows, self.decode(logits, cache, positions, max_new_tokens, mask))

    def _finish_direct(self, group: _Group, clock: _Clock, max_new_tokens: int) -> list[Generation]:
        """Finish the coarse prefill through the upper layers with the same cache, then decode."""
        bb = self.backbone
        with clock("coarse_prefill_s", group.rows):
            hidden = bb.run_layers(group.hidden_k, group.positions, group.cache, self.branch_layer,
                                   bb.num_layers,  # pragma: no mutate (a stop of None runs to the top too)
                                   group.mask, group.additions)
            logits = bb.next_token_logits(hidden)
        return self.decode(logits, group.cache, group.positions, max_new_tokens, group.mask)

    def _zoom(self, group: _Group, batch: PaddedBatch, items, prompts, answers: list[PageAnswer],
              boxes: dict[int, tuple[Box, Box]], kept: dict[int, torch.Tensor | None], roi_threshold: float,
              settings: ZoomSettings, clock: _Clock, max_new_tokens: int) -> None:
        bb = self.backbone
        fused_inputs = []
        for i in group.rows:
            page, text = items[i]
            box, region_px = boxes[i]
            budget = bb.read_budget(settings.region_budget(page.budget, page.native_tokens(region_px, bb)))
            with clock("region_encode_s", [i]):
                region = page.read_stretched(region_px, kept[i], bb) if i in kept else \
                    page.read_region(region_px, budget, bb)
            with clock("fused_prefill_s", [i]):
                fused_inputs.append(fuse_region(bb, text, prompts[i], page.encoding, region, box,
                                                aligned=self.reuse_src_pos))
            answer = answers[i]
            answer.prompt_tokens = fused_inputs[-1].prompt.length
            answer.trace.region = RegionRead(box, region_px, roi_threshold, region.grid, budget.max_tokens,
                                             "aligned" if self.reuse_src_pos else "second_image")
            answer.baseline_tokens = max(answer.coarse_tokens, equivalent_page_tokens(answer.region_tokens, region_px,
                                                                                     page.size))
        prefix_mask = batch.attention_mask[group.rows, :batch.boundaries[1]]
        with clock("fused_prefill_s", group.rows):
            logits, positions, mask = self.fused_prefill(fused_inputs, group.hidden_k, group.positions, prefix_mask,
                                                         group.cache, group.mark, group.additions)
        self._decode(answers, group.rows, logits, group.cache, positions, mask, max_new_tokens)

    def fused_prefill(self, fused: list[FusedInputs], hidden_k: torch.Tensor, coarse_positions: torch.Tensor,
                      prefix_mask: torch.Tensor, cache, mark: CacheMark,
                      coarse_additions: VisualAdditions | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Prefill fused sequences reusing the coarse pass.

        Every sample's unchanged prefix ends at the same index E (the padded coarse layout puts
        it there) and keeps its cache (rewound to `mark`, taken at E) and layer-K states; only
        the new suffixes (left-padded) run through layers 0..K-1, with the region's per-layer
        additions, then layers K..L-1 run over prefix + suffix (with the additions of both,
        should any layer >= K take them).
        Returns the next-token logits and the positions and mask to decode with; `cache` ends
        up holding it all.
        """
        bb = self.backbone
        prefix_end = prefix_mask.shape[1]
        suffix = pad_segments([[f.suffix] for f in fused])
        mask = torch.cat([prefix_mask, suffix.attention_mask], dim=1)
        mask = None if bool(mask.all()) else mask
        positions = torch.cat([coarse_positions[..., :prefix_end], suffix.positions], dim=2)  # float if aligned
        rewind_cache(cache, mark, range(self.branch_layer))
        replay = bb.run_layers(suffix.embeds, suffix.positions, cache, 0, self.branch_layer, mask, suffix.additions)
        hidden = torch.cat([hidden_k[:, :prefix_end], replay], dim=1)
        upper = None
        if self.branch_layer < bb.layout.addition_layers:  # pragma: no mutate (at K itself: no layer adds; speed)
            # Page and region both hold image tokens, so a family that adds at these layers has both.
            upper = coarse_additions.tokens(0, prefix_end).then(  # pragma: no mutate (a slice from None starts at 0)
                suffix.additions)
        hidden = bb.run_layers(hidden, positions, cache, self.branch_layer,
                               bb.num_layers,  # pragma: no mutate (a stop of None runs to the top too)
                               mask, upper)
        return bb.next_token_logits(hidden), positions, mask


def _keep(answers: list[PageAnswer], rows: list[int], generations: list[Generation]) -> None:
    """Each row's generation into its answer, with its decode time."""
    for i, generation in zip(rows, generations, strict=True):  # pragma: no mutate (one generation per row, always)
        answers[i].generation = generation
        answers[i].time.decode_s = generation.decode_s


def _rows(mask: torch.Tensor | None, rows: list[int]) -> torch.Tensor | None:
    if mask is None:
        return None
    picked = mask[rows]
    return None if bool(picked.all()) else picked  # pragma: no mutate (None only spares an all-true mask's work)


def _pick(value: float | None, default: float) -> float:
    return default if value is None else value


class _Clock:
    """Adds the wall time of a block (GPU work included), split evenly, to the rows taking part."""

    def __init__(self, timings: list[Timings], device: torch.device, now: Callable[[], float] = time.perf_counter):
        self.timings = timings
        self.device = device
        self.now = now

    @contextmanager
    def __call__(self, name: str, rows: list[int]):
        start = self.now()
        yield
        synchronize(self.device)
        share = (self.now() - start) / len(rows)
        for i in rows:
            setattr(self.timings[i], name, getattr(self.timings[i], name) + share)
