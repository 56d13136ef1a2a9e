"""`prefixroute demo --live`: fake engines, the gateway and the seed traffic, watched live.

    python -m prefixroute.devtools.live [--engines 4] [--rate 32 | --users 52] [--duration S]

Starts one `prefixroute.devtools.fake_engine` process serving `engines`
engines on consecutive free 127.0.0.1 ports, then the gateway
(`prefixroute.drivers.gateway`) with a generated config listing them, waits
until every one answers `/health`, and drives the gateway in-process with the
load tool (`prefixroute.devtools.bench`: the seed experiment's
traffic, open loop at 32 req/s by default). Once a second it redraws a small
view: elapsed time, req/s and TTFT percentiles over the last 5 s, failures,
the hit rate the engines reported in each response's usage (overall and per
tenant), and per endpoint the requests served, in flight and its own
prefix-cache hit rate, read from the engines' `/metrics` (vLLM's
`vllm:request_success_total`, `vllm:num_requests_running` +
`vllm:num_requests_waiting`, `vllm:prefix_cache_hits_total` /
`vllm:prefix_cache_queries_total`).

On a terminal it runs until Ctrl-C (or `--duration`); when stdout is not a
terminal it prints one plain line per second and stops after 30 s by default.
Either way it ends by stopping the load (in-flight requests finish), killing
its subprocesses (started in their own session, so a terminal's Ctrl-C
reaches only this process) and printing a summary. Exit status 0 when
requests were served and none failed, 1 otherwise (or when a subprocess
could not start: its log's tail goes to stderr), 2 for bad arguments.

The process helpers (`start_engines`, `start_gateway`, `stop_process`,
`wait_ready`, `sample_fleet`) are shared with `benchmarks/side_by_side.py`.
The event loop is uvloop's when installed (`bench.run_with_uvloop`): the
load generator shares the CPU with the engines and the gateway it drives.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import attrs

from prefixroute.devtools.bench import (
    LoadReport,
    Result,
    percentile,
    run_load,
    run_with_uvloop,
    summarise,
)

__all__ = [
    "EngineSample",
    "LiveResult",
    "cli_arguments",
    "cli_main",
    "free_port",
    "free_port_block",
    "metric_sums",
    "run_live",
    "sample_fleet",
    "start_engines",
    "start_gateway",
    "stop_process",
    "wait_ready",
]

ENGINE_METRICS = (
    "vllm:request_success_total",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
)
_WINDOW_S = 5.0  # the view's rates and percentiles cover the last few seconds
_NON_TTY_DURATION_S = 30.0
_UNTIL_STOPPED_S = 1e9  # "until Ctrl-C": far past any session


# --- processes ---------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (see `free_port_block`)."""
    return free_port_block(1)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(n: int, *, attempts: int = 200) -> int:
    """The first of `n` consecutive 127.0.0.1 ports that were free a moment ago.

    Drawn from 20000-32767, below Linux's ephemeral range (32768 up), so no
    outgoing connection takes one between this check and the server's bind.
    O(n) binds per attempt; RuntimeError if `attempts` bases all collide.
    """
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(20000, 32768 - n)
        if all(_port_free(base + i) for i in range(n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports found")


def _python_module(module: str, args: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """`python -m module args`, output to `log`, in its own session (Ctrl-C stays with us)."""
    with open(log, "wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True,
        )


def start_engines(
    n: int,
    workdir: Path,
    *,
    port_base: int | None = None,
    time_scale: float = 1.0,
    extra: Sequence[str] = (),
) -> tuple[subprocess.Popen[bytes], list[str]]:
    """One fake-engine process serving `n` engines; (process, their "127.0.0.1:port" addresses)."""
    base = port_base if port_base is not None else free_port_block(n)
    args = ["--port", str(base), "--engines", str(n), "--time-scale", f"{time_scale:g}", *extra]
    proc = _python_module("prefixroute.devtools.fake_engine", args, workdir / "engines.log")
    return proc, [f"127.0.0.1:{base + i}" for i in range(n)]


ROUND_ROBIN: dict[str, Any] = {
    "plugins": [
        {"type": "healthy-filter"},
        {"type": "queue-depth-scorer"},  # a profile needs a scorer; the picker ignores it
        {"type": "round-robin-picker"},
    ],
    "profiles": [
        {
            "name": "rr",
            "plugins": [
                {"pluginRef": "healthy-filter"},
                {"pluginRef": "queue-depth-scorer"},
                {"pluginRef": "round-robin-picker"},
            ],
        }
    ],
}
"""A prefix-blind router (healthy endpoints in turn): the baseline for hit rates."""


def gateway_config(addresses: Sequence[str], port: int) -> dict[str, Any]:
    """The generated gateway config: the default router, these endpoints, loopback only."""
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "endpoints": [{"address": a} for a in addresses],
    }


def start_gateway(
    addresses: Sequence[str],
    workdir: Path,
    *,
    port: int | None = None,
    config: Mapping[str, Any] | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """The gateway in front of `addresses`; (process, its base URL).

    `config` entries are merged over the generated config's top level.
    """
    port = port or free_port()
    doc = {**gateway_config(addresses, port), **(config or {})}
    path = workdir / "gateway.json"
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    proc = _python_module(
        "prefixroute.drivers.gateway", ["--config", str(path)], workdir / "gateway.log"
    )
    return proc, f"http://127.0.0.1:{port}"


def start_picker(
    doc: Mapping[str, Any], port: int, workdir: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """`prefixroute extproc` on 127.0.0.1:`port` with config `doc`; (process, its /health URL).

    `doc`'s `extproc` section is kept, with the host, the gRPC `port` and a
    free loopback port for `/metrics` and `/health` set over it.
    """
    metrics_port = free_port()
    extproc = {**doc.get("extproc", {}), "host": "127.0.0.1", "port": port}
    config = {**doc, "extproc": {**extproc, "metrics_port": metrics_port}}
    path = workdir / "extproc.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    args = ["--config", str(path), "--log-level", "warning"]
    proc = _python_module("prefixroute.drivers.extproc", args, workdir / "extproc.log")
    return proc, f"http://127.0.0.1:{metrics_port}/health"


def wait_ready(
    urls: Sequence[str], procs: Sequence[subprocess.Popen[bytes]], *, timeout_s: float = 30.0
) -> None:
    """Poll each URL until it answers 200; RuntimeError on timeout or if a process exits.

    Blocking (the standard library's client, no proxies from the environment):
    it runs before any event loop does.
    """
    deadline = time.monotonic() + timeout_s
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for url in urls:
        while True:
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{_name(proc)} exited with status {proc.returncode}")
            # refused, timed out, non-2xx (HTTPError is an OSError), a malformed answer
            with (
                contextlib.suppress(OSError, http.client.HTTPException),
                opener.open(url, timeout=1.0) as answer,
            ):
                if answer.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer 200 within {timeout_s:g} s")
            time.sleep(0.05)


def _name(proc: subprocess.Popen[bytes]) -> str:
    args = proc.args if isinstance(proc.args, list) else [str(proc.args)]
    return str(args[2]) if len(args) > 2 and args[1] == "-m" else " ".join(map(str, args))


def stop_process(proc: subprocess.Popen[bytes], *, timeout_s: float = 10.0) -> None:
    """SIGTERM `proc`, SIGKILL it after `timeout_s`, and reap it. Idempotent."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def supervised(workdir: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """A list to append started processes to; all stopped on exit, last started first.

    When a start fails (`RuntimeError`, as `wait_ready` raises), the tails of
    every `*.log` in `workdir` are printed to stderr before it propagates.
    """
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    except RuntimeError:
        for log in sorted(workdir.glob("*.log")):
            print(f"--- {log.name}\n{log_tail(log)}", file=sys.stderr)
        raise
    finally:
        for proc in reversed(procs):
            stop_process(proc)


def log_tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log file ("" if unreadable)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- engine metrics ----------------------------------------------------------------------


def metric_sums(text: str, names: Sequence[str]) -> dict[str, float]:
    """The sum over label sets of each metric in `names`, from Prometheus text. O(lines)."""
    wanted = set(names)
    sums = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name not in wanted:
            continue
        rest = line[line.rfind("}") + 1 :] if "{" in line else line[len(name) :]
        parts = rest.split()
        if parts:
            with contextlib.suppress(ValueError):
                value = float(parts[0])
                if math.isfinite(value):
                    sums[name] += value
    return sums


@attrs.frozen
class EngineSample:
    """One engine's counters and gauges at one moment (counters are totals since it started)."""

    address: str
    ok: bool
    requests: float = 0.0
    running: float = 0.0
    waiting: float = 0.0
    queries: float = 0.0
    hits: float = 0.0

    def minus(self, before: EngineSample) -> EngineSample:
        """Counters as deltas since `before`; gauges as now."""
        return attrs.evolve(
            self,
            requests=self.requests - before.requests,
            queries=self.queries - before.queries,
            hits=self.hits - before.hits,
        )

    @property
    def hit_rate(self) -> float | None:
        """Prefix-cache hit rate: hit tokens / queried tokens (None before any query)."""
        return self.hits / self.queries if self.queries > 0 else None


async def sample_fleet(
    client: aiohttp.ClientSession, addresses: Sequence[str]
) -> list[EngineSample]:
    """Scrape every engine's `/metrics` concurrently; `ok=False` for one that did not answer
    (a connection error, the client's timeout, a non-2xx status)."""

    async def one(address: str) -> EngineSample:
        try:
            async with client.get(f"http://{address}/metrics") as resp:
                resp.raise_for_status()
                text = await resp.text(errors="replace")
        except (aiohttp.ClientError, TimeoutError):
            return EngineSample(address, ok=False)
        s = metric_sums(text, ENGINE_METRICS)
        return EngineSample(
            address,
            ok=True,
            requests=s["vllm:request_success_total"],
            running=s["vllm:num_requests_running"],
            waiting=s["vllm:num_requests_waiting"],
            queries=s["vllm:prefix_cache_queries_total"],
            hits=s["vllm:prefix_cache_hits_total"],
        )

    return list(await asyncio.gather(*(one(a) for a in addresses)))


def fleet_delta(after: Sequence[EngineSample], before: Sequence[EngineSample]) -> EngineSample:
    """The whole fleet's counters between two samples, as one sample named "fleet"."""
    total = EngineSample("fleet", ok=all(s.ok for s in after))
    for a, b in zip(after, before, strict=True):
        d = a.minus(b)
        total = attrs.evolve(
            total,
            requests=total.requests + d.requests,
            running=total.running + d.running,
            waiting=total.waiting + d.waiting,
            queries=total.queries + d.queries,
            hits=total.hits + d.hits,
        )
    return total


# --- the view ----------------------------------------------------------------------------


class _View:
    """Collects results and renders the once-a-second view."""

    def __init__(self, out: TextIO, tty: bool, header: str) -> None:
        self.out = out
        self.tty = tty
        self.header = header
        self.results: list[Result] = []
        self.recent: deque[tuple[float, Result]] = deque()
        self.t0 = time.monotonic()

    def add(self, result: Result) -> None:
        self.results.append(result)
        self.recent.append((time.monotonic(), result))

    def _window(self, now: float) -> list[Result]:
        while self.recent and self.recent[0][0] < now - _WINDOW_S:
            self.recent.popleft()
        return [r for _, r in self.recent]

    def draw(self, engines: Sequence[EngineSample], first: Sequence[EngineSample]) -> None:
        now = time.monotonic()
        elapsed = now - self.t0
        window = self._window(now)
        span = min(_WINDOW_S, max(elapsed, 1e-9))
        rps = sum(r.ok for r in window) / span
        ttfts = sorted(r.ttft_s for r in window if r.ok and r.ttft_s is not None)
        total = summarise(self.results, duration_s=max(elapsed, 1e-9))
        if not self.tty:
            split = " ".join(
                f"{s.address.rsplit(':', 1)[-1]}:{s.minus(f).requests:.0f}"
                for s, f in zip(engines, first, strict=True)
            )
            self.out.write(
                f"{elapsed:6.1f} s  {rps:6.1f} req/s  ok {total.ok}  failures {total.failures}"
                f"  hit {_pct(total.hit_rate)}  TTFT p50 {_ms(percentile(ttfts, 0.5))}"
                f" p99 {_ms(percentile(ttfts, 0.99))}  split {split}\n"
            )
            self.out.flush()
            return
        lines = [
            self.header,
            "",
            f"elapsed {elapsed:7.1f} s   last {_WINDOW_S:g} s: {rps:7.1f} req/s   "
            f"TTFT p50 {_ms(percentile(ttfts, 0.5))}  p99 {_ms(percentile(ttfts, 0.99))}",
            f"requests {total.ok} ok, {total.failures} failed   "
            f"hit rate (usage) {_pct(total.hit_rate)}",
            "tenants: "
            + "  ".join(f"{t} {_pct(h)}" for t, (_, h) in sorted(total.tenants.items())),
            "",
            f"{'endpoint':<22}{'requests':>10}{'share':>8}{'in flight':>11}{'hit rate':>10}",
        ]
        deltas = [s.minus(f) for s, f in zip(engines, first, strict=True)]
        served = sum(d.requests for d in deltas) or 1.0
        for d in deltas:
            flight = f"{d.running + d.waiting:.0f}" if d.ok else "down"
            lines.append(
                f"{d.address:<22}{d.requests:>10.0f}{d.requests / served:>8.0%}"
                f"{flight:>11}{_pct(d.hit_rate):>10}"
            )
        lines += ["", "Ctrl-C to stop"]
        self.out.write("\x1b[H\x1b[2J" + "\n".join(lines) + "\n")
        self.out.flush()


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _pct(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.1%}"


# --- running it --------------------------------------------------------------------------


@attrs.frozen
class LiveResult:
    """How a live run ended: exit status, the load summary, per-engine deltas, the child pids."""

    exit_code: int
    report: LoadReport | None
    engines: tuple[EngineSample, ...]
    pids: tuple[int, ...]


def run_live(
    engines: int = 4,
    duration_s: float | None = None,
    rate_rps: float | None = None,
    users: int | None = None,
    port_base: int | None = None,
    out: TextIO | None = None,
    *,
    time_scale: float = 1.0,
    seed: int = 0,
    stream: bool = True,
    tty: bool | None = None,
) -> LiveResult:
    """Run the live demo (module docstring); prints to `out` (default stdout).

    `rate_rps` (default 32, open loop) or `users` (closed loop) shapes the
    load. `port_base` P puts the gateway on P and the engines on P+1..P+N
    (default: free ports). `duration_s` None means until Ctrl-C on a
    terminal, 30 s otherwise. Always stops its subprocesses before returning.
    ValueError for bad arguments.
    """
    out = out or sys.stdout
    if engines < 1:
        raise ValueError(f"engines must be >= 1, got {engines}")
    if users is None and rate_rps is None:
        rate_rps = 32.0
    if tty is None:
        tty = out.isatty()
    if duration_s is None:
        duration_s = _UNTIL_STOPPED_S if tty else _NON_TTY_DURATION_S
    if not 0 < duration_s < math.inf:
        raise ValueError(f"duration must be > 0, got {duration_s}")
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="prefixroute-live-") as tmp:
        workdir = Path(tmp)
        try:
            try:
                engine_proc, addresses = start_engines(
                    engines,
                    workdir,
                    port_base=None if port_base is None else port_base + 1,
                    time_scale=time_scale,
                )
                procs.append(engine_proc)
                wait_ready([f"http://{a}/health" for a in addresses], procs)
                gateway, url = start_gateway(addresses, workdir, port=port_base)
                procs.append(gateway)
                wait_ready([f"{url}/health"], procs)
            except (RuntimeError, OSError) as exc:
                print(f"prefixroute demo --live: {exc}", file=sys.stderr)
                for proc in reversed(procs):
                    stop_process(proc)
                for log in sorted(workdir.glob("*.log")):
                    print(f"--- {log.name}\n{log_tail(log)}", file=sys.stderr)
                return LiveResult(1, None, (), tuple(p.pid for p in procs))
            load = (
                f"{rate_rps:g} req/s open loop" if users is None else f"{users} closed-loop users"
            )
            header = (
                f"prefixroute live: {engines} fake engines behind the gateway at {url}, "
                f"seed traffic, {load}"
            )
            if not tty:
                print(header, file=out, flush=True)
            report, samples = run_with_uvloop(
                _drive(url, addresses, out, tty, header, duration_s, rate_rps, users, seed, stream)
            )
        finally:
            for proc in reversed(procs):
                stop_process(proc)
        crashed = [p for p in procs if p.returncode not in (0, -signal.SIGTERM)]
        code = 0 if report.ok > 0 and report.failures == 0 and not crashed else 1
        _summary(out, report, samples, crashed)
        return LiveResult(code, report, tuple(samples), tuple(p.pid for p in procs))


def _summary(
    out: TextIO,
    report: LoadReport,
    samples: Sequence[EngineSample],
    crashed: Sequence[subprocess.Popen[bytes]],
) -> None:
    print("\nsummary:", file=out)
    for line in report.lines():
        print(f"  {line}", file=out)
    served = sum(s.requests for s in samples) or 1.0
    for s in samples:
        print(
            f"  endpoint {s.address}: {s.requests:.0f} requests ({s.requests / served:.0%}),"
            f" engine hit rate {_pct(s.hit_rate)}",
            file=out,
        )
    for p in crashed:
        print(f"  note: {_name(p)} exited with status {p.returncode}", file=out)
    out.flush()


async def _drive(
    url: str,
    addresses: Sequence[str],
    out: TextIO,
    tty: bool,
    header: str,
    duration_s: float,
    rate_rps: float | None,
    users: int | None,
    seed: int,
    stream: bool,
) -> tuple[LoadReport, list[EngineSample]]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGINT, stop.set)
    view = _View(out, tty, header)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as metrics_client:
        first = await sample_fleet(metrics_client, addresses)
        load = asyncio.create_task(
            run_load(
                url,
                rate_rps=rate_rps,
                users=users,
                duration_s=duration_s,
                seed=seed,
                stream=stream,
                on_result=view.add,
                stop=stop,
            )
        )
        try:
            while not load.done():
                await asyncio.wait({load}, timeout=1.0)
                view.draw(await sample_fleet(metrics_client, addresses), first)
            report = load.result()
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGINT)
            if not load.done():
                load.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await load
        last = await sample_fleet(metrics_client, addresses)
    return report, [a.minus(b) for a, b in zip(last, first, strict=True)]


# --- command line ------------------------------------------------------------------------


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `prefixroute demo --live`'s options to `parser`."""
    parser.add_argument("--engines", type=int, default=4, help="fake engines to start (4)")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, help="open-loop arrivals per second (default 32)")
    load.add_argument("--users", type=int, help="closed-loop users instead of a rate")
    parser.add_argument(
        "--duration",
        type=float,
        help="seconds to run (default: until Ctrl-C on a terminal, else 30)",
    )
    parser.add_argument("--port-base", type=int, help="gateway on P, engines on P+1.. (free)")
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="fake engines' step-time multiplier (1.0)"
    )
    parser.add_argument("--seed", type=int, default=0, help="load generator seed (0)")
    parser.add_argument("--no-stream", action="store_true", help="non-streaming requests")


def cli_main(args: argparse.Namespace) -> int:
    """Run the live demo from parsed arguments; its exit status."""
    try:
        result = run_live(
            engines=args.engines,
            duration_s=args.duration,
            rate_rps=args.rate,
            users=args.users,
            port_base=args.port_base,
            time_scale=args.time_scale,
            seed=args.seed,
            stream=not args.no_stream,
        )
    except ValueError as exc:
        print(f"prefixroute demo --live: {exc}", file=sys.stderr)
        return 2
    return result.exit_code


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(
        prog="python -m prefixroute.devtools.live", description=__doc__.split("\n", 1)[0]
    )
    cli_arguments(_parser)
    sys.exit(cli_main(_parser.parse_args()))
