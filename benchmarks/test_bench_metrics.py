"""pytest-benchmark suite for the gateway's Prometheus exporter (`GatewayMetrics`).

What the request path pays per request: `request_started`, `observe_decision`
and `observe_request` (ten histogram observations), over 100 tenants; and what
a scrape pays: `render()` with 16 endpoints and a full ledger. Figures in
docs/metrics.md.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from prefixroute import EndpointState, Request, Router, Usage
from prefixroute.drivers.metrics import GatewayMetrics

BATCH = 1000
USAGE = Usage(prompt_tokens=900, cached_tokens=500, completion_tokens=40, ttft_s=0.05)


def endpoint(i: int) -> EndpointState:
    """Endpoint `e{i}` on a loopback port, fresh metrics at t=0."""
    return EndpointState(id=f"e{i}", address=f"127.0.0.1:{9000 + i}", observed_at=0.0)


def _metrics(endpoints: int = 16, tenants: int = 128) -> GatewayMetrics:
    router = Router.default()
    states = [endpoint(i) for i in range(endpoints)]
    for t in range(tenants):
        req = Request(model="m", prompt=f"tenant {t} says hello " * 20, tenant=f"t{t}")
        decision = router.route(req, states, now=float(t))
        router.on_complete(decision, USAGE, now=t + 0.5)  # type: ignore[arg-type]
    return GatewayMetrics(CollectorRegistry(), router, lambda: states)


def test_request_path(benchmark: Any) -> None:
    metrics = _metrics()

    def batch() -> None:
        for i in range(BATCH):
            tenant = f"t{i % 100}"
            metrics.request_started("m", tenant)
            metrics.observe_decision(0.0001, "decision")
            metrics.observe_request(
                model="m",
                tenant=tenant,
                endpoint="e0",
                status=200,
                code=None,
                duration_s=0.5,
                ttft_s=0.05,
                usage=USAGE,
                request_bytes=4000,
                response_bytes=800,
            )

    benchmark(batch)


def test_render(benchmark: Any) -> None:
    metrics = _metrics()
    body, _ = benchmark(metrics.render)
    assert b"inference_objective_request_total" in body
