"""What the gateway adds to one request, measured in CPU and latency, and why it uses aiohttp.

    python -m benchmarks.gateway_overhead [--requests 2000]

Starts one fake engine at `--time-scale 0` (no modelled GPU time: what is
left is HTTP and tokenisation) and `prefixroute serve` in front of it, then
from this process, one request at a time (no queueing anywhere):

- `direct` vs `gateway`: chat completions (a 60-token prompt, max_tokens 2)
  sent straight to the engine and through the gateway. Reported: latency
  p50/p99 of each and the difference, and the gateway process's CPU per
  request (user + system time from /proc, over the whole batch).
- `gateway, streamed`: the same through the gateway with `stream: true`
  and max_tokens 64: the per-chunk cost of relaying SSE.
- client libraries: the CPU this process spends per request as an HTTP
  client, httpx vs aiohttp, against the engine directly, in the same run (a
  ratio, so the machine's noise cancels). This is why the gateway's upstream
  hop uses aiohttp.

Medians of `--repeats` batches are printed as a markdown table (figures in
docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import aiohttp
import httpx

from prefixroute.devtools.live import start_engines, start_gateway, stop_process, wait_ready

BODY = {
    "model": "qwen3-0.6b",
    "max_tokens": 2,
    "messages": [
        {"role": "system", "content": "You are a terse assistant. " * 10},
        {"role": "user", "content": "Say hello."},
    ],
}
STREAMED = {**BODY, "max_tokens": 64, "stream": True}


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _batch(
    send: Callable[[], Awaitable[None]], n: int, pid: int | None
) -> tuple[list[float], float, float]:
    """(latencies, server CPU per request, this process's CPU per request) over `n` sends."""
    for _ in range(20):
        await send()
    cpu0 = process_cpu_s(pid) if pid else 0.0
    own0 = time.process_time()
    latencies = []
    for _ in range(n):
        t = time.perf_counter()
        await send()
        latencies.append(time.perf_counter() - t)
    own = (time.process_time() - own0) / n
    server = ((process_cpu_s(pid) - cpu0) / n) if pid else 0.0
    return latencies, server, own


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(engine: str, gateway: str, gateway_pid: int, n: int) -> dict[str, float]:
    """One repeat: every figure of the table, in seconds."""
    out: dict[str, float] = {}
    async with aiohttp.ClientSession() as session:

        def post(url: str, body: dict[str, object]) -> Callable[[], Awaitable[None]]:
            async def send() -> None:
                async with session.post(f"{url}/v1/chat/completions", json=body) as r:
                    await r.read()
                    assert r.status == 200, r.status

            return send

        lat, _, aio_own = await _batch(post(engine, BODY), n, None)
        out["direct_p50"], out["direct_p99"] = _pct(lat, 0.5), _pct(lat, 0.99)
        out["aiohttp_client_cpu"] = aio_own
        lat, cpu, _ = await _batch(post(gateway, BODY), n, gateway_pid)
        out["gateway_p50"], out["gateway_p99"] = _pct(lat, 0.5), _pct(lat, 0.99)
        out["gateway_cpu"] = cpu
        lat, cpu, _ = await _batch(post(gateway, STREAMED), n // 4, gateway_pid)
        out["stream_p50"], out["stream_cpu"] = _pct(lat, 0.5), cpu
    async with httpx.AsyncClient() as client:

        async def send() -> None:
            r = await client.post(f"{engine}/v1/chat/completions", json=BODY)
            assert r.status_code == 200, r.status_code

        _, _, out["httpx_client_cpu"] = await _batch(send, n, None)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per batch (2000)")
    parser.add_argument("--repeats", type=int, default=3, help="batches; medians reported (3)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="prefixroute-overhead-") as tmp:
        work = Path(tmp)
        engines, addresses = start_engines(1, work, time_scale=0.0)
        gateway, url = start_gateway(addresses, work, config={"scrape": {"interval_s": 0.05}})
        try:
            engine = f"http://{addresses[0]}"
            wait_ready([f"{engine}/health", f"{url}/health"], [engines, gateway])
            runs = [
                asyncio.run(measure(engine, url, gateway.pid, args.requests))
                for _ in range(args.repeats)
            ]
        finally:
            stop_process(gateway)
            stop_process(engines)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    ms = 1e3
    print(f"{args.repeats} batches of {args.requests} sequential requests; medians\n")
    print("| path | latency p50 (ms) | latency p99 (ms) | gateway CPU per request (ms) |")
    print("|---|---|---|---|")
    direct = f"{med['direct_p50'] * ms:.2f} | {med['direct_p99'] * ms:.2f}"
    print(f"| direct to the engine | {direct} | |")
    print(
        f"| through the gateway | {med['gateway_p50'] * ms:.2f} | {med['gateway_p99'] * ms:.2f} "
        f"| {med['gateway_cpu'] * ms:.3f} |"
    )
    print(
        f"| through the gateway, streamed (64 tokens) | {med['stream_p50'] * ms:.2f} | "
        f"| {med['stream_cpu'] * ms:.3f} |"
    )
    added = (med["gateway_p50"] - med["direct_p50"]) * ms
    print(f"\nadded latency p50: {added:.2f} ms")
    ratio = med["httpx_client_cpu"] / med["aiohttp_client_cpu"]
    print(
        f"client CPU per request: httpx {med['httpx_client_cpu'] * ms:.3f} ms, "
        f"aiohttp {med['aiohttp_client_cpu'] * ms:.3f} ms (httpx / aiohttp = {ratio:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
