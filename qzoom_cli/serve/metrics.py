"""Prometheus metrics of one service (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..results import Result

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (64, 128, 256, 576, 1024, 2048, 4096, 8192, 16384)


class Metrics:
    def __init__(self, queue_length):
        self.registry = CollectorRegistry()
        self.requests = Counter("qzoom_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("qzoom_request_seconds", "Time from a request's arrival to its answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.answers = Counter("qzoom_answers", "Answers given, by whether a region was read at high resolution",
                               ["zoomed"], registry=self.registry)
        self.visual_tokens = Histogram("qzoom_visual_tokens", "Visual tokens read for an answer (page + region)",
                                       buckets=TOKEN_BUCKETS, registry=self.registry)
        self.failures = Counter("qzoom_failures", "Failed requests, by error code", ["code"], registry=self.registry)
        self.batches = Histogram("qzoom_batch_requests", "Requests answered together in one engine pass",
                                 buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        queue = Gauge("qzoom_queue_length", "Requests waiting for the engine", registry=self.registry)
        queue.set_function(queue_length)

    def answered(self, results: list[Result]) -> None:
        for result in results:
            self.answers.labels(zoomed=str(bool(result.zoom.zoomed)).lower()).inc()
            if result.stats is not None:
                self.visual_tokens.observe(result.stats.visual_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
