"""The stock baseline: transformers' `generate()` on the same manifest rows (`qzoom bench --modes stock`).

What a transformers user runs on a page: render, resize to the budget's grid, the stock image
processor and greedy `generate()` with transformers' own attention kernels (sampling and
repetition settings of the checkpoint switched off, so its tokens are comparable), on the prompt
qzoom builds. Every page of a row is answered and the most likely answer kept, as qzoom does, so
`stock` and `never` differ only in the engine. (page, question) pairs are batched `batch_size` at a time, left-padded, and a batch's
time is shared evenly between its pairs. Records have the `qzoom.result/v1` shape (decoder
`generate`, never zoomed), so one summary serves every mode.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from .api import QZoom
from .backbones import Prompt
from .batch import RunOptions, document_groups, error_fields, error_result
from .budget import VisualBudget
from .decode import Generation, until_end
from .documents import open_document, parse_page_spec
from .errors import QZoomError
from .manifest import ManifestRow, RowError
from .options import with_instruction
from .results import BudgetInfo, Candidate, InputInfo, Result, Stats, Timings, ZoomInfo, decode_speed
from .runtime import peak_memory, reset_peak_memory, synchronize

DECODER = "generate"


@dataclass
class _PageAnswer:
    generation: Generation
    text: str
    reasoning: str | None
    visual_tokens: int
    prompt_tokens: int
    time: Timings


@dataclass
class _Row:
    row: ManifestRow
    info: InputInfo
    answers: dict[int, _PageAnswer] = field(default_factory=dict)
    failed: bool = False


@dataclass
class _Pair:
    state: _Row
    page: int
    image: Image.Image  # fitted to the budget
    visual_tokens: int
    prompt: Prompt
    render_s: float
    fit_s: float


def left_padded(samples: list[dict], pad: int) -> dict:
    """Single-sample stock inputs as one batch: per-token entries (ids, mask, token types) padded
    on the left, image entries concatenated, whatever the family's processor returns."""
    width = max(sample["input_ids"].shape[1] for sample in samples)
    batch = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        if values[0].shape != samples[0]["input_ids"].shape:
            batch[key] = torch.cat(values)
            continue
        fill = pad if key == "input_ids" else 0
        batch[key] = torch.cat([torch.nn.functional.pad(v, (width - v.shape[1], 0), value=fill) for v in values])
    return batch


class _FirstToken:
    """A `generate()` streamer that notes when the first new token arrives (its first call is the prompt)."""

    def __init__(self):
        self.calls, self.at = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def stock_rows(qz: QZoom, rows: list[ManifestRow | RowError], options: RunOptions,
               emit: Callable[[int, Result], None]) -> None:
    """`batch.answer_rows` with stock `generate()` in place of qzoom's engine (zoom settings ignored)."""
    bb = qz.backbone
    budget = bb.read_budget(options.budget or qz.default_budget("never"))
    max_new_tokens = qz.default_max_new_tokens() if options.max_new_tokens is None else options.max_new_tokens
    batch_size = qz.resolve_batch_size(options.batch_size, budget, max_new_tokens, "never")
    queue: list[_Pair] = []
    reset_peak_memory(qz.runtime.device)  # as `ask_many` does: each run reports its own peak

    def answer_queued(keep: int) -> None:
        """Answer batches of queued pairs until at most `keep` wait."""
        while len(queue) > keep:
            pairs = queue[:batch_size]
            del queue[:batch_size]
            try:
                answers = _generate(qz, pairs, max_new_tokens)
            except Exception as exc:  # the rows of this batch fail with it; the rest carry on
                code, message = error_fields(exc, options.verbose)
                for state in {id(p.state): p.state for p in pairs}.values():
                    _fail(state, code, message, emit)
                continue
            for pair, page_answer in zip(pairs, answers, strict=True):
                pair.state.answers[pair.page] = page_answer
                if len(pair.state.answers) == len(pair.state.info.pages):  # never, once a page has failed
                    emit(pair.state.row.index, _result(qz, pair.state, budget))

    for row in rows:
        if isinstance(row, RowError):
            emit(row.index, error_result(row, row.code, row.message))
    for group in document_groups(r for r in rows if isinstance(r, ManifestRow)):
        try:
            doc = open_document(group[0].file, password=group[0].password, dpi=options.dpi)
        except QZoomError as exc:
            for row in group:
                emit(row.index, error_result(row, exc.code, exc.message))
            continue
        with doc:
            for row in group:
                try:
                    pages = parse_page_spec(row.pages, doc.page_count)
                    state = _Row(row, InputInfo(file=doc.source, sha256=doc.sha256, kind=doc.kind, pages=pages,
                                                dpi=doc.dpi, warnings=list(doc.warnings)))
                    text = with_instruction(row.question, options.instruction)
                    queue.extend(_prepare(qz, doc, number, budget, text, state) for number in pages)
                except QZoomError as exc:
                    emit(row.index, error_result(row, exc.code, exc.message))
                    continue
                answer_queued(keep=batch_size - 1)
    answer_queued(keep=0)


def _fail(state: _Row, code: str, message: str, emit: Callable[[int, Result], None]) -> None:
    if not state.failed:
        state.failed = True
        emit(state.row.index, error_result(state.row, code, message))


def _prepare(qz: QZoom, doc, number: int, budget: VisualBudget, text: str, state: _Row) -> _Pair:
    bb = qz.backbone
    start = time.perf_counter()
    page = doc.render(number)
    rendered = time.perf_counter()
    image = bb.fit_image(page, budget)
    grid = bb.image_grid(image.size, budget)
    prompt = bb.build_prompt(text, [grid])
    return _Pair(state, number, image, grid[0] * grid[1], prompt, rendered - start, time.perf_counter() - rendered)


@torch.inference_mode()
def _generate(qz: QZoom, pairs: list[_Pair], max_new_tokens: int) -> list[_PageAnswer]:
    bb = qz.backbone
    device = bb.device
    start = time.perf_counter()
    inputs = left_padded([bb.stock_inputs(p.prompt, [p.image]) for p in pairs], bb.tokenizer.pad_token_id)
    prepared = time.perf_counter()
    first = _FirstToken()
    with bb.stock_attention():
        out = bb.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.0,
                                eos_token_id=bb.eos_token_ids, pad_token_id=bb.tokenizer.pad_token_id,
                                output_scores=True, return_dict_in_generate=True, streamer=first)
    synchronize(device)
    end = time.perf_counter()
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    logprobs = torch.stack([torch.log_softmax(step.float(), dim=-1).gather(1, tokens[:, i:i + 1])[:, 0]
                            for i, step in enumerate(out.scores)], dim=1)
    share = len(pairs)
    eos = set(bb.eos_token_ids)
    answers = []
    for pair, row_tokens, row_logprobs in zip(pairs, tokens.tolist(), logprobs.tolist(), strict=True):
        generation = until_end(row_tokens, row_logprobs, eos, (end - first.at) / share)
        text, reasoning = qz._text(generation)
        timings = Timings(render_s=pair.render_s, preprocess_s=pair.fit_s + (prepared - start) / share,
                          coarse_prefill_s=(first.at - prepared) / share, decode_s=generation.decode_s)
        answers.append(_PageAnswer(generation, text, reasoning, pair.visual_tokens, pair.prompt.length, timings))
    return answers


def _result(qz: QZoom, state: _Row, budget: VisualBudget) -> Result:
    pages = state.info.pages
    answers = [state.answers[number] for number in pages]
    best_index = max(range(len(answers)), key=lambda i: answers[i].generation.score)  # ties: first
    best = answers[best_index]
    total = Timings()
    for page_answer in answers:
        total.add(page_answer.time)
    output_tokens = len(best.generation.token_ids)
    total_output = sum(len(a.generation.token_ids) for a in answers)
    truncated = not best.generation.finished
    memory = peak_memory(qz.runtime.device)
    return Result(
        id=state.row.id, status="truncated" if truncated else "ok", input=state.info, question=state.row.question,
        answer=best.text, reasoning=best.reasoning, page=pages[best_index],
        candidates=[Candidate(page=number, answer=a.text, score=round(a.generation.score, 6),
                              output_tokens=len(a.generation.token_ids), visual_tokens=a.visual_tokens,
                              truncated=not a.generation.finished)
                    for number, a in zip(pages, answers, strict=True)],
        zoom=ZoomInfo(mode="never"),
        model=dataclasses.replace(qz.model_info(), decoder=DECODER),
        budget=BudgetInfo(min_tokens=budget.min_tokens, max_tokens=budget.max_tokens, visual_tokens=best.visual_tokens),
        stats=Stats(latency_s=round(total.total, 6), visual_tokens=best.visual_tokens,
                    coarse_visual_tokens=best.visual_tokens, region_visual_tokens=0,
                    baseline_visual_tokens=best.visual_tokens, prompt_tokens=best.prompt_tokens,
                    output_tokens=output_tokens,
                    tokens_per_s=decode_speed(total_output, total.decode_s),
                    total_visual_tokens=sum(a.visual_tokens for a in answers),
                    total_prompt_tokens=sum(a.prompt_tokens for a in answers),
                    total_output_tokens=total_output,
                    peak_mem_gib=round(memory[0], 3), peak_mem_source=memory[1], time=total.rounded()),
        warnings=[f"answer stopped at the --max-new-tokens limit ({output_tokens} tokens)"] if truncated else [],
    )
