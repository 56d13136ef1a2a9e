"""The gateway's Prometheus exporter: real router, real registry, parsed exposition text."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from prefixroute import Decision, EndpointState, Rejection, Request, Router, Usage
from prefixroute.drivers.metrics import OTHER, BoundedLabel, GatewayMetrics, RequestRecord
from prefixroute.ledger import TenantLedger
from tests.helpers import endpoint

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "examples" / "grafana" / "prefixroute-dashboard.json"
SYSTEM = "You are a helpful assistant for a logistics company. Answer briefly. " * 6

Key = tuple[str, frozenset[tuple[str, str]]]
Setup = tuple["GatewayMetrics", Router, list[EndpointState], "Clock"]


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Scrape:
    """A parsed exposition: samples by (name, labels), family types by name."""

    def __init__(self, body: bytes) -> None:
        self.values: dict[Key, float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(body.decode("utf-8")):
            self.types[family.name] = family.type
            for s in family.samples:
                key = (s.name, frozenset(s.labels.items()))
                assert key not in self.values, f"duplicate series {key}"
                self.values[key] = s.value

    def get(self, metric: str, /, **labels: str) -> float:
        return self.values[(metric, frozenset(labels.items()))]

    def has(self, metric: str, /, **labels: str) -> bool:
        return (metric, frozenset(labels.items())) in self.values

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: v for (n, labels), v in self.values.items() if n == name}

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(labels)[label] for labels in self.series(name)}

    def names(self) -> set[str]:
        return {n for n, _ in self.values}


def scrape(metrics: GatewayMetrics) -> Scrape:
    body, content_type = metrics.render()
    assert content_type == prometheus_client.CONTENT_TYPE_LATEST
    return Scrape(body)


def fleet() -> list[EndpointState]:
    return [
        endpoint(0, waiting=3, running=5, kv_usage=0.25, observed_at=99.5),
        endpoint(1, waiting=0, running=2, kv_usage=0.75, observed_at=99.9),
        endpoint(2, waiting=7, running=1, kv_usage=0.5, observed_at=90.0),  # stale
        endpoint(3, healthy=False, observed_at=None),  # never scraped
    ]


def request(tenant: str, i: int, *, model: str = "m") -> Request:
    return Request(model=model, prompt=SYSTEM + f"Question {i}?", tenant=tenant, max_tokens=16)


def serve(
    metrics: GatewayMetrics,
    router: Router,
    eps: Sequence[EndpointState],
    req: Request,
    now: float,
    *,
    status: int = 200,
) -> Decision | Rejection:
    """What the gateway does for one request: route, complete, report."""
    metrics.request_started(req.model, req.tenant)
    outcome = router.route(req, eps, now)
    assert isinstance(outcome, Decision | Rejection), outcome
    decision = outcome if isinstance(outcome, Decision) else None
    metrics.observe_decision(0.0002, "decision" if decision else "rejection", decision=decision)
    size = len(req.prompt or "")
    if isinstance(outcome, Decision):
        usage = Usage(
            prompt_tokens=outcome.prompt_tokens,
            cached_tokens=outcome.predicted_cached_tokens // 2,
            completion_tokens=8,
            ttft_s=0.04,
            e2e_s=0.3,
            ok=status < 400,
        )
        router.on_complete(outcome, usage, now + 0.3)
        metrics.observe_request(
            model=req.model,
            tenant=req.tenant,
            endpoint=outcome.endpoint,
            status=status,
            code=None if status < 400 else "upstream_error",
            duration_s=0.3,
            ttft_s=0.04 if status < 400 else None,
            usage=usage if status < 400 else None,
            request_bytes=size,
            response_bytes=200,
        )
    else:
        metrics.observe_request(
            model=req.model,
            tenant=req.tenant,
            endpoint=None,
            status=outcome.status,
            code=outcome.kind,
            duration_s=0.001,
            ttft_s=None,
            usage=None,
            request_bytes=size,
            response_bytes=100,
        )
    return outcome


@pytest.fixture
def setup() -> Iterator[Setup]:
    router = Router.default()
    eps = fleet()
    clock = Clock()
    metrics = GatewayMetrics(CollectorRegistry(), router, lambda: eps, clock=clock)
    yield metrics, router, eps, clock


def drive(
    metrics: GatewayMetrics, router: Router, eps: list[EndpointState]
) -> list[Decision | Rejection]:
    """A mixed workload: two busy tenants, three light ones, one failure, one rejection."""
    out: list[Decision | Rejection] = []
    now = 100.0
    for i in range(12):
        tenant = ("alpha", "beta", "alpha", "gamma", "alpha", "beta")[i % 6]
        out.append(serve(metrics, router, eps, request(tenant, i), now))
        now += 0.5
    out.append(serve(metrics, router, eps, request("delta", 99), now, status=502))
    out.append(serve(metrics, router, [], request("epsilon", 7), now))  # no endpoint: rejected
    metrics.observe_retry("e0", "connect_error")
    return out


# -- the request path ----------------------------------------------------------------------


def test_request_counts_errors_and_running_gauge(setup: Setup) -> None:
    metrics, *_ = setup
    metrics.request_started("m", "alpha")
    metrics.request_started("m", "alpha")
    assert scrape(metrics).get("inference_objective_running_requests", model_name="m") == 2
    metrics.observe_request(
        model="m",
        tenant="alpha",
        endpoint="e0",
        status=200,
        code=None,
        duration_s=1.5,
        ttft_s=0.2,
        usage=Usage(prompt_tokens=1000, cached_tokens=600, completion_tokens=50),
        request_bytes=4000,
        response_bytes=900,
    )
    metrics.observe_request(
        model="m",
        tenant="alpha",
        endpoint=None,
        status=429,
        code="rate_limit_exceeded",
        duration_s=0.001,
        ttft_s=None,
        usage=None,
        request_bytes=4000,
        response_bytes=120,
    )
    s = scrape(metrics)
    pair = {"model_name": "m", "target_model_name": "m"}
    assert s.get("inference_objective_running_requests", model_name="m") == 0
    assert s.get("inference_objective_request_total", **pair) == 2
    assert (
        s.get("inference_objective_request_error_total", error_code="rate_limit_exceeded", **pair)
        == 1
    )
    assert s.label_values("inference_objective_request_error_total", "error_code") == {
        "rate_limit_exceeded"
    }
    assert s.get("inference_objective_request_duration_seconds_count", **pair) == 2
    assert s.get("inference_objective_request_duration_seconds_sum", **pair) == pytest.approx(1.501)
    assert s.get("inference_objective_request_ttft_seconds_count", **pair) == 1
    assert s.get("inference_objective_request_ttft_seconds_bucket", le="0.2", **pair) == 1
    assert s.get("inference_objective_request_ttft_seconds_bucket", le="0.1", **pair) == 0
    assert s.get("inference_objective_input_tokens_sum", **pair) == 1000
    assert s.get("inference_objective_prompt_cached_tokens_sum", **pair) == 600
    assert s.get("inference_objective_output_tokens_sum", **pair) == 50
    assert s.get(
        "inference_objective_normalized_time_per_output_token_seconds_sum", **pair
    ) == pytest.approx(1.5 / 50)
    assert s.get("inference_objective_request_sizes_sum", **pair) == 8000
    assert s.get("inference_objective_response_sizes_count", **pair) == 2
    assert s.get("prefixroute_requests_total", tenant="alpha", code="200") == 1
    assert s.get("prefixroute_requests_total", tenant="alpha", code="429") == 1
    assert s.get("prefixroute_ttft_seconds_count", tenant="alpha") == 1
    assert s.get("prefixroute_ttft_seconds_bucket", tenant="alpha", le="0.25") == 1
    assert s.get("prefixroute_endpoint_requests_total", endpoint="e0") == 1
    assert s.types["inference_objective_request"] == "counter"
    assert s.types["inference_objective_request_ttft_seconds"] == "histogram"
    assert s.types["inference_objective_running_requests"] == "gauge"


def test_error_code_defaults_to_the_status(setup: Setup) -> None:
    metrics, *_ = setup
    metrics.request_started("m", "t")
    metrics.observe_request(
        model="m",
        tenant="t",
        endpoint="e1",
        status=503,
        code=None,
        duration_s=0.01,
        ttft_s=None,
        usage=None,
        request_bytes=10,
        response_bytes=10,
    )
    s = scrape(metrics)
    assert s.label_values("inference_objective_request_error_total", "error_code") == {"503"}


def test_decisions_attempts_and_hit_ratio_histogram(setup: Setup) -> None:
    metrics, router, eps, _ = setup
    outcomes = drive(metrics, router, eps)
    decisions = [o for o in outcomes if isinstance(o, Decision)]
    metrics.observe_decision(0.00003, "deferral")
    s = scrape(metrics)
    attempts = "inference_extension_scheduler_attempts_total"
    assert s.get(attempts, status="success") == len(decisions)
    assert s.get(attempts, status="failure") == len(outcomes) - len(decisions)
    assert s.get(attempts, status="deferred") == 1
    latency = "inference_extension_scheduler_e2e_duration_seconds"
    assert s.get(f"{latency}_count") == len(outcomes) + 1
    assert s.get(f"{latency}_bucket", le="2.5e-05") == 0
    assert s.get(f"{latency}_bucket", le="5e-05") == 1
    ratio = "inference_extension_prefix_indexer_hit_ratio"
    assert s.get(f"{ratio}_count") == len(decisions)
    expected = sum(d.matched_blocks / d.total_blocks for d in decisions)
    assert s.get(f"{ratio}_sum") == pytest.approx(expected)
    assert s.get(f"{ratio}_bucket", le="0.0") == sum(d.matched_blocks == 0 for d in decisions)
    with pytest.raises(ValueError, match="outcome"):
        metrics.observe_decision(0.001, "decided")


def test_retries_are_counted_by_endpoint_and_reason(setup: Setup) -> None:
    metrics, *_ = setup
    metrics.observe_retry("e0", "connect_error")
    metrics.observe_retry("e0", "connect_error")
    metrics.observe_retry("e1", "http_503")
    s = scrape(metrics)
    assert s.get("prefixroute_retries_total", endpoint="e0", reason="connect_error") == 2
    assert s.get("prefixroute_retries_total", endpoint="e1", reason="http_503") == 1


# -- scrape time: router, index, ledger ------------------------------------------------------


def test_router_counters_and_hit_ratios_match_the_core(setup: Setup) -> None:
    metrics, router, eps, _ = setup
    drive(metrics, router, eps)
    s = scrape(metrics)
    c = router.counters
    assert c.decisions == 13 and c.rejections == 1 and c.failures == 1
    assert s.get("prefixroute_decisions_total") == c.decisions
    assert s.get("prefixroute_completions_total") == c.completions
    assert s.get("prefixroute_failures_total") == c.failures
    assert s.get("prefixroute_deferrals_total") == 0
    assert s.get("prefixroute_prompt_tokens_total") == c.prompt_tokens
    assert s.get("prefixroute_predicted_cached_tokens_total") == c.predicted_cached_tokens
    assert c.predicted_cached_tokens > 0
    assert s.get("prefixroute_predicted_hit_ratio") == pytest.approx(
        c.predicted_cached_tokens / c.prompt_tokens
    )
    total = router.ledger.snapshot().total
    # ok completions only, like completed_prompt_tokens (the failed request's report is left out)
    assert s.get("prefixroute_cached_tokens_total") == total.cached_tokens < c.actual_cached_tokens
    assert s.get("prefixroute_completed_prompt_tokens_total") == total.completed_prompt_tokens
    assert s.get("prefixroute_rejections_total", kind="no-endpoint") == 1
    assert s.get("prefixroute_tenant_group_hit_ratio", group="all", source="actual") == (
        pytest.approx(total.cached_tokens / total.completed_prompt_tokens)
    )
    assert s.get("prefixroute_tenant_group_hit_ratio", group="all", source="predicted") == (
        pytest.approx(c.predicted_cached_tokens / c.prompt_tokens)
    )
    stats = router.index.stats()
    assert s.get("inference_extension_prefix_indexer_size") == stats.entries > 0
    assert s.get("prefixroute_index_keys") == stats.keys
    assert s.get("prefixroute_index_inserted_total") == stats.inserted
    for eid, n in stats.per_endpoint.items():
        assert s.get("prefixroute_endpoint_index_entries", endpoint=eid) == n


def test_tenant_series_come_from_the_ledger_snapshot(setup: Setup) -> None:
    metrics, router, eps, _ = setup
    drive(metrics, router, eps)
    s = scrape(metrics)
    snap = router.ledger.snapshot()
    names = {t.tenant for t in snap.tenants} | {OTHER}
    assert s.label_values("prefixroute_tenant_requests_total", "tenant") == names
    for t in snap.tenants:
        assert s.get("prefixroute_tenant_requests_total", tenant=t.tenant) == t.requests
        assert s.get("prefixroute_tenant_prompt_tokens_total", tenant=t.tenant) == t.prompt_tokens
        assert s.get("prefixroute_tenant_cached_tokens_total", tenant=t.tenant) == t.cached_tokens
        assert s.get("prefixroute_tenant_failures_total", tenant=t.tenant) == t.failed
        assert s.get("prefixroute_tenant_inflight_requests", tenant=t.tenant) == t.in_flight
        if t.hit_rate is not None:
            assert s.get("prefixroute_tenant_hit_ratio", tenant=t.tenant) == pytest.approx(
                t.hit_rate
            )
        if t.ttft.count:
            assert s.get("prefixroute_tenant_ttft_seconds_count", tenant=t.tenant) == t.ttft.count
            assert s.get(
                "prefixroute_tenant_ttft_seconds", tenant=t.tenant, quantile="0.99"
            ) == pytest.approx(t.ttft.p99)
    f = snap.fairness
    assert f.head_hit_rate is not None and f.tail_hit_rate is not None
    group = "prefixroute_tenant_group_hit_ratio"
    assert s.get(group, group="head", source="actual") == pytest.approx(f.head_hit_rate)
    assert s.get(group, group="tail", source="actual") == pytest.approx(f.tail_hit_rate)
    assert s.get("prefixroute_tenant_group_tenants", group="tail") == f.tail_tenants
    assert s.get("prefixroute_fairness_jain_index", of="hit_ratio") == pytest.approx(
        f.jain_hit_rate
    )
    # alpha (6 requests) is head; gamma and delta (1-2) are tail, as is "other"
    assert s.get("prefixroute_tenant_tail", tenant="alpha") == 0
    assert s.get("prefixroute_tenant_tail", tenant="gamma") == 1
    assert s.get("prefixroute_tenant_tail", tenant=OTHER) == 1
    tail = [t for t in snap.tenants if 0 < t.requests < (f.tail_threshold or 0)]
    predicted = sum(t.predicted_cached_tokens for t in tail) / sum(t.prompt_tokens for t in tail)
    assert s.get(group, group="tail", source="predicted") == pytest.approx(predicted)
    # epsilon was rejected before it was ever routed: the ledger counts it in "other"
    assert s.get("prefixroute_tenant_rejections_total", tenant=OTHER, kind="no-endpoint") == 1
    assert "epsilon" not in s.label_values("prefixroute_tenant_requests_total", "tenant")


def test_ledger_other_row_and_a_tenant_named_other_share_one_series() -> None:
    router = Router(ledger=TenantLedger(top_k=2))
    eps = fleet()
    metrics = GatewayMetrics(CollectorRegistry(), router, lambda: eps, clock=Clock())
    for i, tenant in enumerate(["a", "a", "a", "other", "other", "b", "c", "d"]):
        serve(metrics, router, eps, request(tenant, i), 100.0 + i)
    s = scrape(metrics)  # Scrape refuses duplicate series
    snap = router.ledger.snapshot()
    routed = sum(t.requests - t.count_error for t in snap.tenants) + snap.other.requests
    assert routed == 8
    assert sum(s.series("prefixroute_tenant_requests_total").values()) == routed
    assert s.label_values("prefixroute_tenant_requests_total", "tenant") == (
        {t.tenant for t in snap.tenants} | {OTHER}
    )
    assert s.get("prefixroute_ledger_evictions_total") == snap.evictions > 0


# -- scrape time: endpoints and pool ----------------------------------------------------------


def test_endpoint_gauges_equal_the_states(setup: Setup) -> None:
    metrics, router, eps, clock = setup
    routed = [router.route(request("alpha", i), eps, 100.0) for i in range(3)]
    decisions = [d for d in routed if isinstance(d, Decision)]
    s = scrape(metrics)
    pool = {"name": "default"}
    assert s.get("inference_pool_ready_pods", **pool) == 3
    assert s.get("inference_pool_average_queue_size", **pool) == pytest.approx(10 / 4)
    assert s.get("inference_pool_average_kv_cache_utilization", **pool) == pytest.approx(1.5 / 4)
    for e in eps:
        assert s.get("inference_pool_per_pod_queue_size", model_server_pod=e.id, **pool) == (
            e.waiting
        )
        assert s.get("prefixroute_endpoint_running_requests", endpoint=e.id) == e.running
        assert s.get("prefixroute_endpoint_kv_cache_utilization", endpoint=e.id) == e.kv_usage
        assert s.get("prefixroute_endpoint_healthy", endpoint=e.id) == float(e.healthy)
        assert s.get("prefixroute_endpoint_inflight_requests", endpoint=e.id) == (
            router.load.requests(e.id)
        )
        assert s.get("prefixroute_endpoint_inflight_tokens", endpoint=e.id) == (
            router.load.tokens(e.id)
        )
    assert sum(s.series("prefixroute_endpoint_inflight_requests").values()) == len(decisions) == 3
    stale = {e: s.get("prefixroute_endpoint_stale", endpoint=e) for e in ("e0", "e1", "e2", "e3")}
    assert stale == {"e0": 0, "e1": 0, "e2": 1, "e3": 1}
    assert s.get("prefixroute_endpoint_metrics_age_seconds", endpoint="e0") == pytest.approx(0.5)
    assert not s.has("prefixroute_endpoint_metrics_age_seconds", endpoint="e3")
    clock.now = 102.0  # e0 (observed at 99.5) is now 2.5 s old: stale
    assert scrape(metrics).get("prefixroute_endpoint_stale", endpoint="e0") == 1


def test_stale_threshold_is_a_constructor_argument() -> None:
    eps = [endpoint(0, observed_at=95.0)]
    metrics = GatewayMetrics(
        CollectorRegistry(), Router.default(), lambda: eps, stale_after_s=10.0, clock=Clock(100.0)
    )
    assert scrape(metrics).get("prefixroute_endpoint_stale", endpoint="e0") == 0


def test_empty_pool_reports_zero_averages() -> None:
    metrics = GatewayMetrics(CollectorRegistry(), Router.default(), list, pool_name="p1")
    s = scrape(metrics)
    assert s.get("inference_pool_ready_pods", name="p1") == 0
    assert s.get("inference_pool_average_queue_size", name="p1") == 0
    assert s.get("prefixroute_decisions_total") == 0
    assert not s.series("prefixroute_predicted_hit_ratio")  # undefined before any routing


# -- cardinality ----------------------------------------------------------------------------


def test_the_65th_tenant_folds_into_other() -> None:
    router = Router.default()
    metrics = GatewayMetrics(CollectorRegistry(), router, list, max_tenants=64)
    for i in range(70):
        tenant = f"tenant-{i:02d}"
        metrics.request_started("m", tenant)
        metrics.observe_request(
            model="m",
            tenant=tenant,
            endpoint="e0",
            status=200,
            code=None,
            duration_s=0.1,
            ttft_s=0.01,
            usage=None,
            request_bytes=1,
            response_bytes=1,
        )
    metrics.request_started("m", "tenant-00")  # admitted before the cap filled: keeps its label
    metrics.observe_request(
        model="m",
        tenant="tenant-00",
        endpoint="e0",
        status=200,
        code=None,
        duration_s=0.1,
        ttft_s=0.01,
        usage=None,
        request_bytes=1,
        response_bytes=1,
    )
    s = scrape(metrics)
    tenants = s.label_values("prefixroute_requests_total", "tenant")
    assert tenants == {f"tenant-{i:02d}" for i in range(64)} | {OTHER}
    assert s.get("prefixroute_requests_total", tenant=OTHER, code="200") == 6
    assert s.get("prefixroute_requests_total", tenant="tenant-00", code="200") == 2
    assert s.label_values("prefixroute_ttft_seconds_count", "tenant") == tenants
    assert sum(s.series("prefixroute_ttft_seconds_count").values()) == 71


def test_folded_models_keep_the_running_gauge_balanced() -> None:
    metrics = GatewayMetrics(CollectorRegistry(), Router.default(), list, max_models=2)
    models = [f"model-{i}" for i in range(5)] + [""]
    for model in models:
        metrics.request_started(model, "t")
    s = scrape(metrics)
    running = s.series("inference_objective_running_requests")
    # an empty name is "unknown", a fixed label outside the cap
    assert {dict(k)["model_name"] for k in running} == {"model-0", "model-1", OTHER, "unknown"}
    assert s.get("inference_objective_running_requests", model_name=OTHER) == 3
    for model in models:
        metrics.observe_request(
            model=model,
            tenant="t",
            endpoint=None,
            status=404,
            code="model_not_found",
            duration_s=0.001,
            ttft_s=None,
            usage=None,
            request_bytes=1,
            response_bytes=1,
        )
    assert set(scrape(metrics).series("inference_objective_running_requests").values()) == {0.0}
    assert len(metrics._by_model) == 4  # folded names are not cached one by one


def test_bounded_label() -> None:
    label = BoundedLabel(2, pinned=["vip"])
    assert [label.bound(v) for v in ("a", "vip", "b", "c", "a", "", "vip")] == [
        "a",
        "vip",
        "b",
        OTHER,
        "a",
        OTHER,
        "vip",
    ]
    assert label.admitted() == {"a", "b"}
    assert BoundedLabel(1).bound("") == "unknown"
    with pytest.raises(ValueError, match="cap"):
        BoundedLabel(0)


def test_pinned_ledger_tenants_do_not_use_the_cap() -> None:
    router = Router(ledger=TenantLedger(pinned=["vip"]))
    metrics = GatewayMetrics(CollectorRegistry(), router, list, max_tenants=1)
    for tenant in ("a", "b", "vip"):
        metrics.request_started("m", tenant)
        metrics.observe_request(
            model="m",
            tenant=tenant,
            endpoint=None,
            status=200,
            code=None,
            duration_s=0.1,
            ttft_s=None,
            usage=None,
            request_bytes=1,
            response_bytes=1,
        )
    tenants = scrape(metrics).label_values("prefixroute_requests_total", "tenant")
    assert tenants == {"a", OTHER, "vip"}


# -- construction and registries ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tenants": 0}, "max_tenants"),
        ({"max_models": -1}, "max_models"),
        ({"max_endpoints": True}, "max_endpoints"),
        ({"stale_after_s": 0.0}, "stale_after_s"),
        ({"stale_after_s": math.inf}, "stale_after_s"),
        ({"pool_name": ""}, "pool_name"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        GatewayMetrics(CollectorRegistry(), Router.default(), list, **kwargs)  # type: ignore[arg-type]


def test_registries_are_private_and_duplicates_refused() -> None:
    registry = CollectorRegistry()
    GatewayMetrics(registry, Router.default(), list)
    GatewayMetrics(CollectorRegistry(), Router.default(), list)  # a second gateway is fine
    with pytest.raises(ValueError, match="Duplicated"):
        GatewayMetrics(registry, Router.default(), list)
    default = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "inference_objective_request_total" not in default
    assert "prefixroute_" not in default


# -- the Grafana dashboard ------------------------------------------------------------------

PROMQL_WORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}
LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers other than functions, keywords, labels."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers (and Grafana variables in them)
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors
    e = LABEL_LISTS.sub("", e)  # by (...), on (...), group_left (...)
    names = set()
    for m in IDENT.finditer(e):
        rest = e[m.end() :].lstrip()
        if rest.startswith("(") or m.group() in PROMQL_WORDS:
            continue  # a function or an aggregation
        if m.start() > 0 and e[m.start() - 1] in "$.0123456789":
            continue  # a Grafana variable or part of a number (1e3)
        names.add(m.group())
    return names


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, tenant) (rate(a_bucket{x="y", m=~"$model"}[5m])))'
        " / on (tenant) group_left () b and c offset 5m > bool 1e3"
    )
    assert metric_names(expr) == {"a_bucket", "b", "c"}


def dashboard() -> dict[str, object]:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def panels(doc: dict[str, object]) -> list[dict[str, object]]:
    out = []
    for p in doc["panels"]:  # type: ignore[attr-defined]
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def exprs(doc: dict[str, object]) -> list[str]:
    out = [t["expr"] for p in panels(doc) for t in p.get("targets", [])]  # type: ignore[attr-defined]
    for var in doc["templating"]["list"]:  # type: ignore[index]
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if isinstance(query, str) and (m := re.match(r"label_values\((\w+),\s*\w+\)", query)):
            out.append(m.group(1))
    return out


def test_dashboard_uses_only_exported_metrics(setup: Setup) -> None:
    metrics, router, eps, _ = setup
    drive(metrics, router, eps)
    exported = scrape(metrics).names()
    used = set().union(*(metric_names(e) for e in exprs(dashboard())))
    assert len(used) >= 25
    missing = sorted(used - exported)
    assert not missing, f"dashboard queries metrics GatewayMetrics does not export: {missing}"


def test_dashboard_structure() -> None:
    doc = dashboard()
    assert doc["schemaVersion"] == 39 and doc["uid"] and doc["title"]
    variables = {v["name"]: v for v in doc["templating"]["list"]}  # type: ignore[index]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids: set[int] = set()
    cells: set[tuple[int, int]] = set()
    for p in panels(doc):
        assert isinstance(p["id"], int) and p["id"] not in ids
        ids.add(p["id"])
        assert p["title"] and p["type"] in {"row", "timeseries", "stat"}
        g = p["gridPos"]
        assert isinstance(g, dict) and {"x", "y", "w", "h"} <= g.keys()
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0
        for x in range(g["x"], g["x"] + g["w"]):  # panels never overlap
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        targets = p["targets"]
        assert isinstance(targets, list) and targets
        assert len({t["refId"] for t in targets}) == len(targets)
        for t in targets:
            assert t["expr"].strip() and t["datasource"] == p["datasource"]
            assert t["expr"].count("(") == t["expr"].count(")")
    titles = " ".join(str(p["title"]).lower() for p in panels(doc))
    for topic in ("hit rate", "tail", "ttft", "queue", "kv", "error", "decision", "rejection"):
        assert topic in titles, f"no panel about {topic}"


def test_only_served_models_take_a_label_and_a_request_keeps_its_label() -> None:
    served = {"served"}
    metrics = GatewayMetrics(
        CollectorRegistry(), Router.default(), list, served_models=lambda: served
    )
    assert [metrics.model_label(m) for m in ("served", "junk", "", "\ud800")] == [
        "served",
        OTHER,
        "unknown",
        OTHER,
    ]
    for i in range(100):  # junk never takes a slot, so a later served name still gets one
        assert metrics.model_label(f"junk-{i}") == OTHER
    served.add("late")
    assert metrics.model_label("late") == "late"
    # a request that started as "other" ends there, though its model became served meanwhile
    record = RequestRecord(metrics, started=0.0)
    record.model = "later"
    record.begin()
    served.add("later")
    record.end(200, now=1.0)
    running = scrape(metrics).series("inference_objective_running_requests")
    assert set(running.values()) == {0.0}
