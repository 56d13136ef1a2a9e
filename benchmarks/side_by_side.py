"""Routers side by side in front of the same fake engines: hit rate, TTFT, overhead, throughput.

    python -m benchmarks.side_by_side [--quick] [--routers ours,sglang-cache-aware,...]
                                      [--json PATH] [--engines 4] [--scenario NAME|FILE]

Routers (`--routers`, default all five):

- `direct`: no router; the load generator spreads requests over the engines
  itself, round robin. It measures the engines (and the generator) alone.
- `ours`: `python -m prefixroute.drivers.gateway` with a generated config
  (the default router profile, the engines as endpoints).
- `envoy`: a real Envoy (`.venv-envoy`, the version prefixroute.devtools.envoy pins)
  loading the shipped `examples/envoy/envoy.yaml` with only its listener,
  admin and ext_proc ports rewritten (`prefixroute.devtools.envoy.render`, as the e2e
  tests do; `run_envoy` starts it with `--concurrency 2`), and
  `python -m prefixroute.drivers.extproc` as its endpoint picker with the
  same generated config as `ours` (the `server` section aside) plus an
  `extproc` section. The client talks to Envoy's listener. Skipped with a
  note when Envoy is not installed (`make envoy`).
- `sglang-cache-aware`, `sglang-round-robin`: sglang-router 0.3.2
  (`python -m sglang_router.launch_router --policy cache_aware|round_robin`,
  flags from `sgl-router/py_src/sglang_router/router_args.py` and its
  `--help`), bound to 127.0.0.1 with its Prometheus exporter on 127.0.0.1,
  run from its own virtualenv `.venv-sglang` in the repository root (created
  and `pip install sglang-router==0.3.2`-ed on first use; a router that
  cannot be installed is skipped with a note).

For each router the engines are restarted (fresh caches, same seeds) twice:

1. engines at `--time-scale 1` (modelled Qwen3-0.6B on an H100):
   a. `seed`: the seed experiment's traffic (`prefixroute.devtools.bench`,
      personas + cold questions 4:1, max_tokens 80/50), Poisson 32 req/s,
      streamed (`--scenario` replaces the seed traffic with another
      scenario's or a trace's requests, in their order, at the same rate:
      `prefixroute.devtools.bench.scenario_source`). Engine-measured hit rate = delta of
      `vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total`
      summed over the engines; client-measured TTFT p50/p99; failures
      (must be 0); per-engine request split (`vllm:request_success_total`).
   b. `burst`: 16 new tenants, each with its own 2,000-token system prompt,
      send their first requests at the same instant, then `rounds - 1`
      rounds of follow-ups (each tenant a new question, all 16 at once, a
      round after the previous one finished). Engine hit rate and TTFT p99.
      A cache-aware router that breaks ties by list order sends all 16 first
      requests to one engine; one that breaks them by load spreads them.
      (Not run for `direct`, whose round robin would pin tenant i to engine
      i mod 4 by construction.)
2. engines at `--time-scale 0` (no modelled GPU time, so what is left is
   HTTP, tokenisation, bookkeeping and the router):
   c. `overhead`: seed traffic at 200 req/s Poisson, max_tokens 4, streamed.
      Added latency = the router's latency p50/p99 minus direct's.
   d. `ramp`: open-loop rates 50, 100, 200, 400, 800, ... (evenly spaced
      arrivals, each rate `ramp_s` long, max_tokens 4), stopping after the first rate that is not
      sustainable. Sustainable: no failures, achieved >= 95% of offered, and
      latency p99 <= 500 ms.

Caveats, printed with the results: everything shares one small machine. The
load generator is one Python process (aiohttp on uvloop) and its own ceiling is
`direct`'s maximum; the four fake engines are one Python process (one event
loop, one core at most), so "max req/s" is the whole loop's, and a router
that costs CPU takes it from the engines and the generator as well.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import httpx

from prefixroute.devtools.bench import (
    MODEL,
    LoadReport,
    WireRequest,
    run_load,
    run_with_uvloop,
    scenario_source,
    source_requests,
    summarise,
)
from prefixroute.devtools.envoy import (
    ENVOY_VERSION,
    envoy_binary,
    free_ports,
    render,
    run_envoy,
)
from prefixroute.devtools.live import (
    EngineSample,
    fleet_delta,
    free_port,
    gateway_config,
    sample_fleet,
    start_engines,
    start_gateway,
    start_picker,
    supervised,
    wait_ready,
)
from prefixroute.sim.workload import OpenLoopSource, TenantKind, Tenants, WorkloadSpec

ROUTERS = ("ours", "envoy", "sglang-cache-aware", "sglang-round-robin", "direct")
SGLANG_VERSION = "0.3.2"
REPO = Path(__file__).resolve().parent.parent
SGLANG_VENV = REPO / ".venv-sglang"
LATENCY_BOUND_S = 0.5
SUSTAINED_SHARE = 0.95


@attrs.frozen
class Plan:
    """Phase lengths and loads (seconds, requests per second); the first phase's scenario."""

    scenario: str = "seed"
    seed_s: float = 30.0
    seed_rps: float = 32.0
    burst_tenants: int = 16
    burst_prompt_tokens: int = 2000
    burst_rounds: int = 4
    burst_max_tokens: int = 16
    overhead_s: float = 10.0
    overhead_rps: float = 200.0
    small_max_tokens: int = 4
    ramp_rps: tuple[float, ...] = (50, 100, 200, 400, 800, 1600, 3200)
    ramp_s: float = 8.0


FULL = Plan()
QUICK = Plan(
    seed_s=4.0, burst_rounds=2, overhead_s=3.0, overhead_rps=100.0, ramp_rps=(100, 400), ramp_s=2.0
)


# --- the burst workload ------------------------------------------------------------------


def burst_rounds(plan: Plan, *, seed: int = 0, model: str = MODEL) -> list[list[WireRequest]]:
    """`plan.burst_rounds` rounds of one request per tenant (round 0: their first requests).

    Drawn from the simulator's workload (`burst_tenants` Zipf-free tenants
    with `burst_prompt_tokens`-token system prompts, 8-token questions): the
    k-th request each tenant draws goes into round k, tenants in name order.
    """
    spec = WorkloadSpec(
        model=model,
        mix=(
            TenantKind(
                question_tokens=(8, 8), max_tokens=(plan.burst_max_tokens, plan.burst_max_tokens)
            ),
        ),
        tenants=Tenants(
            count=plan.burst_tenants,
            system_prompt_tokens=(plan.burst_prompt_tokens, plan.burst_prompt_tokens),
        ),
    )
    source = OpenLoopSource(spec, process="constant", rate_rps=1.0, seed=seed, duration_s=1e12)
    per_tenant: dict[str, list[WireRequest]] = {}
    for wire in source_requests(source):
        queue = per_tenant.setdefault(wire[2]["x-tenant-id"], [])
        if len(queue) < plan.burst_rounds:
            queue.append(wire)
        if len(per_tenant) == plan.burst_tenants and all(
            len(q) == plan.burst_rounds for q in per_tenant.values()
        ):
            break
    tenants = sorted(per_tenant)
    return [[per_tenant[t][k] for t in tenants] for k in range(plan.burst_rounds)]


# --- routers -----------------------------------------------------------------------------


def ensure_venv(venv: Path, packages: Sequence[str], modules: str, log: Path) -> Path | None:
    """`venv`'s python with `packages` pip-installed (creating it), once `modules` import.

    `modules` is an import statement's names (``"sglang_router, vllm_router"``);
    None if creating, installing or importing fails (pip's output goes to `log`).
    """
    python = venv / "bin" / "python"
    check = [str(python), "-c", f"import {modules}"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"creating {venv} with {' '.join(packages)} ...", file=sys.stderr)
    steps = [[str(python), "-m", "pip", "install", "-q", *packages]]
    if not python.exists():
        steps.insert(0, ["python3", "-m", "venv", str(venv)])
    with open(log, "wb") as f:
        for step in steps:
            try:
                done = subprocess.run(step, stdout=f, stderr=subprocess.STDOUT, timeout=900)
            except (OSError, subprocess.TimeoutExpired):
                return None
            if done.returncode != 0:
                return None
    return python if subprocess.run(check, capture_output=True).returncode == 0 else None


def ensure_sglang(log: Path) -> Path | None:
    """The sglang venv's python, creating `.venv-sglang` if missing; None if that fails."""
    return ensure_venv(SGLANG_VENV, [f"sglang-router=={SGLANG_VERSION}"], "sglang_router", log)


def start_sglang(
    python: Path, addresses: Sequence[str], policy: str, workdir: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """sglang-router with `policy` over `addresses`, all on 127.0.0.1; (process, base URL)."""
    port, prom = free_port(), free_port()
    args = [
        str(python),
        "-m",
        "sglang_router.launch_router",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--worker-urls",
        *[f"http://{a}" for a in addresses],
        "--policy",
        policy,
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(prom),
        "--log-level",
        "warn",
    ]
    with open(workdir / "sglang.log", "wb") as f:
        proc = subprocess.Popen(
            args,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return proc, f"http://127.0.0.1:{port}"


def wait_sglang_workers(url: str, n: int, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Poll sglang-router's `/workers` until `n` healthy workers are registered."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sglang-router exited with status {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError, ValueError):
            workers = httpx.get(f"{url}/workers", timeout=1.0).json().get("workers", [])
            if len(workers) >= n and all(w.get("is_healthy") for w in workers):
                return
        time.sleep(0.1)
    raise RuntimeError(f"sglang-router did not register {n} healthy workers in {timeout_s:g} s")


@contextlib.contextmanager
def fleet(
    router: str, engines: int, time_scale: float, workdir: Path, sglang: Path | None
) -> Iterator[tuple[list[str], list[str]]]:
    """Fresh engines and `router` in front of them; yields (target URLs, engine addresses).

    Teardown in reverse: Envoy (if any) first, then the router, then the engines.
    """
    with supervised(workdir) as procs, contextlib.ExitStack() as stack:  # Envoy stops first
        engine_proc, addresses = start_engines(engines, workdir, time_scale=time_scale)
        procs.append(engine_proc)
        wait_ready([f"http://{a}/health" for a in addresses], procs)
        if router == "direct":
            urls = [f"http://{a}" for a in addresses]
        elif router == "ours":
            gateway, url = start_gateway(addresses, workdir)
            procs.append(gateway)
            wait_ready([f"{url}/health"], procs)
            urls = [url]
        elif router == "envoy":
            ports = free_ports()
            picker_doc = {k: v for k, v in gateway_config(addresses, 0).items() if k != "server"}
            picker, health = start_picker(picker_doc, ports.extproc, workdir)
            procs.append(picker)
            wait_ready([health], procs)
            urls = [stack.enter_context(run_envoy(render("envoy.yaml", ports))).url]
        else:
            assert sglang is not None
            policy = "cache_aware" if router == "sglang-cache-aware" else "round_robin"
            proc, url = start_sglang(sglang, addresses, policy, workdir)
            procs.append(proc)
            wait_sglang_workers(url, engines, proc, timeout_s=60.0)
            urls = [url]
        _warm_up(urls, engines)
        yield urls, addresses


def _warm_up(urls: Sequence[str], n: int, timeout_s: float = 30.0) -> None:
    """Send `n` tiny completions until each succeeds (connections, registration, first scrape)."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5.0) as client:
        for i in range(n):
            url = urls[i % len(urls)]
            body = {"model": MODEL, "prompt": f"warm-up {i}", "max_tokens": 1}
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if client.post(f"{url}/v1/completions", json=body).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"warm-up request to {url} never succeeded")
                time.sleep(0.2)


# --- phases ------------------------------------------------------------------------------


async def _measured(
    addresses: Sequence[str], load: Any
) -> tuple[LoadReport, EngineSample, list[EngineSample]]:
    """Run the `load` coroutine between two samples of the engines' counters."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as client:
        before = await sample_fleet(client, addresses)
        report: LoadReport = await load
        await asyncio.sleep(0.2)  # let the last counters land
        after = await sample_fleet(client, addresses)
    per_engine = [a.minus(b) for a, b in zip(after, before, strict=True)]
    return report, fleet_delta(after, before), per_engine


def _phase(
    report: LoadReport, total: EngineSample, per_engine: Sequence[EngineSample]
) -> dict[str, Any]:
    served = sum(e.requests for e in per_engine) or 1.0
    return {
        "requests": report.requests,
        "ok": report.ok,
        "failures": report.failures,
        "by_status": report.by_status,
        "offered_rps": report.offered_rps,
        "achieved_rps": report.achieved_rps,
        "ttft_p50_s": report.ttft_p50_s,
        "ttft_p99_s": report.ttft_p99_s,
        "latency_p50_s": report.latency_p50_s,
        "latency_p99_s": report.latency_p99_s,
        "lag_p99_s": report.lag_p99_s,
        "usage_hit_rate": report.hit_rate,
        "engine_hit_rate": total.hit_rate,
        "engine_split": [round(e.requests / served, 4) for e in per_engine],
        "engine_requests": [int(e.requests) for e in per_engine],
    }


async def seed_phase(urls: list[str], addresses: list[str], plan: Plan) -> dict[str, Any]:
    source = None
    if plan.scenario != "seed":
        source = scenario_source(plan.scenario, model=MODEL, seed=0, timed=False).source
    load = run_load(
        urls,
        rate_rps=plan.seed_rps,
        duration_s=plan.seed_s,
        seed=0,
        source=source,
        timeout_s=30,
    )
    return _phase(*await _measured(addresses, load))


async def burst_phase(urls: list[str], addresses: list[str], plan: Plan) -> dict[str, Any]:
    reports: list[LoadReport] = []

    async def all_rounds() -> LoadReport:
        for batch in burst_rounds(plan):  # a round at once; the next when it is done
            reports.append(
                await run_load(
                    urls,
                    rate_rps=1e6,
                    process="constant",
                    duration_s=5.0,
                    requests=batch,
                    timeout_s=30,
                )
            )
        merged = [r for rep in reports for r in rep.results]
        return summarise(merged, duration_s=sum(rep.duration_s for rep in reports))

    phase = _phase(*await _measured(addresses, all_rounds()))
    phase["first_round_ttft_p99_s"] = reports[0].ttft_p99_s
    phase["first_round_engines"] = dict(reports[0].engines)
    return phase


async def overhead_phase(urls: list[str], addresses: list[str], plan: Plan) -> dict[str, Any]:
    load = run_load(
        urls,
        rate_rps=plan.overhead_rps,
        duration_s=plan.overhead_s,
        seed=1,
        max_tokens=plan.small_max_tokens,
        timeout_s=10,
    )
    return _phase(*await _measured(addresses, load))


async def ramp_phase(urls: list[str], addresses: list[str], plan: Plan) -> list[dict[str, Any]]:
    steps = []
    for rate in plan.ramp_rps:
        load = run_load(
            urls,
            rate_rps=rate,
            process="constant",
            duration_s=plan.ramp_s,
            seed=2,
            max_tokens=plan.small_max_tokens,
            timeout_s=10,
        )
        step = _phase(*await _measured(addresses, load))
        step["sustained"] = sustained(step, rate)
        steps.append(step)
        if not step["sustained"]:
            break
        await asyncio.sleep(0.5)
    return steps


def sustained(step: dict[str, Any], rate: float) -> bool:
    """No failures, achieved >= 95% of offered, latency p99 under the bound."""
    p99 = step["latency_p99_s"]
    return (
        step["failures"] == 0
        and step["achieved_rps"] >= SUSTAINED_SHARE * rate
        and p99 is not None
        and p99 <= LATENCY_BOUND_S
    )


def run_router(
    router: str, engines: int, plan: Plan, workdir: Path, sglang: Path | None
) -> dict[str, Any]:
    """Every phase for one router (module docstring)."""
    out: dict[str, Any] = {}
    print(f"[{router}] engines at time-scale 1: seed traffic, burst", file=sys.stderr)
    with fleet(router, engines, 1.0, workdir, sglang) as (urls, addresses):
        out["seed"] = run_with_uvloop(seed_phase(urls, addresses, plan))
        if router != "direct":
            out["burst"] = run_with_uvloop(burst_phase(urls, addresses, plan))
    print(f"[{router}] engines at time-scale 0: overhead, ramp", file=sys.stderr)
    with fleet(router, engines, 0.0, workdir, sglang) as (urls, addresses):
        out["overhead"] = run_with_uvloop(overhead_phase(urls, addresses, plan))
        out["ramp"] = run_with_uvloop(ramp_phase(urls, addresses, plan))
    ok = [s["offered_rps"] for s in out["ramp"] if s["sustained"]]
    out["max_sustained_rps"] = max(ok) if ok else None
    return out


# --- reporting ---------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _pct(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.1%}"


def _split(phase: dict[str, Any]) -> str:
    return "/".join(f"{s * 100:.0f}" for s in phase["engine_split"])


def markdown(results: dict[str, dict[str, Any]], plan: Plan) -> str:
    """The results as markdown tables."""
    direct = results.get("direct", {}).get("overhead")
    traffic = "Seed" if plan.scenario == "seed" else f"`{plan.scenario}`"
    lines = [
        f"{traffic} traffic at {plan.seed_rps:g} req/s for {plan.seed_s:g} s"
        " (engines at time-scale 1);"
        f" overhead at {plan.overhead_rps:g} req/s and the ramp with engines at time-scale 0.",
        "",
        "| router | engine hit rate | TTFT p50 (ms) | TTFT p99 (ms) | failures | split % "
        "| added latency p50 / p99 (ms) | max sustained req/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        seed, over = r["seed"], r["overhead"]
        if direct is not None and name != "direct":
            added = (
                f"{_ms(over['latency_p50_s'] - direct['latency_p50_s'])} / "
                f"{_ms(over['latency_p99_s'] - direct['latency_p99_s'])}"
            )
        else:
            added = f"({_ms(over['latency_p50_s'])} / {_ms(over['latency_p99_s'])} absolute)"
        top = r["max_sustained_rps"]
        ramp_top = r["ramp"][-1]
        ceiling = (
            ""
            if ramp_top["sustained"]
            else f" (at {ramp_top['offered_rps']:g}: "
            + (
                f"{ramp_top['achieved_rps']:.0f} achieved, p99 {_ms(ramp_top['latency_p99_s'])} ms,"
                f" {ramp_top['failures']} failed)"
            )
        )
        lines.append(
            f"| {name} | {_pct(seed['engine_hit_rate'])} | {_ms(seed['ttft_p50_s'])} "
            f"| {_ms(seed['ttft_p99_s'])} | {seed['failures']} | {_split(seed)} | {added} "
            f"| {'-' if top is None else f'{top:g}'}{ceiling} |"
        )
    bursts = {n: r["burst"] for n, r in results.items() if "burst" in r}
    if bursts:
        lines += [
            "",
            f"Burst: {plan.burst_tenants} new tenants ({plan.burst_prompt_tokens}-token system "
            f"prompts), first requests simultaneous, then {plan.burst_rounds - 1} rounds of "
            "follow-ups.",
            "",
            "| router | engine hit rate | TTFT p99 (ms) | first round TTFT p99 (ms) "
            "| first round per engine | split % | failures |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, b in bursts.items():
            firsts = "/".join(str(v) for _, v in sorted(b["first_round_engines"].items())) or "-"
            lines.append(
                f"| {name} | {_pct(b['engine_hit_rate'])} | {_ms(b['ttft_p99_s'])} "
                f"| {_ms(b['first_round_ttft_p99_s'])} | {firsts} | {_split(b)} | {b['failures']} |"
            )
    lines += [
        "",
        "| router | ramp: offered -> achieved req/s (latency p99 ms, failures) |",
        "|---|---|",
    ]
    for name, r in results.items():
        steps = ", ".join(
            f"{s['offered_rps']:g}->{s['achieved_rps']:.0f} ({_ms(s['latency_p99_s'])}, "
            f"{s['failures']}){'' if s['sustained'] else ' x'}"
            for s in r["ramp"]
        )
        lines.append(f"| {name} | {steps} |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_1m": os.getloadavg()[0],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.side_by_side", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short phases (a smoke run)")
    parser.add_argument("--routers", default=",".join(ROUTERS), help=",".join(ROUTERS))
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    parser.add_argument(
        "--scenario",
        default="seed",
        help="the first phase's traffic: a built-in scenario, a scenario file or a Mooncake "
        "trace (prefixroute bench's --scenario; default seed)",
    )
    args = parser.parse_args(argv)
    routers = [r.strip() for r in args.routers.split(",") if r.strip()]
    unknown = [r for r in routers if r not in ROUTERS]
    if unknown or not routers:
        print(
            f"side_by_side: unknown routers {unknown} (known: {', '.join(ROUTERS)})",
            file=sys.stderr,
        )
        return 2
    # direct first: the other routers' added latency is measured against it
    routers.sort(key=lambda r: r != "direct")
    plan = attrs.evolve(QUICK if args.quick else FULL, scenario=args.scenario)
    try:
        scenario_source(plan.scenario, model=MODEL, timed=False)
    except ValueError as exc:
        print(f"side_by_side: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    results: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="side-by-side-") as tmp:
        sglang = None
        if any(r.startswith("sglang") for r in routers):
            sglang = ensure_sglang(Path(tmp) / "pip.log")
            if sglang is None:
                notes.append(f"sglang-router {SGLANG_VERSION} could not be installed: skipped")
                routers = [r for r in routers if not r.startswith("sglang")]
        if "envoy" in routers:
            try:
                envoy_binary()
            except RuntimeError as exc:
                notes.append(f"envoy {ENVOY_VERSION}: {exc}: skipped")
                routers.remove("envoy")
        for router in routers:
            workdir = Path(tmp) / router
            workdir.mkdir()
            try:
                results[router] = run_router(router, args.engines, plan, workdir, sglang)
            except RuntimeError as exc:
                notes.append(f"{router}: {exc}")
                print(f"[{router}] failed: {exc}", file=sys.stderr)
    table = markdown(results, plan) if results else "(no results)"
    print(table)
    for note in notes:
        print(f"\nnote: {note}")
    print(f"\n({time.monotonic() - started:.0f} s; machine: {machine()})")
    if args.json:
        doc = {
            "plan": attrs.asdict(plan),
            "machine": machine(),
            "routers": results,
            "notes": notes,
            "markdown": table,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0 if results and not notes else 1


if __name__ == "__main__":
    sys.exit(main())
