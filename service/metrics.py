"""Prometheus metrics, in a registry of the app's own (no global state)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, engine_counts: Callable[[], dict[str, tuple[int, int]]]):
        self.registry = CollectorRegistry()
        labels = ["model"]
        self.queue_time = Histogram("lm_queue_time_seconds", "Time requests wait before admission",
                                    labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("lm_time_to_first_token_seconds", "Time to the first generated token",
                              labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("lm_inter_token_latency_seconds",
                             "Time between streamed chunks (per request mean when not streaming)",
                             labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("lm_e2e_request_latency_seconds", "Whole request latency",
                             labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("lm_prompt_tokens", "Prompt tokens processed", labels,
                                     registry=self.registry)
        self.generation_tokens = Counter("lm_generation_tokens", "Tokens generated", labels,
                                         registry=self.registry)
        self.requests = Counter("lm_requests", "Finished sequences by finish reason",
                                ["model", "finish_reason"], registry=self.registry)
        self.rejected = Counter("lm_requests_rejected", "Requests refused because the queue was full",
                                labels, registry=self.registry)
        self.registry.register(_EngineGauges(engine_counts))

    def observe_finished(self, model: str, timings: dict, finish_reason: str, streamed: bool) -> None:
        self.queue_time.labels(model).observe(timings["queue_s"])
        self.ttft.labels(model).observe(timings["ttft_s"])
        self.e2e.labels(model).observe(timings["e2e_s"])
        self.prompt_tokens.labels(model).inc(timings["prompt_tokens"])
        self.generation_tokens.labels(model).inc(timings["completion_tokens"])
        self.requests.labels(model, finish_reason).inc()
        if not streamed and timings["completion_tokens"] > 1:
            self.itl.labels(model).observe(timings["decode_s"] / (timings["completion_tokens"] - 1))


class _EngineGauges:
    """Running and waiting requests per model, read from the engines at scrape time."""

    def __init__(self, counts: Callable[[], dict[str, tuple[int, int]]]):
        self.counts = counts

    def collect(self):
        running = GaugeMetricFamily("lm_requests_running", "Sequences in the running batch",
                                    labels=["model"])
        waiting = GaugeMetricFamily("lm_requests_waiting", "Requests waiting for a batch slot",
                                    labels=["model"])
        for model, (n_running, n_waiting) in self.counts().items():
            running.add_metric([model], n_running)
            waiting.add_metric([model], n_waiting)
        yield running
        yield waiting
