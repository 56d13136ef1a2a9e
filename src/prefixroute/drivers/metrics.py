"""The gateway's Prometheus exporter: request-path series plus scrape-time router and pool gauges.

`GatewayMetrics` owns two kinds of series in an injected `CollectorRegistry`
(never the process-global default one, so two gateways or a test can each
have their own):

- **Request-path series**, updated by the gateway as requests start and end
  (`request_started`, `observe_decision`, `observe_request`, `observe_retry`).
  Label children are looked up once per label value and cached, so a call
  costs a few dictionary look-ups and histogram increments (its cost is
  measured in docs/metrics.md).
- **Scrape-time series**, computed by `_ScrapeCollector.collect` when
  `render` runs: router counters, index statistics, the router's in-flight
  accounting, the tenant ledger's snapshot (per-tenant figures, head/tail
  hit rates, Jain's fairness, latency-objective attainment), the router's
  latency model's prediction error per endpoint (issue 16) and the
  endpoints' scraped state. The request path pays nothing for them.

Names follow the Gateway API Inference Extension endpoint picker wherever it
has one, so its dashboards and alerts work unchanged:
kubernetes-sigs/gateway-api-inference-extension `pkg/epp/metrics/metrics.go`
(``inference_objective_*``, ``inference_pool_*``, ``inference_extension_*``;
label names, and the latency, size and token buckets),
`pkg/epp/metrics/collectors/inference_pool.go`
(``inference_pool_per_pod_queue_size``) and `site-src/guides/metrics-and-observability.md`.
The predicted-latency histograms (``inference_objective_request_predicted_ttft_seconds``,
``..._predicted_tpot_seconds``, ``..._tpot_seconds``) are GIE's latency-predictor
series with its ``GeneralLatencyBuckets`` and ``TPOTBuckets``, same file.
The rest are ours, prefixed ``prefixroute_``. The per-tenant TTFT buckets are
vLLM v1's ``vllm:time_to_first_token_seconds`` buckets
(vllm-project/vllm `vllm/v1/metrics/loggers.py`).

Cardinality is bounded whatever the traffic. Every label value that comes
from a client or an engine passes `label_value` first: valid UTF-8 (a lone
surrogate such as a JSON-escaped ``"\ud800"`` becomes the text ``\ud800``,
which would otherwise make every later scrape fail) and at most
`MAX_LABEL_CHARS` characters. Request-derived label values (model, tenant,
error code, retry reason, endpoint) then go through `BoundedLabel`: the
first `cap` distinct values keep their own series, later ones share
``"other"`` (llm-d-router's `pkg/epp/metrics/cardinality.go` does the same
for model names). A model name takes a slot only if an endpoint of the pool
serves it (`served_models`, from the pool's configured and listed models);
any other name is ``"other"`` (``"unknown"`` when empty), so names no
endpoint serves can neither grow the series nor squat the slots real
traffic needs. The tenant ledger is bounded by its own top-k (plus pinned
tenants and ``"other"``), and per-endpoint series by the configured pool.

`render` reads router state: call it on the thread (event loop) that owns the
router, as the gateway does for ``GET /metrics``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from prefixroute.decision import Decision
from prefixroute.drivers.kvevents import LAG_BUCKETS, StreamSnapshot
from prefixroute.endpoint import EndpointState
from prefixroute.ledger import LedgerSnapshot, TenantSnapshot
from prefixroute.request import Usage
from prefixroute.router import Router

__all__ = [
    "DECISION_BUCKETS",
    "DEFAULT_MAX_TENANTS",
    "GIE_LATENCY_BUCKETS",
    "MAX_LABEL_CHARS",
    "OTHER",
    "OUTCOMES",
    "TTFT_BUCKETS",
    "BoundedLabel",
    "GatewayMetrics",
    "label_value",
]

OTHER = "other"
"""The label value every request-derived value beyond its cap folds into."""

UNKNOWN = "unknown"
"""The label value of an empty model or tenant name."""

MAX_LABEL_CHARS = 256
"""Longest label value emitted (tenant ids are at most 256 characters: they fit whole)."""

DEFAULT_MAX_TENANTS = 64
DEFAULT_MAX_MODELS = 64
DEFAULT_MAX_ENDPOINTS = 256
MAX_ERROR_CODES = 32
MAX_RETRY_REASONS = 16

OUTCOMES = {"decision": "success", "rejection": "failure", "deferral": "deferred"}
"""`observe_decision` outcomes and the GIE ``scheduler_attempts_total`` status each counts as."""

GIE_LATENCY_BUCKETS = (
    *(0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6),
    *(8, 10, 15, 20, 30, 45, 60, 120, 180, 240, 300, 360, 480, 600, 900, 1200),
    *(1800, 2700, 3600),
)
"""GIE's `GeneralLatencyBuckets`: 5 ms to one hour (request duration and TTFT)."""

TTFT_BUCKETS = (
    *(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0),
    *(2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
)
"""vLLM v1's TTFT buckets, 1 ms to 43 minutes, for the per-tenant TTFT histogram."""

DECISION_BUCKETS = (
    *(0.00001, 0.000025, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005),
    *(0.01, 0.02, 0.05, 0.1),
)
"""GIE's scheduler buckets (100 us to 100 ms) plus 10, 25 and 50 us, where our decisions fall."""

TPOT_BUCKETS = (
    *(0.0005, 0.00205, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2),
    *(0.3, 0.4, 0.5, 0.6, 0.8, 1, 1.5, 2, 3, 4.5, 6, 12, 18, 24, 30, 36, 48, 60),
    *(90, 120, 180, 270, 360),
)
"""GIE's `TPOTBuckets` (0.5 ms to 6 min), for the predicted and measured TPOT histograms."""

NTPOT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
REQUEST_SIZE_BUCKETS = tuple(float(2**i) for i in range(6, 31))  # 64 B .. 1 GiB, as GIE
RESPONSE_SIZE_BUCKETS = (
    1,
    8,
    16,
    32,
    64,
    128,
    256,
    512,
    1024,
    2048,
    4096,
    8192,
    16384,
    32768,
    65536,
)
INPUT_TOKEN_BUCKETS = (1, *(float(2**i) for i in range(3, 21)))  # 1, 8 .. 1,048,576, as GIE
OUTPUT_TOKEN_BUCKETS = (1, *(float(2**i) for i in range(3, 14)))  # 1, 8 .. 8192, as GIE
HIT_RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TTFT_QUANTILES = ("0.5", "0.95", "0.99")

MODEL_LABELS = ("model_name", "target_model_name")


def label_value(value: object) -> str:
    """`value` as a label value Prometheus' text format can carry: valid UTF-8, bounded.

    Lone surrogates (which `str.encode` refuses, failing the whole scrape)
    become backslash escapes; a value longer than `MAX_LABEL_CHARS`
    characters is cut to that length, ending in "...". O(`MAX_LABEL_CHARS`):
    a megabyte value costs no more than a short one.
    """
    text = value if isinstance(value, str) else str(value)
    cut = text[:MAX_LABEL_CHARS]
    if cut.isascii():
        if len(text) <= MAX_LABEL_CHARS:
            return text
    else:
        cut = cut.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(cut) < len(text) or len(cut) > MAX_LABEL_CHARS:
        cut = cut[: MAX_LABEL_CHARS - 3] + "..."
    return cut


class BoundedLabel:
    """Caps the distinct values of one label: the first `cap` keep themselves, the rest `OTHER`.

    A value once admitted always maps to itself, so paired updates (a
    running-requests increment and its decrement) stay balanced. `pinned`
    values always map to themselves without using the cap. An empty value
    maps to `UNKNOWN` (which counts like any other). Values pass `label_value`
    first (valid UTF-8, at most `MAX_LABEL_CHARS`). `bound` is O(1): one set
    look-up on the common path. Memory: at most `cap` values plus the pins.
    After llm-d-router's `BoundedLabel` (pkg/common/observability/metrics),
    without its lock: the gateway updates metrics from one event loop.
    """

    __slots__ = ("_cap", "_pinned", "_seen")

    def __init__(self, cap: int, *, pinned: Iterable[str] = ()) -> None:
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ValueError(f"a label cap must be an integer >= 1, got {cap!r}")
        self._cap = cap
        self._pinned = frozenset(label_value(p) for p in pinned)
        self._seen: set[str] = set()

    @property
    def cap(self) -> int:
        """Distinct values (besides pins) kept before folding into `OTHER`."""
        return self._cap

    def bound(self, value: str, *, admit: bool = True) -> str:
        """The label value to emit for `value`; `admit=False` takes no free slot (`OTHER`)."""
        if value in self._seen or value in self._pinned:
            return value  # only clean values are kept, so a hit is clean
        value = label_value(value) if value else UNKNOWN
        if value in self._seen or value in self._pinned:
            return value
        if not admit or len(self._seen) >= self._cap:
            return OTHER
        self._seen.add(value)
        return value

    def admitted(self) -> frozenset[str]:
        """The values admitted so far (pins not included)."""
        return frozenset(self._seen)


class _ModelSeries:
    """The request-path children of one model label value, looked up once."""

    __slots__ = (
        "cached_tokens",
        "duration",
        "input_tokens",
        "label",
        "latency_series",
        "ntpot",
        "output_tokens",
        "request_sizes",
        "requests",
        "response_sizes",
        "running",
        "ttft",
    )

    def __init__(self, m: GatewayMetrics, label: str) -> None:
        pair = (label, label)  # no model rewriting: the target is the requested model
        self.label = label
        self.requests = m._requests.labels(*pair)
        self.duration = m._duration.labels(*pair)
        self.ttft = m._ttft.labels(*pair)
        self.request_sizes = m._request_sizes.labels(*pair)
        self.response_sizes = m._response_sizes.labels(*pair)
        self.input_tokens = m._input_tokens.labels(*pair)
        self.output_tokens = m._output_tokens.labels(*pair)
        self.cached_tokens = m._cached_tokens.labels(*pair)
        self.ntpot = m._ntpot.labels(*pair)
        self.running = m._running.labels(label)
        self.latency_series: tuple[Any, Any, Any] | None = None  # see `latency`

    def latency(self, m: GatewayMetrics) -> tuple[Any, Any, Any]:
        """The predicted-TTFT, predicted-TPOT and measured-TPOT children, made on first use:
        a model whose requests carry no prediction nor TPOT costs no empty histograms."""
        if self.latency_series is None:
            pair = (self.label, self.label)
            self.latency_series = (
                m._predicted_ttft.labels(*pair),
                m._predicted_tpot.labels(*pair),
                m._tpot.labels(*pair),
            )
        return self.latency_series


def _finite(value: float | None) -> bool:
    return value is not None and 0.0 <= value < math.inf


class GatewayMetrics:
    """The gateway's metrics: request-path series plus a scrape-time collector, in `registry`.

    `router` and `endpoints` (a callable returning the pool's current
    `EndpointState`s) are read only when `render` runs. `max_tenants` caps
    the distinct tenant label values of the request-path series (tenants
    pinned in the router's ledger do not use the cap); `max_models` and
    `max_endpoints` cap the model and endpoint labels likewise.
    `served_models` (a callable returning the names some endpoint serves,
    cheap to call: the pool's cached set) decides which model names may take
    a slot at all; every other name is `OTHER` (see `model_label`). None
    lets every name take a slot (up to `max_models`). An endpoint
    is stale when its metrics were never observed or are older than
    `stale_after_s` by `clock` (the gateway's monotonic clock, the one its
    pool stamps `observed_at` with). `pool_name` is the ``name`` label of the
    ``inference_pool_*`` series.

    Raises ValueError (naming the argument) for a cap below 1 or a
    non-positive `stale_after_s`.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        router: Router,
        endpoints: Callable[[], Sequence[EndpointState]],
        *,
        max_tenants: int = DEFAULT_MAX_TENANTS,
        pool_name: str = "default",
        stale_after_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        max_models: int = DEFAULT_MAX_MODELS,
        max_endpoints: int = DEFAULT_MAX_ENDPOINTS,
        served_models: Callable[[], Collection[str]] | None = None,
    ) -> None:
        for name, cap in (
            ("max_tenants", max_tenants),
            ("max_models", max_models),
            ("max_endpoints", max_endpoints),
        ):
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {cap!r}")
        if not (isinstance(stale_after_s, int | float) and 0 < stale_after_s < math.inf):
            raise ValueError(f"stale_after_s must be a finite number > 0, got {stale_after_s!r}")
        if not isinstance(pool_name, str) or not pool_name:
            raise ValueError(f"pool_name must be a non-empty string, got {pool_name!r}")
        self.registry = registry
        self.router = router
        self.pool_name = pool_name
        self.max_tenants = max_tenants
        self.stale_after_s = float(stale_after_s)
        self.tenants = BoundedLabel(max_tenants, pinned=router.ledger.pinned)
        self.models = BoundedLabel(max_models)
        self._served = served_models
        self.endpoint_labels = BoundedLabel(max_endpoints)
        self.error_codes = BoundedLabel(MAX_ERROR_CODES)
        self.retry_reasons = BoundedLabel(MAX_RETRY_REASONS)
        self._by_model: dict[str, _ModelSeries] = {}
        self._by_tenant: dict[str, Histogram] = {}
        self._by_tenant_status: dict[tuple[str, int], Counter] = {}
        self._by_endpoint: dict[str, Counter] = {}

        reg = registry
        self._requests = Counter(
            "inference_objective_request_total",
            "Requests handled, per model and target model (counted when the request ends).",
            MODEL_LABELS,
            registry=reg,
        )
        self._errors = Counter(
            "inference_objective_request_error_total",
            "Requests that ended in an error (HTTP status >= 400 or an error code), per code.",
            (*MODEL_LABELS, "error_code"),
            registry=reg,
        )
        self._duration = Histogram(
            "inference_objective_request_duration_seconds",
            "End-to-end request latency at the gateway, in seconds.",
            MODEL_LABELS,
            buckets=GIE_LATENCY_BUCKETS,
            registry=reg,
        )
        self._ttft = Histogram(
            "inference_objective_request_ttft_seconds",
            "Time to first token at the gateway, in seconds.",
            MODEL_LABELS,
            buckets=GIE_LATENCY_BUCKETS,
            registry=reg,
        )
        self._request_sizes = Histogram(
            "inference_objective_request_sizes",
            "Request body size in bytes.",
            MODEL_LABELS,
            buckets=REQUEST_SIZE_BUCKETS,
            registry=reg,
        )
        self._response_sizes = Histogram(
            "inference_objective_response_sizes",
            "Response body size in bytes.",
            MODEL_LABELS,
            buckets=RESPONSE_SIZE_BUCKETS,
            registry=reg,
        )
        self._input_tokens = Histogram(
            "inference_objective_input_tokens",
            "Prompt tokens per request, as the engine reported.",
            MODEL_LABELS,
            buckets=INPUT_TOKEN_BUCKETS,
            registry=reg,
        )
        self._output_tokens = Histogram(
            "inference_objective_output_tokens",
            "Completion tokens per request, as the engine reported.",
            MODEL_LABELS,
            buckets=OUTPUT_TOKEN_BUCKETS,
            registry=reg,
        )
        self._cached_tokens = Histogram(
            "inference_objective_prompt_cached_tokens",
            "Prompt tokens served from the engine's prefix cache, per request.",
            MODEL_LABELS,
            buckets=INPUT_TOKEN_BUCKETS,
            registry=reg,
        )
        self._ntpot = Histogram(
            "inference_objective_normalized_time_per_output_token_seconds",
            "Request latency divided by completion tokens, in seconds.",
            MODEL_LABELS,
            buckets=NTPOT_BUCKETS,
            registry=reg,
        )
        self._predicted_ttft = Histogram(
            "inference_objective_request_predicted_ttft_seconds",
            "The router's predicted TTFT on the chosen endpoint, per decision, in seconds.",
            MODEL_LABELS,
            buckets=GIE_LATENCY_BUCKETS,
            registry=reg,
        )
        self._predicted_tpot = Histogram(
            "inference_objective_request_predicted_tpot_seconds",
            "The router's predicted time per output token on the chosen endpoint, in seconds.",
            MODEL_LABELS,
            buckets=TPOT_BUCKETS,
            registry=reg,
        )
        self._tpot = Histogram(
            "inference_objective_request_tpot_seconds",
            "Time per output token after the first, (duration - TTFT) / (tokens - 1), seconds.",
            MODEL_LABELS,
            buckets=TPOT_BUCKETS,
            registry=reg,
        )
        self._running = Gauge(
            "inference_objective_running_requests",
            "Requests in the gateway (started and not yet ended), per model.",
            ("model_name",),
            registry=reg,
        )
        self._decision_latency = Histogram(
            "inference_extension_scheduler_e2e_duration_seconds",
            "Router decision latency (admission, filters, scorers, picker), in seconds.",
            buckets=DECISION_BUCKETS,
            registry=reg,
        )
        self._attempts = Counter(
            "inference_extension_scheduler_attempts_total",
            "Routing attempts by status: success (a decision), failure (a rejection), deferred.",
            ("status",),
            registry=reg,
        )
        self._attempt_children = {
            outcome: self._attempts.labels(status) for outcome, status in OUTCOMES.items()
        }
        self._hit_ratio = Histogram(
            "inference_extension_prefix_indexer_hit_ratio",
            "Matched / total prompt blocks on the chosen endpoint, per decision.",
            buckets=HIT_RATIO_BUCKETS,
            registry=reg,
        )
        self._tenant_requests = Counter(
            "prefixroute_requests_total",
            f"Requests handled per tenant and HTTP status (at most {max_tenants} tenants).",
            ("tenant", "code"),
            registry=reg,
        )
        self._tenant_ttft = Histogram(
            "prefixroute_ttft_seconds",
            f"Time to first token per tenant, in seconds (at most {max_tenants} tenants).",
            ("tenant",),
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self._endpoint_requests = Counter(
            "prefixroute_endpoint_requests_total",
            "Requests served per endpoint (the one that answered, after any retry).",
            ("endpoint",),
            registry=reg,
        )
        self._retries = Counter(
            "prefixroute_retries_total",
            "Fallback attempts, by the endpoint that failed and why.",
            ("endpoint", "reason"),
            registry=reg,
        )
        self._collector = _ScrapeCollector(self, endpoints, clock)
        registry.register(self._collector)

    def add_kv_events(self, snapshots: Callable[[], Sequence[StreamSnapshot]]) -> None:
        """Export the KV-event subscribers' figures (`prefixroute_kv_events_*`) at scrape time.

        `snapshots` is `KVEventsManager.snapshots`; one series per endpoint
        with `kv_events` configured (bounded by the configured pool).
        """
        self.registry.register(_KVEventsCollector(snapshots))

    def add_shared_state(self, status: Callable[[], Mapping[str, Any]]) -> None:
        """Export the replica's shared-state link (`prefixroute_shared_state_*`) at scrape time.

        `status` is `Coordinator.status` (issue 15): up or down, replicas
        seen, verdicts and syncs answered locally, peer decisions applied.
        """
        self.registry.register(_SharedStateCollector(status))

    # -- the request path ---------------------------------------------------------------

    def model_label(self, model: str) -> str:
        """The `model_name` label of a request for `model`.

        `UNKNOWN` for an empty name, `OTHER` for a name no endpoint serves
        (when `served_models` was given) or beyond `max_models`, else the
        name itself (through `label_value`). O(1) on average: one set
        look-up in the served names and one in the admitted labels.
        """
        if not model:
            return UNKNOWN
        served = self._served
        if served is not None and model not in served():
            return OTHER
        return self.models.bound(model)

    def _model(self, model: str) -> _ModelSeries:
        series = self._by_model.get(model)
        if series is None:
            label = self.model_label(model)
            series = self._by_model.get(label)
            if series is None:  # keyed by label only: folded names add no entries
                series = self._by_model[label] = _ModelSeries(self, label)
        return series

    def request_started(self, model: str, tenant: str) -> None:
        """A request entered the gateway: the running-requests gauge goes up. O(1).

        Pass the same `model` to `observe_request`; drivers pass the label
        `model_label` gave (`RequestRecord` does), so the gauge's increment
        and decrement meet even if the pool's models change meanwhile.
        """
        self._model(model).running.inc()

    def observe_decision(
        self, seconds: float, outcome: str, *, decision: Decision | None = None
    ) -> None:
        """The router answered in `seconds` with `outcome` (decision, rejection or deferral).

        With the `Decision`, its match on the chosen endpoint also feeds the
        prefix-indexer hit-ratio histogram, and its predicted TTFT and TPOT
        (the router's latency model's, for the chosen endpoint) the
        predicted-latency histograms of its model. ValueError for an unknown outcome (a driver
        bug). O(buckets).
        """
        child = self._attempt_children.get(outcome)
        if child is None:
            raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, got {outcome!r}")
        child.inc()
        if _finite(seconds):
            self._decision_latency.observe(seconds)
        if decision is None:
            return
        if decision.total_blocks:
            self._hit_ratio.observe(decision.matched_blocks / decision.total_blocks)
        ttft, tpot = decision.predicted_ttft_s, decision.predicted_tpot_s
        if ttft is not None or tpot is not None:
            children = self._model(decision.request.model).latency(self)
            if ttft is not None and _finite(ttft):
                children[0].observe(ttft)
            if tpot is not None and _finite(tpot):
                children[1].observe(tpot)

    def observe_request(
        self,
        *,
        model: str,
        tenant: str,
        endpoint: str | None,
        status: int,
        code: str | None,
        duration_s: float,
        ttft_s: float | None,
        usage: Usage | None,
        request_bytes: int,
        response_bytes: int,
    ) -> None:
        """A request `request_started` counted has ended (answered, failed or rejected).

        Counts it (and its error: `status` >= 400 or a `code`, labelled by
        `code`, else the status), takes it off the running gauge, and records
        its latencies, sizes and token counts. Negative, infinite or None
        values are left out of their histogram. O(buckets).
        """
        series = self._model(model)
        series.running.dec()
        series.requests.inc()
        if status >= 400 or code is not None:
            error_code = self.error_codes.bound(code or str(status))
            self._errors.labels(series.label, series.label, error_code).inc()
        # A request refused as invalid (a 4xx other than admission's 429) takes no tenant
        # label slot, so junk cannot squat them; answered or routed requests do.
        refused = 400 <= status < 500 and status != 429 and endpoint is None
        tenant_label = self.tenants.bound(tenant, admit=not refused)
        key = (tenant_label, status)
        counter = self._by_tenant_status.get(key)
        if counter is None:
            counter = self._by_tenant_status[key] = self._tenant_requests.labels(
                tenant_label, str(status)
            )
        counter.inc()
        if _finite(duration_s):
            series.duration.observe(duration_s)
        if request_bytes >= 0:
            series.request_sizes.observe(request_bytes)
        if response_bytes >= 0:
            series.response_sizes.observe(response_bytes)
        if ttft_s is not None and _finite(ttft_s):
            series.ttft.observe(ttft_s)
            ttft = self._by_tenant.get(tenant_label)
            if ttft is None:
                ttft = self._by_tenant[tenant_label] = self._tenant_ttft.labels(tenant_label)
            ttft.observe(ttft_s)
        if usage is not None:
            if usage.prompt_tokens > 0:
                series.input_tokens.observe(usage.prompt_tokens)
                series.cached_tokens.observe(usage.cached_tokens)
            if usage.completion_tokens > 0:
                series.output_tokens.observe(usage.completion_tokens)
                if _finite(duration_s):
                    series.ntpot.observe(duration_s / usage.completion_tokens)
                if usage.completion_tokens > 1 and ttft_s is not None and _finite(ttft_s):
                    tpot = (duration_s - ttft_s) / (usage.completion_tokens - 1)
                    if _finite(tpot):
                        series.latency(self)[2].observe(tpot)
        if endpoint is not None:
            served = self._by_endpoint.get(endpoint)
            if served is None:
                label = self.endpoint_labels.bound(endpoint)
                served = self._by_endpoint.get(label)
                if served is None:
                    served = self._by_endpoint[label] = self._endpoint_requests.labels(label)
            served.inc()

    def observe_retry(self, endpoint: str, reason: str) -> None:
        """The gateway falls back to another endpoint after `endpoint` failed for `reason`."""
        self._retries.labels(
            self.endpoint_labels.bound(endpoint), self.retry_reasons.bound(reason)
        ).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type, for ``GET /metrics``."""
        return prometheus_client.generate_latest(
            self.registry
        ), prometheus_client.CONTENT_TYPE_LATEST


# -- scrape time -------------------------------------------------------------------------


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


_TENANT_COUNTERS = (
    ("requests", "Requests routed (exact since the tenant entered the ledger's table)."),
    ("prompt_tokens", "Prompt tokens of routed requests."),
    ("predicted_cached_tokens", "Prompt tokens the router predicted cached, at decision."),
    ("completed_prompt_tokens", "Prompt tokens of requests that completed ok."),
    ("cached_tokens", "Prompt tokens the engines reported cached, for requests that completed ok."),
    ("failures", "Routed requests that failed."),
    (
        "slo_requests",
        "Requests with a latency objective (completed, failed or rejected; issue 16).",
    ),
    ("slo_met", "Requests with an objective that completed ok and met every objective set."),
)


def _tenant_figures(s: TenantSnapshot) -> tuple[int, ...]:
    return (
        s.requests - s.count_error,
        s.prompt_tokens,
        s.predicted_cached_tokens,
        s.completed_prompt_tokens,
        s.cached_tokens,
        s.failed,
        s.slo_requests,
        s.slo_met,
    )


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


_KV_COUNTERS = (
    ("messages", "Event batches received from the engine."),
    ("events", "Engine events decoded (BlockStored, BlockRemoved, AllBlocksCleared)."),
    ("blocks_stored", "Engine blocks announced stored."),
    ("blocks_removed", "Engine blocks announced removed."),
    ("clears", "AllBlocksCleared events from the engine."),
    ("gaps", "Gaps in the sequence numbers."),
    ("missing", "Messages lost in sequence gaps."),
    ("replays", "Replays asked of the engine's replay socket."),
    ("replay_failures", "Replays that did not bring back every missing message."),
    ("resets", "Times the endpoint's entries were dropped (gap, restart, health)."),
    ("dropped", "Messages dropped before decoding (bad frames, too large)."),
    ("malformed", "Messages or events that did not decode (skipped)."),
    ("unmapped", "Engine blocks skipped: unknown parent or hash, unnamed LoRA, unknown medium."),
    ("map_evicted", "Engine blocks forgotten by the bounded hash map."),
)


class _KVEventsCollector(Collector):
    """The KV-event subscribers' counters, lag and mode per endpoint, at scrape time."""

    def __init__(self, snapshots: Callable[[], Sequence[StreamSnapshot]]) -> None:
        self._snapshots = snapshots

    def describe(self) -> Iterable[Metric]:
        """The families, without samples."""
        return list(self._families(()))

    def collect(self) -> Iterable[Metric]:
        """Every family with one sample per subscribed endpoint. O(endpoints)."""
        return list(self._families(self._snapshots()))

    def _families(self, rows: Sequence[StreamSnapshot]) -> Iterator[Metric]:
        for field, doc in _KV_COUNTERS:
            family = _counter(f"prefixroute_kv_events_{field}", doc, ("endpoint",))
            for r in rows:
                family.add_metric([label_value(r.endpoint)], getattr(r, field))
            yield family
        precise = _gauge(
            "prefixroute_kv_events_precise",
            "1 while the endpoint is in precise mode (its KV events are the truth), else 0.",
            ("endpoint",),
        )
        mapped = _gauge(
            "prefixroute_kv_events_mapped_blocks",
            "Engine blocks in the endpoint's engine-hash map.",
            ("endpoint",),
        )
        lag = HistogramMetricFamily(
            "prefixroute_kv_events_lag_seconds",
            "From an event batch's engine timestamp to its application here.",
            labels=["endpoint"],
        )
        for r in rows:
            label = [label_value(r.endpoint)]
            precise.add_metric(label, 1.0 if r.precise else 0.0)
            mapped.add_metric(label, r.mapped_blocks)
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, n in zip((*LAG_BUCKETS, math.inf), r.lag_buckets, strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
            lag.add_metric(label, buckets, r.lag_sum)
        yield precise
        yield mapped
        yield lag


class _SharedStateCollector(Collector):
    """The shared-state link of this replica (`Coordinator.status`), at scrape time."""

    def __init__(self, status: Callable[[], Mapping[str, Any]]) -> None:
        self._status = status

    def describe(self) -> Iterable[Metric]:
        """The families, without samples."""
        return list(self._families(None))

    def collect(self) -> Iterable[Metric]:
        """One sample per family. O(1)."""
        return list(self._families(self._status()))

    def _families(self, status: Mapping[str, Any] | None) -> Iterator[Metric]:
        families = (
            (
                _gauge,
                "prefixroute_shared_state_up",
                "1 while the shared store (Redis) answers, 0 while this replica runs alone.",
                lambda st: 1.0 if st["state"] == "up" else 0.0,
            ),
            (
                _gauge,
                "prefixroute_shared_state_replicas",
                "Replicas seen alive in the shared store at the last sync (this one included).",
                lambda st: st["replicas"],
            ),
            (
                _counter,
                "prefixroute_shared_state_fallbacks",
                "Shared-store calls answered from local state (store down, slow or refusing).",
                lambda st: st["fallbacks"],
            ),
            (
                _counter,
                "prefixroute_shared_state_local_verdicts",
                "Rate-limit verdicts made on this replica's share, without the shared bucket.",
                lambda st: st["local_verdicts"],
            ),
            (
                _counter,
                "prefixroute_shared_state_peer_decisions",
                "Other replicas' decisions applied to this replica's index.",
                lambda st: st["peer_decisions"],
            ),
        )
        for make, name, doc, value in families:
            family = make(name, doc, ())
            if status is not None:
                family.add_metric([], float(value(status)))
            yield family


class _ScrapeCollector(Collector):
    """Yields the router, ledger, index and pool figures at scrape time (see `GatewayMetrics`)."""

    def __init__(
        self,
        owner: GatewayMetrics,
        endpoints: Callable[[], Sequence[EndpointState]],
        clock: Callable[[], float],
    ) -> None:
        self._owner = owner
        self._endpoints = endpoints
        self._clock = clock

    def describe(self) -> Iterable[Metric]:
        """The families, without samples: lets the registry refuse duplicate names."""
        return list(self._families(None))

    def collect(self) -> Iterable[Metric]:
        """Every scrape-time family with its current samples. O(endpoints + top-k tenants)."""
        return list(self._families(self._read()))

    def _read(self) -> tuple[list[EndpointState], float, LedgerSnapshot]:
        return list(self._endpoints()), self._clock(), self._owner.router.ledger.snapshot()

    def _families(
        self, state: tuple[list[EndpointState], float, LedgerSnapshot] | None
    ) -> Iterator[Metric]:
        yield from self._router_families(state is not None)
        yield from self._latency_families(state is not None)
        yield from self._pool_families(state)
        yield from self._ledger_families(state[2] if state is not None else None)

    def _latency_families(self, live: bool) -> Iterator[Metric]:
        """The latency model's prediction error per endpoint and kind (ttft, tpot).

        Counters of samples and of absolute error, so the MAE over a window is
        a ratio of rates; the signed error (predicted - actual) sum is a gauge,
        since it goes down whenever the model under-predicts (a counter that
        falls reads as a reset to `rate`): the bias over a window is its
        `delta` over the samples' `increase`. O(endpoints the model holds:
        it forgets removed ones).
        """
        labels = ("endpoint", "kind")
        samples = _counter(
            "prefixroute_latency_prediction_samples",
            "Completions the latency model compared its prediction with, per endpoint and kind.",
            labels,
        )
        abs_error = _counter(
            "prefixroute_latency_prediction_abs_error_seconds",
            "Sum of |predicted - actual| latency (TTFT, or time per output token), in seconds.",
            labels,
        )
        signed_error = _gauge(
            "prefixroute_latency_prediction_signed_error_seconds",
            "Sum of predicted - actual latency since start, in seconds (positive: the model "
            "over-predicts; a gauge, as it falls when the model under-predicts).",
            labels,
        )
        if live:
            for eid, e in sorted(self._owner.router.latency.error_by_endpoint().items()):
                endpoint = label_value(eid)
                for kind, n, total_abs, total_signed in (
                    ("ttft", e.ttft_samples, e.ttft_abs_s, e.ttft_signed_s),
                    ("tpot", e.tpot_samples, e.tpot_abs_s, e.tpot_signed_s),
                ):
                    samples.add_metric([endpoint, kind], n)
                    abs_error.add_metric([endpoint, kind], total_abs)
                    signed_error.add_metric([endpoint, kind], total_signed)
        yield from (samples, abs_error, signed_error)

    def _router_families(self, live: bool) -> Iterator[Metric]:
        router = self._owner.router
        c = router.counters
        for name, doc, value in (
            ("prefixroute_decisions", "Requests the router sent to an endpoint.", c.decisions),
            ("prefixroute_deferrals", "Requests admission deferred to its queue.", c.deferrals),
            ("prefixroute_completions", "Decisions settled by on_complete.", c.completions),
            ("prefixroute_failures", "Decisions that completed with a failure.", c.failures),
            ("prefixroute_prompt_tokens", "Prompt tokens of routed requests.", c.prompt_tokens),
            (
                "prefixroute_predicted_cached_tokens",
                "Prompt tokens the index predicted cached on the chosen endpoint, at decision.",
                c.predicted_cached_tokens,
            ),
        ):
            family = _counter(name, doc)
            if live:
                family.add_metric([], value)
            yield family
        predicted = _gauge(
            "prefixroute_predicted_hit_ratio",
            "Predicted cached / prompt tokens of routed requests, since start.",
        )
        if live and c.prompt_tokens:
            predicted.add_metric([], c.predicted_cached_tokens / c.prompt_tokens)
        yield predicted

        stats = router.index.stats() if live else None
        size = _gauge(
            "inference_extension_prefix_indexer_size",
            "Entries ((block, endpoint) pairs) in the router's prefix index.",
        )
        keys = _gauge("prefixroute_index_keys", "Distinct blocks in the prefix index.")
        spec = _gauge(
            "prefixroute_index_speculative_entries",
            "Index entries the router predicted and no engine confirmed yet.",
        )
        moves = [
            _counter(f"prefixroute_index_{what}", f"Index entries {what} since start.")
            for what in ("inserted", "evicted", "expired", "removed")
        ]
        per_endpoint = _gauge(
            "prefixroute_endpoint_index_entries",
            "Index entries (cached blocks the router believes) per endpoint.",
            ("endpoint",),
        )
        if stats is not None:
            size.add_metric([], stats.entries)
            keys.add_metric([], stats.keys)
            spec.add_metric([], stats.speculative)
            for family, value in zip(
                moves, (stats.inserted, stats.evicted, stats.expired, stats.removed), strict=True
            ):
                family.add_metric([], value)
            for eid, n in sorted(stats.per_endpoint.items()):
                per_endpoint.add_metric([label_value(eid)], n)
        yield from (size, keys, spec, *moves, per_endpoint)

    def _pool_families(
        self, state: tuple[list[EndpointState], float, LedgerSnapshot] | None
    ) -> Iterator[Metric]:
        owner = self._owner
        pool = owner.pool_name
        kv_avg = _gauge(
            "inference_pool_average_kv_cache_utilization",
            "Mean KV-cache utilisation (0..1) over the pool's endpoints.",
            ("name",),
        )
        queue_avg = _gauge(
            "inference_pool_average_queue_size",
            "Mean requests waiting in the engines' queues over the pool's endpoints.",
            ("name",),
        )
        ready = _gauge("inference_pool_ready_pods", "Endpoints passing health checks.", ("name",))
        per_pod = _gauge(
            "inference_pool_per_pod_queue_size",
            "Requests waiting in each endpoint's engine queue.",
            ("name", "model_server_pod"),
        )
        labels = ("endpoint",)
        running = _gauge(
            "prefixroute_endpoint_running_requests",
            "Requests the engine reports running.",
            labels,
        )
        kv = _gauge(
            "prefixroute_endpoint_kv_cache_utilization",
            "KV-cache utilisation (0..1) the engine reports.",
            labels,
        )
        healthy = _gauge("prefixroute_endpoint_healthy", "1 if health checks pass.", labels)
        stale = _gauge(
            "prefixroute_endpoint_stale",
            f"1 if the endpoint's metrics are missing or older than {owner.stale_after_s:g} s.",
            labels,
        )
        age = _gauge(
            "prefixroute_endpoint_metrics_age_seconds",
            "Age of the endpoint's scraped metrics (absent when never scraped).",
            labels,
        )
        inflight = _gauge(
            "prefixroute_endpoint_inflight_requests",
            "Requests the router sent to the endpoint that have not completed.",
            labels,
        )
        inflight_tokens = _gauge(
            "prefixroute_endpoint_inflight_tokens",
            "Token work (uncached prompt + expected output) the router has in flight there.",
            labels,
        )
        if state is not None:
            eps, now, _ = state
            n = len(eps)
            kv_avg.add_metric([pool], sum(e.kv_usage for e in eps) / n if n else 0.0)
            queue_avg.add_metric([pool], sum(e.waiting for e in eps) / n if n else 0.0)
            ready.add_metric([pool], sum(1 for e in eps if e.healthy))
            limit = owner.stale_after_s
            for e in eps:
                eid = label_value(e.id)
                per_pod.add_metric([pool, eid], e.waiting)
                running.add_metric([eid], e.running)
                kv.add_metric([eid], e.kv_usage)
                healthy.add_metric([eid], 1.0 if e.healthy else 0.0)
                seen = e.observed_at
                stale.add_metric([eid], 1.0 if seen is None or now - seen > limit else 0.0)
                if seen is not None:
                    age.add_metric([eid], max(0.0, now - seen))
            load = owner.router.load
            requests, tokens = load.requests_view(), load.tokens_view()
            for eid in sorted({e.id for e in eps} | requests.keys()):
                inflight.add_metric([label_value(eid)], requests.get(eid, 0))
                inflight_tokens.add_metric([label_value(eid)], tokens.get(eid, 0))
        yield from (kv_avg, queue_avg, ready, per_pod, running, kv, healthy, stale, age)
        yield from (inflight, inflight_tokens)

    def _ledger_families(self, snap: LedgerSnapshot | None) -> Iterator[Metric]:
        tl = ("tenant",)
        counters = [
            _counter(f"prefixroute_tenant_{name}", doc, tl) for name, doc in _TENANT_COUNTERS
        ]
        rejections = _counter(
            "prefixroute_rejections", "Requests the router rejected, by kind.", ("kind",)
        )
        tenant_rejections = _counter(
            "prefixroute_tenant_rejections", "Rejections per tenant and kind.", ("tenant", "kind")
        )
        completed = _counter(
            "prefixroute_completed_prompt_tokens",
            "Prompt tokens of routed requests that completed ok.",
        )
        cached = _counter(
            "prefixroute_cached_tokens",
            "Prompt tokens the engines reported cached, for routed requests that completed ok.",
        )
        hit = _gauge("prefixroute_tenant_hit_ratio", "Engine-reported cached / prompt tokens.", tl)
        predicted_hit = _gauge(
            "prefixroute_tenant_predicted_hit_ratio", "Predicted cached / prompt tokens.", tl
        )
        tenant_inflight = _gauge(
            "prefixroute_tenant_inflight_requests", "Routed requests not yet completed.", tl
        )
        attainment = _gauge(
            "prefixroute_tenant_slo_attainment_ratio",
            "Requests meeting their latency objectives / requests with objectives, since the "
            "tenant entered the ledger (absent before its first request with one).",
            tl,
        )
        slo_requests = _counter(
            "prefixroute_slo_requests",
            "Requests with a latency objective, all tenants (completed, failed or rejected).",
        )
        slo_met = _counter(
            "prefixroute_slo_met",
            "Requests with an objective that completed ok and met every objective, all tenants.",
        )
        tail = _gauge(
            "prefixroute_tenant_tail",
            "1 if the tenant is in the tail (fewer requests than the ledger's tail quantile).",
            tl,
        )
        ttft = SummaryMetricFamily(
            "prefixroute_tenant_ttft_seconds",
            "TTFT per tenant since it entered the ledger (quantiles within 3.85%).",
            labels=["tenant"],
        )
        group = _gauge(
            "prefixroute_tenant_group_hit_ratio",
            "Cached / prompt tokens of head, tail and all tenants; source actual or predicted.",
            ("group", "source"),
        )
        groups_n = _gauge(
            "prefixroute_tenant_group_tenants",
            "Tracked tenants in the head and the tail.",
            ("group",),
        )
        jain = _gauge(
            "prefixroute_fairness_jain_index",
            "Jain's fairness index over tracked tenants, of hit ratio or TTFT slowdown.",
            ("of",),
        )
        bias = _gauge(
            "prefixroute_prediction_bias_ratio",
            "(Predicted - actual cached tokens) / prompt tokens, over completed requests.",
        )
        mae = _gauge(
            "prefixroute_prediction_mae_ratio",
            "Mean |predicted - actual cached tokens| / prompt tokens, over completed requests.",
        )
        evictions = _counter(
            "prefixroute_ledger_evictions", "Tenants the ledger's top-k table replaced."
        )
        tracked = _gauge("prefixroute_ledger_tracked_tenants", "Tenants the ledger tracks exactly.")
        if snap is not None:
            total = snap.total
            for kind, n in total.rejections.items():
                rejections.add_metric([label_value(kind)], n)
            completed.add_metric([], total.completed_prompt_tokens)
            cached.add_metric([], total.cached_tokens)
            slo_requests.add_metric([], total.slo_requests)
            slo_met.add_metric([], total.slo_met)
            evictions.add_metric([], snap.evictions)
            tracked.add_metric([], len(snap.tenants))
            f = snap.fairness
            rows = _rows(snap)
            tail_rows = [s for s in rows if _is_tail(s, f.tail_threshold)]
            tail_names = {s.tenant for s in tail_rows}
            head_rows = [s for s in rows if s.requests > 0 and s.tenant not in tail_names]
            for s in rows:
                tenant = label_value(s.tenant)
                label = [tenant]
                for family, value in zip(counters, _tenant_figures(s), strict=True):
                    family.add_metric(label, value)
                for kind, n in s.rejections.items():
                    tenant_rejections.add_metric([tenant, label_value(kind)], n)
                if s.hit_rate is not None:
                    hit.add_metric(label, s.hit_rate)
                if s.predicted_hit_rate is not None:
                    predicted_hit.add_metric(label, s.predicted_hit_rate)
                tenant_inflight.add_metric(label, s.in_flight)
                if s.attainment is not None:
                    attainment.add_metric(label, s.attainment)
                if f.tail_threshold is not None and (s.requests > 0 or s.tenant == OTHER):
                    tail.add_metric(label, 1.0 if s.tenant in tail_names else 0.0)
                if s.ttft.count:
                    ttft.add_metric(label, s.ttft.count, (s.ttft.mean or 0.0) * s.ttft.count)
                    for q, v in zip(
                        TTFT_QUANTILES, (s.ttft.p50, s.ttft.p95, s.ttft.p99), strict=True
                    ):
                        if v is not None:
                            ttft.samples.append(
                                Sample(ttft.name, {"tenant": tenant, "quantile": q}, v)
                            )
            for name, actual, members in (
                ("head", f.head_hit_rate, head_rows),
                ("tail", f.tail_hit_rate, tail_rows),
                ("all", total.hit_rate, None),
            ):
                if actual is not None:
                    group.add_metric([name, "actual"], actual)
                if members is None:
                    predicted = total.predicted_hit_rate
                else:
                    predicted = _ratio(
                        sum(s.predicted_cached_tokens for s in members),
                        sum(s.prompt_tokens for s in members),
                    )
                if predicted is not None:
                    group.add_metric([name, "predicted"], predicted)
            groups_n.add_metric(["head"], f.head_tenants)
            groups_n.add_metric(["tail"], f.tail_tenants)
            if f.jain_hit_rate is not None:
                jain.add_metric(["hit_ratio"], f.jain_hit_rate)
            if f.jain_ttft is not None:
                jain.add_metric(["ttft"], f.jain_ttft)
            if f.prediction_bias is not None:
                bias.add_metric([], f.prediction_bias)
            if f.prediction_mae is not None:
                mae.add_metric([], f.prediction_mae)
        yield from counters
        yield from (rejections, tenant_rejections, completed, cached, hit, predicted_hit)
        yield from (tenant_inflight, attainment, slo_requests, slo_met)
        yield from (tail, ttft, group, groups_n, jain, bias, mae)
        yield from (evictions, tracked)


def _is_tail(s: TenantSnapshot, threshold: float | None) -> bool:
    """The ledger's tail: ``other``, and tracked tenants with fewer requests than the threshold."""
    if threshold is None:
        return False
    return s.tenant == OTHER or 0 < s.requests < threshold


def _rows(snap: LedgerSnapshot) -> list[TenantSnapshot]:
    """Tracked tenants plus ``other``; a tracked tenant literally named "other" folds into it."""
    rows = [s for s in snap.tenants if s.tenant != OTHER]
    other = snap.other
    for s in snap.tenants:
        if s.tenant == OTHER:  # one label per series: merge its counts, keep the aggregate's TTFT
            other = TenantSnapshot(
                tenant=OTHER,
                requests=other.requests + s.requests - s.count_error,
                prompt_tokens=other.prompt_tokens + s.prompt_tokens,
                predicted_cached_tokens=other.predicted_cached_tokens + s.predicted_cached_tokens,
                completed=other.completed + s.completed,
                failed=other.failed + s.failed,
                completed_prompt_tokens=other.completed_prompt_tokens + s.completed_prompt_tokens,
                cached_tokens=other.cached_tokens + s.cached_tokens,
                in_flight=other.in_flight + s.in_flight,
                rejected=other.rejected + s.rejected,
                slo_requests=other.slo_requests + s.slo_requests,
                slo_met=other.slo_met + s.slo_met,
                rejections={
                    k: other.rejections.get(k, 0) + s.rejections.get(k, 0)
                    for k in {*other.rejections, *s.rejections}
                },
                ttft=other.ttft,
            )
    return [*rows, other]


CLIENT_CLOSED = 499  # nginx's "client closed request": a status for metrics only, never sent


class RequestRecord:
    """One client request's metrics: `request_started` once, `observe_request` once, whatever
    path the request takes (drivers create one per request and end it exactly once)."""

    __slots__ = ("begun", "ended", "metrics", "model", "request_bytes", "started", "tenant")

    def __init__(self, metrics: GatewayMetrics, started: float) -> None:
        self.metrics = metrics
        self.started = started
        self.model = "unknown"
        self.tenant = "unknown"
        self.request_bytes = 0
        self.begun = False
        self.ended = False

    def begin(self) -> None:
        if not self.begun:
            self.begun = True
            self.model = self.metrics.model_label(self.model)  # one label from start to end
            self.metrics.request_started(self.model, self.tenant)

    def end(
        self,
        status: int,
        *,
        now: float,
        code: str | None = None,
        endpoint: str | None = None,
        ttft_s: float | None = None,
        usage: Usage | None = None,
        response_bytes: int = 0,
    ) -> None:
        if self.ended:
            return
        self.begin()
        self.ended = True
        self.metrics.observe_request(
            model=self.model,
            tenant=self.tenant,
            endpoint=endpoint,
            status=status,
            code=code,
            duration_s=now - self.started,
            ttft_s=ttft_s,
            usage=usage,
            request_bytes=self.request_bytes,
            response_bytes=response_bytes,
        )
