"""What sharing state through Redis adds to a request, end to end, at 200 requests/s.

    python -m benchmarks.replicas_latency [--rate 200] [--seconds 10] [--repeats 3]

Starts a real `redis-server` on 127.0.0.1, one fake engine at
`--time-scale 0` (no modelled GPU time) and two `prefixroute serve`
processes in front of it, both rate-limiting every tenant
(`token-bucket-admission`, 10,000 requests/s: everything is admitted, but
every request pays the limiter): `alone` without a `shared_state` section,
`shared` with one (its token bucket in Redis: the one round trip on the
route path, plus the background syncs of loads, counters and decisions).
Then, alternating between the two in each repeat, an open loop sends
`--rate` chat completions per second for `--seconds` from this process
(aiohttp) and records each request's latency as the client sees it.

Reported: p50 and p99 of each, and the differences (what sharing adds), as
medians over `--repeats`; the shared gateway's own counters say how many
verdicts were answered locally (0 expected while Redis is up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from benchmarks.gateway_overhead import BODY
from prefixroute.devtools.live import start_engines, start_gateway, stop_process, wait_ready
from prefixroute.devtools.redis import redis_server


def _policy() -> dict[str, object]:
    """The default profile's scoring behind a generous per-tenant token bucket."""
    return {
        "plugins": [
            {"type": "healthy-filter"},
            {"type": "prefix-affinity-scorer", "name": "prefix"},
            {"type": "inflight-scorer", "name": "inflight"},
            {"type": "max-score-picker"},
            {
                "type": "token-bucket-admission",
                "name": "rate",
                "parameters": {"requests_per_s": 10_000},
            },
        ],
        "profiles": [
            {
                "name": "limited",
                "plugins": [
                    {"pluginRef": "healthy-filter"},
                    {"pluginRef": "prefix", "weight": 3},
                    {"pluginRef": "inflight", "weight": 2},
                    {"pluginRef": "max-score-picker"},
                    {"pluginRef": "rate"},
                ],
            }
        ],
    }


async def _open_loop(url: str, rate: float, seconds: float) -> list[float]:
    """Send at `rate`/s for `seconds` without waiting for answers; each request's latency."""
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:

        async def one() -> None:
            t = time.perf_counter()
            async with session.post(
                f"{url}/v1/chat/completions", json=BODY, headers={"x-tenant-id": "acme"}
            ) as r:
                await r.read()
                assert r.status == 200, r.status
            latencies.append(time.perf_counter() - t)

        for _ in range(20):  # warm the connections
            await one()
        latencies.clear()
        tasks = []
        start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return latencies


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _health(url: str) -> dict[str, object]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{url}/health", timeout=5) as answer:
        body: dict[str, object] = json.load(answer)
    return body


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s (200)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per batch (10)")
    parser.add_argument("--repeats", type=int, default=3, help="batches per gateway (3)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="prefixroute-replicas-") as tmp, redis_server() as r:
        work = Path(tmp)
        engines, addresses = start_engines(1, work, time_scale=0.0)
        shared = {"url": r.url, "key_prefix": "bench", "timeout_ms": 50}
        for name in ("alone", "shared"):
            (work / name).mkdir()
        alone, alone_url = start_gateway(addresses, work / "alone", config=_policy())
        both, shared_url = start_gateway(
            addresses, work / "shared", config={**_policy(), "shared_state": shared}
        )
        try:
            wait_ready(
                [f"http://{addresses[0]}/health", f"{alone_url}/health", f"{shared_url}/health"],
                [engines, alone, both],
            )
            runs: dict[str, list[list[float]]] = {"alone": [], "shared": []}
            for _ in range(args.repeats):
                for name, url in (("alone", alone_url), ("shared", shared_url)):
                    runs[name].append(asyncio.run(_open_loop(url, args.rate, args.seconds)))
            status = _health(shared_url)["shared_state"]
        finally:
            for proc in (both, alone, engines):
                stop_process(proc)
    med = {
        (name, q): statistics.median(_pct(batch, q) for batch in batches)
        for name, batches in runs.items()
        for q in (0.5, 0.99)
    }
    ms = 1e3
    n = int(args.rate * args.seconds)
    print(f"{args.repeats} batches of {n} requests at {args.rate:g}/s per gateway; medians\n")
    print("| gateway | latency p50 (ms) | latency p99 (ms) |")
    print("|---|---|---|")
    for name in ("alone", "shared"):
        print(f"| {name} | {med[name, 0.5] * ms:.2f} | {med[name, 0.99] * ms:.2f} |")
    added = [(med["shared", q] - med["alone", q]) * ms for q in (0.5, 0.99)]
    print(f"| added by sharing | {added[0]:+.2f} | {added[1]:+.2f} |")
    print(f"\nshared gateway's shared_state: {status}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
