"""Real peer routers, live, against their simulated models on the same traffic.

    python -m benchmarks.real_peers [--traffic agentic,agentic-tools,seed]
                                    [--routers ours,sglang,vllm-router] [--runs 3]
                                    [--json PATH] [--quick] [--keep]
    python -m benchmarks.real_peers --resimulate PATH [PATH ...] [--json PATH]

Issue 16's "honest baselines": a simulated peer is only worth comparing
against if it behaves like the real one. For each traffic and each run this

1. starts four fresh fake engines (`prefixroute.devtools.fake_engine`, the
   simulator's engine model behind a vLLM-shaped HTTP server, real time) with
   the traffic's cost profile and KV capacity, puts one router in front of
   them and replays the traffic through it with `prefixroute bench`'s
   `run_load` in scenario timing (its own arrival times; a chat's next turn
   leaves when the previous answer is in). Engine hit rate = delta of
   `vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total`
   over the engines; TTFT p50/p99 measured by the client at the first
   streamed chunk; request split from `vllm:request_success_total`.
   Routers:

   - `ours`: `prefixroute serve` (the gateway) with the default profile: the
     reference each peer is compared with;
   - `sglang`: sglang-router 0.3.2, `python -m sglang_router.launch_router
     --policy cache_aware` with its defaults;
   - `vllm-router`: vllm-router 0.1.17, `vllm-router --policy cache_aware`
     (its default policy) with its defaults;

   both peers from the virtualenv `.venv-peers` (created on first use with
   `pip install sglang-router==0.3.2 vllm-router==0.1.17`; a peer that cannot
   be installed is skipped with a note), bound to 127.0.0.1.
2. simulates the same scenario file (same requests: the same workload
   builder and seed) under the policies `prefixroute`, `sglang-cache-aware`
   and `vllm-router` (`prefixroute.sim.policies`).

The table compares each peer with `ours` as ratios, live and simulated: the
simulator's absolute figures differ from a live run for every router alike (a
chat's next turn resends the simulator's reply text, not the engine's, so
live hits stop at the previous prompt, and real time adds HTTP, event-loop
and scheduling jitter on a shared machine), so a simulated peer is judged by
whether it stands to the default profile as the real peer does. Medians over
`--runs` runs; the ratios are taken within each run before the median.

`--resimulate` takes the live runs of earlier `--json` files and simulates
again with the code and policy YAMLs as they are now: the loop for
calibrating a model without minutes of live traffic per try.

Traffics (scenario files written to the run's work directory, also usable
with `prefixroute simulate` and `prefixroute bench`):

- `agentic`: AGENTIC below, issue 16's setup: multi-tenant agent sessions,
  about 1,500 requests over 125 s on four Llama-3-8B engines holding 60,000
  KV tokens each;
- `agentic-tools`: the same requests with each chat's system prompt sent as
  the request's `tools` (one function described by it), as agent clients
  send tool definitions; the engines render `tools` first, so what they
  cache is the same. The simulator has no `tools` field: its side of this
  traffic is `agentic`'s;
- `seed`: the seed experiment's traffic (`seed` scenario: three personas and
  cold questions 4:1, 52 closed-loop users) for 40 s, on four Qwen3-0.6B
  engines of 60,000 KV tokens.

Caveats: everything shares one small machine (the four engines are one Python
process, one event loop); a live TTFT p99 carries that machine's jitter, so
quote medians over runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
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
import yaml

from benchmarks import cells
from benchmarks.side_by_side import ensure_venv
from prefixroute.devtools.bench import (
    WireRequest,
    run_load,
    run_with_uvloop,
    runner,
    scenario_source,
    wire_request,
)
from prefixroute.devtools.live import (
    fleet_delta,
    free_port,
    sample_fleet,
    start_engines,
    start_gateway,
    supervised,
    wait_ready,
)
from prefixroute.sim.compare import run_policy
from prefixroute.sim.policy import load_policy
from prefixroute.sim.scenario import load_scenario
from prefixroute.sim.source import SimRequest

REPO = Path(__file__).resolve().parent.parent
PEERS_VENV = REPO / ".venv-peers"
PEER_PACKAGES = ("sglang-router==0.3.2", "vllm-router==0.1.17")
ROUTERS = ("ours", "sglang", "vllm-router")
SIMULATED = {"ours": "prefixroute", "sglang": "sglang-cache-aware", "vllm-router": "vllm-router"}
TRAFFICS = ("agentic", "agentic-tools", "seed")

AGENTIC: dict[str, Any] = {
    "name": "agentic-peers",
    "description": (
        "Multi-tenant agentic traffic: 40 tenants (Zipf 1.0) whose system prompts "
        "(instructions and tool definitions) hold 1,000-4,000 tokens; agent sessions of "
        "3-10 steps whose history grows each step by a 60-300-token tool result and a "
        "20-80-token tool call; Poisson arrivals at 12 req/s for 125 s (about 1,500 "
        "requests) on four Llama-3-8B engines holding 60,000 KV tokens each."
    ),
    "duration_s": 125,
    "seed": 0,
    "endpoints": {"count": 4, "profile": "llama3-8b-h100", "kv_capacity_tokens": 60000},
    "workload": {
        "arrival": {"process": "poisson", "rate_rps": 12},
        "tenants": {"count": 40, "zipf_exponent": 1.0, "system_prompt_tokens": [1000, 4000]},
        "mix": {
            "chat": {
                "weight": 1,
                "turns": [3, 10],
                "user_tokens": [60, 300],
                "reply_tokens": [20, 80],
            }
        },
    },
}
SEED: dict[str, Any] = {
    "name": "seed-peers",
    "description": (
        "The seed experiment's traffic (three personas, cold questions 4:1, 52 closed-loop "
        "users) for 40 s on four Qwen3-0.6B engines holding 60,000 KV tokens each."
    ),
    "duration_s": 40,
    "seed": 0,
    "endpoints": {"count": 4, "profile": "qwen3-0.6b-h100", "kv_capacity_tokens": 60000},
    "workload": {
        "arrival": {"process": "closed-loop", "users": 52, "think_s": [0.5, 2.0], "ramp_s": 10},
        "tenants": {"count": 3, "personas": "seed"},
        "mix": {
            "tenant": {"weight": 4, "seed_questions": True, "max_tokens": [80, 80]},
            "cold": {"weight": 1, "seed_questions": True, "max_tokens": [50, 50]},
        },
    },
}
MODELS = {"llama3-8b-h100": "llama3-8b", "qwen3-0.6b-h100": "qwen3-0.6b"}


@attrs.frozen
class Traffic:
    """A scenario document and what the live run needs from it.

    `tools`: send each chat's system message as the request's `tools` (one
    function whose description is the system prompt) instead: the shape of
    agent traffic, where the long shared prefix is the tool definitions. The
    engine renders `tools` first, so a tenant's requests still share it; a
    router that routes on the messages' text alone does not see it.
    """

    name: str
    doc: dict[str, Any]
    tools: bool = False

    @property
    def profile(self) -> str:
        return str(self.doc["endpoints"]["profile"])

    @property
    def model(self) -> str:
        return MODELS[self.profile]

    @property
    def engines(self) -> int:
        return int(self.doc["endpoints"]["count"])

    @property
    def kv_tokens(self) -> int:
        return int(self.doc["endpoints"]["kv_capacity_tokens"])

    def scaled(self, duration_s: float) -> Traffic:
        return attrs.evolve(self, doc={**self.doc, "duration_s": duration_s})

    def write(self, directory: Path) -> Path:
        path = directory / f"{self.name}.yaml"
        path.write_text(yaml.safe_dump(self.doc, sort_keys=False), encoding="utf-8")
        return path


TRAFFIC = {
    "agentic": Traffic("agentic", AGENTIC),
    "agentic-tools": Traffic("agentic-tools", AGENTIC, tools=True),
    "seed": Traffic("seed", SEED),
}


def tools_request(sim: SimRequest) -> WireRequest:
    """`wire_request(sim)`, with a chat's system message moved into `tools`."""
    path, body, headers = wire_request(sim)
    messages = body.get("messages")
    if messages and messages[0]["role"] == "system":
        function = {
            "name": "tenant_tools",
            "description": messages[0]["content"],
            "parameters": {"type": "object", "properties": {}},
        }
        body = {
            **body,
            "messages": messages[1:],
            "tools": [{"type": "function", "function": function}],
        }
    return path, body, headers


_RUNNER_HOOK = "wire_request"  # the name `run_load` turns each simulated request into a wire one by


@contextlib.contextmanager
def sending_tools(enabled: bool) -> Iterator[None]:
    """While active, `run_load` sends `tools_request`s (the bench has no such option)."""
    if not enabled:
        yield
        return
    saved = getattr(runner, _RUNNER_HOOK)
    setattr(runner, _RUNNER_HOOK, tools_request)
    try:
        yield
    finally:
        setattr(runner, _RUNNER_HOOK, saved)


# --- peers -------------------------------------------------------------------------------


def ensure_peers(log: Path) -> Path | None:
    """`.venv-peers`' bin directory with both peers installed (creating it); None if that fails."""
    python = ensure_venv(PEERS_VENV, PEER_PACKAGES, "sglang_router, vllm_router", log)
    return None if python is None else python.parent


def peer_command(
    router: str, bin_dir: Path, addresses: Sequence[str], port: int, metrics_port: int
) -> list[str]:
    """The peer's command line: cache_aware with its defaults, everything on 127.0.0.1.

    Logging at warning level: both log every request at their default (info),
    which costs CPU the engines and the load generator share.
    """
    workers = [f"http://{a}" for a in addresses]
    common = ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", *workers]
    common += ["--policy", "cache_aware", "--prometheus-host", "127.0.0.1"]
    common += ["--prometheus-port", str(metrics_port)]
    if router == "sglang":
        module = [str(bin_dir / "python"), "-m", "sglang_router.launch_router"]
        return [*module, *common, "--log-level", "warn"]
    # vllm-router checks workers every 30 s by default before it serves; 1 s here
    return [
        str(bin_dir / "vllm-router"),
        *common,
        "--log-level",
        "warning",
        "--worker-startup-check-interval",
        "1",
    ]


def start_peer(
    router: str, bin_dir: Path, addresses: Sequence[str], workdir: Path
) -> tuple[subprocess.Popen[bytes], str, str]:
    """The peer in front of `addresses`; (process, base URL, Prometheus URL)."""
    port, metrics_port = free_port(), free_port()
    with open(workdir / f"{router}.log", "wb") as f:
        proc = subprocess.Popen(
            peer_command(router, bin_dir, addresses, port, metrics_port),
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"


def warm_up(url: str, model: str, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """One tiny completion until it succeeds (the router has its workers and a connection)."""
    deadline = time.monotonic() + timeout_s
    body = {"model": model, "prompt": "warm-up", "max_tokens": 1}
    with httpx.Client(timeout=5.0) as client:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with status {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if client.post(f"{url}/v1/completions", json=body).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"warm-up request to {url} never succeeded")
            time.sleep(0.2)


@contextlib.contextmanager
def fleet(
    router: str, traffic: Traffic, workdir: Path, peers: Path | None
) -> Iterator[tuple[str, list[str], str]]:
    """Fresh engines and `router` in front; yields (its URL, engine addresses, its metrics URL)."""
    with supervised(workdir) as procs:
        extra = ["--profile", traffic.profile, "--model", traffic.model]
        extra += ["--kv-tokens", str(traffic.kv_tokens)]
        engines, addresses = start_engines(traffic.engines, workdir, extra=extra)
        procs.append(engines)
        wait_ready([f"http://{a}/health" for a in addresses], procs)
        if router == "ours":
            proc, url = start_gateway(addresses, workdir)
            metrics = f"{url}/metrics"
        else:
            assert peers is not None
            proc, url, metrics = start_peer(router, peers, addresses, workdir)
        procs.append(proc)
        warm_up(url, traffic.model, proc)
        yield url, addresses, metrics


async def measure(
    url: str, addresses: Sequence[str], traffic: Traffic, path: Path, metrics: str
) -> dict[str, Any]:
    """The traffic through `url` in scenario timing, between two samples of the engines.

    `decisions`: the router's own decision counters afterwards (lines of its
    Prometheus text that count cache-aware decisions or load balancing), to
    tell why a peer chose as it did.
    """
    workload = scenario_source(
        str(path), model=traffic.model, duration_s=float(traffic.doc["duration_s"])
    )
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as client:
        before = await sample_fleet(client, addresses)
        report = await run_load(
            url,
            source=workload.source,
            duration_s=float(traffic.doc["duration_s"]),
            model=traffic.model,
            timeout_s=30.0,
        )
        await asyncio.sleep(0.3)  # let the last counters land
        after = await sample_fleet(client, addresses)
        decisions = await router_decisions(client, metrics)
    per_engine = [a.minus(b) for a, b in zip(after, before, strict=True)]
    served = sum(e.requests for e in per_engine) or 1.0
    return {
        "requests": report.requests,
        "failures": report.failures,
        "hit_rate": fleet_delta(after, before).hit_rate,
        "ttft_p50_s": report.ttft_p50_s,
        "ttft_p99_s": report.ttft_p99_s,
        "split": sorted((e.requests / served for e in per_engine), reverse=True),
        "lag_p99_s": report.lag_p99_s,
        "decisions": decisions,
    }


DECISION_WORDS = ("decision", "load_balanc", "cache_hit", "cache_miss")


async def router_decisions(client: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The router's decision counters by series (empty if it has none or did not answer)."""
    try:
        async with client.get(url) as resp:
            text = await resp.text(errors="replace")
    except (aiohttp.ClientError, TimeoutError):
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not any(w in line for w in DECISION_WORDS):
            continue
        series, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[series] = float(value)
    return out


def simulate(policy: str, path: Path) -> dict[str, Any]:
    """The simulator's figures for `policy` on the scenario file at `path`."""
    summary = run_policy(load_scenario(path), load_policy(policy)).summary
    counts = [int(c) for c in summary["endpoint_requests"]]
    total = sum(counts) or 1
    return {
        "requests": summary["requests"],
        "failures": summary["failed"],
        "hit_rate": summary["hit_rate"],
        "ttft_p50_s": summary["ttft_s"]["p50"],
        "ttft_p99_s": summary["ttft_s"]["p99"],
        "split": sorted((c / total for c in counts), reverse=True),
    }


# --- reporting ---------------------------------------------------------------------------

FIELDS = ("hit_rate", "ttft_p50_s", "ttft_p99_s")


def median_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the fields over runs (and of the sorted split, share by share)."""
    out: dict[str, Any] = {"runs": len(rows)}
    for key in (*FIELDS, "requests", "failures"):
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    out["split"] = [statistics.median(s) for s in zip(*(r["split"] for r in rows), strict=True)]
    return out


def ratios(row: dict[str, Any], ref: dict[str, Any]) -> dict[str, float | None]:
    """row / ref per field (hit rate as a difference in points)."""
    out: dict[str, float | None] = {}
    for key in FIELDS:
        a, b = row.get(key), ref.get(key)
        if a is None or b is None or (key != "hit_rate" and b == 0):
            out[key] = None
        elif key == "hit_rate":
            out[key] = 100.0 * (a - b)
        else:
            out[key] = a / b
    return out


def median_ratios(runs: Sequence[dict[str, Any]], router: str, side: str) -> dict[str, Any]:
    """Medians over runs of the within-run comparison of `router` with `ours`."""
    each = [ratios(run[side][router], run[side]["ours"]) for run in runs if router in run[side]]
    out: dict[str, Any] = {}
    for key in FIELDS:
        values: list[float] = [v for e in each if (v := e[key]) is not None]
        out[key] = statistics.median(values) if values else None
    return out


_pct = cells.pct
_ms = cells.ms
_x = cells.times
_pts = cells.points


def _split(split: Sequence[float]) -> str:
    return "/".join(f"{100 * s:.0f}" for s in split)


def table(result: dict[str, Any]) -> str:
    """Markdown table: per traffic and router, live vs simulated, absolute and against ours."""
    lines = [
        "| traffic | router | side | engine hit | TTFT p50 / p99 (ms) | split (%, sorted) "
        "| hit vs ours (pts) | p50 vs ours | p99 vs ours | failures |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for traffic, block in result["traffics"].items():
        for router in block["routers"]:
            for side in ("live", "sim"):
                row = block["median"][side].get(router)
                if row is None:
                    continue
                rel = block["ratios"][side].get(router, {})
                lines.append(
                    f"| {traffic} | {router} | {side} | {_pct(row['hit_rate'])} | "
                    f"{_ms(row['ttft_p50_s'])} / {_ms(row['ttft_p99_s'])} | "
                    f"{_split(row['split'])} | "
                    f"{_pts(rel.get('hit_rate'))} | {_x(rel.get('ttft_p50_s'))} | "
                    f"{_x(rel.get('ttft_p99_s'))} | {row['failures']} |"
                )
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------


def run_traffic(
    traffic: Traffic, routers: Sequence[str], runs: int, workdir: Path, peers: Path | None
) -> dict[str, Any]:
    path = traffic.write(workdir)
    per_run: list[dict[str, Any]] = []
    for k in range(runs):
        live: dict[str, Any] = {}
        for router in routers:
            print(f"[{traffic.name} run {k + 1}/{runs}] {router} live", file=sys.stderr)
            rundir = workdir / f"{traffic.name}-{router}-{k}"
            rundir.mkdir()
            with (
                fleet(router, traffic, rundir, peers) as (url, addresses, metrics),
                sending_tools(traffic.tools),
            ):
                live[router] = run_with_uvloop(measure(url, addresses, traffic, path, metrics))
            print(f"  {json.dumps(live[router])}", file=sys.stderr)
        per_run.append({"live": live})
    return summarise_traffic(traffic, routers, per_run, path)


def summarise_traffic(
    traffic: Traffic, routers: Sequence[str], live_runs: Sequence[dict[str, Any]], path: Path
) -> dict[str, Any]:
    """Simulate the traffic's scenario file for each router; medians and ratios of both sides."""
    sim = {r: simulate(SIMULATED[r], path) for r in routers}
    per_run = [{"live": run["live"], "sim": sim} for run in live_runs]
    return {
        "scenario": traffic.doc,
        "routers": list(routers),
        "runs": per_run,
        "median": {
            "live": {r: median_row([run["live"][r] for run in per_run]) for r in routers},
            "sim": {r: median_row([sim[r]]) for r in routers},
        },
        "ratios": {
            side: {r: median_ratios(per_run, r, side) for r in routers if r != "ours"}
            for side in ("live", "sim")
        },
    }


def resimulate(files: Sequence[Path], json_path: str | None) -> int:
    """The live runs of earlier `--json` files against the simulator as it is now.

    For calibrating a peer's YAML without minutes of live traffic per try;
    traffics found in several files are taken from the last.
    """
    result: dict[str, Any] = {"machine": None, "traffics": {}, "resimulated_from": []}
    with tempfile.TemporaryDirectory(prefix="real-peers-") as tmp:
        for file in files:
            doc = json.loads(file.read_text(encoding="utf-8"))
            result["machine"] = doc.get("machine")
            result["resimulated_from"].append(str(file))
            for name, block in doc["traffics"].items():
                traffic = attrs.evolve(TRAFFIC[name], doc=block["scenario"])
                path = traffic.write(Path(tmp))
                runs = block["runs"]
                result["traffics"][name] = summarise_traffic(traffic, block["routers"], runs, path)
    print(table(result))
    runs = max(len(b["runs"]) for b in result["traffics"].values())
    print(f"(live: medians over {runs} run(s) from {', '.join(map(str, files))}; sim: now)")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--traffic", default=",".join(TRAFFICS))
    parser.add_argument("--routers", default=",".join(ROUTERS))
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="20 s of each traffic, one run")
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument(
        "--resimulate",
        nargs="+",
        metavar="JSON",
        help="no live runs: take them from these --json files, simulate again, print the table",
    )
    args = parser.parse_args(argv)
    if args.resimulate:
        return resimulate([Path(p) for p in args.resimulate], args.json_path)
    traffics = [t for t in args.traffic.split(",") if t]
    routers = [r for r in args.routers.split(",") if r]
    for name in traffics:
        if name not in TRAFFIC:
            parser.error(f"--traffic: unknown {name!r} (one of {', '.join(TRAFFICS)})")
    for name in routers:
        if name not in ROUTERS:
            parser.error(f"--routers: unknown {name!r} (one of {', '.join(ROUTERS)})")
    if "ours" not in routers:
        routers.insert(0, "ours")  # the reference every ratio needs
    runs = 1 if args.quick else args.runs
    workdir = Path(tempfile.mkdtemp(prefix="real-peers-"))
    peers = None
    if any(r != "ours" for r in routers):
        peers = ensure_peers(workdir / "pip.log")
        if peers is None:
            print(f"peers not installable (see {workdir / 'pip.log'}): ours only", file=sys.stderr)
            routers = ["ours"]
    result: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(),
        },
        "traffics": {},
    }
    for name in traffics:
        traffic = TRAFFIC[name].scaled(20.0) if args.quick else TRAFFIC[name]
        result["traffics"][name] = run_traffic(traffic, routers, runs, workdir, peers)
        if args.json_path:  # after each traffic, so a later failure keeps what was measured
            Path(args.json_path).write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(table(result))
    print(f"(medians over {runs} run(s); ratios taken within each run)")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"(work directory kept: {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
