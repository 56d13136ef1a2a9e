"""Precise (KV events) vs approximate (own decisions) vs round robin, in the simulator.

    python -m benchmarks.precise_vs_approximate [--scenarios a,b] [--policies a,b]
        [--links "20 ms,50 ms"] [--duration S] [--json PATH]
    python -m benchmarks.precise_vs_approximate --design [--rate RPS]

For each scenario (default `kv-pressure-restarts`, `tenants-500`,
`mooncake`) it runs `round-robin`, `prefixroute` (approximate: the index
learns from the router's own decisions, completions confirm) and
`prefixroute-precise` (every endpoint in precise mode, the engines' KV
events are the truth) under several event links (`--links`, names from
`LINKS`): no delay, 20 ms, 50 ms, 20 ms with 1% of the batches lost (a gap
clears the endpoint, which is relearned), the same loss where a gap keeps
the index (`on_gap: keep`), and the same loss with the replay socket. The
event link only matters to the precise policy; the scenario's engine
restarts apply to every run.

Per run it prints one markdown row: the engines' hit rate, TTFT p50 / p99,
the router's predicted cached tokens against the engines' (`over`:
(predicted - actual) / actual over the run; `exact`, `over %`, `under %`:
shares of requests predicted exactly, too high, too low), the event batches
lost, the gaps and endpoint clears, and the failed requests.

`--design` instead sweeps `router.precise_speculative_ttl_s` of the precise
policy (after one approximate `prefixroute` run for reference) on
`kv-pressure-restarts` (the scenario the default was chosen on;
`tenants-500` and `mooncake` confirm it). `--rate` replaces the Poisson
arrival rate of the scenarios (`--rate 40` overloads `kv-pressure-restarts`).
Runs are deterministic (seed 0).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Any

import attrs

from prefixroute.sim.compare import run_policy
from prefixroute.sim.policy import Policy, load_policy
from prefixroute.sim.scenario import Scenario, load_scenario
from prefixroute.sim.simulation import EventLink

LINKS: dict[str, EventLink] = {
    "0 ms": EventLink(),
    "20 ms": EventLink(delay_s=0.02),
    "50 ms": EventLink(delay_s=0.05),
    "20 ms + 1% lost": EventLink(delay_s=0.02, loss=0.01),
    "20 ms + 1% lost + keep": EventLink(delay_s=0.02, loss=0.01, on_gap="keep"),
    "20 ms + 1% lost + replay": EventLink(delay_s=0.02, loss=0.01, replay=True),
}

HEADER = (
    "| scenario | policy | events | hit rate | TTFT p50 | TTFT p99 | predicted / actual "
    "| over | exact | over % | under % | lost | gaps / clears | failed |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def row(summary: dict[str, Any], events: str) -> str:
    """One markdown row of a run's summary."""
    p = summary["prediction"]
    ev = summary["kv_events"]
    over = "-" if p["over_prediction"] is None else f"{p['over_prediction'] * 100:+.1f}%"
    return (
        f"| {summary['scenario']} | {summary['policy']} | {events} | {_pct(summary['hit_rate'])} "
        f"| {_ms(summary['ttft_s']['p50'])} | {_ms(summary['ttft_s']['p99'])} "
        f"| {p['predicted_tokens'] / 1e6:.2f}M / {p['actual_tokens'] / 1e6:.2f}M | {over} "
        f"| {_pct(p['exact'])} | {_pct(p['over'])} | {_pct(p['under'])} "
        f"| {ev['lost']} | {ev['gaps']} / {ev['cleared']} | {summary['failed']} |"
    )


def run(scenario: Scenario, policy: Policy, link: EventLink, events: str) -> dict[str, Any]:
    summary = run_policy(attrs.evolve(scenario, link=link), policy).summary
    summary["events_link"] = events
    print(row(summary, events), flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="kv-pressure-restarts,tenants-500,mooncake")
    parser.add_argument("--policies", default="round-robin,prefixroute,prefixroute-precise")
    parser.add_argument("--links", default=",".join(LINKS), help="event links for precise runs")
    parser.add_argument("--duration", type=float, default=None, help="override every scenario's")
    parser.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second")
    parser.add_argument("--json", default=None, help="write every run's summary here")
    parser.add_argument("--design", action="store_true", help="sweep precise_speculative_ttl_s")
    args = parser.parse_args(argv)
    results: list[dict[str, Any]] = []

    def scenario_named(name: str) -> Scenario:
        sc = load_scenario(name).with_overrides(duration_s=args.duration)
        if args.rate is not None:
            workload = copy.deepcopy(sc.workload)
            workload["arrival"]["rate_rps"] = args.rate
            sc = attrs.evolve(sc, workload=workload)
        return sc

    print(HEADER)
    if args.design:
        scenario = scenario_named("kv-pressure-restarts")
        results.append(run(scenario, load_policy("prefixroute"), EventLink(), "-"))
        base = load_policy("prefixroute-precise")
        for ttl in (0.5, 1.0, 2.0, 5.0, 30.0):
            doc = copy.deepcopy(base.document)
            doc.setdefault("router", {})["precise_speculative_ttl_s"] = ttl
            policy = attrs.evolve(base, name=f"precise ttl {ttl:g} s", document=doc)
            for events in ("20 ms", "20 ms + 1% lost"):
                results.append(run(scenario, policy, LINKS[events], events))
    else:
        policies = [load_policy(n) for n in args.policies.split(",")]
        chosen = {name: LINKS[name] for name in args.links.split(",")}
        for name in args.scenarios.split(","):
            scenario = scenario_named(name)
            for policy in policies:
                links = chosen if policy.kv_events else {"-": EventLink()}
                for events, link in links.items():
                    results.append(run(scenario, policy, link, events))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
