"""Per-decision latency of `Router.route` on a warm index, by request kind and fleet size.

    python -m benchmarks.route_latency [--decisions N] [--entries N] [--endpoints 8,64]

For each fleet size, warms an index to `--entries` (block, endpoint) entries
by routing real requests, then times `route` alone (perf_counter_ns around
the call; `on_complete` settles each decision outside the timed region) for
three request kinds: half hit (a 2,048-token shared prefix + 2,048 new
tokens), repeat (the same requests again: a full hit unless their tails were
evicted meanwhile), cold (4,096 random tokens). Prints the mean matched
fraction, p50/p99 latency of `route`, decisions per second on one core
(1 / mean) for `route` alone and with `on_complete`, and the hashing share
(`Blocker.keys` timed separately). The machine is shared
and noisy: quote medians, compare within one run.
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np

from benchmarks.fleet import warm_router
from prefixroute import Decision, Request, Usage


def measure(endpoints: int, entries: int, decisions: int) -> None:
    t0 = time.perf_counter()
    router, fleet, work = warm_router(endpoints=endpoints, entries=entries)
    warm_s = time.perf_counter() - t0
    print(f"{endpoints} endpoints, {len(router.index):,} entries (warmed in {warm_s:.1f} s)")

    rng = np.random.default_rng(1)
    half = [work.request(i) for i in range(decisions)]
    cold = [
        Request(model="m", token_ids=rng.integers(0, 150_000, 4096, dtype=np.uint32))
        for _ in range(decisions)
    ]
    kinds = {"half hit": half, "repeat": half, "cold": cold}
    now = 1000.0
    gc.collect()  # start clean; the collector stays on, as in production
    for name, requests in kinds.items():
        lat = np.empty(len(requests))
        settle = np.empty(len(requests))
        hashing = np.empty(len(requests))
        matched = np.empty(len(requests))
        for i, req in enumerate(requests):
            now += 0.0005
            h0 = time.perf_counter_ns()
            router.blocker.keys(req)
            h1 = time.perf_counter_ns()
            result = router.route(req, fleet, now)
            t1 = time.perf_counter_ns()
            assert isinstance(result, Decision)
            usage = Usage(
                prompt_tokens=result.prompt_tokens,
                cached_tokens=result.predicted_cached_tokens,
            )
            router.on_complete(result, usage, now)
            t2 = time.perf_counter_ns()
            lat[i] = (t1 - h1) / 1e3
            settle[i] = (t2 - t1) / 1e3
            hashing[i] = (h1 - h0) / 1e3
            matched[i] = result.matched_blocks / max(result.total_blocks, 1)
        p50, p99 = np.percentile(lat, [50, 99])
        print(
            f"  {name:8s} matched {matched.mean():4.0%}  route p50 {p50:6.1f} us  "
            f"p99 {p99:7.1f} us  {1e6 / lat.mean():5.0f}/s route only, "
            f"{1e6 / (lat + settle).mean():5.0f}/s with on_complete  "
            f"hashing p50 {np.median(hashing):4.1f} us"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--decisions", type=int, default=5000)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--endpoints", default="64", help="comma-separated fleet sizes")
    args = parser.parse_args()
    for n in (int(x) for x in args.endpoints.split(",")):
        measure(n, args.entries, args.decisions)


if __name__ == "__main__":
    main()
