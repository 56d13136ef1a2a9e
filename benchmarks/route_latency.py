"""Per-decision latency of `Router.route` on a warm 1M-entry index over 64 endpoints.

    python -m benchmarks.route_latency [--decisions N] [--entries N]

Reports p50/p99 latency and decisions per second on one core for three
request kinds (half prefix hit, full hit, cold), plus the hashing share.
Each decision is settled with `on_complete` outside the timed region, so the
in-flight counts stay realistic. Quote medians; the machine is shared.
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np

from benchmarks.fleet import warm_router
from prefixroute import Decision, Request, Usage


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--decisions", type=int, default=5000)
    parser.add_argument("--entries", type=int, default=1_000_000)
    args = parser.parse_args()

    t0 = time.perf_counter()
    router, fleet, work = warm_router(entries=args.entries)
    print(f"warmed index: {len(router.index):,} entries in {time.perf_counter() - t0:.1f} s")

    rng = np.random.default_rng(1)
    kinds = {
        "half hit (2,048 shared + 2,048 new)": [work.request(i) for i in range(args.decisions)],
        "full hit (repeat of a routed prompt)": [],
        "cold (no shared prefix)": [
            Request(model="m", token_ids=rng.integers(0, 150_000, 4096, dtype=np.uint32))
            for _ in range(args.decisions)
        ],
    }
    now = 1000.0
    gc.collect()
    gc.disable()
    for name, requests in kinds.items():
        if not requests:
            requests = kinds["half hit (2,048 shared + 2,048 new)"]
        lat = np.empty(len(requests))
        hashing = np.empty(len(requests))
        for i, req in enumerate(requests):
            now += 0.0005
            h0 = time.perf_counter_ns()
            router.blocker.keys(req)
            h1 = time.perf_counter_ns()
            result = router.route(req, fleet, now)
            t1 = time.perf_counter_ns()
            assert isinstance(result, Decision)
            usage = Usage(
                prompt_tokens=result.prompt_tokens, cached_tokens=result.predicted_cached_tokens
            )
            router.on_complete(result, usage, now)
            lat[i] = (t1 - h1) / 1e3
            hashing[i] = (h1 - h0) / 1e3
        p50, p99 = np.percentile(lat, [50, 99])
        print(
            f"{name:40s} p50 {p50:7.1f} us  p99 {p99:7.1f} us  "
            f"{1e6 / np.mean(lat):8.0f} decisions/s  hashing p50 {np.median(hashing):5.1f} us"
        )
    gc.enable()


if __name__ == "__main__":
    main()
