"""The service's Prometheus metrics (prometheus_client), one registry per app so that several
apps in one process (tests, embedding) never share counters."""
from __future__ import annotations

import typing as tp

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    """Counters and histograms, updated from the event loop and the worker thread
    (prometheus_client's metrics are thread-safe). Requests, errors and latency carry a
    `route` label: generate, edit, stream, speech_edit."""

    def __init__(self, queue_depth: tp.Callable[[], int], running_rows: tp.Callable[[], int],
                 memory: tp.Optional[tp.Callable[[], dict]] = None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("magnet_requests", "Requests answered, by route and HTTP status.",
                                ["route", "status"], registry=r)
        self.errors = Counter("magnet_errors", "Failed requests, by route and error type.", ["route", "type"],
                              registry=r)
        self.latency = Histogram("magnet_request_duration_seconds",
                                 "Latency of successful requests by route, arrival to answer (a stream: to "
                                 "its last chunk).", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        Gauge("magnet_queue_depth", "Requests of every route waiting for the worker.",
              registry=r).set_function(queue_depth)
        Gauge("magnet_running_rows", "Rows in the batch being generated now (a task runs alone: 1).",
              registry=r).set_function(running_rows)
        self.batch_size = Histogram("magnet_batch_size", "Rows per generation batch.", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batches = Counter("magnet_batches", "Generation loops run (one per batch).", registry=r)
        self.rows = Counter("magnet_rows", "Rows (descriptions) generated.", registry=r)
        self.cancelled = Counter("magnet_cancelled", "Requests cancelled by disconnect or timeout.", registry=r)
        self.tasks = Counter("magnet_tasks", "Jobs run alone by the worker (not generate rows), by kind.",
                             ["kind"], registry=r)
        if memory is not None:   # MAGNeT.memory_stats: weights in their run precision, the process's peak
            Gauge("magnet_weights_bytes", "Bytes of the loaded weights, in the precision they run in.",
                  registry=r).set_function(lambda: memory()["weights_total_bytes"])
            Gauge("magnet_peak_memory_bytes", "Peak memory of the process: CUDA peak allocated on a GPU, "
                  "else peak resident set.", registry=r).set_function(lambda: _peak(memory()))

    def request_done(self, status: int, seconds: tp.Optional[float] = None, error: tp.Optional[str] = None,
                     route: str = "generate") -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.outcome(route, seconds, error)

    def outcome(self, route: str, seconds: tp.Optional[float] = None, error: tp.Optional[str] = None) -> None:
        """A request's latency (success) or error type, without counting an answer: a streamed
        run ends after its POST was answered (202)."""
        if seconds is not None:
            self.latency.labels(route=route).observe(seconds)
        if error is not None:
            self.errors.labels(route=route, type=error).inc()

    def task_done(self, kind: str) -> None:
        self.tasks.labels(kind=kind).inc()

    def batch_done(self, size: int) -> None:
        self.batches.inc()
        self.rows.inc(size)
        self.batch_size.observe(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _peak(stats: dict) -> int:
    return stats.get("cuda_peak_allocated_bytes", stats.get("peak_rss_bytes", 0))
