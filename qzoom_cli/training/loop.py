"""What both trainers share: options, the optimiser and schedule, accumulation, checkpoints.

Optimiser and schedule follow the reference scripts: AdamW (betas 0.9/0.999, eps 1e-8, no
weight decay), peak learning rate with 3% linear warm-up then cosine decay to 0, gradients
clipped at norm 1. Runs under `accelerate` so `accelerate launch` trains on several GPUs
(data parallel: each process takes every world-size-th batch, and one short of batches takes the
epoch's first ones again so that all take the same steps; gradients are averaged).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..errors import ResumeMismatch
from ..options import changed_settings
from .saved import reading_back, writing
from .settings import TrainOptions

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.pt"
_AUTOCAST = {torch.bfloat16: "bf16", torch.float16: "fp16"}  # pragma: no mutate (precisions only a GPU uses)


@dataclass
class StepReport:
    step: int
    total_steps: int
    loss: float
    samples_per_s: float
    lr: float


def enable_gradient_checkpointing(layers: nn.ModuleList) -> None:
    """Recompute each branch layer in the backward pass instead of keeping its activations."""
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)


def _accelerator(base_dtype: torch.dtype):
    """Autocast in the base model's half precision on a GPU; plain float32 on a CPU."""
    from accelerate import Accelerator

    if torch.cuda.is_available():  # pragma: no mutate (tests run on a CPU: only a GPU takes this branch)
        return Accelerator(mixed_precision=_AUTOCAST.get(base_dtype, "no"))  # pragma: no mutate (only a GPU runs it)
    return Accelerator(cpu=True)  # pragma: no mutate (without a GPU every device choice is the CPU)


def cosine_with_warmup(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def batches(items: list, batch_size: int, epoch: int, seed: int) -> Iterator[list]:
    order = list(range(len(items)))
    random.Random(seed + epoch).shuffle(order)  # pragma: no mutate (any per-epoch seed: no promise pins the order)
    for start in range(0, len(order), batch_size):
        yield [items[i] for i in order[start:start + batch_size]]


class Trainer:
    """Optimises `module` with `loss_fn(batch) -> loss` over epochs of shuffled batches."""

    def __init__(self, module: nn.Module, options: TrainOptions, out_dir: Path,
                 save_adapter: Callable[[Path], None], base_dtype: torch.dtype, settings: dict | None = None):
        """Trainable weights are kept in float32; with a bf16/fp16 base on a GPU the forward runs
        under autocast in that precision. `settings`: what else the steps depend on (a resume
        with other values is refused, as with other options)."""
        self.options = options
        self.out_dir = out_dir
        self.save_adapter = save_adapter
        self.settings = json.loads(json.dumps(settings or {}))
        self.accelerator = _accelerator(base_dtype)  # pragma: no mutate (only a GPU reads the dtype)
        for parameter in module.parameters():  # only what is learned: a frozen base keeps its dtype
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
        params = [p for p in module.parameters() if p.requires_grad]
        # torch's default betas (0.9, 0.999) and eps (1e-8) are the reference's
        self.optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
        self.module, self.optimizer = self.accelerator.prepare(module, self.optimizer)
        self.step = 0
        self.losses: list[float] = []

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def train(self, items: list, loss_fn: Callable[[nn.Module, list, int], torch.Tensor],
              on_step: Callable[[StepReport], None] = lambda report: None) -> list[float]:
        """`loss_fn(module, batch, epoch)`; returns the loss of every optimiser step (averaged over
        its micro-batches). Every `grad_accum` micro-batches make a step, and so do the last few
        when fewer are left (a run with fewer micro-batches than `grad_accum` still takes one)."""
        options, accelerator = self.options, self.accelerator
        world, rank = accelerator.num_processes, accelerator.process_index
        per_epoch = math.ceil(len(items) / options.batch_size / world)  # every process alike (collectives match)
        micro_batches = per_epoch * options.epochs
        total = math.ceil(micro_batches / options.grad_accum)
        scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_with_warmup(total, options.warmup_ratio))
        self.plan = {**{k: v for k, v in options_dict(options).items() if k not in _FREE_ON_RESUME},
                     "samples": len(items), "processes": world, **self.settings}
        start_step = self._resume(scheduler)
        micro, window, seen, clock = 0, [], 0, time.perf_counter()
        self.module.train()
        for epoch in range(options.epochs):
            shuffled = list(batches(items, options.batch_size, epoch, options.seed))
            for k in range(per_epoch):
                batch = shuffled[(k * world + rank) % len(shuffled)]  # short: the epoch's first again
                micro += 1
                if micro <= start_step * options.grad_accum:
                    continue  # already done before the checkpoint we resumed from
                window_start = (micro - 1) // options.grad_accum * options.grad_accum
                window_size = min(options.grad_accum, micro_batches - window_start)
                steps_now = micro == window_start + window_size
                with self._sync_if(steps_now):  # pragma: no mutate (one process: syncs nothing either way)
                    loss = loss_fn(self.module, batch, epoch)
                    accelerator.backward(loss / window_size)
                window.append(float(loss.detach()))
                seen += len(batch)
                if steps_now:
                    accelerator.clip_grad_norm_(self.module.parameters(), options.max_grad_norm)
                    self.optimizer.step()
                    scheduler.step()
                    self.optimizer.zero_grad()
                    self.step += 1
                    self.losses.append(sum(window) / len(window))
                    window = []
                    elapsed = time.perf_counter() - clock
                    on_step(StepReport(self.step, total, self.losses[-1], seen * world / elapsed if elapsed else 0.0,
                                       scheduler.get_last_lr()[0]))
                    if options.save_every and self.step % options.save_every == 0:
                        self._checkpoint(scheduler)
        self.module.eval()
        return self.losses

    def _sync_if(self, steps_now: bool):
        """Gradients are averaged across processes once a window, at its step (a single process, as
        in every test, syncs nothing either way)."""
        return nullcontext() if steps_now else self.accelerator.no_sync(self.module)  # pragma: no mutate (1 process)

    def _checkpoint(self, scheduler) -> None:
        """Written beside its final name, then renamed: a crash or a full disk mid-save leaves no
        half checkpoint for the rerun to resume from."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            folder = self.out_dir / f"{CHECKPOINT_PREFIX}{self.step}"
            partial = self.out_dir / f".{folder.name}.partial"
            for stale in (partial, folder):  # a crash's leftover; a checkpoint of this step a resume redid
                if stale.exists():
                    shutil.rmtree(stale)
            with writing(folder):
                self.save_adapter(partial)
                torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "step": self.step, "losses": self.losses, "plan": self.plan, "rng": _rng_state()},
                           partial / TRAINER_STATE)
                partial.rename(folder)

    def _resume(self, scheduler) -> int:
        """Continue from the newest checkpoint in the output folder, if there is one."""
        checkpoint = latest_checkpoint(self.out_dir)
        if checkpoint is None:
            return 0
        with reading_checkpoint(checkpoint, TRAINER_STATE):
            state = torch.load(checkpoint / TRAINER_STATE, weights_only=True)  # pragma: no mutate (torch's default)
            before = state.get("plan", self.plan)
        changed = changed_settings(before, self.plan)
        if changed:
            raise ResumeMismatch(f"{checkpoint} was trained with other settings ({', '.join(changed)}): rerun "
                                 "with the same options and samples, or write to another --output")
        with reading_checkpoint(checkpoint, TRAINER_STATE):
            self.optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            self.step, self.losses = int(state["step"]), [float(loss) for loss in state["losses"]]
            rng = state.get("rng")  # dropout then draws the masks it would have drawn (older checkpoints: none saved)
            if rng is not None:
                torch.set_rng_state(rng["cpu"])
                if rng["cuda"] and torch.cuda.is_available():  # pragma: no mutate (only a GPU restores a GPU's state)
                    torch.cuda.set_rng_state_all(rng["cuda"])  # pragma: no mutate (only a GPU runs this)
        return self.step


# a resumed run may change these: they alter no step already taken (more epochs continue the run
# on the longer schedule); any other change would make the skipped steps differ from the ones done
_FREE_ON_RESUME = ("save_every", "gradient_checkpointing", "epochs")


def _rng_state() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}  # no GPU: an empty list


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest checkpoint a previous run of this output left (each one arrives whole)."""
    steps = [int(folder.name.removeprefix(CHECKPOINT_PREFIX)) for folder in out_dir.glob(f"{CHECKPOINT_PREFIX}*")
             if folder.name.removeprefix(CHECKPOINT_PREFIX).isdigit() and folder.is_dir()]
    return out_dir / f"{CHECKPOINT_PREFIX}{max(steps)}" if steps else None


def reading_checkpoint(checkpoint: Path, file: str | None = None):
    """Reading back a checkpoint (or one `file` of it): one that cannot be read is named, with the way past it."""
    return reading_back(checkpoint / file if file else checkpoint,
                        f"delete {checkpoint} and rerun to resume from the checkpoint before it (or from the start)")


def options_dict(options: TrainOptions) -> dict:
    return json.loads(json.dumps(asdict(options)))
