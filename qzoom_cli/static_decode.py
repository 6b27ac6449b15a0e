"""Greedy decoding on a preallocated KV cache, each step captured once as a CUDA graph and replayed.

The eager loop (`decode.greedy_decode_batch`) launches every kernel of every layer from Python
and reads each token back to the host; on a GPU that loop, not the matrix work, sets the pace.
Here the prompt's cache (however the prefill built it) is copied into a static cache sized
`prompt + max_new_tokens` (rounded up to a bucket, so one graph serves many prompts; a recurrent
layer's state is fixed-size and copied as it is); the step
(embed the last token, run every layer, pick the next token, write it into an output buffer,
advance the position and the cursor) only mutates tensors that live at fixed addresses, so it
is captured once per (batch, bucket) and replayed per token. The host reads one flag per step,
one step behind the GPU, to stop once every sample has ended: the GPU never waits for Python.

Without CUDA the same step runs uncaptured (what the CPU tests compare with the eager loop).
Tokens equal the eager loop's; a finished sample's surplus tokens are cut at its end token.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import Cache

from .backbones import Backbone
from .backbones.caches import allocate_static, load_static, static_cursor, static_step_state
from .decode import Decoder, EagerDecoder, Generation, pick_tokens, until_end
from .errors import first_line
from .runtime import synchronize

log = logging.getLogger("qzoom")

BUCKET = 256          # cache lengths are rounded up to this, so nearby prompt lengths share a graph
MAX_SESSIONS = 4      # captured (batch, bucket) sessions kept; each holds its own cache buffers


@dataclass
class _Session:
    """Everything one captured step reads and writes, at fixed addresses."""

    cache: Cache
    tokens: torch.Tensor      # [batch] the token fed to the next step
    positions: torch.Tensor   # [rows, batch, 1] its position ids
    visible: torch.Tensor     # [batch, capacity] which cache slots attention may read
    step: torch.Tensor        # [] the output column the next step writes
    out_tokens: torch.Tensor  # [batch, capacity]
    out_logprobs: torch.Tensor
    done: torch.Tensor        # [batch] whether the sample has produced an end token
    eos: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def cursor(self) -> torch.Tensor:
        """[] the cache slot the next step writes: the static cache's own length counter."""
        return static_cursor(self.cache)


def bucket(length: int) -> int:
    return -(-length // BUCKET) * BUCKET


class StaticDecoder:
    """Drop-in for `greedy_decode_batch` with a static cache and, on CUDA, graph replay."""

    def __init__(self, backbone: Backbone, capture: bool, fuse: bool = False, inductor_options: dict | None = None):
        self.backbone = backbone
        self.capture = capture
        self.fuse = fuse
        self.inductor_options = inductor_options
        self.sessions: OrderedDict[tuple, _Session] = OrderedDict()
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        # inductor fuses the step's small element-wise kernels (norms, rotary, activations) before
        # capture; shapes turn dynamic at the second bucket, so later buckets do not recompile.
        # `inductor_options` (torch.compile's `options`) are for benchmarks comparing inductor settings
        self._run_step = torch.compile(self._step, options=inductor_options) if fuse else self._step

    @property
    def name(self) -> str:
        base = "cuda_graphs" if self.capture else "static_cache"
        return base + "+inductor" if self.fuse else base

    @torch.inference_mode()
    def __call__(self, first_logits: torch.Tensor, cache: Cache, positions: torch.Tensor, max_new_tokens: int,
                 attention_mask: torch.Tensor | None = None) -> list[Generation]:
        start = time.perf_counter()
        session = self._session(cache, positions, max_new_tokens)
        self._load(session, cache, positions, attention_mask)
        if self.capture and session.graph is None:
            self._capture_or_fall_back(session)
        token, logprob = pick_tokens(first_logits)
        self._record(session, token, logprob)
        produced = 1
        previous = _AllDone(session.done)
        while produced < max_new_tokens:
            if session.graph is not None:
                session.graph.replay()
            else:
                self._run_step(session)
            produced += 1
            current = _AllDone(session.done)
            # with a graph, read the flag one step behind so the GPU always has the next step queued
            if (previous if session.graph is not None else current).value():
                break
            previous = current
        tokens = session.out_tokens[:, :produced].tolist()
        logprobs = session.out_logprobs[:, :produced].tolist()
        synchronize(first_logits.device)
        elapsed = (time.perf_counter() - start) / session.batch
        eos = set(self.backbone.eos_token_ids)
        return [until_end(row, row_logprobs, eos, elapsed)
                for row, row_logprobs in zip(tokens, logprobs, strict=True)]

    def _session(self, cache: Cache, positions: torch.Tensor, max_new_tokens: int) -> _Session:
        prompt = cache.get_seq_length()
        batch = positions.shape[1]
        key = (batch, bucket(prompt + max_new_tokens), positions.dtype, positions.shape[0])
        if key in self.sessions:
            self.sessions.move_to_end(key)
            return self.sessions[key]
        while len(self.sessions) >= MAX_SESSIONS:
            self.sessions.popitem(last=False)
        self.sessions[key] = self._new_session(cache, positions, key[1])
        return self.sessions[key]

    def _capture_or_fall_back(self, session: _Session) -> None:
        try:
            session.graph = self._capture(session)
        except RuntimeError as exc:
            log.warning("CUDA graph capture failed (%s); decoding on the static cache without capture",
                        first_line(exc))
            self.capture = False

    def _new_session(self, cache: Cache, positions: torch.Tensor, capacity: int) -> _Session:
        bb = self.backbone
        device, batch = positions.device, positions.shape[1]
        static = bb.new_static_cache(capacity)
        allocate_static(static, cache)
        return _Session(
            cache=static,
            tokens=torch.zeros(batch, dtype=torch.long, device=device),
            positions=torch.zeros(positions.shape[0], batch, 1, dtype=positions.dtype, device=device),
            visible=torch.zeros(batch, capacity, dtype=torch.bool, device=device),
            step=torch.zeros((), dtype=torch.long, device=device),
            out_tokens=torch.zeros(batch, capacity, dtype=torch.long, device=device),
            out_logprobs=torch.zeros(batch, capacity, dtype=torch.float32, device=device),
            done=torch.zeros(batch, dtype=torch.bool, device=device),
            eos=torch.tensor(bb.eos_token_ids, dtype=torch.long, device=device),
        )

    def _load(self, session: _Session, cache: Cache, positions: torch.Tensor,
              attention_mask: torch.Tensor | None) -> None:
        """Copy the prompt's cache in and reset every step input, in place (the graph keeps the addresses)."""
        prompt = cache.get_seq_length()
        load_static(session.cache, cache)
        session.visible.zero_()
        if attention_mask is None:
            session.visible[:, :prompt] = True
        else:
            session.visible[:, :prompt].copy_(attention_mask.bool())
        session.positions.copy_(self.backbone.next_position_ids(positions, 0))
        session.step.zero_()
        session.done.zero_()

    def _record(self, session: _Session, token: torch.Tensor, logprob: torch.Tensor) -> None:
        """Write the chosen tokens into the output column `step` and make them the next step's input."""
        session.out_tokens.index_copy_(1, session.step.view(1), token[:, None])
        session.out_logprobs.index_copy_(1, session.step.view(1), logprob[:, None])
        session.done |= (token[:, None] == session.eos).any(dim=1)
        session.tokens.copy_(token)
        session.step.add_(1)

    def _step(self, session: _Session) -> None:
        """One decode step, reading and writing only the session's tensors (so it can be captured);
        the cache advances its own cursor as the layers write into it."""
        bb = self.backbone
        session.visible.index_fill_(1, session.cursor.view(1), True)
        hidden = bb.run_layers(bb.embed_tokens(session.tokens[:, None]), session.positions, session.cache, 0,
                               bb.num_layers, session.visible[:, None, None, :])
        token, logprob = pick_tokens(bb.next_token_logits(hidden))
        self._record(session, token, logprob)
        session.positions.add_(1)

    def _capture(self, session: _Session) -> torch.cuda.CUDAGraph:
        """Warm the step up on a side stream (allocator, kernels), undo its effects, then capture it."""
        saved = [t.clone() for t in _state(session)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._run_step(session)
        torch.cuda.current_stream().wait_stream(stream)
        for tensor, value in zip(_state(session), saved, strict=True):
            tensor.copy_(value)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._run_step(session)
        return graph


def _state(session: _Session) -> list[torch.Tensor]:
    """The tensors a step advances (the cache contents past the cursor are overwritten before use)."""
    return [session.tokens, session.positions, session.visible, session.step, session.done,
            *static_step_state(session.cache)]


class _AllDone:
    """Whether every sample had ended, copied to the host without blocking until asked."""

    def __init__(self, done: torch.Tensor):
        flag = done.all()
        if flag.device.type == "cuda":
            self.host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self.host.copy_(flag, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = flag, None

    def value(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.host)


def make_decoder(backbone: Backbone, kind: str) -> Decoder:
    """The greedy decoder of a resolved `Runtime.decoder` kind, bound to `backbone`."""
    if kind == "eager":
        return EagerDecoder(backbone)
    return StaticDecoder(backbone, capture=kind.startswith("cuda_graphs"), fuse=kind.endswith("+inductor"))
