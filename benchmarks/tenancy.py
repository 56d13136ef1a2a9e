"""The tenancy scenarios: what admission and fair queueing do for the tenants who behave.

    PYTHONPATH=. python -m benchmarks.tenancy [--duration S] [--scenario NAME ...]

For `noisy-neighbour` it prints, per policy, the burster's requests, 429s and
retry-after hints, and the other tenants' TTFT p50/p99 over the burst window
and over the whole run; for `longtail`, head and tail hit rates and the
tail's TTFT p99. The figures in docs/tenants.md come from this script.
"""

from __future__ import annotations

import argparse
import copy

import attrs
import numpy as np

from prefixroute.sim.compare import run_policy
from prefixroute.sim.policy import load_policy
from prefixroute.sim.scenario import load_scenario

POLICIES = {
    "noisy-neighbour": ["prefixroute", "prefixroute-rate-limited", "prefixroute-fair-queue"],
    "longtail": ["round-robin", "prefixroute", "prefixroute-longtail"],
}
BURSTER = "t0010"


def _ms(x: float) -> str:
    return "-" if np.isnan(x) else f"{x * 1e3:.0f}"


def noisy(duration: float | None) -> None:
    scenario = load_scenario("noisy-neighbour").with_overrides(duration_s=duration)
    stream = next(s for s in scenario.workload["tenants"]["rates"].items())
    start, end = stream[1].get("start_s", 0.0), stream[1].get("end_s", scenario.duration_s)
    print(f"noisy-neighbour: {BURSTER} bursts during [{start:g}, {end:g}) s\n")
    print(
        "| policy | burster requests | burster 429s | retry-after (s) "
        "| others' TTFT p50 / p99, burst window | others' TTFT p99, whole run | others' 429s |"
    )
    print("|---|---|---|---|---|---|---|")
    quiet = copy.deepcopy(scenario.workload)
    del quiet["tenants"]["rates"]
    runs = [("no burst (prefixroute)", attrs.evolve(scenario, workload=quiet), "prefixroute")]
    runs += [(name, scenario, name) for name in POLICIES["noisy-neighbour"]]
    for label, sc, name in runs:
        run = run_policy(sc, load_policy(name))
        out = run.simulation.outcomes
        tenant = np.asarray(out.tenant)
        status = np.asarray(out.status)
        arrival = np.asarray(out.arrival_s)
        ttft = np.asarray(out.ttft_s)
        burster = tenant == BURSTER
        others = ~burster & (status == 200)
        window = others & (arrival >= start) & (arrival < end)
        w50, w99 = np.percentile(ttft[window], [50, 99])
        hints = np.asarray(out.retry_after_s)[burster & (status == 429)]
        hint = f"{hints.min():.2f}-{hints.max():.2f}" if hints.size else "-"
        print(
            f"| {label} | {burster.sum()} | {(burster & (status == 429)).sum()} | {hint} | "
            f"{_ms(w50)} / {_ms(w99)} | {_ms(np.percentile(ttft[others], 99))} | "
            f"{(~burster & (status == 429)).sum()} |"
        )


def longtail(duration: float | None) -> None:
    scenario = load_scenario("longtail").with_overrides(duration_s=duration)
    print("\nlongtail\n")
    print(
        "| policy | hit rate | head hit | tail hit | Jain (hit) "
        "| tail TTFT p50 / p99 | worst TTFT p99 of the 10 busiest |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in POLICIES["longtail"]:
        s = run_policy(scenario, load_policy(name)).summary
        t = s["tenants"]
        head_p99 = max(p["ttft_s"]["p99"] or 0.0 for p in t["per_tenant"])
        tail = t["tail"]["ttft_s"]
        print(
            f"| {name} | {s['hit_rate']:.1%} | {t['head_hit_rate']:.1%} | "
            f"{t['tail_hit_rate']:.1%} | {t['jain_hit_rate']:.2f} | "
            f"{tail['p50'] * 1e3:.0f} / {tail['p99'] * 1e3:.0f} | {head_p99 * 1e3:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, help="override the scenarios' duration (s)")
    parser.add_argument("--scenario", action="append", choices=sorted(POLICIES))
    args = parser.parse_args()
    chosen = args.scenario or sorted(POLICIES, reverse=True)
    if "noisy-neighbour" in chosen:
        noisy(args.duration)
    if "longtail" in chosen:
        longtail(args.duration)


if __name__ == "__main__":
    main()
