"""How long one big request body stalls the gateway's event loop, seen from `/health`.

    python -m benchmarks.big_body_stall [--mb 8] [--repeats 5] [--shape transcript|parts]

Starts one fake engine (`--time-scale 0`, a 4M-token context so the prompt
is routed, not refused) and `prefixroute serve` in front of it. Each repeat
sends one chat request of about `--mb` MB (`transcript`: the prompt in 4 KB
messages, as a long agent transcript is; `parts`: messages of ten
60-character content parts, streamed, so the body is re-serialised to ask
for usage: its parse costs more than its routing) while another connection
polls `GET /health` back to back. Reported: the `/health` latencies seen
while the big request is in the gateway (p50 over all repeats, the longest
per big request as a median over repeats, and the overall max), and the big
request's own latency. A gateway busy with the body on its event loop
answers `/health` only after it is done: the longest answer is the stall
(figures in docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from prefixroute.devtools.live import (
    free_port,
    start_engines,
    start_gateway,
    stop_process,
    wait_ready,
)


def big_body(megabytes: float, shape: str = "transcript") -> bytes:
    """A chat body of about `megabytes` MB, of `shape` (see the module docstring)."""
    doc: dict[str, object] = {"model": "qwen3-0.6b", "max_tokens": 1}
    if shape == "parts":
        parts = [{"type": "text", "text": "p" * 60}] * 10
        n = min(10_000, max(1, int(megabytes * 1e6 / 930)))  # ~930 bytes a message
        doc.update(stream=True, messages=[{"role": "user", "content": parts}] * n)
    else:
        piece = "lorem ipsum dolor sit amet " * 150  # ~4 KB
        n = max(1, int(megabytes * 1e6 / len(piece)))
        doc["messages"] = [{"role": "user", "content": f"{i} {piece}"} for i in range(n)]
    return json.dumps(doc).encode()


async def one(url: str, body: bytes) -> tuple[list[float], float]:
    """(/health latencies while the big request ran, the big request's latency)."""
    async with aiohttp.ClientSession() as big, aiohttp.ClientSession() as probe:
        async with probe.get(f"{url}/health") as r:  # a warm connection
            await r.read()
        headers = {"content-type": "application/json"}
        t0 = time.perf_counter()
        task = asyncio.ensure_future(
            big.post(f"{url}/v1/chat/completions", data=body, headers=headers)
        )
        latencies = []
        while not task.done():
            t = time.perf_counter()
            async with probe.get(f"{url}/health") as r:
                await r.read()
            latencies.append(time.perf_counter() - t)
        answer = await task
        await answer.read()
        return latencies, time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=8.0, help="request body size in MB (8)")
    parser.add_argument("--repeats", type=int, default=5, help="big requests sent (5)")
    parser.add_argument("--shape", choices=["transcript", "parts"], default="transcript")
    args = parser.parse_args(argv)
    body = big_body(args.mb, args.shape)
    with tempfile.TemporaryDirectory(prefix="prefixroute-bigbody-") as tmp:
        work = Path(tmp)
        # a context long enough for the whole prompt: the request is routed, not refused
        engines, addresses = start_engines(
            1, work, time_scale=0.0, extra=["--kv-tokens", "4000000"]
        )
        port = free_port()
        server = {"host": "127.0.0.1", "port": port, "body_limit_bytes": 64 * 1024 * 1024}
        gateway, url = start_gateway(addresses, work, port=port, config={"server": server})
        try:
            wait_ready([f"http://{addresses[0]}/health", f"{url}/health"], [engines, gateway])
            runs = [asyncio.run(one(url, body)) for _ in range(args.repeats)]
        finally:
            stop_process(gateway)
            stop_process(engines)
    health = [x for lat, _ in runs for x in lat]
    big = [t for _, t in runs]
    ms = 1e3
    size = f"{len(body) / 1e6:.1f} MB ({args.shape})"
    print(f"{args.repeats} requests of {size}; /health polled back to back\n")
    longest = statistics.median(max(lat) for lat, _ in runs)
    print(
        "| /health p50 (ms) | longest /health per request, median (ms) | /health max (ms) ", end=""
    )
    print("| big request p50 (ms) |")
    print("|---|---|---|---|")
    print(
        f"| {statistics.median(health) * ms:.1f} | {longest * ms:.0f} | {max(health) * ms:.0f} "
        f"| {statistics.median(big) * ms:.0f} |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
