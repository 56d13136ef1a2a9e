"""The router's per-request work outside the index and hashing, list path against array path.

For each fleet size, a router is warmed (benchmarks.fleet) and then, for
every request, the same request is taken through the filters, the scorers
and the picker twice in one loop: with the one-method protocols
(`Filter.filter`, `Profile.score`, `Picker.pick`: what any third-party plugin
runs, and what every decision ran before the array path) and with the array
capabilities on the router's `EndpointTable` (`filter_rows`, `score_rows`,
`pick_top`). The two alternate which goes first, so neither always finds the
caches warm. Then the request is routed and completed for real, so the load
and the index move as in production. Medians per stage, in microseconds; the
two paths' picks are checked equal on every request.

    PYTHONPATH=. .venv/bin/python -m benchmarks.router_stages --endpoints 8,64,1000
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from benchmarks.fleet import warm_router
from prefixroute import Decision, Usage
from prefixroute.plugins import RouteContext


def measure(endpoints: int, entries: int, requests: int) -> dict[str, float]:
    router, fleet, work = warm_router(endpoints=endpoints, entries=entries)
    profile = router.profile
    picker = profile.picker[1]
    stages = ("sync", "list filters", "list score", "list pick", "filters", "score", "pick")
    times: dict[str, list[float]] = {s: [] for s in stages}
    times["route + on_complete"] = []
    now = 1000.0
    clock = time.perf_counter_ns
    for i in range(requests):
        now += 0.0005
        request = work.request(i)
        keys = router.blocker.keys(request)
        listed = keys.tolist()
        router.index.expire(now)
        t0 = clock()
        table = router._sync_capacities(fleet)
        times["sync"].append((clock() - t0) / 1e3)
        matches = router.index.match(listed)
        picks = []
        for path in ("list", "array") if i % 2 else ("array", "list"):
            ctx = RouteContext(
                request=request,
                now=now,
                rng=random.Random(i),
                block_keys=listed,
                prompt_tokens=router._prompt_tokens(request),
                tokens_per_block=16.0,
                matches=matches,
                load=router.load,
                tenants=router.ledger,
                table=table,
            )
            ctx.endpoints = fleet
            if path == "list":
                t0 = clock()
                candidates = list(fleet)
                for _, flt in profile.filters:
                    candidates = flt.filter(ctx, candidates)
                t1 = clock()
                ctx.candidates = candidates
                _, totals = profile.score(ctx, candidates)
                t2 = clock()
                order = picker.pick(ctx, totals)[: 1 + profile.max_fallbacks]
                t3 = clock()
                picks.append([candidates[k].id for k in order])
                prefix = "list "
            else:
                t0 = clock()
                rows = table.all_rows
                for _, flt in profile.filters:
                    rows = flt.filter_rows(ctx, rows)  # type: ignore[attr-defined]
                t1 = clock()
                ctx.set_rows(rows)
                _, array = profile.score_rows(ctx, rows)
                t2 = clock()
                order = picker.pick_top(ctx, array, profile.max_fallbacks)  # type: ignore[attr-defined]
                t3 = clock()
                picks.append([table.ids[k] for k in rows[order].tolist()])
                prefix = ""
            times[prefix + "filters"].append((t1 - t0) / 1e3)
            times[prefix + "score"].append((t2 - t1) / 1e3)
            times[prefix + "pick"].append((t3 - t2) / 1e3)
        if picks[0] != picks[1]:
            raise AssertionError(f"request {i}: the two paths picked {picks[0]} and {picks[1]}")
        t0 = clock()
        decision = router.route(request, fleet, now, keys=keys)
        assert isinstance(decision, Decision)
        router.on_complete(decision, Usage(prompt_tokens=decision.prompt_tokens), now)
        times["route + on_complete"].append((clock() - t0) / 1e3)
    return {name: float(np.median(v)) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoints", default="8,64,1000", help="comma-separated fleet sizes")
    parser.add_argument("--entries", type=int, default=1_000_000, help="index entries to warm")
    parser.add_argument("--requests", type=int, default=2000, help="requests timed per fleet")
    args = parser.parse_args()
    sizes = [int(x) for x in args.endpoints.split(",")]
    results = {n: measure(n, args.entries, args.requests) for n in sizes}
    names = list(next(iter(results.values())))
    print("| stage (p50, us) | " + " | ".join(f"{n} endpoints" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{results[n][name]:.1f}" for n in sizes) + " |")
    for n in sizes:
        r = results[n]
        old = r["list filters"] + r["list score"] + r["list pick"]
        new = r["filters"] + r["score"] + r["pick"]
        print(f"{n} endpoints: filters + score + pick {old:.1f} -> {new:.1f} us ({old / new:.1f}x)")


if __name__ == "__main__":
    main()
