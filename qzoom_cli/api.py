"""The library API: load a model once, ask questions about documents, get `Result` records.

    from qzoom_cli import QZoom
    qz = QZoom.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct")
    [result] = qz.ask("invoice.pdf", "What is the total due?")
    print(result.answer, result.page, result.zoom.roi)

Every selected page answers every question (through the zoom engine, `zoom/pipeline.py`); the
page whose answer the model is most confident about wins (score: mean log-probability of the
generated tokens, see `decode.Generation.score`). Pages are rendered and encoded one at a time,
so memory does not grow with document length.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from .backbones import Backbone, load_backbone
from .budget import VisualBudget
from .cards import GENERIC_BUDGET, ModelCard, default_card, find_card
from .documents import DEFAULT_DPI, Document, open_document, parse_page_spec
from .errors import OutOfMemory, QZoomError, UsageError
from .options import (
    SHORT_ANSWER_INSTRUCTION,
    ZoomSettings,
    check_counts,
    check_instruction,
    check_questions,
    with_instruction,
)
from .results import (
    BudgetInfo,
    Candidate,
    InputInfo,
    ModelInfo,
    Result,
    Stats,
    Timings,
    ZoomInfo,
    decode_speed,
)
from .runtime import (
    Runtime,
    peak_memory,
    reset_peak_memory,
    resolve_runtime,
    synchronize,
)
from .static_decode import make_decoder
from .zoom.adapter import ADAPTER_CONFIG, ZoomAdapter, checkpoint_files, official_adapter_config
from .zoom.geometry import normalized
from .zoom.lora import load_lora
from .zoom.pipeline import PageAnswer, PageView, ZoomEngine, ZoomTrace

DEFAULT_MAX_NEW_TOKENS = 64
THINKING_MAX_NEW_TOKENS = 1024  # thinking checkpoints reason for hundreds of tokens before answering
ZOOM_COARSE_BUDGET = (256, 576)
MAX_AUTO_BATCH = 64

log = logging.getLogger("qzoom")

__all__ = ["QZoom", "AskRequest", "ZoomSettings", "SHORT_ANSWER_INSTRUCTION", "DEFAULT_MAX_NEW_TOKENS"]


@dataclass
class _EncodedPage:
    view: PageView
    time: Timings
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Candidate:
    answer: PageAnswer
    page: PageView
    text: str
    reasoning: str | None


def zoom_info(trace: ZoomTrace, page: PageView) -> ZoomInfo:
    """The record's `zoom` object: what the engine did on `page`, in page pixels and plain values."""
    gate, region = trace.gate, trace.region
    return ZoomInfo(
        mode=trace.mode, zoomed=trace.zoomed, region_head=trace.region_head,
        gate=None if gate is None else {"kind": gate.kind, "score": round(gate.score, 6), "threshold": gate.threshold},
        roi=None if region is None else {
            "page": page.number,
            "bbox_xyxy": [int(v) for v in region.page_box.as_list()],
            "bbox_norm": normalized(region.page_box, page.size),
            "coord_space": page.coord_space,
            "threshold": region.threshold,
            "grid_box": [int(v) for v in region.grid_box.as_list()],
            "grid": list(page.grid),
            "tokens": region.tokens,
        },
        skipped_reason=trace.skipped_reason, positions=None if region is None else region.positions,
        region_rule=trace.region_rule)


def default_branch(num_layers: int, key_layers: tuple[int, ...]) -> tuple[int, int]:
    """(K, T) for models without a card: branch two thirds of the way up, three layers deep; in a
    hybrid stack, moved to the nearest place where the last of them is a layer with keys."""
    k = min(num_layers - 1, max(1, round(num_layers * 2 / 3)))
    t = min(3, num_layers - k)
    last = min((layer for layer in key_layers if layer - t + 1 >= 1), key=lambda layer: abs(layer - (k + t - 1)),
               default=k + t - 1)
    return last - t + 1, t


class QZoom:
    """A loaded model, with its zoom engine, ready to answer questions about documents."""

    def __init__(self, backbone: Backbone, runtime: Runtime, card: ModelCard | None = None,
                 adapter: ZoomAdapter | None = None, branch_layer: int | None = None, depth: int | None = None):
        self.backbone = backbone
        self.runtime = runtime
        self.card = card
        self.adapter = adapter
        zoom_card = card.zoom if card else {}
        if adapter is not None:
            k, t = adapter.config.branch_layer, adapter.config.depth
        else:
            k, t = zoom_card.get("branch_layer"), zoom_card.get("depth")
            if k is None or t is None:
                k, t = default_branch(backbone.num_layers, backbone.key_layers)
            k, t = branch_layer or k, depth or t
        trained = adapter is not None
        gate_threshold = adapter.config.gate_threshold if trained else None
        roi_threshold = adapter.config.roi_threshold if trained else None
        if trained:
            gate_threshold = gate_threshold if gate_threshold is not None else zoom_card.get("gate_threshold")
            roi_threshold = roi_threshold if roi_threshold is not None else zoom_card.get("roi_threshold")
        self.engine = ZoomEngine(backbone, k, t, adapter, reuse_src_pos=bool(adapter and adapter.config.reuse_src_pos),
                                 gate_threshold=gate_threshold, roi_threshold=roi_threshold,
                                 decode=make_decoder(backbone, runtime.decoder))

    @classmethod
    def from_pretrained(cls, model: str | Path | None = None, *, adapter: str | Path | None = None,
                        revision: str | None = None, device: str | None = "auto", dtype: str | None = "auto",
                        attn: str | None = "auto", compile: str | None = "auto", branch_layer: int | None = None,
                        depth: int | None = None, merge_lora: bool = True, thinking: bool | None = None) -> QZoom:
        """Load a hub id or local checkpoint (default: the default card's model) with its zoom modules.

        Zoom modules come from `adapter` (a directory written by `ZoomAdapter.save_pretrained`),
        else from the checkpoint itself when it is a released Q-Zoom checkpoint; a stock
        checkpoint zooms training-free with its own layers K..K+T-1 as region head. LoRA weights in
        the adapter folder (`qzoom train sft`) are attached to the decoder, merged into its weights
        unless `merge_lora` is False. `compile` picks the decoder (`runtime.resolve_decoder`): auto
        captures it as a CUDA graph on CUDA. `thinking` lets a checkpoint that reasons on request
        (its chat template's enable_thinking) do so; None: the model card's default, else off.
        """
        card = default_card() if model is None else find_card(str(model))
        ref = card.id if model is None else str(model)
        runtime = resolve_runtime(device, dtype, attn, compile)
        for note in runtime.notes:
            log.warning(note)
        if thinking is None:
            thinking = card.thinking if card is not None else False
        backbone = load_backbone(ref, runtime, revision, processor=card.processor if card else None,
                                 thinking=thinking)
        if card is not None and card.system_prompt is not None:
            backbone.system_prompt = card.system_prompt
        own = Path(backbone.model_id)
        if adapter is None and (own / ADAPTER_CONFIG).is_file():  # a checkpoint with its adapter beside it
            adapter = own
        if adapter is not None:
            load_lora(backbone, adapter, merge=merge_lora)  # first: the zoom modules record the decoder they fit
            zoom_modules = ZoomAdapter.from_pretrained(adapter, backbone)
        elif official_adapter_config(backbone) is not None:
            zoom_modules = ZoomAdapter.from_official_checkpoint(backbone, checkpoint_files(backbone.model_id, revision))
        else:
            zoom_modules = None
        return cls(backbone, runtime, card, zoom_modules, branch_layer, depth)

    def default_budget(self, zoom_mode: str = "auto") -> VisualBudget:
        """The page budget: the card's zoom coarse budget when zooming, its plain budget otherwise
        (a fixed-grid family: its grid)."""
        if zoom_mode != "never":
            zoom_card = self.card.zoom if self.card else {}
            budget = VisualBudget(zoom_card.get("min_visual_tokens", ZOOM_COARSE_BUDGET[0]),
                                  zoom_card.get("max_visual_tokens", ZOOM_COARSE_BUDGET[1]))
        elif self.card is not None:
            budget = VisualBudget(self.card.min_visual_tokens, self.card.max_visual_tokens)
        else:
            budget = VisualBudget(*GENERIC_BUDGET)
        return self.backbone.read_budget(budget)

    def resolve_budget(self, min_tokens: int | None = None, max_tokens: int | None = None,
                       zoom_mode: str = "auto") -> VisualBudget:
        """The default budget with the given bounds replaced; a lone bound drags the other along.
        A fixed-grid family keeps its grid, and says so when bounds were given."""
        default = self.default_budget(zoom_mode)
        if min_tokens is None and max_tokens is None:
            return default
        if self.backbone.layout.fixed_grid is not None:
            log.warning(self.fixed_grid_note("--min/--max-visual-tokens"))
            return default
        if min_tokens is None:
            min_tokens = min(default.min_tokens, max_tokens)
        if max_tokens is None:
            max_tokens = max(default.max_tokens, min_tokens)
        return VisualBudget(min_tokens, max_tokens)

    def fixed_grid_note(self, options: str) -> str:
        """What a fixed-grid family says of options that set budgets it cannot honour."""
        rows, cols = self.backbone.layout.fixed_grid
        return (f"{self.backbone.family} reads every page and region as a fixed {rows}x{cols} grid ({rows * cols} "
                f"visual tokens); ignoring {options}")

    def default_max_new_tokens(self) -> int:
        """The longest answer when none is asked for: the card's, else 64 (1024 for thinking models)."""
        if self.card is not None and self.card.max_new_tokens is not None:
            return self.card.max_new_tokens
        return DEFAULT_MAX_NEW_TOKENS if self.backbone.reasoning_end_id is None else THINKING_MAX_NEW_TOKENS

    def resolve_batch_size(self, batch_size: int | str, budget: VisualBudget, max_new_tokens: int,
                           zoom_mode: str = "auto") -> int:
        """`batch_size`, or for 'auto' the most (page, question) pairs (up to 64) whose prompts fit
        in half the GPU memory free now; 1 off CUDA, where batching does not pay."""
        if batch_size != "auto":
            return batch_size
        device = self.runtime.device
        if device.type != "cuda":
            return 1
        read = budget.max_tokens * (1 if zoom_mode == "never" else 2)  # the page, and a region as large
        pair = (read + 256 + max_new_tokens) * self.backbone.memory_per_token()
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, min(MAX_AUTO_BATCH, free // 2 // pair))

    def model_info(self) -> ModelInfo:
        bb = self.backbone
        return ModelInfo(id=bb.model_id if self.card is None else self.card.id, revision=bb.revision,
                         family=bb.family, device=str(self.runtime.device), dtype=self.runtime.dtype_name,
                         attn=self.runtime.attn, decoder=self.engine.decode.name)

    def ask(self, document: str | Path | bytes | Document, questions: str | list[str], *,
            pages: str | None = None, dpi: int = DEFAULT_DPI, password: str | None = None,
            budget: VisualBudget | None = None, zoom: ZoomSettings | str = "auto",
            max_new_tokens: int | None = None, instruction: str = SHORT_ANSWER_INSTRUCTION,
            ids: list[str] | None = None, overlay_dir: str | Path | None = None,
            batch_size: int | str = 1) -> list[Result]:
        """Answer each question about the document; one `Result` per question, in order.

        (page, question) pairs are answered `batch_size` at a time (same answers as one at a
        time, faster on a GPU; 'auto' sizes batches from free GPU memory). `max_new_tokens`
        None is the model's default (`default_max_new_tokens`)."""
        questions = check_questions(questions)
        if ids is not None and len(ids) != len(questions):
            raise UsageError("one id per question is needed")
        check_counts(batch_size, max_new_tokens)  # before the document is read
        doc = document if isinstance(document, Document) else open_document(document, password=password, dpi=dpi)
        try:
            request = AskRequest(doc, questions, ids, pages)
            [(_, outcome)] = self.ask_many([request], budget=budget, zoom=zoom, max_new_tokens=max_new_tokens,
                                           instruction=instruction, overlay_dir=overlay_dir, batch_size=batch_size)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        finally:
            if doc is not document:
                doc.close()

    def ask_many(self, requests: Iterable[AskRequest], *, budget: VisualBudget | None = None,
                 zoom: ZoomSettings | str = "auto", max_new_tokens: int | None = None,
                 instruction: str = SHORT_ANSWER_INSTRUCTION, overlay_dir: str | Path | None = None,
                 batch_size: int | str = 1) -> Iterator[tuple[AskRequest, list[Result] | Exception]]:
        """Answer many requests (questions about pages of open documents), batching (page, question)
        pairs across requests and documents, `batch_size` at a time.

        Yields each request with its results, in order of completion (roughly the input order),
        or with the error that stopped it: a bad page range, an unreadable page, running out of
        memory in a batch it was part of. Other requests carry on. `requests` is consumed lazily,
        so a caller can open each document only when its turn comes; a request's document must
        stay open until the request is yielded.
        """
        settings = ZoomSettings(mode=zoom) if isinstance(zoom, str) else zoom
        requested = budget or self.default_budget(settings.mode)
        budget = self.backbone.read_budget(requested)
        if budget != requested:
            log.warning(self.fixed_grid_note("the budget given"))
        if self.backbone.layout.fixed_grid is not None and (settings.region_max_tokens or settings.region_native):
            log.warning(self.fixed_grid_note("--roi-max-visual-tokens and --roi-native"))
        max_new_tokens = self.default_max_new_tokens() if max_new_tokens is None else max_new_tokens
        batch_size = self.resolve_batch_size(batch_size, budget, max_new_tokens, settings.mode)
        check_counts(batch_size, max_new_tokens)
        check_instruction(instruction)
        batcher = _Batcher(self, settings, budget, max_new_tokens, instruction, batch_size, overlay_dir)
        reset_peak_memory(self.runtime.device)
        for request in requests:
            yield from batcher.add(request)
        yield from batcher.flush()

    def page_view(self, doc: Document, number: int, budget: VisualBudget) -> PageView:
        """Page `number` as the engine reads it at `budget` (its coarse encoding, and sharp crops)."""
        return self._encode_page(doc, number, budget).view

    def _encode_page_with_retry(self, doc: Document, number: int, budget: VisualBudget) -> _EncodedPage:
        """Encode a page; on out-of-memory, retry once at half the visual-token budget."""
        try:
            return self._encode_page(doc, number, budget)
        except torch.OutOfMemoryError:
            self._release_memory()
        smaller = VisualBudget(min(budget.min_tokens, budget.max_tokens // 2), max(1, budget.max_tokens // 2))
        try:
            page = self._encode_page(doc, number, smaller)
        except torch.OutOfMemoryError:
            self._release_memory()
            raise OutOfMemory(f"out of memory on page {number} even at {smaller.max_tokens} visual tokens; "
                              "lower --max-visual-tokens or use a smaller model") from None
        page.warnings.append(f"page {number}: out of memory at {budget.max_tokens} visual tokens, "
                             f"retried at {smaller.max_tokens}")
        return page

    def _release_memory(self) -> None:
        if self.runtime.device.type == "cuda":
            torch.cuda.empty_cache()

    def _encode_page(self, doc: Document, number: int, budget: VisualBudget) -> _EncodedPage:
        bb = self.backbone
        start = time.perf_counter()
        image = doc.render(number)
        rendered = time.perf_counter()
        encoding = bb.encode_image(bb.fit_image(image, budget))
        synchronize(self.runtime.device)
        view = PageView(number=number, size=image.size, encoding=encoding, budget=budget,
                        crop=partial(doc.render_region, number), pixels=partial(doc.page_pixels, number),
                        coord_space=doc.coord_space)
        return _EncodedPage(view, Timings(render_s=rendered - start, preprocess_s=time.perf_counter() - rendered))

    def _text(self, generation) -> tuple[str, str | None]:
        """The answer's text and, for thinking checkpoints, its reasoning's."""
        ids = generation.token_ids[:-1] if generation.finished else generation.token_ids
        reasoning, answer = self.backbone.split_reasoning(ids, generation.finished)
        return self.backbone.decode_text(answer), None if reasoning is None else self.backbone.decode_text(reasoning)

    def _result(self, qid: str, question: str, input_info: InputInfo, budget: VisualBudget,
                per_page: list[_Candidate], memory: tuple[float, str], warnings: list[str],
                settings: ZoomSettings) -> Result:
        best_index = max(range(len(per_page)), key=lambda i: per_page[i].answer.generation.score)  # ties: first
        best = per_page[best_index]
        answer = best.answer
        total = Timings()
        for candidate in per_page:
            total.add(candidate.answer.time)
        output_tokens = len(answer.generation.token_ids)
        truncated = not answer.generation.finished
        result_warnings = list(warnings)
        if truncated:
            result_warnings.append(f"answer stopped at the --max-new-tokens limit ({output_tokens} tokens)"
                                   + (", still reasoning" if best.reasoning is not None and not best.text else ""))
        zoom = zoom_info(answer.trace, best.page)
        if settings.explain and zoom.zoomed:
            zoom.zoom_answer = best.text
            zoom.direct_answer = self._text(answer.direct)[0] if answer.direct is not None else None
        region = answer.trace.region
        roi_max_tokens = region.max_tokens if region is not None else \
            self.backbone.read_budget(settings.region_budget(budget)).max_tokens
        total_output = sum(len(c.answer.generation.token_ids) for c in per_page)
        return Result(
            id=qid, status="truncated" if truncated else "ok", input=input_info, question=question,
            answer=best.text, reasoning=best.reasoning, page=input_info.pages[best_index],
            candidates=[Candidate(page=page, answer=c.text, score=round(c.answer.generation.score, 6),
                                  output_tokens=len(c.answer.generation.token_ids),
                                  visual_tokens=c.answer.visual_tokens,
                                  truncated=not c.answer.generation.finished, zoomed=c.answer.trace.zoomed)
                        for page, c in zip(input_info.pages, per_page, strict=True)],
            zoom=zoom,
            model=self.model_info(),
            budget=BudgetInfo(min_tokens=budget.min_tokens, max_tokens=budget.max_tokens,
                              visual_tokens=answer.visual_tokens,
                              roi_tokens=answer.region_tokens, roi_max_tokens=roi_max_tokens),
            stats=Stats(latency_s=round(total.total, 6), visual_tokens=answer.visual_tokens,
                        coarse_visual_tokens=answer.coarse_tokens, region_visual_tokens=answer.region_tokens,
                        baseline_visual_tokens=answer.baseline_tokens, prompt_tokens=answer.prompt_tokens,
                        output_tokens=output_tokens,
                        tokens_per_s=decode_speed(total_output, total.decode_s),
                        total_visual_tokens=sum(c.answer.visual_tokens for c in per_page),
                        total_prompt_tokens=sum(c.answer.prompt_tokens for c in per_page),
                        total_output_tokens=total_output,
                        peak_mem_gib=round(memory[0], 3), peak_mem_source=memory[1], time=total.rounded()),
            warnings=result_warnings,
        )

    def _write_overlays(self, doc: Document, results: list[Result], candidates: list[list[_Candidate]],
                        directory: Path) -> None:
        from .render import write_overlay

        directory.mkdir(parents=True, exist_ok=True)
        stem = Path(doc.source).stem if doc.source not in ("-", "<bytes>") else "stdin"
        for result, per_page in zip(results, candidates, strict=True):
            chosen = per_page[result.input.pages.index(result.page)].answer
            path = directory / f"{stem}-{result.id}-p{result.page}.png"
            write_overlay(path, doc.render(result.page), chosen.region_map,
                          result.zoom.roi["bbox_xyxy"] if result.zoom.roi else None)
            result.zoom.overlay = str(path)


@dataclass
class AskRequest:
    """Questions about some pages of an open document (`pages` as for `ask`); `handle` is the caller's."""

    doc: Document
    questions: list[str]
    ids: list[str] | None = None
    pages: str | None = None
    handle: object = None


@dataclass
class _InFlight:
    """A request being answered: its pages, the candidates found so far, the pairs still to go."""

    request: AskRequest
    input_info: InputInfo
    ids: list[str]
    questions: list[str]
    texts: list[str]
    candidates: list[dict[int, _Candidate]]
    remaining: int
    warnings: list[str] = field(default_factory=list)
    failed: bool = False


@dataclass
class _Pair:
    flight: _InFlight
    page: _EncodedPage
    question: int


class _Batcher:
    """Queues (page, question) pairs from requests as their pages are encoded and answers them
    `batch_size` at a time; a request is finished when its last pair is answered."""

    def __init__(self, qz: QZoom, settings: ZoomSettings, budget: VisualBudget, max_new_tokens: int,
                 instruction: str, batch_size: int, overlay_dir: str | Path | None):
        self.qz, self.settings, self.budget = qz, settings, budget
        self.max_new_tokens, self.instruction, self.batch_size = max_new_tokens, instruction, batch_size
        self.overlay_dir = Path(overlay_dir) if overlay_dir is not None else None
        self.queue: list[_Pair] = []

    def add(self, request: AskRequest) -> Iterator[tuple[AskRequest, list[Result] | Exception]]:
        try:
            flight = self._start(request)
        except QZoomError as exc:
            yield request, exc
            return
        selected = flight.input_info.pages
        for index, number in enumerate(selected):
            if index + 1 < len(selected):
                request.doc.render_ahead(selected[index + 1])
            try:
                page = self.qz._encode_page_with_retry(request.doc, number, self.budget)
            except Exception as exc:  # this request stops here; the others carry on
                yield from self._fail([flight], exc)
                return
            flight.warnings.extend(page.warnings)
            self.queue.extend(_Pair(flight, page, q) for q in range(len(flight.texts)))
            while len(self.queue) >= self.batch_size:
                yield from self._answer()

    def flush(self) -> Iterator[tuple[AskRequest, list[Result] | Exception]]:
        while self.queue:
            yield from self._answer()

    def _start(self, request: AskRequest) -> _InFlight:
        questions = check_questions(request.questions)
        ids = request.ids or [f"q{i}" for i in range(1, len(questions) + 1)]
        if len(ids) != len(questions):
            raise UsageError("one id per question is needed")
        doc = request.doc
        selected = parse_page_spec(request.pages, doc.page_count)
        info = InputInfo(file=doc.source, sha256=doc.sha256, kind=doc.kind, pages=selected, dpi=doc.dpi,
                         warnings=list(doc.warnings))
        texts = [with_instruction(q, self.instruction) for q in questions]
        return _InFlight(request, info, ids, questions, texts, [{} for _ in questions],
                         len(selected) * len(questions))

    def _answer(self) -> Iterator[tuple[AskRequest, list[Result] | Exception]]:
        """The next `batch_size` queued pairs (or what is left) in one engine batch."""
        pairs, self.queue = self.queue[:self.batch_size], self.queue[self.batch_size:]
        items = [(pair.page.view, pair.flight.texts[pair.question]) for pair in pairs]
        try:
            answers = self.qz.engine.answer_batch(items, self.settings, self.max_new_tokens)
        except torch.OutOfMemoryError:
            self.qz._release_memory()
            numbers = sorted({pair.page.view.number for pair in pairs})
            error = OutOfMemory(f"out of memory answering page(s) {', '.join(map(str, numbers))}; lower "
                                "--batch-size, --max-visual-tokens or --roi-max-visual-tokens")
            yield from self._fail(_flights(pairs), error)
            return
        except Exception as exc:  # every request in this batch fails with it; the rest carry on
            yield from self._fail(_flights(pairs), exc)
            return
        for pair, answer in zip(pairs, answers, strict=True):
            flight, page = pair.flight, pair.page
            share = len(flight.texts)  # the page's rendering and encoding are split between its questions
            answer.time.render_s += page.time.render_s / share
            answer.time.preprocess_s += page.time.preprocess_s / share
            flight.candidates[pair.question][page.view.number] = _Candidate(answer, page.view, *self.qz._text(answer.generation))
            flight.remaining -= 1
            if flight.remaining == 0:
                yield flight.request, self._finish(flight)

    def _finish(self, flight: _InFlight) -> list[Result] | Exception:
        pages = flight.input_info.pages
        memory = peak_memory(self.qz.runtime.device)
        per_question = [[found[number] for number in pages] for found in flight.candidates]
        results = [self.qz._result(qid, q, flight.input_info, self.budget, per_page, memory, flight.warnings,
                                   self.settings)
                   for qid, q, per_page in zip(flight.ids, flight.questions, per_question, strict=True)]
        if self.overlay_dir is not None:
            try:
                self.qz._write_overlays(flight.request.doc, results, per_question, self.overlay_dir)
            except OSError as exc:  # the answers stand; the record and the exit code say what is missing
                for result in results:
                    if result.zoom.overlay is None:
                        result.warnings.append(f"overlay not written into {self.overlay_dir}: {exc.strerror or exc}")
            except Exception as exc:
                return exc
        return results

    def _fail(self, flights: list[_InFlight], error: Exception
              ) -> Iterator[tuple[AskRequest, list[Result] | Exception]]:
        failing = [f for f in flights if not f.failed]
        for flight in failing:
            flight.failed = True
        self.queue = [pair for pair in self.queue if not pair.flight.failed]
        for flight in failing:
            yield flight.request, error


def _flights(pairs: list[_Pair]) -> list[_InFlight]:
    return list({id(pair.flight): pair.flight for pair in pairs}.values())
