"""CPU per request and ceiling of Envoy + `prefixroute extproc` and of the gateway, in one run.

    python -m benchmarks.extproc_cpu [--routers ours,envoy] [--rate 400] [--seconds 8]
                                     [--ramp 400,800,1200,1600,2000] [--ramp-seconds 5]
                                     [--processing-mode JSON] [--picker-script FILE]
                                     [--json PATH]

For each router, in front of the same fake engines (four engines in one
process at `--time-scale 0`: no modelled GPU time, so what is left is HTTP,
bookkeeping and the router), as `benchmarks.side_by_side` sets them up:

- `ours`: `python -m prefixroute.drivers.gateway` with the generated config.
- `envoy`: a real Envoy (`.venv-envoy`, `prefixroute.devtools.envoy`) on the
  shipped `examples/envoy/envoy.yaml` (only its ports rewritten, plus
  `--processing-mode`, a JSON object merged into the ext_proc filter's
  `processing_mode`, for probing other modes) and `python -m
  prefixroute.drivers.extproc` as its picker, with the same generated config.

Two phases per router, on fresh engines and router:

1. `cpu`: `--warm-up` seconds of load at `--rate` (not measured), then
   `--seconds` more at `--rate` (evenly spaced arrivals, seed traffic,
   `max_tokens` 4, streamed). CPU time of every process (`/proc/PID/stat`
   utime + stime; the picker's threads from `/proc/PID/task`), read before
   and after, divided by the completed requests. The load generator is this
   process (`resource.getrusage`). The router's voluntary context switches
   per request (all its threads, `/proc/PID/task/*/status`): how often it
   went to sleep and was woken, which depends much less than CPU time on how
   busy the machine is with other work. `Router.route`'s own time per request, from the
   router's decision-latency histogram. For Envoy, its ext_proc counters
   from the admin `/stats`: gRPC messages per request each way.
2. `ramp`: `--warm-up` seconds at the first rate (not measured), then
   open-loop rates `--ramp`, each `--ramp-seconds` long, stopping
   after the first rate that is not sustained (no failure, >= 95% of the
   offered rate achieved, latency p99 <= 500 ms: `benchmarks.side_by_side`'s
   rule). The highest sustained rate is the router's ceiling.

- `envoy-script`: `envoy` with the picker run from `--picker-script` (a
  file and its arguments) instead of the installed module: an older picker
  for a before/after in one run (`git show
  REV:src/prefixroute/drivers/extproc.py > FILE`), or
  `benchmarks/extproc_floor.py` (the gRPC server alone).

Everything shares one machine (this one: 2 cores): Envoy, the picker, the
engines and the load generator take CPU from each other, so the ceiling is
the whole loop's, and the ratio of ceilings is what the issue asks for
("Envoy + picker against the gateway on the same machine in one run").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from benchmarks.side_by_side import Plan, _warm_up, ramp_phase, sustained
from prefixroute.devtools.bench import run_load, run_with_uvloop
from prefixroute.devtools.envoy import ENVOY_VERSION, free_ports, render, run_envoy
from prefixroute.devtools.live import (
    free_port,
    gateway_config,
    start_engines,
    start_gateway,
    start_picker,
    supervised,
    wait_ready,
)

ROUTERS = ("ours", "envoy", "envoy-script")
ENGINES = 4
_TICK = os.sysconf("SC_CLK_TCK")
DECISION_METRIC = "inference_extension_scheduler_e2e_duration_seconds"
_EXT_PROC_STATS = ("streams_started", "stream_msgs_sent", "stream_msgs_received")


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all its threads), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def thread_seconds(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of process `pid` (threads of one name summed)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            text = (task / "stat").read_text()
            name = text[text.index("(") + 1 : text.rindex(")")]
            fields = text.rsplit(")", 1)[1].split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _TICK
    return out


def context_switches(pid: int) -> int:
    """Voluntary context switches of all threads of process `pid`: how often they slept.

    Each is a wake-up (a message, a timer). They fall as the request rate
    rises (hand-offs batch), but depend much less than CPU time on how busy
    the machine is with other work.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def self_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@attrs.frozen
class Stack:
    """What one router's run runs: target URL, the processes to measure, Envoy's admin URL."""

    url: str
    addresses: list[str]
    pids: dict[str, int]
    threads_of: str | None
    admin: str | None
    metrics: str


def start_picker_script(
    doc: Mapping[str, Any], port: int, workdir: Path, script: str
) -> tuple[subprocess.Popen[bytes], str]:
    """`start_picker`, running the picker from `script`: a file and its arguments."""
    metrics_port = free_port()
    extproc = {"host": "127.0.0.1", "port": port, "metrics_port": metrics_port}
    path = workdir / "extproc.json"
    path.write_text(json.dumps({**doc, "extproc": extproc}, indent=2), encoding="utf-8")
    args = [sys.executable, *shlex.split(script), "--config", str(path), "--log-level", "warning"]
    with open(workdir / "extproc.log", "wb") as log:
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return proc, f"http://127.0.0.1:{metrics_port}/health"


@contextlib.contextmanager
def stack(
    router: str,
    workdir: Path,
    processing_mode: Mapping[str, str] | None,
    picker_script: str | None = None,
) -> Iterator[Stack]:
    """Fresh engines (time-scale 0) and `router` in front of them, warmed up."""
    with supervised(workdir) as procs, contextlib.ExitStack() as envoy_stack:
        engines, addresses = start_engines(ENGINES, workdir, time_scale=0.0)
        procs.append(engines)
        wait_ready([f"http://{a}/health" for a in addresses], procs)
        pids = {"engines": engines.pid}
        if router == "ours":
            gateway, url = start_gateway(addresses, workdir)
            procs.append(gateway)
            wait_ready([f"{url}/health"], procs)
            pids["gateway"] = gateway.pid
            yielded = Stack(url, addresses, pids, "gateway", None, f"{url}/metrics")
        else:
            ports = free_ports()
            doc = {k: v for k, v in gateway_config(addresses, 0).items() if k != "server"}
            if picker_script:
                picker, health = start_picker_script(doc, ports.extproc, workdir, picker_script)
            else:
                picker, health = start_picker(doc, ports.extproc, workdir)
            procs.append(picker)
            wait_ready([health], procs)
            pids["picker"] = picker.pid
            rendered = render("envoy.yaml", ports, processing_mode=processing_mode)
            envoy = envoy_stack.enter_context(run_envoy(rendered))
            pids["envoy"] = envoy.process.pid
            metrics = health.rsplit("/", 1)[0] + "/metrics"
            yielded = Stack(envoy.url, addresses, pids, "picker", envoy.admin, metrics)
        _warm_up([yielded.url], ENGINES)
        yield yielded


def ext_proc_stats(admin: str) -> dict[str, int]:
    """Envoy's ext_proc counters (summed over stat prefixes)."""
    with urllib.request.urlopen(f"{admin}/stats?filter=ext_proc", timeout=5) as answer:
        text = answer.read().decode()
    out = dict.fromkeys(_EXT_PROC_STATS, 0)
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        name = key.rsplit(".", 1)[-1]
        if name in out and value.strip().isdigit():
            out[name] += int(value)
    return out


def route_seconds(metrics: str) -> float:
    """The router's summed `Router.route` wall time (its decision-latency histogram's sum)."""
    with urllib.request.urlopen(metrics, timeout=5) as answer:
        text = answer.read().decode()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(f"{DECISION_METRIC}_sum")
    )


def _load(url: str, rate: float, seconds: float, seed: int) -> Any:
    return run_load(
        [url],
        rate_rps=rate,
        process="constant",
        duration_s=seconds,
        seed=seed,
        max_tokens=4,
        timeout_s=10,
    )


def cpu_phase(st: Stack, rate: float, seconds: float, warm_up_s: float) -> dict[str, Any]:
    """Warm up, then CPU per completed request of each process (module docstring)."""
    if warm_up_s > 0:
        run_with_uvloop(_load(st.url, rate, warm_up_s, seed=3))
    before = {name: cpu_seconds(pid) for name, pid in st.pids.items()}
    threads_before = thread_seconds(st.pids[st.threads_of]) if st.threads_of else {}
    switches = context_switches(st.pids[st.threads_of]) if st.threads_of else 0
    stats_before = ext_proc_stats(st.admin) if st.admin else {}
    routed = route_seconds(st.metrics)
    me = self_seconds()
    wall = time.monotonic()
    report = run_with_uvloop(_load(st.url, rate, seconds, seed=4))
    wall = time.monotonic() - wall
    me = self_seconds() - me
    after = {name: cpu_seconds(pid) for name, pid in st.pids.items()}
    threads_after = thread_seconds(st.pids[st.threads_of]) if st.threads_of else {}
    switches = (context_switches(st.pids[st.threads_of]) if st.threads_of else 0) - switches
    stats_after = ext_proc_stats(st.admin) if st.admin else {}
    routed = route_seconds(st.metrics) - routed
    n = max(report.ok, 1)
    per_request = {name: (after[name] - before[name]) / n * 1000 for name in st.pids}
    per_request["load generator"] = me / n * 1000
    threads = {
        name: (threads_after[name] - threads_before.get(name, 0.0)) / n * 1000
        for name in threads_after
        if threads_after[name] - threads_before.get(name, 0.0) > 0
    }
    out: dict[str, Any] = {
        "rate": rate,
        "seconds": seconds,
        "requests": report.requests,
        "ok": report.ok,
        "failures": report.failures,
        "achieved_rps": report.achieved_rps,
        "latency_p50_s": report.latency_p50_s,
        "latency_p99_s": report.latency_p99_s,
        "wall_s": wall,
        "cpu_ms_per_request": per_request,
        "route_ms_per_request": routed / n * 1000,
        "wake_ups_per_request": switches / n,
        "threads_ms_per_request": threads,
    }
    if st.admin:
        delta = {k: stats_after[k] - stats_before[k] for k in _EXT_PROC_STATS}
        streams = max(delta["streams_started"], 1)
        out["ext_proc"] = {
            **delta,
            "messages_in_per_stream": delta["stream_msgs_sent"] / streams,
            "messages_out_per_stream": delta["stream_msgs_received"] / streams,
        }
    return out


def ramp(st: Stack, rates: Sequence[float], seconds: float) -> dict[str, Any]:
    plan = Plan(ramp_rps=tuple(rates), ramp_s=seconds)
    steps = run_with_uvloop(ramp_phase([st.url], st.addresses, plan))
    ok = [s["offered_rps"] for s in steps if s["sustained"]]
    return {"steps": steps, "max_sustained_rps": max(ok) if ok else None}


def run_router(router: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    mode = json.loads(args.processing_mode) if args.processing_mode else None
    script = args.picker_script if router == "envoy-script" else None
    out: dict[str, Any] = {}
    if args.seconds > 0:
        print(f"[{router}] cpu: {args.rate:g} req/s for {args.seconds:g} s", file=sys.stderr)
        with stack(router, workdir, mode, script) as st:
            out["cpu"] = cpu_phase(st, args.rate, args.seconds, args.warm_up)
    if args.ramp:
        rates = [float(r) for r in args.ramp.split(",")]
        print(f"[{router}] ramp: {args.ramp}", file=sys.stderr)
        with stack(router, workdir, mode, script) as st:
            if args.warm_up > 0:  # first decisions, connections, compiled kernels: not measured
                run_with_uvloop(_load(st.url, rates[0], args.warm_up, seed=3))
            out["ramp"] = ramp(st, rates, args.ramp_seconds)
    return out


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def markdown(results: Mapping[str, Mapping[str, Any]]) -> str:
    lines = []
    cpu = {r: v["cpu"] for r, v in results.items() if "cpu" in v}
    if cpu:
        lines += [
            "| router | ok / sent | CPU ms per request (process: ms; threads) "
            "| of which Router.route | router wake-ups | ext_proc msgs in/out "
            "| latency p50 / p99 (ms) |"
        ]
        lines += ["|---|---|---|---|---|---|---|"]
        for router, c in cpu.items():
            parts = ", ".join(f"{k} {v:.2f}" for k, v in c["cpu_ms_per_request"].items())
            threads = ", ".join(f"{k} {v:.2f}" for k, v in c["threads_ms_per_request"].items())
            ep = c.get("ext_proc")
            msgs = (
                f"{ep['messages_in_per_stream']:.1f} / {ep['messages_out_per_stream']:.1f}"
                if ep
                else "-"
            )
            route = f"{c['route_ms_per_request']:.2f}"
            sent = f"{c['ok']} / {c['requests']}"
            latency = f"{_ms(c['latency_p50_s'])} / {_ms(c['latency_p99_s'])}"
            wake = f"{c['wake_ups_per_request']:.1f}"
            cells = [router, sent, f"{parts} ({threads})", route, wake, msgs, latency]
            lines.append("| " + " | ".join(cells) + " |")
    ramps = {r: v["ramp"] for r, v in results.items() if "ramp" in v}
    if ramps:
        lines += ["", "| router | ramp: offered->achieved (p99 ms, failures) | max sustained |"]
        lines += ["|---|---|---|"]
        for router, rp in ramps.items():
            steps = ", ".join(
                f"{s['offered_rps']:g}->{s['achieved_rps']:.0f} "
                f"({(s['latency_p99_s'] or 0) * 1000:.1f}, {s['failures']})"
                + ("" if sustained(s, s["offered_rps"]) else " x")
                for s in rp["steps"]
            )
            lines.append(f"| {router} | {steps} | {rp['max_sustained_rps']} |")
        if {"ours", "envoy"} <= ramps.keys():
            a, b = ramps["envoy"]["max_sustained_rps"], ramps["ours"]["max_sustained_rps"]
            if a and b:
                lines += ["", f"envoy + extproc / ours, max sustained: {a / b:.2f}x"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.extproc_cpu", description=__doc__)
    parser.add_argument("--routers", default=",".join(ROUTERS))
    parser.add_argument("--rate", type=float, default=400.0)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured load (0: skip)")
    parser.add_argument("--warm-up", type=float, default=2.0)
    parser.add_argument("--ramp", default="", help="comma-separated rates (empty: no ramp)")
    parser.add_argument("--ramp-seconds", type=float, default=5.0)
    parser.add_argument("--processing-mode", help="JSON merged into ext_proc's processing_mode")
    parser.add_argument(
        "--picker-script",
        metavar="FILE",
        help="the picker of router envoy-script (e.g. from `git show REV:src/.../extproc.py`)",
    )
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="extproc-cpu-") as tmp:
        for router in args.routers.split(","):
            if router not in ROUTERS:
                parser.error(f"unknown router {router!r}")
            if router == "envoy-script" and not args.picker_script:
                parser.error("envoy-script needs --picker-script")
            runs = sum(1 for name in results if name.split("#")[0] == router)
            name = f"{router}#{runs + 1}" if runs else router  # a repeated router: envoy#2
            results[name] = run_router(router, args, Path(tmp))
    meta: dict[str, Any] = {
        "envoy": ENVOY_VERSION,
        "python": sys.version.split()[0],
        "cores": os.cpu_count(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
    }
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(markdown(results))
    print(f"\n{meta}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
