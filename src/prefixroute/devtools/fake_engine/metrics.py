"""`EngineMetrics`: a fake engine's `/metrics`, under vLLM v1's Prometheus names.

Names, help texts and histogram buckets follow vLLM's
`vllm/v1/metrics/loggers.py` (`vllm:num_requests_running`,
`vllm:kv_cache_usage_perc`, `vllm:prefix_cache_*`, ...), so scrapers written
for vLLM read a fake engine unchanged. Gauges and token counters are read from
the simulator's engine at scrape time; only the latency histograms and the
success counter are updated per finished request.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from prefixroute.sim.engine import Completion, Engine

__all__ = ["EngineMetrics"]

# vLLM v1 histogram buckets (vllm/v1/metrics/loggers.py)
_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
_LABELS = ("model_name", "engine")


class EngineMetrics:
    """The Prometheus registry of one fake engine serving `model` with `engine`.

    `completed` records a finished request (O(buckets)); `exposition` renders
    the registry as Prometheus text (O(metrics)) of media type `media_type`.
    """

    media_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: Engine, model: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = (model, "0")
        self.ttft, self.e2e = (
            Histogram(name, doc, _LABELS, registry=self.registry, buckets=buckets).labels(*labels)
            for name, doc, buckets in (
                (
                    "vllm:time_to_first_token_seconds",
                    "Histogram of time to first token in seconds.",
                    _TTFT_BUCKETS,
                ),
                (
                    "vllm:e2e_request_latency_seconds",
                    "Histogram of e2e request latency in seconds.",
                    _E2E_BUCKETS,
                ),
            )
        )
        self.success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            (*_LABELS, "finished_reason"),
            registry=self.registry,
        ).labels(*labels, "length")
        self.registry.register(_EngineCollector(engine, labels))

    def completed(self, done: Completion) -> None:
        """Record a finished request: its TTFT and end-to-end latency from its arrival."""
        arrival = done.sim.arrival_s
        self.ttft.observe(max(0.0, done.first_token_s - arrival))
        self.e2e.observe(max(0.0, done.finished_s - arrival))
        self.success.inc()

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """vLLM's gauges and token counters, read from the engine at scrape time (O(1))."""

    def __init__(self, engine: Engine, labels: tuple[str, str]) -> None:
        self.engine = engine
        self.labels = labels

    def describe(self) -> Iterable[Metric]:
        return list(self.collect())

    def collect(self) -> Iterable[Metric]:
        engine = self.engine
        stats = engine.stats
        names = list(_LABELS)
        values = list(self.labels)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(values, value)
            return c

        yield gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            engine.running,
        )
        yield gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            engine.waiting,
        )
        yield gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            engine.kv_usage,
        )
        cfg = engine.config
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=[
                "block_size",
                "cache_dtype",
                "enable_prefix_caching",
                "engine",
                "gpu_memory_utilization",
                "num_gpu_blocks",
                "prefix_caching_hash_algo",
            ],
        )
        info.add_metric(
            [str(cfg.block_size), "auto", "True", "0", "0.9", str(cfg.num_blocks), "sha256"], 1.0
        )
        yield info
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            stats.prefix_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            stats.prefix_hits,
        )
        yield counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", stats.prompt_tokens
        )
        yield counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            stats.generated_tokens,
        )
        yield counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            stats.preemptions,
        )
