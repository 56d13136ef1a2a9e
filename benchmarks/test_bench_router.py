"""pytest-benchmark suite for `Router.route` (4,096-token prompts, 64 endpoints, 1M entries).

Only `route` is timed: each round's setup settles the previous decision with
`on_complete`, so in-flight counts stay realistic without being measured.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from benchmarks.fleet import Workload, warm_router
from prefixroute import Decision, EndpointState, Request, Router, Usage


@pytest.fixture(scope="module")
def warm() -> tuple[Router, list[EndpointState], Workload]:
    return warm_router()


def _bench_route(
    benchmark: Any, router: Router, fleet: list[EndpointState], requests: list[Request]
) -> None:
    clock = itertools.count(10_000.0, 0.0005)
    cycle = itertools.cycle(requests)
    last: list[Decision] = []

    def setup() -> tuple[tuple[Request, list[EndpointState], float], dict[str, Any]]:
        if last:
            d = last.pop()
            router.on_complete(d, Usage(prompt_tokens=d.prompt_tokens), d.decided_at)
        return (next(cycle), fleet, next(clock)), {}

    def route(request: Request, endpoints: list[EndpointState], now: float) -> None:
        d = router.route(request, endpoints, now)
        assert isinstance(d, Decision)
        last.append(d)

    benchmark.pedantic(route, setup=setup, rounds=3000, warmup_rounds=100)


def test_route_half_hit(benchmark: Any, warm: tuple[Router, list[EndpointState], Workload]) -> None:
    router, fleet, work = warm
    _bench_route(benchmark, router, fleet, [work.request(i) for i in range(3100)])


def test_route_full_hit(benchmark: Any, warm: tuple[Router, list[EndpointState], Workload]) -> None:
    router, fleet, work = warm
    requests = [work.request(i) for i in range(50)]
    _bench_route(benchmark, router, fleet, requests)


def test_route_cold(benchmark: Any, warm: tuple[Router, list[EndpointState], Workload]) -> None:
    router, fleet, _ = warm
    rng = np.random.default_rng(5)
    requests = [
        Request(model="m", token_ids=rng.integers(0, 150_000, 4096, dtype=np.uint32))
        for _ in range(3100)
    ]
    _bench_route(benchmark, router, fleet, requests)
