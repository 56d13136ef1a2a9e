"""What a client of the shipped Envoy configs sees when a model server or the picker dies.

    python -m benchmarks.envoy_failures --scenario engine-death|picker-death
                                        [--config envoy.yaml|envoy-failopen.yaml|
                                                  envoy-fallbacks.yaml|PATH]
                                        [--signal KILL|TERM] [--runs N] [--json PATH]
                                        [--no-retry-policy] [--processing-mode JSON]

Everything runs on 127.0.0.1 and is torn down after each run: fake engines
(`prefixroute.devtools.fake_engine`, one process each, so one can be killed
alone), the endpoint picker (`python -m prefixroute.drivers.extproc`) and a
real Envoy (`.venv-envoy`, `make envoy`) loading the named config from
`examples/envoy/` (or any file given as a path, e.g. an older revision of
it) with only its ports and model-server addresses rewritten
(`prefixroute.devtools.envoy.render`). Configs whose `inference` cluster
lists the model servers (`envoy-fallbacks.yaml`) get the picker's
`extproc.fallback_list: true` unless `--no-fallback-list`. Two changes to
the rendered config, for comparisons: `--no-retry-policy` removes the
routes' `retry_policy`, `--processing-mode` merges a JSON object into the
ext_proc filter's `processing_mode` (e.g. `{"response_body_mode": "NONE",
"response_trailer_mode": "SKIP"}`: the picker sees no response body).

- `engine-death`: two engines with `--time-scale 0` (no simulated step
  time), the picker with a prefix-blind round-robin profile (`ROUND_ROBIN`)
  and the default health checks, `--clients` closed-loop clients sending small chat
  requests back to back; one engine gets `--signal` (SIGKILL by default)
  `--kill-after` seconds in, and the clients go on for `--observe` seconds.
  Reported: requests sent after the kill, how many were not a 200, their
  statuses (with Envoy's `error.code`), and the first and last failure's
  start relative to the kill.
- `picker-death`: one engine with `--time-scale 1` (real-time steps, so a
  streamed answer of 400 tokens is still going), the picker with the default
  router profile, `--clients` such streaming requests in flight, then
  the picker gets `--signal` `--kill-after` seconds in (its
  `drain_timeout_s` is 10 s), and new small requests are sent one after the
  other, 50 ms apart, for `--observe` seconds. Reported: per in-flight
  stream whether it finished (`data: [DONE]`) or was cut, after how many
  events and how long after the kill; the new requests by status, and the
  span of the failures and the first success.

Both windows end at a health check (the picker's of the engines, every
1 s, or Envoy's of the picker, every 1 s), so where the signal falls in
that cycle matters: each run waits a random 0 to 1 s (drawn from `--seed`)
once everything is ready, before the load starts. Each run is independent
(fresh processes and ports). Exit status 0 when
every run completed, 1 when a process could not start (its log's tail goes
to stderr), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import attrs

from prefixroute.devtools.envoy import EXAMPLES, Envoy, envoy_binary, free_ports, render, run_envoy
from prefixroute.devtools.live import (
    ROUND_ROBIN,
    free_port_block,
    start_engines,
    start_picker,
    supervised,
    wait_ready,
)

SCENARIOS = ("engine-death", "picker-death")
PHASE_S = 1.0  # the health checks' interval (Envoy's of the picker, the picker's of engines)
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}
MODEL = "qwen3-0.6b"
"""A prefix-blind router: requests alternate between the healthy endpoints."""

SMALL = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
STREAM = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "tell me"}],
    "max_tokens": 400,
    "stream": True,
}


@attrs.frozen
class Scenario:
    """One measurement's settings (see the module docstring)."""

    name: str
    config: str
    signal: str = "KILL"
    clients: int = 4
    kill_after_s: float = 1.5
    observe_s: float = 4.0
    fallback_list: bool | None = None  # None: on when the config lists the model servers
    retry_policy: bool = True  # False: the routes' retry_policy removed
    processing_mode: dict[str, str] = attrs.field(factory=dict)  # merged into ext_proc's


# --- processes ---------------------------------------------------------------------------


def config_path(config: str) -> Path:
    """`config` as a file: a name in `examples/envoy/`, else a path. FileNotFoundError if absent."""
    path = EXAMPLES / config if "/" not in config else Path(config).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no Envoy config {path}")
    return path


def lists_servers(doc: dict[str, Any]) -> bool:
    """Whether a rendered config's `inference` cluster lists the model servers (STATIC)."""
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    return bool(clusters.get("inference", {}).get("type") == "STATIC")


def drop_retry_policies(doc: dict[str, Any]) -> None:
    """Remove every route's `retry_policy` from a rendered config (in place)."""
    (listener,) = doc["static_resources"]["listeners"]
    (manager,) = listener["filter_chains"][0]["filters"]
    for host in manager["typed_config"]["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            route.get("route", {}).pop("retry_policy", None)


@contextlib.contextmanager
def stack(
    s: Scenario, workdir: Path, engines: int, time_scale: float, picker_doc: dict[str, Any]
) -> Iterator[tuple[Envoy, list[subprocess.Popen[bytes]], subprocess.Popen[bytes]]]:
    """Engines (one process each), the picker and Envoy; yields (Envoy, engine processes,
    picker). Teardown: Envoy, then the picker, then the engines."""
    with supervised(workdir) as procs, contextlib.ExitStack() as envoy_stack:
        engine_procs, addresses = [], []
        base = free_port_block(engines)  # one block: no two engines draw the same port
        for i in range(engines):
            sub = workdir / f"engine{i}"
            sub.mkdir()
            proc, (address,) = start_engines(1, sub, port_base=base + i, time_scale=time_scale)
            procs.append(proc)
            engine_procs.append(proc)
            addresses.append(address)
        wait_ready([f"http://{a}/health" for a in addresses], procs)
        ports = free_ports()
        rendered = render(
            str(config_path(s.config)),
            ports,
            fallback=addresses,
            processing_mode=s.processing_mode or None,
        )
        if not s.retry_policy:
            drop_retry_policies(rendered)
        fallback_list = lists_servers(rendered) if s.fallback_list is None else s.fallback_list
        doc = {
            **picker_doc,
            "endpoints": [
                {"address": a, "id": f"engine-{i}", "models": [MODEL]}
                for i, a in enumerate(addresses)
            ],
            "extproc": {"drain_timeout_s": 10, "fallback_list": fallback_list},
        }
        picker, health = start_picker(doc, ports.extproc, workdir)
        procs.append(picker)
        wait_ready([health], procs)
        envoy = envoy_stack.enter_context(run_envoy(rendered))
        envoy.wait_stat("cluster.extproc.membership_healthy", 1)
        yield envoy, engine_procs, picker


def error_code(status: int, body: bytes) -> str:
    """A response's outcome: "ok" for 200, else "<status> <error.code>" (from Envoy's and the
    picker's JSON error bodies) or the bare status."""
    if status == 200:
        return "ok"
    try:
        code = json.loads(body).get("error", {}).get("code")
    except (ValueError, AttributeError):
        code = None
    return f"{status} {code}" if code else str(status)


# --- engine death ------------------------------------------------------------------------


async def _closed_loop(
    url: str, stop: asyncio.Event, out: list[tuple[float, str]], client: aiohttp.ClientSession
) -> None:
    while not stop.is_set():
        t = time.monotonic()
        try:
            async with client.post(f"{url}/v1/chat/completions", json=SMALL) as resp:
                out.append((t, error_code(resp.status, await resp.read())))
        except (aiohttp.ClientError, TimeoutError) as exc:
            out.append((t, type(exc).__name__))


async def _engine_death(
    s: Scenario, envoy: Envoy, victim: subprocess.Popen[bytes], phase_s: float
) -> dict[str, Any]:
    stop = asyncio.Event()
    results: list[tuple[float, str]] = []
    timeout = aiohttp.ClientTimeout(total=30)
    await asyncio.sleep(phase_s)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        tasks = [
            asyncio.create_task(_closed_loop(envoy.url, stop, results, client))
            for _ in range(s.clients)
        ]
        await asyncio.sleep(s.kill_after_s)
        killed = time.monotonic()
        victim.send_signal(SIGNALS[s.signal])
        await asyncio.sleep(s.observe_s)
        stop.set()
        await asyncio.gather(*tasks)
    results.sort()  # by start time (they are appended as they end)
    after = [(t - killed, what) for t, what in results if t >= killed]
    failed = [(t, what) for t, what in after if what != "ok"]
    return {
        "phase_s": round(phase_s, 3),
        "requests": len(results),
        "after_kill": len(after),
        "failed": len(failed),
        "failures": dict(Counter(what for _, what in failed)),
        "first_failure_s": round(failed[0][0], 3) if failed else None,
        "last_failure_s": round(failed[-1][0], 3) if failed else None,
        "failed_before_kill": sum(what != "ok" for t, what in results if t < killed),
    }


def engine_death(s: Scenario, workdir: Path, phase_s: float) -> dict[str, Any]:
    """One engine-death run (module docstring); its figures."""
    with stack(s, workdir, 2, 0.0, ROUND_ROBIN) as (envoy, engines, _):
        return asyncio.run(_engine_death(s, envoy, engines[0], phase_s))


# --- picker death ------------------------------------------------------------------------


async def _stream(url: str, client: aiohttp.ClientSession) -> tuple[str, int, bool, float]:
    """One streaming request: (status or error, data events, saw [DONE], its end time)."""
    events, done, what = 0, False, "?"
    try:
        async with client.post(f"{url}/v1/chat/completions", json=STREAM) as resp:
            what = str(resp.status)
            async for line in resp.content:
                if line.startswith(b"data: "):
                    events += 1
                    done = done or line.strip() == b"data: [DONE]"
    except (aiohttp.ClientError, TimeoutError) as exc:
        what = type(exc).__name__
    return what, events, done, time.monotonic()


async def _picker_death(
    s: Scenario, envoy: Envoy, picker: subprocess.Popen[bytes], phase_s: float
) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=30)
    await asyncio.sleep(phase_s)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        streams = [asyncio.create_task(_stream(envoy.url, client)) for _ in range(s.clients)]
        await asyncio.sleep(s.kill_after_s)
        killed = time.monotonic()
        picker.send_signal(SIGNALS[s.signal])
        news: list[tuple[float, str]] = []
        while time.monotonic() - killed < s.observe_s:
            t = time.monotonic()
            try:
                async with client.post(f"{envoy.url}/v1/chat/completions", json=SMALL) as resp:
                    news.append((t - killed, error_code(resp.status, await resp.read())))
            except (aiohttp.ClientError, TimeoutError) as exc:
                news.append((t - killed, type(exc).__name__))
            await asyncio.sleep(0.05)
        ended = await asyncio.gather(*streams)
    failed = [(t, what) for t, what in news if what != "ok"]  # sequential: in start order
    ok = [t for t, what in news if what == "ok"]
    return {
        "phase_s": round(phase_s, 3),
        "streams": [
            {
                "status": what,
                "events": n,
                "done": done,
                "ended_after_kill_s": round(end - killed, 2),
            }
            for what, n, done, end in ended
        ],
        "streams_done": sum(done for _, _, done, _ in ended),
        "new_requests": len(news),
        "new_outcomes": dict(Counter(what for _, what in news)),
        "first_failure_s": round(failed[0][0], 2) if failed else None,
        "last_failure_s": round(failed[-1][0], 2) if failed else None,
        "first_ok_s": round(ok[0], 2) if ok else None,
    }


def picker_death(s: Scenario, workdir: Path, phase_s: float) -> dict[str, Any]:
    """One picker-death run (module docstring); its figures."""
    with stack(s, workdir, 1, 1.0, {}) as (envoy, _, picker):
        return asyncio.run(_picker_death(s, envoy, picker, phase_s))


# --- the report --------------------------------------------------------------------------


def _span(run: dict[str, Any]) -> str:
    if run["first_failure_s"] is None:
        return "-"
    return f"{run['first_failure_s']:+.3f} to {run['last_failure_s']:+.3f} s"


def table(s: Scenario, runs: Sequence[dict[str, Any]]) -> list[str]:
    """A Markdown table of the runs, one row each."""
    if s.name == "engine-death":
        lines = [
            "| run | phase | requests after the kill | failed | failures | span (from the kill) |",
            "|---|---|---|---|---|---|",
        ]
        for i, r in enumerate(runs, 1):
            kinds = ", ".join(f"{k}: {n}" for k, n in sorted(r["failures"].items())) or "-"
            lines.append(
                f"| {i} | {r['phase_s']:.2f} s | {r['after_kill']} | {r['failed']} | {kinds} "
                f"| {_span(r)} |"
            )
        return lines
    lines = [
        "| run | phase | in-flight streams | new requests | their outcomes | failures span "
        "| first 200 |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        streams = f"{r['streams_done']} of {len(r['streams'])} finished"
        cut = [x for x in r["streams"] if not x["done"]]
        if cut:
            events = sorted(x["events"] for x in cut)
            ends = sorted(x["ended_after_kill_s"] for x in cut)
            kinds = ", ".join(sorted({x["status"] for x in cut}))
            streams += (
                f"; {len(cut)} cut after {events[0]} to {events[-1]} events,"
                f" {ends[0]:g} to {ends[-1]:g} s after the signal ({kinds})"
            )
        outcomes = ", ".join(f"{k}: {n}" for k, n in sorted(r["new_outcomes"].items()))
        first_ok = "-" if r["first_ok_s"] is None else f"{r['first_ok_s']:+.2f} s"
        lines.append(
            f"| {i} | {r['phase_s']:.2f} s | {streams} | {r['new_requests']} | {outcomes} "
            f"| {_span(r)} | {first_ok} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (module docstring); its exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.envoy_failures", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--scenario", choices=SCENARIOS, required=True)
    parser.add_argument(
        "--config", default="envoy.yaml", help="a file in examples/envoy/ or a path (envoy.yaml)"
    )
    parser.add_argument("--signal", choices=sorted(SIGNALS), default="KILL", help="(KILL)")
    parser.add_argument("--runs", type=int, default=1, help="independent runs (1)")
    parser.add_argument("--clients", type=int, default=4, help="clients or streams (4)")
    parser.add_argument("--kill-after", type=float, help="seconds (1.5 engine, 0.7 picker)")
    parser.add_argument("--observe", type=float, help="seconds after it (4 engine, 3.5 picker)")
    parser.add_argument(
        "--fallback-list",
        action=argparse.BooleanOptionalAction,
        help="the picker's extproc.fallback_list (default: on if the config lists the servers)",
    )
    parser.add_argument(
        "--no-retry-policy", action="store_true", help="remove the routes' retry_policy"
    )
    parser.add_argument(
        "--processing-mode",
        type=json.loads,
        default={},
        help="a JSON object merged into ext_proc's processing_mode",
    )
    parser.add_argument("--seed", type=int, default=0, help="draws each run's phase (0)")
    parser.add_argument("--json", type=Path, help="also write the runs here")
    args = parser.parse_args(argv)
    engine = args.scenario == "engine-death"
    s = Scenario(
        name=args.scenario,
        config=args.config,
        signal=args.signal,
        clients=args.clients,
        kill_after_s=args.kill_after if args.kill_after is not None else 1.5 if engine else 0.7,
        observe_s=args.observe if args.observe is not None else 4.0 if engine else 3.5,
        fallback_list=args.fallback_list,
        retry_policy=not args.no_retry_policy,
        processing_mode=args.processing_mode,
    )
    if not isinstance(args.processing_mode, dict):
        parser.error("--processing-mode must be a JSON object")
    if not (1 <= args.runs <= 20 and 1 <= s.clients <= 64):
        parser.error("--runs must be 1..20 and --clients 1..64")
    if not (0 < s.kill_after_s <= 30 and 0 < s.observe_s <= 30):
        parser.error("--kill-after and --observe must be in (0, 30] seconds")
    try:
        config_path(s.config)
        envoy_binary()
    except (FileNotFoundError, RuntimeError) as exc:
        parser.error(str(exc))
    measure = engine_death if engine else picker_death
    runs = []
    rng = random.Random(args.seed)
    for _ in range(args.runs):
        phase_s = rng.uniform(0.0, PHASE_S)
        with tempfile.TemporaryDirectory(prefix="envoy-failures-") as tmp:
            try:
                runs.append(measure(s, Path(tmp), phase_s))
            except (RuntimeError, AssertionError) as exc:  # a start failed; wait_stat asserts
                print(f"envoy_failures: {exc}", file=sys.stderr)
                return 1
    changes = [
        *(["no retry_policy"] if not s.retry_policy else []),
        *([f"processing_mode {json.dumps(s.processing_mode)}"] if s.processing_mode else []),
    ]
    print(f"{s.name}, {s.config}, SIG{s.signal}, {s.clients} clients", *changes, sep=", ")
    print("\n".join(table(s, runs)))
    if args.json:
        args.json.write_text(
            json.dumps({"scenario": attrs.asdict(s), "seed": args.seed, "runs": runs}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
