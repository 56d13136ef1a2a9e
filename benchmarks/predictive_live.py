"""Predicted latency, live: the predictive profile against the default and round robin.

    python -m benchmarks.predictive_live [--runs 3] [--duration 90] [--routers ...]
                                         [--json PATH] [--keep]

Issue 16's "Live" check of the latency model (`prefixroute.latency`) and the
`prefixroute-predictive` profile (`prefixroute.predictive`): the same
traffic, at time scale 1, through `prefixroute serve` configured three ways:

- `default`: the gateway's default router (no `plugins` / `profiles`:
  `Router.default()`, the `prefixroute` profile);
- `predictive`: the plugins and profile of the simulator's policy
  `prefixroute-predictive` (`src/prefixroute/sim/policies/`), copied from
  that file at run time;
- `round-robin`: the simulator's `round-robin` policy (prefix-blind);
- on request only (`--routers`), `predictive-no-objective`: the predictive
  profile without the objective, so `slo-filter` keeps every candidate
  and the latency scorer alone adds to the default's scorers (a
  diagnostic: which half of the profile moves the figures).

Every config but the diagnostic one carries `objectives: {ttft_ms: 300}`
(`Plan.objective_ttft_ms`; the traffic sends no `x-slo-ttft-ms` header, so
the objective is the router's default for every request; only `slo-filter`
in the predictive profile acts on it, the ledger counts attainment for
all), and every config sets `server.explain_header`,
so each answer's `x-prefixroute-decision` carries the decision's predicted
TTFT (`Decision.predicted_ttft_s`, the model's mean at decision time). No
latency prior is configured: the model starts from `LatencyPrior()`'s
defaults and learns from the completions, as it would for a new user.

Per router and run, fresh engines (one `prefixroute fake-engine --engines 4`
process, `llama3-8b-h100` cost profile, 40,000 KV tokens each, time
scale 1; fresh caches, same seeds) and a fresh gateway; the traffic is
replayed with `prefixroute bench`'s `run_load` in scenario timing (its own
arrival times; a chat's next turn leaves when the previous answer is in).
Measured:

- engine hit rate: delta of `vllm:prefix_cache_hits_total` /
  `vllm:prefix_cache_queries_total` summed over the engines;
- TTFT p50 / p99 at the client (first streamed content chunk);
- attainment: requests sent that came back 200 with a client TTFT at most
  the objective, over requests sent (failures and 503s miss); goodput:
  those per second of the traffic's duration;
- the latency model's live error, two ways: from the gateway's `/metrics`
  (`prefixroute_latency_prediction_*`, deltas over the run: predicted
  mean minus the TTFT the gateway measured, summed over endpoints; MAE =
  abs / samples, bias = signed / samples, positive = predicts slower), and
  at the client: each answer's predicted TTFT (its decision header) minus
  the TTFT the client measured. Headers are paired with results by send
  order (`DecisionLog`); a pair whose header's `served_by` is not the engine
  that answered (`x-fake-engine-id`) counts as a mismatch and is left out.

The traffic (`scenario`): multi-tenant agentic, 60 tenants (Zipf 1.0) with
2,000-6,000-token system prompts, single questions and 2-8-turn chats,
plus cold 2,000-6,000-token prompts, 16-48 output tokens; Poisson arrivals
at `rate_rps` with a `for_s`-second burst at `burst_rps` every `every_s`
seconds. Sized with `prefixroute simulate` on the same file so that
queues build in every burst (simulated TTFT p99 1.9 s under round robin,
0.35-0.39 s under the cache-aware profiles; docs/performance.md).

Repeats: `--runs` times, the routers' order rotated each run (so no router
always runs first on a cold machine); medians over runs, and the
predictive profile's ratios to each other router taken within each run
before the median. Caveats: everything shares one small machine (the four
engines are one Python process, one event loop), whose jitter lands in
every TTFT; compare within runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import yaml

import prefixroute
from benchmarks import cells
from benchmarks.real_peers import warm_up
from prefixroute.devtools.bench import (
    LoadReport,
    Result,
    run_load,
    run_with_uvloop,
    scenario_source,
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
from prefixroute.sim.policy import load_policy

ROUTERS = ("default", "predictive", "round-robin")
EXTRA = ("predictive-no-objective",)
"""Diagnostic variants, run on request (`--routers`): the predictive profile without the
objective (so `slo-filter` keeps every candidate and only the latency scorer acts)."""
POLICIES = {
    "predictive": "prefixroute-predictive",
    "predictive-no-objective": "prefixroute-predictive",
    "round-robin": "round-robin",
}
PROFILE = "llama3-8b-h100"
MODEL = "llama3-8b"
DECISION_HEADER = "x-prefixroute-decision"
LATENCY_METRICS = (
    "prefixroute_latency_prediction_samples_total",
    "prefixroute_latency_prediction_abs_error_seconds_total",
    "prefixroute_latency_prediction_signed_error_seconds",
)


@attrs.frozen
class Plan:
    """The traffic and the fleet: rates (req/s), seconds, tokens, the TTFT objective (ms)."""

    duration_s: float = 90.0
    rate_rps: float = 16.0
    burst_rps: float = 40.0
    every_s: float = 20.0
    for_s: float = 5.0
    start_s: float = 8.0
    engines: int = 4
    kv_tokens: int = 40_000
    tenants: int = 60
    prompt_tokens: tuple[int, int] = (2000, 6000)
    max_tokens: tuple[int, int] = (16, 48)
    objective_ttft_ms: float = 300.0
    seed: int = 0


FULL = Plan()
TINY = Plan(
    duration_s=4.0,
    rate_rps=6.0,
    burst_rps=12.0,
    every_s=2.0,
    for_s=1.0,
    start_s=1.0,
    engines=2,
    kv_tokens=20_000,
    tenants=4,
    prompt_tokens=(200, 600),
    max_tokens=(4, 8),
)
"""A few seconds of light traffic on two engines: what the fast test runs."""


def scenario(plan: Plan) -> dict[str, Any]:
    """The traffic as a simulator scenario document (also usable with `prefixroute simulate`)."""
    lo, hi = plan.prompt_tokens
    out = list(plan.max_tokens)
    return {
        "name": "predictive-live",
        "description": (
            f"Multi-tenant agentic traffic: {plan.tenants} tenants (Zipf 1.0) with {lo}-{hi}-token "
            "system prompts, questions and 2-8-turn chats, cold prompts; Poisson "
            f"{plan.rate_rps:g} req/s with {plan.for_s:g}-s bursts at {plan.burst_rps:g} req/s "
            f"every {plan.every_s:g} s, on {plan.engines} Llama-3-8B engines of "
            f"{plan.kv_tokens} KV tokens."
        ),
        "duration_s": plan.duration_s,
        "seed": plan.seed,
        "endpoints": {
            "count": plan.engines,
            "profile": PROFILE,
            "kv_capacity_tokens": plan.kv_tokens,
        },
        "workload": {
            "arrival": {
                "process": "poisson",
                "rate_rps": plan.rate_rps,
                "bursts": {
                    "rate_rps": plan.burst_rps,
                    "every_s": plan.every_s,
                    "for_s": plan.for_s,
                    "start_s": plan.start_s,
                },
            },
            "tenants": {
                "count": plan.tenants,
                "zipf_exponent": 1.0,
                "system_prompt_tokens": [lo, hi],
            },
            "mix": {
                "tenant": {"weight": 3, "question_tokens": [20, 200], "max_tokens": out},
                "chat": {
                    "weight": 3,
                    "turns": [2, 8],
                    "user_tokens": [60, 300],
                    "reply_tokens": out,
                },
                "cold": {"weight": 1, "prompt_tokens": [lo, hi], "max_tokens": out},
            },
        },
    }


def router_config(router: str, plan: Plan, port: int) -> dict[str, Any]:
    """The gateway's config entries over the generated ones (live.gateway_config) for `router`."""
    doc: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "explain_header": True},
    }
    if router != "predictive-no-objective":
        doc["objectives"] = {"ttft_ms": plan.objective_ttft_ms}
    if router in POLICIES:
        policy = load_policy(POLICIES[router]).document
        doc["plugins"] = policy["plugins"]
        doc["profiles"] = policy["profiles"]
    elif router != "default":
        raise ValueError(f"unknown router {router!r} (one of {', '.join((*ROUTERS, *EXTRA))})")
    return doc


@contextlib.contextmanager
def fleet(router: str, plan: Plan, workdir: Path) -> Iterator[tuple[str, list[str]]]:
    """Fresh engines and a gateway configured as `router`; yields (its URL, engine addresses)."""
    with supervised(workdir) as procs:
        extra = ["--profile", PROFILE, "--model", MODEL, "--kv-tokens", str(plan.kv_tokens)]
        engines, addresses = start_engines(plan.engines, workdir, extra=extra)
        procs.append(engines)
        wait_ready([f"http://{a}/health" for a in addresses], procs)
        port = free_port()
        gateway, url = start_gateway(
            addresses, workdir, port=port, config=router_config(router, plan, port)
        )
        procs.append(gateway)
        wait_ready([f"{url}/health"], procs)
        warm_up(url, MODEL, gateway)
        yield url, addresses


# --- what the router predicted -----------------------------------------------------------


def parse_decision(value: str) -> dict[str, str]:
    """The `x-prefixroute-decision` header's `key=value` parts (gateway `explain_header`)."""
    out = {}
    for part in value.split(";"):
        key, sep, val = part.strip().partition("=")
        if sep:
            out[key] = val
    return out


class DecisionLog:
    """Each request's decision header, in the order the requests were sent.

    An aiohttp `TraceConfig` on the load tool's client: `on_request_start`
    opens a record (in send order: `run_load` starts a request and reaches
    aiohttp's request start without yielding), `on_request_end` (headers
    in) fills it with the decision header's predicted TTFT and endpoint.
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.trace = aiohttp.TraceConfig()
        self.trace.on_request_start.append(self._start)
        self.trace.on_request_end.append(self._end)

    async def _start(
        self, _s: aiohttp.ClientSession, ctx: types.SimpleNamespace, params: Any
    ) -> None:
        if params.method == "POST":
            ctx.record = {"predicted_ttft_s": None, "served_by": None}
            self.records.append(ctx.record)

    async def _end(
        self, _s: aiohttp.ClientSession, ctx: types.SimpleNamespace, params: Any
    ) -> None:
        record = getattr(ctx, "record", None)
        header = params.response.headers.get(DECISION_HEADER)
        if record is None or header is None:
            return
        parts = parse_decision(header)
        record["served_by"] = parts.get("served_by")
        with contextlib.suppress(KeyError, ValueError):
            record["predicted_ttft_s"] = float(parts["predicted_ttft_ms"]) / 1000.0


def _port(address: str | None) -> str | None:
    """The port at the end of an endpoint id (`127.0.0.1:8001`) or engine id (`fake-8001`)."""
    if not address:
        return None
    return address.replace("-", ":").rsplit(":", 1)[-1]


def client_error(results: Sequence[Result], records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Predicted (header) minus client-measured TTFT over the answers that carry both.

    Results are put in send order (`sent_s`; requests never sent are left
    out) and paired with the log's records one to one. Besides MAE and bias:
    `constant_mae_s`, the MAE of the best constant guess (the measured
    median), so a model is only worth its keep below it, and `corr`, the
    Pearson correlation of predicted with measured (does the model rank
    requests by how long they will wait?). O(n log n).
    """
    sent = sorted((r for r in results if r.url), key=lambda r: r.sent_s)
    mismatched = 0
    predicted: list[float] = []
    measured: list[float] = []
    for result, record in zip(sent, records, strict=False):
        guess = record["predicted_ttft_s"]
        if not result.ok or result.ttft_s is None or guess is None:
            continue
        if _port(record["served_by"]) != _port(result.engine):
            mismatched += 1
            continue
        predicted.append(guess)
        measured.append(result.ttft_s)
    n = len(predicted)
    out: dict[str, Any] = {
        "samples": n,
        "mismatched": mismatched,
        "unpaired": abs(len(sent) - len(records)),
        "mae_s": None,
        "bias_s": None,
        "constant_mae_s": None,
        "corr": None,
    }
    if n:
        errors = [p - m for p, m in zip(predicted, measured, strict=True)]
        mid = statistics.median(measured)
        out["mae_s"] = sum(abs(e) for e in errors) / n
        out["bias_s"] = sum(errors) / n
        out["constant_mae_s"] = sum(abs(m - mid) for m in measured) / n
    if n > 2 and len(set(predicted)) > 1 and len(set(measured)) > 1:
        out["corr"] = statistics.correlation(predicted, measured)
    return out


def latency_sums(text: str) -> dict[str, float]:
    """`prefixroute_latency_prediction_*` summed over endpoints, per kind: `<kind>_<what>`."""
    out = {f"{k}_{w}": 0.0 for k in ("ttft", "tpot") for w in ("samples", "abs", "signed")}
    what = dict(zip(LATENCY_METRICS, ("samples", "abs", "signed"), strict=True))
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name not in what or "}" not in line:
            continue
        labels, _, value = line.partition("{")[2].rpartition("}")
        kind = "ttft" if 'kind="ttft"' in labels else "tpot" if 'kind="tpot"' in labels else None
        if kind is not None:
            with contextlib.suppress(ValueError, IndexError):
                out[f"{kind}_{what[name]}"] += float(value.split()[0])
    return out


async def router_metrics(client: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The gateway's latency-model error sums and SLO counters (empty if it did not answer)."""
    try:
        async with client.get(f"{url}/metrics") as resp:
            text = await resp.text(errors="replace")
    except (aiohttp.ClientError, TimeoutError):
        return {}
    out = latency_sums(text)
    for line in text.splitlines():
        for name in ("prefixroute_slo_requests_total", "prefixroute_slo_met_total"):
            if line.startswith(name + " "):
                with contextlib.suppress(ValueError):
                    out[name] = float(line.split()[1])
    return out


def model_error(after: dict[str, float], before: dict[str, float]) -> dict[str, Any]:
    """The router's MAE and bias over the run (deltas of its sums), TTFT and TPOT."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    out: dict[str, Any] = {}
    for kind in ("ttft", "tpot"):
        n = d.get(f"{kind}_samples", 0.0)
        out[f"{kind}_samples"] = int(n)
        out[f"{kind}_mae_s"] = d[f"{kind}_abs"] / n if n else None
        out[f"{kind}_bias_s"] = d[f"{kind}_signed"] / n if n else None
    slo_n = d.get("prefixroute_slo_requests_total", 0.0)
    out["router_attainment"] = d.get("prefixroute_slo_met_total", 0.0) / slo_n if slo_n else None
    return out


# --- one run -----------------------------------------------------------------------------


def attainment(report: LoadReport, objective_s: float, duration_s: float) -> tuple[float, float]:
    """(attainment, goodput req/s): answers within the TTFT objective, over requests sent."""
    met = sum(
        1 for r in report.results if r.ok and r.ttft_s is not None and r.ttft_s <= objective_s
    )
    return (met / report.requests if report.requests else 0.0), met / duration_s


async def measure(url: str, addresses: Sequence[str], plan: Plan, path: Path) -> dict[str, Any]:
    """The traffic through `url` in scenario timing, between two samples of engines and router."""
    workload = scenario_source(str(path), model=MODEL, duration_s=plan.duration_s)
    log = DecisionLog()
    probe = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0))
    load_client = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=4096),
        timeout=aiohttp.ClientTimeout(total=None, connect=30.0, sock_read=30.0),
        skip_auto_headers=("Accept-Encoding",),
        trace_configs=[log.trace],
    )
    async with probe, load_client:
        engines_before = await sample_fleet(probe, addresses)
        router_before = await router_metrics(probe, url)
        report = await run_load(
            url,
            source=workload.source,
            duration_s=plan.duration_s,
            model=MODEL,
            timeout_s=30.0,
            client=load_client,
        )
        await asyncio.sleep(0.3)  # let the last counters land
        engines_after = await sample_fleet(probe, addresses)
        router_after = await router_metrics(probe, url)
    per_engine = [a.minus(b) for a, b in zip(engines_after, engines_before, strict=True)]
    served = sum(e.requests for e in per_engine) or 1.0
    att, goodput = attainment(report, plan.objective_ttft_ms / 1000.0, plan.duration_s)
    return {
        "requests": report.requests,
        "failures": report.failures,
        "by_status": report.by_status,
        "hit_rate": fleet_delta(engines_after, engines_before).hit_rate,
        "ttft_p50_s": report.ttft_p50_s,
        "ttft_p99_s": report.ttft_p99_s,
        "attainment": att,
        "goodput_rps": goodput,
        "lag_p99_s": report.lag_p99_s,
        "served": int(sum(e.requests for e in per_engine)),
        "split": sorted((e.requests / served for e in per_engine), reverse=True),
        "model": model_error(router_after, router_before),
        "client": client_error(report.results, log.records),
    }


def run_router(router: str, plan: Plan, path: Path, workdir: Path) -> dict[str, Any]:
    """One run of the traffic through `router` on fresh engines."""
    workdir.mkdir(parents=True, exist_ok=True)
    with fleet(router, plan, workdir) as (url, addresses):
        return run_with_uvloop(measure(url, addresses, plan, path))


# --- reporting ---------------------------------------------------------------------------

FIELDS = ("hit_rate", "ttft_p50_s", "ttft_p99_s", "attainment", "goodput_rps")
MODEL_FIELDS = ("ttft_mae_s", "ttft_bias_s", "ttft_samples", "tpot_mae_s", "tpot_bias_s")
CLIENT_FIELDS = ("mae_s", "bias_s", "samples", "constant_mae_s", "corr")


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def shed(row: dict[str, Any]) -> int:
    """Requests the router answered 503 (an SLO shed, `slo-filter` `on_miss: shed`)."""
    return sum(n for status, n in row["by_status"].items() if status.split(":")[0] == "503")


def median_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over runs of every figure in the table."""
    out: dict[str, Any] = {"runs": len(rows)}
    for key in (*FIELDS, "requests", "failures"):
        out[key] = _median([r[key] for r in rows])
    out["shed"] = _median([shed(r) for r in rows])
    out["model"] = {k: _median([r["model"][k] for r in rows]) for k in MODEL_FIELDS}
    out["client"] = {k: _median([r["client"].get(k) for r in rows]) for k in CLIENT_FIELDS}
    return out


def ratios(row: dict[str, Any], ref: dict[str, Any]) -> dict[str, float | None]:
    """row against ref: hit rate and attainment in points, the rest as row / ref."""
    out: dict[str, float | None] = {}
    for key in FIELDS:
        a, b = row.get(key), ref.get(key)
        if a is None or b is None:
            out[key] = None
        elif key in ("hit_rate", "attainment"):
            out[key] = 100.0 * (a - b)
        else:
            out[key] = a / b if b else None
    return out


def median_ratios(runs: Sequence[dict[str, Any]], router: str, ref: str) -> dict[str, Any]:
    """Medians over runs of `router` against `ref` within each run."""
    each = [ratios(run[router], run[ref]) for run in runs if router in run and ref in run]
    return {k: _median([e[k] for e in each]) for k in FIELDS}


_pct = cells.pct
_ms1 = cells.ms
_sgn = cells.signed_ms
_num = cells.num
_x = cells.times
_pts = cells.points


def _ms(x: float | None) -> str:
    return cells.ms(x, 0)


def _corr(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(result: dict[str, Any]) -> str:
    """The markdown tables: outcomes and the model's error per router (medians over runs),
    then the predictive profile's ratios to the others (within runs, then the median)."""
    plan = result["plan"]
    med = result["median"]
    obj = f"{plan['objective_ttft_ms']:g} ms"
    lines = [
        f"| router | engine hit | TTFT p50 / p99 (ms) | attainment @ TTFT {obj} "
        "| goodput (req/s) | failures (503 shed) |",
        "|---|---|---|---|---|---|",
    ]
    for router, row in med.items():
        lines.append(
            f"| {router} | {_pct(row['hit_rate'])} | {_ms(row['ttft_p50_s'])} / "
            f"{_ms(row['ttft_p99_s'])} | {_pct(row['attainment'])} | "
            f"{_num(row['goodput_rps'])} | "
            f"{'-' if row['failures'] is None else int(row['failures'])} ({int(row['shed'])}) |"
        )
    lines += [
        "",
        "| router | samples | TTFT MAE / bias (ms), router | TTFT MAE / bias (ms), client "
        "| best constant's MAE (ms) | corr | TPOT MAE / bias (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for router, row in med.items():
        m, c = row["model"], row["client"]
        lines.append(
            f"| {router} | {'-' if m['ttft_samples'] is None else int(m['ttft_samples'])} | "
            f"{_ms1(m['ttft_mae_s'])} / {_sgn(m['ttft_bias_s'])} | "
            f"{_ms1(c['mae_s'])} / {_sgn(c['bias_s'])} | {_ms1(c.get('constant_mae_s'))} | "
            f"{_corr(c.get('corr'))} | {_ms1(m['tpot_mae_s'])} / {_sgn(m['tpot_bias_s'])} |"
        )
    if result["ratios"]:
        lines += [
            "",
            "| predictive vs | hit (pts) | TTFT p50 | TTFT p99 | attainment (pts) | goodput |",
            "|---|---|---|---|---|---|",
        ]
        for ref, r in result["ratios"].items():
            lines.append(
                f"| {ref} | {_pts(r['hit_rate'])} | {_x(r['ttft_p50_s'])} | "
                f"{_x(r['ttft_p99_s'])} | {_pts(r['attainment'])} | {_x(r['goodput_rps'])} |"
            )
    return "\n".join(lines)


CORE_FILES = (
    "latency.py",
    "predictive.py",
    "router.py",
    "sim/policies/prefixroute-predictive.yaml",
)


def core_digest() -> dict[str, str]:
    """Short SHA-256 digests of the core files the figures depend on (they change while the
    predictive policy is tuned; the digest says which version a table measured)."""
    root = Path(prefixroute.__file__).parent
    return {
        name: hashlib.sha256((root / name).read_bytes()).hexdigest()[:12] for name in CORE_FILES
    }


def compare(
    plan: Plan, routers: Sequence[str], runs: int, workdir: Path, *, log: Any = sys.stderr
) -> dict[str, Any]:
    """`runs` runs of every router (order rotated per run); per-run rows, medians, ratios."""
    path = workdir / "predictive-live.yaml"
    path.write_text(yaml.safe_dump(scenario(plan), sort_keys=False), encoding="utf-8")
    per_run: list[dict[str, Any]] = []
    for k in range(runs):
        order = [routers[(i + k) % len(routers)] for i in range(len(routers))]
        rows: dict[str, Any] = {}
        for router in order:
            print(f"[run {k + 1}/{runs}] {router}", file=log)
            rows[router] = run_router(router, plan, path, workdir / f"{router}-{k}")
            print(f"  {json.dumps(rows[router])}", file=log)
        per_run.append(rows)
    return summarised(
        {
            "plan": attrs.asdict(plan),
            "scenario": scenario(plan),
            "core": core_digest(),
            "configs": {
                r: {k: v for k, v in router_config(r, plan, 0).items() if k != "server"}
                for r in routers
            },
            "routers": list(routers),
            "runs": per_run,
        }
    )


def summarised(result: dict[str, Any]) -> dict[str, Any]:
    """`result` with the medians and ratios of its runs (also for a saved --json)."""
    routers = result.get("routers") or list(result["median"])
    per_run = result["runs"]
    return {
        **result,
        "median": {r: median_row([run[r] for run in per_run]) for r in routers},
        "ratios": {
            ref: median_ratios(per_run, "predictive", ref)
            for ref in routers
            if ref != "predictive" and "predictive" in routers
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.predictive_live", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=FULL.duration_s, help="seconds a run")
    parser.add_argument("--routers", default=",".join(ROUTERS), help=",".join((*ROUTERS, *EXTRA)))
    parser.add_argument("--tiny", action="store_true", help="a few seconds on two engines")
    parser.add_argument("--json", dest="json_path", help="write every figure as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--table-from", metavar="PATH", help="print the table of a --json file")
    args = parser.parse_args(argv)
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text(encoding="utf-8"))
        print(table(summarised(saved)))
        return 0
    routers = [r for r in args.routers.split(",") if r]
    for name in routers:
        if name not in (*ROUTERS, *EXTRA):
            known = ", ".join((*ROUTERS, *EXTRA))
            parser.error(f"--routers: unknown {name!r} (one of {known})")
    if args.runs < 1:
        parser.error("--runs: at least 1")
    plan = TINY if args.tiny else attrs.evolve(FULL, duration_s=args.duration)
    workdir = Path(tempfile.mkdtemp(prefix="predictive-live-"))
    started = time.monotonic()
    try:
        result = compare(plan, routers, args.runs, workdir)
    except RuntimeError as exc:
        print(f"predictive_live: {exc} (logs in {workdir})", file=sys.stderr)
        return 1
    result["machine"] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
    }
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(table(result))
    print(
        f"\n(medians over {args.runs} run(s); ratios taken within each run; "
        f"{time.monotonic() - started:.0f} s; load average {os.getloadavg()[0]:.1f})"
    )
    if args.keep:
        print(f"(work directory kept: {workdir})")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
