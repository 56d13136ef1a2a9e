"""What the latency model (issue 16) costs: per decision, per completion, per endpoint.

    python -m benchmarks.latency_model [--endpoints 64] [--calls 20000]

Times, with `timeit` (best of 5 repeats, per call): `LatencyModel.on_route`
(the note the router takes at every decision), `on_complete` (the RLS
updates of both models at every completion), and the
`predicted-latency-scorer`'s `score_rows` over `--endpoints` candidates with
a prefix match on a few of them, compiled kernel and numpy twin. Then the
model's memory per endpoint (tracemalloc over 1,024 endpoints, each routed
and completed once). Figures in docs/performance.md.
"""

from __future__ import annotations

import argparse
import random
import timeit
import tracemalloc
from collections.abc import Callable

from prefixroute.endpoint import EndpointId, EndpointState
from prefixroute.index import PrefixMatch
from prefixroute.latency import LatencyModel
from prefixroute.plugins import RouteContext
from prefixroute.predictive import PredictedLatencyScorer
from prefixroute.request import Request
from prefixroute.router import Router


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    """Best of five repeats of `calls` calls, in microseconds per call."""
    return min(timeit.repeat(fn, number=calls, repeat=5)) / calls * 1e6


def scorer_us(endpoints: int, calls: int, *, compiled: bool) -> float:
    """`score_rows` over `endpoints` rows on a router's table, per call."""
    router = Router.default()
    router.latency = LatencyModel(compiled=compiled)
    fleet = [
        EndpointState(id=f"e{i}", address=f"127.0.0.1:{9000 + i}", waiting=i % 3)
        for i in range(endpoints)
    ]
    router.route(Request(model="m", prompt="warm " * 100), fleet, 0.0)
    ctx = RouteContext(
        request=Request(model="m", prompt="x"),
        now=1.0,
        rng=random.Random(0),
        block_keys=list(range(256)),
        prompt_tokens=4096,
        tokens_per_block=16.0,
        matches={EndpointId(f"e{i}"): PrefixMatch(100, 100.0) for i in range(5)},
        load=router.load,
        latency=router.latency,
        table=router._table,
    )
    scorer = PredictedLatencyScorer(scale_ms=200)
    rows = router._table.all_rows
    scorer.score_rows(ctx, rows)  # compile outside the timing
    return per_call_us(lambda: scorer.score_rows(ctx, rows), calls)


def bytes_per_endpoint(n: int = 1024) -> float:
    """Model memory per endpoint slot, each routed and completed once."""
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    model = LatencyModel()
    for i in range(n):
        eid = EndpointId(f"e{i}")
        note = model.on_route(eid, 1000, 0.0, requests=1, tokens=100, waiting=1)
        model.on_complete(eid, note, ttft_s=0.1, tpot_s=0.01)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    return grown / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", type=int, default=64)
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args(argv)
    model = LatencyModel()
    note = model.on_route(EndpointId("e1"), 1000, 0.0, requests=3, tokens=2000, waiting=1)
    route = per_call_us(
        lambda: model.on_route(EndpointId("e1"), 1000, 0.0, requests=3, tokens=2000, waiting=1),
        args.calls,
    )
    complete = per_call_us(
        lambda: model.on_complete(EndpointId("e1"), note, ttft_s=0.1, tpot_s=0.01), args.calls
    )
    calls = max(1, args.calls // 4)
    print("| what | us per call |")
    print("|---|---|")
    print(f"| on_route (every decision) | {route:.2f} |")
    print(f"| on_complete (every completion, both models) | {complete:.2f} |")
    print(
        f"| score_rows, {args.endpoints} endpoints, compiled | "
        f"{scorer_us(args.endpoints, calls, compiled=True):.2f} |"
    )
    print(
        f"| score_rows, {args.endpoints} endpoints, numpy | "
        f"{scorer_us(args.endpoints, calls, compiled=False):.2f} |"
    )
    print(f"\nmemory: {bytes_per_endpoint():.0f} B per endpoint")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
