"""Latency objectives and the latency model in `/metrics` (issue 16).

Per-tenant SLO counters and attainment come from the ledger snapshot; the prediction
error counters from `Router.latency.error_by_endpoint()`; the predicted and measured
TPOT/TTFT histograms from the request path. First the exporter over a real `Router`, then
the gateway and the ext_proc picker over real sockets in front of real fake engines.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from prefixroute import EndpointState, Request, Router, Usage
from prefixroute.decision import Decision
from prefixroute.drivers.metrics import GatewayMetrics
from prefixroute.events import EndpointRemoved
from prefixroute.latency import ObjectivePolicy, Objectives
from prefixroute.ledger import TenantLedger
from tests.helpers import chat_body, pool
from tests.servers import free_port, wait_until
from tests.test_extproc import config as extproc_config
from tests.test_extproc import picker, run, settled
from tests.test_slo_headers import TPOT, TTFT, gateway

SYSTEM = "You are the latency-metrics test assistant; be brief. " * 10
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, keyed by (sample name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(got: Samples, name: str, **labels: str) -> float | None:
    return got.get((name, tuple(sorted(labels.items()))))


def total(got: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over every sample whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in got.items() if n == name and want <= set(ls))


def label_values(got: Samples, name: str, label: str) -> set[str]:
    return {dict(ls)[label] for (n, ls), _ in got.items() if n == name}


# -- the exporter over a real router ----------------------------------------------------------


POOL = [
    EndpointState(id="e0", address="127.0.0.1:8000", observed_at=0.0),
    EndpointState(id="e1", address="127.0.0.1:8001", observed_at=0.0, waiting=3),
]


def serve(
    metrics: GatewayMetrics,
    router: Router,
    request: Request,
    now: float,
    *,
    ttft_s: float | None,
    e2e_s: float,
    tokens: int = 5,
    ok: bool = True,
) -> Decision:
    """Route `request` over `POOL` and settle it as a driver does, feeding the metrics."""
    metrics.request_started(request.model, request.tenant)
    decision = router.route(request, POOL, now)
    assert isinstance(decision, Decision)
    metrics.observe_decision(0.00005, "decision", decision=decision)
    usage = Usage(
        prompt_tokens=decision.prompt_tokens,
        completion_tokens=tokens,
        ttft_s=ttft_s,
        e2e_s=e2e_s,
        ok=ok,
    )
    router.on_complete(decision, usage, now + e2e_s)
    metrics.observe_request(
        model=request.model,
        tenant=request.tenant,
        endpoint=decision.endpoint,
        status=200 if ok else 502,
        code=None if ok else "upstream-status",
        duration_s=e2e_s,
        ttft_s=ttft_s,
        usage=usage if ok else None,
        request_bytes=100,
        response_bytes=100,
    )
    return decision


def ask(tenant: str, i: int, **fields: Any) -> Request:
    return Request(model="m", prompt=f"{tenant} prompt {i} " * 30, tenant=tenant, **fields)


def test_slo_counters_attainment_and_prediction_error() -> None:
    policy = ObjectivePolicy(tenants={"acme": Objectives(ttft_s=0.5)})
    router = Router(objectives=policy)
    metrics = GatewayMetrics(CollectorRegistry(), router, lambda: POOL, clock=lambda: 0.0)
    served = [
        serve(metrics, router, ask("acme", 0), 0.0, ttft_s=0.1, e2e_s=0.3),  # met
        serve(metrics, router, ask("acme", 1), 1.0, ttft_s=0.9, e2e_s=1.2),  # TTFT missed
        serve(metrics, router, ask("acme", 2), 2.0, ttft_s=0.1, e2e_s=0.2, ok=False),  # failed
        # its own TPOT objective: (0.5 - 0.1) / (11 - 1) = 0.04 s per token, within 0.05
        serve(
            metrics,
            router,
            ask("beta", 0, slo_tpot_s=0.05),
            3.0,
            ttft_s=0.1,
            e2e_s=0.5,
            tokens=11,
        ),
        serve(metrics, router, ask("gamma", 0), 4.0, ttft_s=0.2, e2e_s=0.6),  # no objective
    ]
    rejected = router.route(ask("acme", 3), [], 5.0)  # no endpoint: missed, and counted
    assert not isinstance(rejected, Decision)

    got = samples(metrics.render()[0].decode())
    slo = "prefixroute_tenant_slo_requests_total"
    met = "prefixroute_tenant_slo_met_total"
    assert value(got, slo, tenant="acme") == 4 and value(got, met, tenant="acme") == 1
    assert value(got, slo, tenant="beta") == 1 and value(got, met, tenant="beta") == 1
    assert value(got, slo, tenant="gamma") == 0 and value(got, met, tenant="gamma") == 0
    attainment = "prefixroute_tenant_slo_attainment_ratio"
    assert value(got, attainment, tenant="acme") == pytest.approx(0.25)
    assert value(got, attainment, tenant="beta") == 1.0
    assert value(got, attainment, tenant="gamma") is None  # no objective, no ratio
    assert value(got, "prefixroute_slo_requests_total") == 5
    assert value(got, "prefixroute_slo_met_total") == 2

    # prediction error: the model's own sums, per endpoint and kind
    errors = router.latency.error_by_endpoint()
    assert sum(e.ttft_samples for e in errors.values()) == 4  # the ok completions
    assert sum(e.tpot_samples for e in errors.values()) == 4  # each had >= 2 tokens
    for eid, e in errors.items():
        for kind, n, abs_s, signed_s in (
            ("ttft", e.ttft_samples, e.ttft_abs_s, e.ttft_signed_s),
            ("tpot", e.tpot_samples, e.tpot_abs_s, e.tpot_signed_s),
        ):
            labels = {"endpoint": eid, "kind": kind}
            assert value(got, "prefixroute_latency_prediction_samples_total", **labels) == n
            assert value(
                got, "prefixroute_latency_prediction_abs_error_seconds_total", **labels
            ) == pytest.approx(abs_s)
            assert value(
                got, "prefixroute_latency_prediction_signed_error_seconds", **labels
            ) == pytest.approx(signed_s)
    # the first prediction was the prior's: its error is what the request measured against it
    first = served[0]
    assert first.predicted_ttft_s is not None
    e0 = errors[first.endpoint]
    assert e0.ttft_abs_s >= abs(e0.ttft_signed_s) > 0

    # request path: one predicted TTFT and TPOT per decision, one measured TPOT per answer
    pair = {"model_name": "m", "target_model_name": "m"}
    for name in ("predicted_ttft", "predicted_tpot"):
        count = value(got, f"inference_objective_request_{name}_seconds_count", **pair)
        assert count == len(served)
    predicted_sum = value(got, "inference_objective_request_predicted_ttft_seconds_sum", **pair)
    assert predicted_sum == pytest.approx(sum(d.predicted_ttft_s or 0 for d in served))
    # the failed answer has no usage: four measured TPOTs, beta's 0.04 among them
    assert value(got, "inference_objective_request_tpot_seconds_count", **pair) == 4
    assert value(got, "inference_objective_request_tpot_seconds_bucket", le="0.04", **pair) == 1

    # an endpoint that leaves takes its error series with it: bounded by the live pool
    router.observe(EndpointRemoved(endpoint=POOL[1].id))
    after = samples(metrics.render()[0].decode())
    left = label_values(after, "prefixroute_latency_prediction_samples_total", "endpoint")
    assert left == set(router.latency.error_by_endpoint()) and POOL[1].id not in left


def test_slo_tenant_series_are_bounded_by_the_ledger() -> None:
    policy = ObjectivePolicy(default=Objectives(ttft_s=1.0))
    router = Router(objectives=policy, ledger=TenantLedger(top_k=2))
    metrics = GatewayMetrics(CollectorRegistry(), router, lambda: POOL, clock=lambda: 0.0)
    tenants = [f"t{i}" for i in range(8)] + ["t0"] * 5 + ["t1"] * 4
    for i, tenant in enumerate(tenants):
        serve(metrics, router, ask(tenant, i), float(i), ttft_s=0.2, e2e_s=0.4)
    got = samples(metrics.render()[0].decode())
    labels = label_values(got, "prefixroute_tenant_slo_requests_total", "tenant")
    assert len(labels) <= 3 and "other" in labels  # two tracked tenants plus "other"
    assert total(got, "prefixroute_tenant_slo_requests_total") == len(tenants)
    assert total(got, "prefixroute_tenant_slo_met_total") == len(tenants)
    assert value(got, "prefixroute_slo_requests_total") == len(tenants)


def test_a_tenant_named_other_folds_its_slo_counts_into_one_series() -> None:
    policy = ObjectivePolicy(default=Objectives(ttft_s=0.3))
    router = Router(objectives=policy, ledger=TenantLedger(top_k=2))
    metrics = GatewayMetrics(CollectorRegistry(), router, lambda: POOL, clock=lambda: 0.0)
    names = ["other"] * 4 + ["a", "a", "b"]  # "other" stays tracked; "a" is evicted for "b"
    for i, tenant in enumerate(names):
        serve(metrics, router, ask(tenant, i), float(i), ttft_s=0.1 * (i % 5), e2e_s=0.6)
    text = metrics.render()[0].decode()
    got = samples(text)
    series = [
        line.split(" ")[0]
        for line in text.splitlines()
        if line.startswith("prefixroute_tenant_slo_met_total{")
    ]
    assert {t.tenant for t in router.ledger.snapshot().tenants} == {"other", "b"}
    assert len(series) == len(set(series)) == 2  # "b" and "other" (both kinds), each once
    met = sum(1 for i in range(len(names)) if 0.1 * (i % 5) <= 0.3)
    assert total(got, "prefixroute_tenant_slo_requests_total") == len(names)
    assert total(got, "prefixroute_tenant_slo_met_total") == met
    assert value(got, "prefixroute_slo_met_total") == met


def test_without_objectives_nothing_counts() -> None:
    router = Router()
    metrics = GatewayMetrics(CollectorRegistry(), router, lambda: POOL, clock=lambda: 0.0)
    serve(metrics, router, ask("acme", 0), 0.0, ttft_s=0.1, e2e_s=0.2)
    got = samples(metrics.render()[0].decode())
    assert value(got, "prefixroute_tenant_slo_requests_total", tenant="acme") == 0
    assert value(got, "prefixroute_slo_requests_total") == 0
    assert value(got, "prefixroute_tenant_slo_attainment_ratio", tenant="acme") is None
    # the model still learns and reports: its error is independent of objectives
    assert total(got, "prefixroute_latency_prediction_samples_total", kind="ttft") == 1


# -- the drivers, end to end ------------------------------------------------------------------


def stream(url: str, question: str, headers: dict[str, str]) -> None:
    body = chat_body(question, system=SYSTEM, stream=True)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as a:
        a.read()
        assert a.status_code == 200, a.text


def test_gateway_metrics_move_when_requests_complete(engines: list[str]) -> None:
    acme = {"x-tenant-id": "acme"}
    router = Router()
    with gateway({"endpoints": pool(*engines)}, router) as (url, _):
        before = samples(httpx.get(f"{url}/metrics").text)
        stream(url, "slow enough", {**acme, TTFT: "60000", TPOT: "60000"})  # met
        stream(url, "too fast to meet", {**acme, TTFT: "0.001"})  # a microsecond: missed
        stream(url, "no objective", {"x-tenant-id": "zed"})
        wait_until(lambda: router.counters.completions == 3, message="three completions")
        after = samples(httpx.get(f"{url}/metrics").text)
    for name in ("prefixroute_tenant_slo_requests_total", "prefixroute_tenant_slo_met_total"):
        assert value(before, name, tenant="acme") is None  # no row before its first request
    assert value(after, "prefixroute_tenant_slo_requests_total", tenant="acme") == 2
    assert value(after, "prefixroute_tenant_slo_met_total", tenant="acme") == 1
    assert value(after, "prefixroute_tenant_slo_attainment_ratio", tenant="acme") == 0.5
    assert value(after, "prefixroute_tenant_slo_requests_total", tenant="zed") == 0
    assert value(after, "prefixroute_slo_met_total") == 1
    # the model compared a prediction with each streamed completion's measured TTFT
    for kind in ("ttft", "tpot"):
        name = "prefixroute_latency_prediction_samples_total"
        assert total(before, name, kind=kind) == 0
        assert total(after, name, kind=kind) == 3
    abs_error = total(after, "prefixroute_latency_prediction_abs_error_seconds_total", kind="ttft")
    assert abs_error > 0
    assert label_values(after, "prefixroute_latency_prediction_samples_total", "endpoint") <= {
        "e0",
        "e1",
    }
    assert total(after, "inference_objective_request_predicted_ttft_seconds_count") == 3
    assert total(after, "inference_objective_request_tpot_seconds_count") == 3


def test_picker_metrics_count_objectives(engines: list[str]) -> None:
    async def scenario() -> None:
        port = free_port()
        cfg = extproc_config({"endpoints": pool(*engines)}, metrics_port=port)
        async with picker(cfg) as (server, proxy):
            body = json.dumps(chat_body("picker", system=SYSTEM, stream=True)).encode()
            headers = {"x-tenant-id": "acme", TTFT: "60000"}
            first = await proxy.send(body, headers=headers)
            second = await proxy.send(body, headers={**headers, TTFT: "0.001"})
            await settled(server)
            async with httpx.AsyncClient() as client:
                text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
        assert first.status == 200 and second.status == 200
        got = samples(text)
        assert value(got, "prefixroute_tenant_slo_requests_total", tenant="acme") == 2
        assert value(got, "prefixroute_tenant_slo_met_total", tenant="acme") == 1
        assert total(got, "prefixroute_latency_prediction_samples_total", kind="ttft") == 2

    run(scenario())
