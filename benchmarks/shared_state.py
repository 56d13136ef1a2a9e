"""What sharing state on Redis adds per call: one `take` and one `sync` round trip.

    python -m benchmarks.shared_state [--takes 2000] [--rate 200] [--endpoints 64]
        [--replicas 4] [--syncs 500] [--json FILE]

Starts a real `redis-server` on 127.0.0.1 (`prefixroute.devtools.redis`,
Debian's 7.0 here), then:

- take: one `SharedState.take` (one EVALSHA of the token-bucket script) per
  request, paced open-loop at `--rate` requests/s for `--takes` requests
  (the route path's added latency at that rate), wall clock per call
  (`perf_counter`), p50 / p99 / max of the calls Redis answered, and how
  many were answered locally (a call beyond `timeout_ms`, 50 ms, marks the
  state down: the calls of the next 100 ms are local);
- sync: `--replicas` SharedStates, each with `--endpoints` endpoints in
  flight and a few VTC charges, syncing in turn; the latency of each
  `sync` (one EVALSHA that writes this replica's contribution and reads the
  others'), p50 / p99 / max;
- PING on the same client first, the floor of any round trip here;
- the server's own time per script call (`INFO commandstats`,
  `cmdstat_evalsha` usec_per_call), to tell Redis' share from the client's
  (redis-py asyncio, the event loop, loopback TCP).

The machine is shared: quote medians, compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from typing import Any

from prefixroute.devtools.redis import redis_server, redis_version
from prefixroute.drivers.shared import SharedState, SharedStateConfig


def _summary(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples_s)
    return {
        "n": len(ms),
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
        "max_ms": ms[-1],
    }


async def _bench(url: str, port: int, args: argparse.Namespace) -> dict[str, Any]:
    import redis

    raw = redis.Redis(port=port)
    cfg = SharedStateConfig.for_url(url, key_prefix="bench", timeout_ms=50)
    state = SharedState(cfg)
    assert await state.start(), state.reason
    limits = (1e6, 1e6, 1e9, 1e9)  # never refuses: every call does the full script
    for _ in range(50):  # warm: connection, script loaded
        await state.take("warm", 1.0, 100.0, limits)
    pings: list[float] = []
    client = state._client  # the same connection pool: a floor for any one round trip
    assert client is not None
    for _ in range(500):
        t = time.perf_counter()
        await client.ping()
        pings.append(time.perf_counter() - t)
        await asyncio.sleep(1.0 / args.rate)
    takes: list[float] = []
    take_none = 0
    raw.config_resetstat()
    interval = 1.0 / args.rate
    start = time.perf_counter()
    for i in range(args.takes):
        due = start + i * interval
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        t = time.perf_counter()
        got = await state.take(f"tenant-{i % 50}", 1.0, 300.0, limits)
        if got is None:  # Redis slow (beyond timeout_ms) or down: counted, not timed
            take_none += 1
        else:
            takes.append(time.perf_counter() - t)
    take_fallbacks = state.failures
    take_server = _server_usec_per_evalsha(raw)
    await state.close()

    replicas = []
    for r in range(args.replicas):
        c = SharedStateConfig.for_url(url, key_prefix="bench", timeout_ms=50, replica_id=f"r{r}")
        s = SharedState(c)
        assert await s.start(), s.reason
        replicas.append(s)
    endpoints = [f"10.0.{e // 256}.{e % 256}:8000" for e in range(args.endpoints)]
    local_r = {e: 1 + i % 7 for i, e in enumerate(endpoints)}
    local_t = {e: 512 * (1 + i % 7) for i, e in enumerate(endpoints)}
    syncs: list[float] = []
    sync_none = 0
    peers_seen = 0
    for s in replicas:  # warm: scripts loaded
        await s.sync(local_r, local_t, {})
    raw.config_resetstat()
    for i in range(args.syncs):
        s = replicas[i % len(replicas)]
        charges = {f"tenant-{(i + k) % 50}": 1.5 for k in range(5)}
        t = time.perf_counter()
        got = await s.sync(local_r, local_t, charges)
        if got is None:
            sync_none += 1
        else:
            syncs.append(time.perf_counter() - t)
            peers_seen = len(got.peer_requests)
        await asyncio.sleep(0.1 / len(replicas))  # each replica every 100 ms, as the default
    sync_server = _server_usec_per_evalsha(raw)
    for s in replicas:
        await s.close()
    return {
        "ping": _summary(pings),
        "take": _summary(takes),
        "take_none": take_none,
        "take_failures": take_fallbacks,
        "sync": _summary(syncs),
        "sync_none": sync_none,
        "sync_endpoints": args.endpoints,
        "sync_replicas": args.replicas,
        "peer_endpoints_seen": peers_seen,
        "server_us_per_take": take_server,
        "server_us_per_sync": sync_server,
    }


def _server_usec_per_evalsha(raw: Any) -> float:
    """Redis' own time per EVALSHA since the last CONFIG RESETSTAT (INFO commandstats)."""
    stats = raw.info("commandstats")
    return float(stats.get("cmdstat_evalsha", {}).get("usec_per_call", float("nan")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--takes", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--endpoints", type=int, default=64)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--syncs", type=int, default=500)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    with redis_server() as server:
        result = asyncio.run(_bench(server.url, server.port, args))
    result["redis"] = redis_version()
    result["load_average"] = os.getloadavg()
    take, sync = result["take"], result["sync"]
    print(
        f"redis-server {result['redis']} on 127.0.0.1, redis-py asyncio client; "
        f"load average {result['load_average'][0]:.2f} on {os.cpu_count()} cores"
    )
    ping = result["ping"]
    print(
        f"PING  ({ping['n']} calls, same client): p50 {ping['p50_ms']:.3f} ms, "
        f"p99 {ping['p99_ms']:.3f} ms"
    )
    print(
        f"take  ({take['n']} calls at {args.rate:g}/s): p50 {take['p50_ms']:.3f} ms, "
        f"p99 {take['p99_ms']:.3f} ms, max {take['max_ms']:.3f} ms; "
        f"{result['take_none']} answered locally ({result['take_failures']} timeouts)"
    )
    print(
        f"sync  ({sync['n']} calls, {args.endpoints} endpoints, {args.replicas} replicas): "
        f"p50 {sync['p50_ms']:.3f} ms, p99 {sync['p99_ms']:.3f} ms, max {sync['max_ms']:.3f} ms; "
        f"{result['sync_none']} answered locally"
    )
    print(
        f"Redis' own time per script call: take {result['server_us_per_take']:.1f} us, "
        f"sync {result['server_us_per_sync']:.1f} us"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
