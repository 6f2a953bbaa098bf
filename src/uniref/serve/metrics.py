"""Prometheus metrics of one server (``GET /metrics``), in a registry of its own so that several apps in
one process (tests) do not share counters.

- ``uniref_requests_total{route, status}``: answered requests;
- ``uniref_request_seconds{route}``: latency from the first byte received to the response;
- ``uniref_queue_depth``: requests waiting for a batch (read when scraped);
- ``uniref_batch_size`` / ``uniref_batch_requests``: samples and requests per pipeline call;
- ``uniref_batch_tokens``: image tokens (targets + references) per pipeline call;
- ``uniref_batch_seconds``: wall time of a pipeline call;
- ``uniref_dropped_total``: requests dropped because their client disconnected before their batch ran.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from uniref.serve.batcher import BatchStats

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds: a cached page asset takes a millisecond, a tiny-model edit a fraction of a second, a
# Qwen-Image-Edit 1024² edit on a GPU tens of seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
# Image tokens per call: the tiny model's 64² budgets give ~130 per sample, Qwen's 1024² ~8k.
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class Metrics:
    """The server's Prometheus metrics (see the module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("uniref_requests", "Answered requests", ["route", "status"], registry=self.registry)
        self.latency = Histogram(
            "uniref_request_seconds", "Request latency", ["route"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.queue_depth = Gauge("uniref_queue_depth", "Requests waiting for a batch", registry=self.registry)
        self.batch_size = Histogram(
            "uniref_batch_size", "Samples per pipeline call", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.batch_requests = Histogram(
            "uniref_batch_requests", "Requests per pipeline call", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.batch_tokens = Histogram(
            "uniref_batch_tokens",
            "Image tokens (targets + references) per pipeline call",
            buckets=TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "uniref_batch_seconds", "Wall time of a pipeline call", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.dropped = Counter(
            "uniref_dropped", "Requests dropped because the client disconnected", registry=self.registry
        )

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.samples)
        self.batch_requests.observe(stats.requests)
        self.batch_tokens.observe(stats.tokens)
        self.batch_seconds.observe(stats.seconds)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
