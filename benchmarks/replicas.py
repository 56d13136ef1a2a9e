"""Router replicas in the simulator: what N routers in front of the same engines lose, and keep.

    python -m benchmarks.replicas [--scenarios a,b] [--replicas 1,2,4,8] [--sharing none,decisions]
        [--delay-s 0.05] [--seed N] [--duration S] [--json PATH] [--quick]
    python -m benchmarks.replicas --design [--scenarios a,b] [--quick]

For each scenario (default `tenants-500`, `mooncake`, `noisy-neighbour`) it
runs the default `prefixroute` policy with one router, then with 2, 4 and 8
replicas behind a round-robin balancer, sharing nothing or sharing
decisions (`prefixroute.sim.replicas`: decision records with completions
and sessions, and in-flight counts per endpoint, `--delay-s` late: 50 ms
by default, half the shared-state driver's 100 ms sync interval). It prints
one markdown row per run: hit rate, TTFT p50 / p99, the tail tenants' hit
rate and Jain's index of per-tenant hit rates, and the deltas against one
router (hit rate in points, TTFT p99 in percent); then, per scenario,
whether 4 sharing replicas meet issue 15's targets (within 1 point of one
router's hit rate, within 5% of its TTFT p99).

`--design` runs 4 replicas sharing decisions with the delay swept (0, 1,
10, 50, 100 ms) and with what the records carry varied (blocks only, plus
completions, sessions, cold placements; all of it with no delay and 1 ms):
what each part of the sharing is worth. `--quick` shortens every scenario
to a few simulated seconds (a smoke run for the tests). Runs are
deterministic given the seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from prefixroute.sim.compare import run_policy
from prefixroute.sim.policy import load_policy
from prefixroute.sim.replicas import CARRIES, DEFAULT_CARRY, Routers
from prefixroute.sim.report import run_label
from prefixroute.sim.scenario import Scenario, load_scenario

SCENARIOS = ("tenants-500", "mooncake", "noisy-neighbour")
QUICK_DURATION_S = 8.0
DESIGN_DELAYS = (0.0, 0.001, 0.01, 0.05, 0.1)
DESIGN_CARRIES: tuple[tuple[str, ...], ...] = (
    (),
    ("completions",),
    DEFAULT_CARRY,
    CARRIES,
)

HEADER = (
    "| scenario | replicas | sharing | hit rate | vs 1 | TTFT p50 | TTFT p99 | vs 1 "
    "| tail hit | Jain hit |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def row(summary: dict[str, Any], base: dict[str, Any]) -> str:
    """One markdown row: the run's figures and its deltas against `base` (one router)."""
    routers = summary["routers"]
    t = summary["tenants"]
    hit, base_hit = summary["hit_rate"], base["hit_rate"]
    p99, base_p99 = summary["ttft_s"]["p99"], base["ttft_s"]["p99"]
    d_hit = "-" if summary is base else f"{(hit - base_hit) * 100:+.1f} pt"
    d_p99 = "-" if summary is base or not base_p99 else f"{(p99 / base_p99 - 1) * 100:+.1f}%"
    if routers["replicas"] == 1:
        sharing = "-"
    else:
        sharing = run_label(summary).removeprefix(f"{summary['policy']} x{routers['replicas']} ")
    jain = "-" if t["jain_hit_rate"] is None else f"{t['jain_hit_rate']:.2f}"
    return (
        f"| {summary['scenario']} | {routers['replicas']} | {sharing} | {_pct(hit)} | {d_hit} "
        f"| {_ms(summary['ttft_s']['p50'])} | {_ms(p99)} | {d_p99} "
        f"| {_pct(t['tail_hit_rate'])} | {jain} |"
    )


def verdict(scenario: str, base: dict[str, Any], four: dict[str, Any] | None) -> str:
    """Whether 4 sharing replicas meet the targets against one router, in one line."""
    if four is None:
        return f"{scenario}: no 4-replica run sharing decisions"
    d_hit = (four["hit_rate"] - base["hit_rate"]) * 100
    d_p99 = (four["ttft_s"]["p99"] / base["ttft_s"]["p99"] - 1) * 100
    hit_ok = "met" if abs(d_hit) <= 1.0 or d_hit > 0 else "MISSED"
    p99_ok = "met" if d_p99 <= 5.0 else "MISSED"
    return (
        f"{scenario}: 4 replicas sharing decisions: hit rate {d_hit:+.1f} points "
        f"(target within 1: {hit_ok}), TTFT p99 {d_p99:+.1f}% (target within 5%: {p99_ok})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--policy", default="prefixroute")
    parser.add_argument("--replicas", default="1,2,4,8", help="replica counts (1 runs once)")
    parser.add_argument("--sharing", default="none,decisions", help="sharing modes (N > 1)")
    parser.add_argument("--delay-s", type=float, default=0.05, help="sharing delay (s)")
    parser.add_argument("--seed", type=int, default=None, help="override the scenarios' seed")
    parser.add_argument("--duration", type=float, default=None, help="override every scenario's")
    parser.add_argument("--json", default=None, help="write every run's summary here")
    parser.add_argument("--design", action="store_true", help="sweep the delay and the records")
    parser.add_argument("--quick", action="store_true", help="a few simulated seconds per run")
    args = parser.parse_args(argv)
    policy = load_policy(args.policy)
    duration = QUICK_DURATION_S if args.quick else args.duration
    results: list[dict[str, Any]] = []
    verdicts: list[str] = []

    def run(scenario: Scenario, routers: Routers) -> dict[str, Any]:
        summary = run_policy(scenario.with_overrides(routers=routers), policy).summary
        results.append(summary)
        return summary

    print(HEADER, flush=True)
    for name in args.scenarios.split(","):
        scenario = load_scenario(name).with_overrides(duration_s=duration, seed=args.seed)
        base = run(scenario, Routers())
        print(row(base, base), flush=True)
        if args.design:
            plans = [Routers(replicas=4, sharing="none")]
            plans += [
                Routers(replicas=4, sharing="decisions", delay_s=d, carry=DEFAULT_CARRY)
                for d in DESIGN_DELAYS
            ]
            plans += [
                Routers(replicas=4, sharing="decisions", delay_s=args.delay_s, carry=c)
                for c in DESIGN_CARRIES
                if c != DEFAULT_CARRY
            ]
            plans += [
                Routers(replicas=4, sharing="decisions", delay_s=d, carry=CARRIES)
                for d in (0.0, 0.001)
            ]
        else:
            counts = [int(n) for n in args.replicas.split(",") if int(n) > 1]
            plans = [
                Routers(
                    replicas=n,
                    sharing=sharing,
                    delay_s=args.delay_s if sharing == "decisions" else 0.0,
                )
                for n in counts
                for sharing in args.sharing.split(",")
            ]
        four = None
        for routers in plans:
            summary = run(scenario, routers)
            print(row(summary, base), flush=True)
            if routers == Routers(replicas=4, sharing="decisions", delay_s=args.delay_s):
                four = summary
        verdicts.append(verdict(name, base, four))
    print()
    for line in verdicts:
        print(line)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
