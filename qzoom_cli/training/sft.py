"""Targeted fine-tuning's training: LoRA weights on the decoder layers, learned from the fused
sequence inference reads (page, then the region spliced in with the adapter's position scheme)
followed by the answer to learn, with the cross-entropy on the answer's tokens only.

Built from the engine's own pieces (`region_on_page`, `PageView.read_region`, `fuse_region`), so
what is learned is exactly what `ask` reads; the answer's positions are those greedy decoding
gives its tokens.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..api import QZoom
from ..backbones import Backbone, ModelInputs
from ..budget import VisualBudget
from ..errors import AdapterMismatch
from ..zoom.adapter import ZoomAdapter
from ..zoom.fuse import FusedInputs, fuse_region
from ..zoom.geometry import Box, region_on_page
from ..zoom.lora import LORA_FOLDER, check_untuned, import_peft
from ..zoom.pipeline import PageView
from .data import TrainSample
from .loop import StepReport, Trainer, TrainOptions, latest_checkpoint, reading_checkpoint
from .mining import Mined, is_right
from .rpn import _Pages, answer_instruction, prompt_text
from .saved import writing
from .settings import SEED, LoraSettings
from .teacher import with_answer


def decoder_pattern(backbone: Backbone, targets: tuple[str, ...]) -> str:
    """A regex matching exactly the `targets` linear layers of the base decoder layers (never the
    vision tower's, never the zoom branches', which live outside the base model)."""
    prefix = next((name for name, module in backbone.model.named_modules() if module is backbone.decoder_layers), None)
    if prefix is None:
        raise AdapterMismatch(f"{backbone.family}: the decoder layers are not part of the model")
    leaves = "|".join(re.escape(t) for t in targets)
    return rf"{re.escape(prefix)}\.\d+\.(?:.*\.)?(?:{leaves})"


def attach_lora(backbone: Backbone, settings: LoraSettings, resume_from: Path | None = None) -> torch.nn.Module:
    """The base model with fresh LoRA layers on its decoder (B = 0: it still answers as before),
    or with the trainable LoRA weights of `resume_from` (a checkpoint's `lora/`; the trainer refuses
    one made with other settings); returns peft's wrapper, whose `save_pretrained` writes the LoRA weights."""
    check_untuned(backbone)
    peft = import_peft()
    if resume_from is not None:
        with reading_checkpoint(resume_from.parent):
            return peft.PeftModel.from_pretrained(backbone.model, resume_from, is_trainable=True)
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=decoder_pattern(backbone, settings.targets))
    return peft.get_peft_model(backbone.model, config)


def fused_prompt(backbone: Backbone, page: PageView, text: str, box: Box, region_budget: VisualBudget,
                 aligned: bool) -> FusedInputs | None:
    """The page and the region `box` (token grid cells of the page) read at `region_budget`, as one
    prompt; None when the box lies off the page (in the padding around it)."""
    region_px = region_on_page(box, page.grid, page.size, backbone.layout.min_region_side, backbone.layout.canvas)
    if region_px is None:
        return None
    coarse = backbone.build_prompt(text, [page.grid])
    region = page.read_region(region_px, region_budget, backbone)
    return fuse_region(backbone, text, coarse, page.encoding, region, box, aligned)


def answer_token_ids(backbone: Backbone, answer: str) -> list[int]:
    """The answer as the model generates it: its text's tokens, then the end-of-answer token."""
    return backbone.tokenizer.encode(answer, add_special_tokens=False) + [backbone.eos_token_ids[0]]


def answer_loss(backbone: Backbone, inputs: ModelInputs, answer_ids: list[int]) -> torch.Tensor:
    """Mean cross-entropy of the answer's tokens, each predicted from everything before it."""
    hidden = backbone.run_layers(inputs.embeds, inputs.positions, None, 0,
                                 backbone.num_layers,  # pragma: no mutate (a stop of None runs to the top too)
                                 None, inputs.additions)
    start = inputs.length - len(answer_ids)
    logits = backbone.logits(hidden[:, start - 1:-1])[0]
    targets = torch.tensor(answer_ids, device=logits.device)  # pragma: no mutate (CPU: every tensor is there)
    return F.cross_entropy(logits.float(), targets)


@dataclass(frozen=True)
class SftSettings:
    budget: VisualBudget                  # the coarse page read (and, unless region_budget, the region's)
    region_budget: VisualBudget | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)
    box_noise: float = 0.0                # chance a visit reads a random box instead of the mined one
    free_answers: bool = False
    dpi: int = 200
    seed: int = SEED


def noisy_box(box: Box, grid: tuple[int, int], chance: float, rng: random.Random) -> Box:
    """With probability `chance` a random box whose sides are 10-60% of the grid's (the published
    robustness noise), else `box`."""
    if rng.random() >= chance:  # pragma: no mutate (`>` differs with probability zero)
        return box
    rows, cols = grid
    height, width = (max(1, round(rng.uniform(0.1, 0.6) * n)) for n in (rows, cols))
    y0, x0 = rng.randrange(rows - height + 1), rng.randrange(cols - width + 1)
    return Box(x0, y0, x0 + width, y0 + height)


def train_sft(qz: QZoom, adapter: ZoomAdapter, samples: dict[str, TrainSample], mined: list[Mined],
              settings: SftSettings, options: TrainOptions, out_dir: Path,
              on_step: Callable[[StepReport], None] = lambda report: None) -> tuple[torch.nn.Module, list[float]]:
    """LoRA on the decoder layers, learned on the mined pairs' fused sequences (the answer that was
    right, teacher-forced); everything else frozen. Writes the adapter with its `lora/` into
    `out_dir` (resuming from its newest checkpoint); returns peft's model and the loss of each step."""
    backbone = qz.backbone
    backbone.freeze()
    torch.manual_seed(settings.seed)  # the LoRA's first weights and its dropout masks
    checkpoint = latest_checkpoint(out_dir)
    model = attach_lora(backbone, settings.lora, None if checkpoint is None else checkpoint / LORA_FOLDER)
    if options.gradient_checkpointing:
        backbone.model.activation_checkpointing_enable(
            {"use_reentrant": False})  # pragma: no mutate (None: transformers 5's default is non-reentrant too)
    region_budget = settings.region_budget or settings.budget
    pages = _Pages(settings.dpi)
    by_key = {m.key: m for m in mined}

    def save(folder: Path) -> None:
        adapter.save_pretrained(folder)
        model.save_pretrained(Path(folder) / LORA_FOLDER)

    def loss_fn(module, batch: list[str], epoch: int) -> torch.Tensor:
        total = None
        for key in batch:
            pair, sample = by_key[key], samples[key]
            page = qz.page_view(pages.document(sample), sample.page, settings.budget)
            rng = random.Random(f"{settings.seed}|{key}|{epoch}")
            box = noisy_box(Box(*pair.box), page.grid, settings.box_noise, rng)
            fused = fused_prompt(backbone, page, prompt_text(sample.question, settings.free_answers), box,
                                 region_budget, adapter.config.reuse_src_pos)
            if fused is None:
                continue
            answer = answer_token_ids(backbone, pair.target)
            loss = answer_loss(backbone, with_answer(backbone, fused.inputs, answer), answer) / len(batch)
            total = loss if total is None else total + loss
        return total if total is not None else sum(p.sum() * 0.0 for p in module.parameters() if p.requires_grad)

    trainer = Trainer(model, options, out_dir, save,
                      backbone.dtype,  # pragma: no mutate (the base dtype matters only on a GPU: autocast)
                      {"lora": asdict(settings.lora), "box_noise": settings.box_noise,
                       "free_answers": settings.free_answers, "aligned": adapter.config.reuse_src_pos})
    try:
        losses = trainer.train(sorted(by_key), loss_fn, on_step)
    finally:
        pages.close()
    if trainer.is_main:
        with writing(out_dir):
            save(out_dir)
    return model, losses


def split_held_out(mined: list[Mined], fraction: float, seed: int) -> tuple[list[Mined], list[Mined]]:
    """(to train on, held out): a `fraction` of the pairs (in [0, 1): FineTuneSettings checks it),
    drawn with `seed`, kept apart to measure."""
    shuffled = random.Random(seed).sample(mined, len(mined))
    cut = round(len(mined) * fraction)
    return sorted(shuffled[cut:], key=lambda m: m.key), sorted(shuffled[:cut], key=lambda m: m.key)


def held_out_accuracy(qz: QZoom, pairs: list[Mined], samples: dict[str, TrainSample], settings: SftSettings,
                      max_new_tokens: int, metric: str = "auto") -> float | None:
    """Share of `pairs` the zoomed read now answers right (as `ask --zoom always` at the training
    budget answers them), judged against each pair's references; None without pairs."""
    if not pairs:
        return None
    right = 0
    for pair in pairs:
        sample = samples[pair.key]
        [result] = qz.ask(sample.file, sample.question, pages=str(sample.page), password=sample.password,
                          dpi=settings.dpi, zoom="always", budget=settings.budget, max_new_tokens=max_new_tokens,
                          instruction=answer_instruction(settings.free_answers))
        right += is_right(result.answer, list(pair.references), metric)
    return right / len(pairs)
