"""The library API: load a model once, ask questions about documents, get `Result` records.

    from qzoom_cli import QZoom
    qz = QZoom.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct")
    [result] = qz.ask("invoice.pdf", "What is the total due?")
    print(result.answer, result.page)

Every selected page answers every question; the page whose answer the model is most confident
about wins (score: mean log-probability of the generated tokens, see `decode.Generation.score`).
Pages are rendered and encoded one at a time, so memory does not grow with document length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backbones import Backbone, load_backbone
from .budget import VisualBudget, resize_to_budget
from .cards import GENERIC_BUDGET, ModelCard, default_card, find_card
from .decode import Generation, greedy_decode, prefill
from .documents import DEFAULT_DPI, Document, open_document, parse_page_spec
from .errors import OutOfMemory, UsageError
from .results import BudgetInfo, Candidate, InputInfo, ModelInfo, Result, Stats, Timings
from .runtime import Runtime, peak_memory, reset_peak_memory, resolve_runtime, synchronize

SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
DEFAULT_MAX_NEW_TOKENS = 64

__all__ = ["QZoom", "SHORT_ANSWER_INSTRUCTION", "DEFAULT_MAX_NEW_TOKENS"]


@dataclass
class _PageAnswer:
    """One page's answer to one question, with the time this question spent on it."""

    page: int
    generation: Generation
    text: str
    visual_tokens: int
    prompt_tokens: int
    time: Timings


@dataclass
class _EncodedPage:
    number: int
    features: torch.Tensor
    grid: tuple[int, int]
    time: Timings
    warnings: list[str] = field(default_factory=list)


def check_questions(questions: str | list[str]) -> list[str]:
    questions = [questions] if isinstance(questions, str) else list(questions)
    if not questions:
        raise UsageError("no question given")
    for question in questions:
        if not question or not question.strip():
            raise UsageError("empty question: ask something about the document")
    return [q.strip() for q in questions]


class QZoom:
    """A loaded model ready to answer questions about documents."""

    def __init__(self, backbone: Backbone, runtime: Runtime, card: ModelCard | None = None):
        self.backbone = backbone
        self.runtime = runtime
        self.card = card

    @classmethod
    def from_pretrained(cls, model: str | Path | None = None, *, revision: str | None = None,
                        device: str | None = "auto", dtype: str | None = "auto",
                        attn: str | None = "auto") -> QZoom:
        """Load a hub id or local checkpoint directory (default: the default model card's id)."""
        card = default_card() if model is None else find_card(str(model))
        ref = card.id if model is None else str(model)
        runtime = resolve_runtime(device, dtype, attn)
        return cls(load_backbone(ref, runtime, revision), runtime, card)

    @property
    def default_budget(self) -> VisualBudget:
        if self.card is not None:
            return VisualBudget(self.card.min_visual_tokens, self.card.max_visual_tokens)
        return VisualBudget(*GENERIC_BUDGET)

    def resolve_budget(self, min_tokens: int | None = None, max_tokens: int | None = None) -> VisualBudget:
        """The default budget with the given bounds replaced; a lone bound drags the other along."""
        default = self.default_budget
        if min_tokens is None and max_tokens is None:
            return default
        if min_tokens is None:
            min_tokens = min(default.min_tokens, max_tokens)
        if max_tokens is None:
            max_tokens = max(default.max_tokens, min_tokens)
        return VisualBudget(min_tokens, max_tokens)

    def model_info(self) -> ModelInfo:
        bb = self.backbone
        return ModelInfo(id=bb.model_id if self.card is None else self.card.id, revision=bb.revision,
                         family=bb.family, device=str(self.runtime.device), dtype=self.runtime.dtype_name,
                         attn=self.runtime.attn)

    def ask(self, document: str | Path | bytes | Document, questions: str | list[str], *,
            pages: str | None = None, dpi: int = DEFAULT_DPI, password: str | None = None,
            budget: VisualBudget | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
            instruction: str = SHORT_ANSWER_INSTRUCTION, ids: list[str] | None = None) -> list[Result]:
        """Answer each question about the document; one `Result` per question, in order."""
        questions = check_questions(questions)
        if max_new_tokens < 1:
            raise UsageError("--max-new-tokens must be at least 1")
        ids = ids or [f"q{i}" for i in range(1, len(questions) + 1)]
        if len(ids) != len(questions):
            raise UsageError("one id per question is needed")
        budget = budget or self.default_budget
        doc = document if isinstance(document, Document) else open_document(document, password=password, dpi=dpi)
        try:
            selected = parse_page_spec(pages, doc.page_count)
            input_info = InputInfo(file=doc.source, sha256=doc.sha256, kind=doc.kind, pages=selected,
                                   dpi=doc.dpi, warnings=list(doc.warnings))
            reset_peak_memory(self.runtime.device)
            answers: list[list[_PageAnswer]] = [[] for _ in questions]
            warnings: list[str] = []
            for number in selected:
                page = self._encode_page_with_retry(doc, number, budget)
                warnings.extend(page.warnings)
                for i, question in enumerate(questions):
                    answers[i].append(self._answer_page(page, question, instruction, max_new_tokens,
                                                        share=len(questions)))
            memory = peak_memory(self.runtime.device)
            return [self._result(qid, q, input_info, budget, per_page, memory, warnings)
                    for qid, q, per_page in zip(ids, questions, answers, strict=True)]
        finally:
            if doc is not document:
                doc.close()

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
        resized = resize_to_budget(image, bb.patch_factor, budget)
        del image
        features = bb.encode_image(resized)
        synchronize(self.runtime.device)
        grid = (resized.height // bb.patch_factor, resized.width // bb.patch_factor)
        return _EncodedPage(number, features, grid,
                            Timings(render_s=rendered - start, preprocess_s=time.perf_counter() - rendered))

    def _answer_page(self, page: _EncodedPage, question: str, instruction: str, max_new_tokens: int,
                     share: int) -> _PageAnswer:
        """Prefill and decode one question on an encoded page; shared page work is split `share` ways."""
        bb = self.backbone
        text = f"{question}\n{instruction}" if instruction else question
        start = time.perf_counter()
        prompt = bb.build_prompt(text, [page.grid])
        embeds = bb.embed_prompt(prompt, [page.features])
        positions = bb.position_ids(prompt)
        cache = bb.new_cache()
        try:
            logits = prefill(bb, embeds, positions, cache)
            synchronize(self.runtime.device)
            prefill_s = time.perf_counter() - start
            generation = greedy_decode(bb, logits, cache, positions, max_new_tokens)
        except torch.OutOfMemoryError:
            del cache
            self._release_memory()
            raise OutOfMemory(f"out of memory answering on page {page.number} ({prompt.length} prompt tokens); "
                              "lower --max-visual-tokens") from None
        answer_ids = generation.token_ids[:-1] if generation.finished else generation.token_ids
        timings = Timings(render_s=page.time.render_s / share, preprocess_s=page.time.preprocess_s / share,
                          prefill_s=prefill_s, decode_s=generation.decode_s)
        return _PageAnswer(page.number, generation, bb.decode_text(answer_ids), page.grid[0] * page.grid[1],
                           prompt.length, timings)

    def _result(self, qid: str, question: str, input_info: InputInfo, budget: VisualBudget,
                per_page: list[_PageAnswer], memory: tuple[float, str], warnings: list[str]) -> Result:
        best = max(per_page, key=lambda a: a.generation.score)  # ties: the first page in selection order
        total = Timings()
        for answer in per_page:
            total.add(answer.time)
        output_tokens = len(best.generation.token_ids)
        decode_s = best.time.decode_s
        truncated = not best.generation.finished
        result_warnings = list(warnings)
        if truncated:
            result_warnings.append(f"answer stopped at the --max-new-tokens limit ({output_tokens} tokens)")
        return Result(
            id=qid, status="truncated" if truncated else "ok", input=input_info, question=question,
            answer=best.text, page=best.page,
            candidates=[Candidate(page=a.page, answer=a.text, score=round(a.generation.score, 6),
                                  output_tokens=len(a.generation.token_ids), visual_tokens=a.visual_tokens,
                                  truncated=not a.generation.finished) for a in per_page],
            model=self.model_info(),
            budget=BudgetInfo(min_tokens=budget.min_tokens, max_tokens=budget.max_tokens,
                              visual_tokens=best.visual_tokens),
            stats=Stats(latency_s=round(total.total, 6), visual_tokens=best.visual_tokens,
                        prompt_tokens=best.prompt_tokens, output_tokens=output_tokens,
                        tokens_per_s=round(output_tokens / decode_s, 3) if decode_s > 0 else 0.0,
                        total_visual_tokens=sum(a.visual_tokens for a in per_page),
                        total_prompt_tokens=sum(a.prompt_tokens for a in per_page),
                        peak_mem_gib=round(memory[0], 3), peak_mem_source=memory[1], time=total),
            warnings=result_warnings,
        )

