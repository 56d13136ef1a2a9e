"""pytest-benchmark suite for `Router.route` and a whole decision, on a warm index.

The index is warmed by routing (`benchmarks/fleet.py`) to 1,000,000 (block,
endpoint) entries; under `--benchmark-disable` (what `make test` runs) to
20,000, so the suite only checks that everything still works.

- `test_route_half_hit`, `test_route_full_hit`, `test_route_cold`: `route`
  alone, 4,096-token prompts, 64 endpoints, each class's default paths; each
  round's setup settles the previous decision with `on_complete`, untimed.
- `test_decision[...]`: `route` + `on_complete`, one half-hit decision per
  round: the unit `benchmarks/route_latency.py` reports. On the compiled path
  (numba hashing kernel, `CompiledPrefixIndex`) for 8, 64 and 1,000 endpoints
  (4,096-token prompts) and for 1,024- and 16,384-token prompts (64
  endpoints); on the pure path (`compiled=False`: numpy hashing,
  `PrefixIndex`) for 64 endpoints and 4,096 tokens, the ratio's other side.

Every request is built afresh in the round's setup, untimed, as a driver
routes a request it has just parsed (`route_latency.fresh`). The figures
are in docs/performance.md ("Route latency").
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from benchmarks.fleet import Workload, warm_router
from benchmarks.route_latency import fresh
from prefixroute import Decision, EndpointState, Request, Router, Usage, jit

ENTRIES = 1_000_000
QUICK_ENTRIES = 20_000  # under --benchmark-disable
ROUNDS = 3000

Warm = tuple[Router, list[EndpointState], Workload]
_warm: dict[tuple[int, int, bool | None, int], Warm] = {}


def warm(endpoints: int, prompt: int, compiled: bool | None, entries: int) -> Warm:
    """One warm router at a time (a 1M-entry index is large): built on first use."""
    key = (endpoints, prompt, compiled, entries)
    if key not in _warm:
        _warm.clear()
        _warm[key] = warm_router(
            endpoints=endpoints, entries=entries, prompt_tokens=prompt, compiled=compiled
        )
    return _warm[key]


@pytest.fixture(scope="module")
def entries(pytestconfig: pytest.Config) -> int:
    return QUICK_ENTRIES if pytestconfig.getoption("benchmark_disable") else ENTRIES


@pytest.fixture(scope="module", autouse=True)
def _release() -> Any:
    yield
    _warm.clear()


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
        return (fresh(next(cycle)), fleet, next(clock)), {}

    def route(request: Request, endpoints: list[EndpointState], now: float) -> None:
        d = router.route(request, endpoints, now)
        assert isinstance(d, Decision)
        last.append(d)

    benchmark.pedantic(route, setup=setup, rounds=ROUNDS, warmup_rounds=100)
    if last:
        d = last.pop()
        router.on_complete(d, Usage(prompt_tokens=d.prompt_tokens), d.decided_at)


def test_route_half_hit(benchmark: Any, entries: int) -> None:
    router, fleet, work = warm(64, 4096, None, entries)
    _bench_route(benchmark, router, fleet, [work.request(i) for i in range(ROUNDS + 100)])


def test_route_full_hit(benchmark: Any, entries: int) -> None:
    router, fleet, work = warm(64, 4096, None, entries)
    requests = [work.request(i) for i in range(50)]
    _bench_route(benchmark, router, fleet, requests)


def test_route_cold(benchmark: Any, entries: int) -> None:
    router, fleet, _ = warm(64, 4096, None, entries)
    rng = np.random.default_rng(5)
    requests = [
        Request(model="m", token_ids=rng.integers(0, 150_000, 4096, dtype=np.uint32))
        for _ in range(ROUNDS + 100)
    ]
    _bench_route(benchmark, router, fleet, requests)


needs_numba = pytest.mark.skipif(not jit.AVAILABLE, reason="numba (the `fast` extra) is missing")


@pytest.mark.parametrize(
    ("endpoints", "prompt", "compiled"),
    [
        pytest.param(64, 4096, True, id="compiled-64ep-4k", marks=needs_numba),
        pytest.param(64, 4096, False, id="pure-64ep-4k"),
        pytest.param(8, 4096, True, id="compiled-8ep-4k", marks=needs_numba),
        pytest.param(1000, 4096, True, id="compiled-1000ep-4k", marks=needs_numba),
        pytest.param(64, 1024, True, id="compiled-64ep-1k", marks=needs_numba),
        pytest.param(64, 16384, True, id="compiled-64ep-16k", marks=needs_numba),
    ],
)
def test_decision(
    benchmark: Any, entries: int, endpoints: int, prompt: int, compiled: bool
) -> None:
    """One half-hit decision: `route` + `on_complete` (and building its `Usage`), timed."""
    router, fleet, work = warm(endpoints, prompt, compiled, entries)
    requests = iter([work.request(i) for i in range(ROUNDS + 100)])
    clock = itertools.count(20_000.0, 0.0005)

    def setup() -> tuple[tuple[Request, float], dict[str, Any]]:
        return (fresh(next(requests)), next(clock)), {}

    def decide(request: Request, now: float) -> None:
        d = router.route(request, fleet, now)
        assert isinstance(d, Decision)
        usage = Usage(prompt_tokens=d.prompt_tokens, cached_tokens=d.predicted_cached_tokens)
        router.on_complete(d, usage, now)

    benchmark.pedantic(decide, setup=setup, rounds=ROUNDS, warmup_rounds=100)
    assert router.open_decisions == 0


def test_route_latency_runs_and_restores_what_it_instruments(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The script end to end on a small index (not a benchmark: it keeps the script working).

    Its stage timer wraps methods on the router's classes; afterwards every
    one of them is the original again.
    """
    from benchmarks import route_latency
    from prefixroute.blocks import Blocker
    from prefixroute.index import PrefixIndex

    before = (Blocker.keys, PrefixIndex.match, PrefixIndex.insert, Decision.__init__)
    paths = "compiled,pure" if jit.AVAILABLE else "pure"
    args = ["--entries", "4000", "--decisions", "40", "--endpoints", "8", "--prompts", "1024"]
    route_latency.main([*args, "--paths", paths])
    out = capsys.readouterr().out
    assert (Blocker.keys, PrefixIndex.match, PrefixIndex.insert, Decision.__init__) == before
    assert "## Per decision: route + on_complete (GC on)" in out
    assert "| 8 | 1,024 | pure |" in out
    assert "## Stages, pure path" in out and "| speculative insert |" in out
    if jit.AVAILABLE:
        assert "## Pure over compiled" in out
