"""Prometheus metrics with vLLM's names and meanings, in a registry of the app's own.

Every series is labelled `model_name`, as vLLM's are, so dashboards built for vLLM work.
A finished sequence (each of a request's `n` choices) counts as one request.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LABELS = ["model_name"]


class EngineCounts(NamedTuple):
    """What the metrics read from one engine at a scrape."""

    running: int
    waiting: int
    nonfinite: int  # sequences failed for non-finite logits
    prefix_queries: int  # prompt tokens looked up in the prefix cache
    prefix_hits: int  # of those, tokens found cached


def engine_counts(engine) -> EngineCounts:
    """An `lm.engine.Engine`'s counts now."""
    cache = engine.prefix_cache
    return EngineCounts(
        engine.num_running,
        engine.num_waiting,
        engine.nonfinite_rows,
        cache.queries if cache is not None else 0,
        cache.hits if cache is not None else 0,
    )


class Metrics:
    def __init__(self, engine_counts: Callable[[], dict[str, EngineCounts]]):
        """`engine_counts`: per model, its engine's counts, read at every scrape."""
        self.registry = CollectorRegistry()

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, _LABELS, buckets=_LATENCY_BUCKETS, registry=self.registry)

        def counter(name: str, doc: str, labels: list[str] = _LABELS) -> Counter:
            return Counter(name, doc, labels, registry=self.registry)

        self.queue_time = histogram(
            "vllm:request_queue_time_seconds", "Time requests wait in the queue before admission"
        )
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds", "Time from arrival to the first generated token"
        )
        self.itl = histogram(
            "vllm:inter_token_latency_seconds",
            "Time between generated tokens (one observation per token)",
        )
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Whole request latency")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated")
        self.success = counter(
            "vllm:request_success",
            "Requests finished, by finish reason",
            [*_LABELS, "finish_reason"],
        )
        self.failed = counter("lm_requests_failed", "Requests ended by an engine failure")
        self.rejected = counter(
            "lm_requests_rejected", "Requests refused because the queue was full"
        )
        self.registry.register(_EngineGauges(engine_counts))

    def observe_finished(
        self, model: str, timings: dict, finish_reason: str, streamed: bool
    ) -> None:
        """Record a finished sequence from the engine's timings."""
        self.queue_time.labels(model).observe(timings["queue_s"])
        self.ttft.labels(model).observe(timings["ttft_s"])
        self.e2e.labels(model).observe(timings["e2e_s"])
        self.prompt_tokens.labels(model).inc(timings["prompt_tokens"])
        self.generation_tokens.labels(model).inc(timings["completion_tokens"])
        if finish_reason == "error":
            self.failed.labels(model).inc()
        else:
            self.success.labels(model, finish_reason).inc()
        gaps = timings["completion_tokens"] - 1
        if not streamed and gaps > 0:  # only the total is known: each gap gets the mean
            self.observe_gaps(model, timings["decode_s"] / gaps, gaps)

    def observe_gaps(self, model: str, seconds: float, count: int) -> None:
        """Record `count` inter-token gaps of `seconds` each (a chunk of `count` tokens
        streamed `count * seconds` after the previous one)."""
        child = self.itl.labels(model)
        bounds, buckets, total = (
            getattr(child, name, None) for name in ("_upper_bounds", "_buckets", "_sum")
        )
        if bounds is None or buckets is None or total is None:  # another prometheus_client
            for _ in range(count):
                child.observe(seconds)
            return
        total.inc(seconds * count)  # what `count` calls of observe() would do, in one step
        buckets[bisect_left(bounds, seconds)].inc(count)


class _EngineGauges:
    """Running and waiting requests per model, and sequences failed for non-finite logits,
    read from the engines at scrape time."""

    def __init__(self, counts: Callable[[], dict[str, EngineCounts]]):
        self.counts = counts

    def collect(self):
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Sequences in the running batch", labels=_LABELS
        )
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Requests waiting for a batch slot", labels=_LABELS
        )
        nonfinite = CounterMetricFamily(
            "lm:nonfinite_logits",
            "Sequences failed because the model's logits held NaN or inf",
            labels=_LABELS,
        )
        queries = CounterMetricFamily(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens",
            labels=_LABELS,
        )
        hits = CounterMetricFamily(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens",
            labels=_LABELS,
        )
        for model, counts in self.counts().items():
            running.add_metric([model], counts.running)
            waiting.add_metric([model], counts.waiting)
            nonfinite.add_metric([model], counts.nonfinite)
            queries.add_metric([model], counts.prefix_queries)
            hits.add_metric([model], counts.prefix_hits)
        yield from (running, waiting, nonfinite, queries, hits)
