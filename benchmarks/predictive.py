"""Predictive routing against every peer, on every built-in scenario and the held-out ones.

    python -m benchmarks.predictive [--scenarios a,b] [--policies a,b] [--workers 2]
        [--duration S] [--seed N] [--json PATH] [--out PATH.md] [--quick]
        [--candidate NAME] [--default NAME]
    python -m benchmarks.predictive --objectives [--no-bursts] [--scenarios a,b] [--policies a,b]
    python -m benchmarks.predictive --capacity overload [--rates 80,120,160,200,250]
        [--policies a,b] [--duration 60]

Issue 16's comparison. For each scenario (default: every built-in one,
`prefixroute.sim.scenario.builtin_scenarios`, which includes `overload`
and the held-out `heldout-*` scenarios no policy was tuned on) it runs
each policy (default: every peer baseline, i.e. every built-in policy
not named `prefixroute*`, then `prefixroute` and `prefixroute-predictive`)
in a process pool of at most 2 workers (the simulator is single-threaded;
runs are deterministic given the seed, so the pool changes nothing but
the wall time). It prints, per scenario, one markdown row per policy:
hit rate, TTFT p50 / p99, the attainment of the clients' latency
objectives (the scenario's `objectives`) and the goodput (requests per
second meeting them), and for the `prefixroute*` rows their ratios to the
best peer on each figure (the peer with the highest hit rate, the lowest
TTFT p99, the highest goodput: not necessarily one peer). Then one
summary row per scenario: `prefixroute-predictive` (`--candidate`) against
the best peer and against `prefixroute` (today's default, `--default`; a
policy file's name is its stem), with issue 16's targets:
TTFT p99 <= 0.7 x the best peer's and hit rate >= the best peer's minus
1 point where load matters (`tenants-5000`, `mooncake`, `overload`),
goodput >= 1.3 x the best peer's (where the scenario has objectives),
and never worse than today's default elsewhere (TTFT p99 within 5%, hit
rate within 1 point).

`--objectives` prints, instead, each policy's p90 TTFT and TPOT and the
rule that set the scenarios' objectives: the lowest p90 of any peer on
each axis, rounded up to 1, 2, 2.5, 3 or 5 times a power of ten
(docs/simulator.md); `--no-bursts` removes arrival bursts first (for
`overload`'s base load).

`--duration` caps every scenario's simulated seconds (a bounded run);
`--quick` caps it at 10 s (a smoke run for the tests). `--capacity NAME`
measures the fleet's capacity for a scenario's traffic instead: its
workload with the bursts removed, at each `--rates` Poisson rate, for
each policy (default `prefixroute,sglang-cache-aware`): a rate is
sustained when the TTFT p99 stays under 1 s (the queue never holds a
second of work). The `overload` scenario's bursts are twice the highest
rate the default policy sustains (docs/simulator.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import attrs
import numpy as np

from prefixroute.sim.compare import run_policy
from prefixroute.sim.objectives import tpot as measured_tpot
from prefixroute.sim.policy import builtin_policies, load_policy
from prefixroute.sim.scenario import builtin_scenarios, load_scenario

OURS = ("prefixroute", "prefixroute-predictive")
CANDIDATE = "prefixroute-predictive"
DEFAULT = "prefixroute"
LOAD_MATTERS = ("tenants-5000", "mooncake", "overload")
MAX_WORKERS = 2
QUICK_DURATION_S = 10.0
SUSTAINED_TTFT_P99_S = 1.0


def peers() -> list[str]:
    """Every built-in peer baseline: the built-in policies not named prefixroute*."""
    return [p for p in builtin_policies() if not p.startswith("prefixroute")]


def run_one(
    scenario: str,
    policy: str,
    duration_s: float | None,
    seed: int | None,
    no_bursts: bool = False,
) -> dict[str, Any]:
    """One run's summary, trimmed of the per-tenant lists (a worker's job).

    It adds `p90` (the served requests' TTFT and TPOT p90, seconds: what
    `--objectives` reads). `no_bursts` removes the arrival bursts.
    """
    sc = load_scenario(scenario)
    capped = None if duration_s is None else min(duration_s, sc.duration_s)
    sc = sc.with_overrides(duration_s=capped, seed=seed)
    if no_bursts and isinstance(sc.workload.get("arrival"), dict):
        arrival = {k: v for k, v in sc.workload["arrival"].items() if k != "bursts"}
        sc = attrs.evolve(sc, workload={**sc.workload, "arrival": arrival})
    run = run_policy(sc, load_policy(policy))
    summary = run.summary
    summary["tenants"].pop("per_tenant", None)
    summary["scenario"] = scenario
    summary["objectives"] = {"ttft_s": sc.objectives.ttft_s, "tpot_s": sc.objectives.tpot_s}
    out = run.simulation.outcomes
    ok = np.asarray(out.status) == 200
    ttft = np.asarray(out.ttft_s, dtype=np.float64)
    tpot = measured_tpot(
        ttft, np.asarray(out.e2e_s, dtype=np.float64), np.asarray(out.output_tokens, np.int64)
    )[ok]
    tpot = tpot[~np.isnan(tpot)]
    summary["p90"] = {
        "ttft_s": float(np.percentile(ttft[ok], 90)) if ok.any() else None,
        "tpot_s": float(np.percentile(tpot, 90)) if tpot.size else None,
    }
    return summary


ROUND = (1.0, 2.0, 2.5, 3.0, 5.0)


def round_up(x: float) -> float:
    """The next round number at or above `x` > 0: 1, 2, 2.5, 3 or 5 times a power of ten."""
    exp = math.floor(math.log10(x))
    for e in (exp, exp + 1):
        for m in ROUND:
            if m * 10.0**e >= x * (1 - 1e-12):
                return m * 10.0**e
    return 10.0 ** (exp + 2)  # unreachable: 10**(exp + 1) >= x


def objectives_table(name: str, results: Sequence[dict[str, Any]]) -> str:
    """The objectives rule on one scenario: each peer's p90s, the lowest, rounded up (ms)."""
    ps = [r for r in results if not r["policy"].startswith("prefixroute")]
    lines = [f"**{name}**", "", "| policy | p90 TTFT | p90 TPOT |", "|---|---|---|"]
    for r in results:
        lines.append(f"| {r['policy']} | {_ms(r['p90']['ttft_s'])} | {_ms(r['p90']['tpot_s'])} |")
    picks = []
    for axis in ("ttft_s", "tpot_s"):
        found = [r for r in ps if r["p90"][axis] is not None]
        if not found:
            picks.append("-")
            continue
        best = min(found, key=lambda r: r["p90"][axis])
        value = best["p90"][axis]
        picks.append(f"{_ms(value)} ({best['policy']}) -> {round_up(value * 1e3):g} ms")
    lines.append("")
    lines.append(f"Lowest peer p90: TTFT {picks[0]}; TPOT {picks[1]}.")
    return "\n".join(lines)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def _points(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{(a - b) * 100:+.1f} pt"


def best_peer(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The best peer figures: highest hit rate, lowest TTFT p99, highest goodput and attainment."""
    ps = [r for r in results if not r["policy"].startswith("prefixroute")]
    if not ps:
        return {}

    def top(key: Any, *, low: bool = False) -> dict[str, Any]:
        found = [r for r in ps if key(r) is not None]
        if not found:
            return {"policy": None, "value": None}
        r = (min if low else max)(found, key=key)
        return {"policy": r["policy"], "value": key(r)}

    return {
        "hit_rate": top(lambda r: r["hit_rate"]),
        "ttft_p99": top(lambda r: r["ttft_s"]["p99"], low=True),
        "goodput": top(lambda r: r["slo"]["goodput_rps"] if r["slo"]["requests"] else None),
        "attainment": top(lambda r: r["slo"]["attainment"]),
    }


HEADER = (
    "| policy | hit rate | TTFT p50 | TTFT p99 | attainment | goodput | "
    "hit vs best peer | p99 / best peer | goodput / best peer |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def scenario_table(name: str, results: Sequence[dict[str, Any]]) -> str:
    """One scenario's markdown table (times in ms, goodput in requests/s)."""
    best = best_peer(results)
    first = results[0]
    obj = first.get("objectives") or {}
    objective = (
        "no objectives"
        if obj.get("ttft_s") is None and obj.get("tpot_s") is None
        else f"objectives: TTFT {_ms(obj.get('ttft_s'))} ms, TPOT {_ms(obj.get('tpot_s'))} ms"
    )
    counts = sorted({r["requests"] for r in results})
    n = f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,}-{counts[-1]:,}"
    lines = [f"**{name}** ({n} requests; {objective})", "", HEADER]
    for r in results:
        slo = r["slo"]
        ours = r["policy"].startswith("prefixroute") and best
        good_r = (
            _ratio(slo["goodput_rps"], best["goodput"]["value"]) if ours and slo["requests"] else ""
        )
        goodput = f"{slo['goodput_rps']:.1f}" if slo["requests"] else "-"
        policy = f"**{r['policy']}**" if r["policy"] in OURS else r["policy"]
        lines.append(
            f"| {policy} | {_pct(r['hit_rate'])} | {_ms(r['ttft_s']['p50'])} "
            f"| {_ms(r['ttft_s']['p99'])} | {_pct(slo['attainment'])} "
            f"| {goodput} "
            f"| {_points(r['hit_rate'], best['hit_rate']['value']) if ours else ''} "
            f"| {_ratio(r['ttft_s']['p99'], best['ttft_p99']['value']) if ours else ''} "
            f"| {good_r} |"
        )
    if best:
        lines.append("")
        lines.append(
            f"Best peers: hit rate {best['hit_rate']['policy']}, TTFT p99 "
            f"{best['ttft_p99']['policy']}, goodput {best['goodput']['policy'] or '-'}."
        )
    return "\n".join(lines)


def verdict(
    name: str,
    results: Sequence[dict[str, Any]],
    candidate: str = CANDIDATE,
    default: str = DEFAULT,
) -> str | None:
    """`candidate` against issue 16's targets on one scenario, as a markdown row.

    `default` is today's default policy, which the candidate must not fall
    behind where load does not matter.
    """
    by = {r["policy"]: r for r in results}
    cand = by.get(candidate)
    best = best_peer(results)
    if cand is None or not best:
        return None
    checks = []
    hit_d = cand["hit_rate"] - best["hit_rate"]["value"]
    p99 = cand["ttft_s"]["p99"]
    p99_best = best["ttft_p99"]["value"]
    p99_r = p99 / p99_best if p99 is not None and p99_best else None
    if name in LOAD_MATTERS:
        checks.append(f"p99 <= 0.7x: {'met' if p99_r is not None and p99_r <= 0.7 else 'MISSED'}")
        checks.append(f"hit >= best - 1 pt: {'met' if hit_d >= -0.01 else 'MISSED'}")
    good = cand["slo"]["goodput_rps"]
    good_best = best["goodput"]["value"]
    good_r = good / good_best if cand["slo"]["requests"] and good_best else None
    if cand["slo"]["requests"]:
        ok = (good_r is not None and good_r >= 1.3) or (good_best == 0 and good > 0)
        checks.append(f"goodput >= 1.3x: {'met' if ok else 'MISSED'}")
    base = by.get(default)
    vs_default = "-"
    if base is not None:
        bp99 = base["ttft_s"]["p99"]
        d_p99 = p99 / bp99 if p99 is not None and bp99 else None
        d_hit = cand["hit_rate"] - base["hit_rate"]
        vs_default = f"{_points(cand['hit_rate'], base['hit_rate'])}, p99 {_ratio(p99, bp99)}"
        if name not in LOAD_MATTERS:
            worse = (d_p99 is not None and d_p99 > 1.05) or d_hit < -0.01
            checks.append(f"not worse than default: {'MISSED' if worse else 'met'}")
    return (
        f"| {name} | {_points(cand['hit_rate'], best['hit_rate']['value'])} "
        f"| {_ratio(p99, p99_best)} | {_ratio(good, good_best) if good_r is not None else '-'} "
        f"| {vs_default} | {'; '.join(checks)} |"
    )


def summary_header(candidate: str, default: str) -> str:
    """The header of the targets table."""
    return (
        f"| scenario | {candidate}: hit vs best peer | p99 / best peer | goodput / best peer "
        f"| vs {default} (hit, p99) | targets |\n|---|---|---|---|---|---|"
    )


def compare(args: argparse.Namespace) -> int:
    scenarios = args.scenarios.split(",") if args.scenarios else builtin_scenarios()
    policies = args.policies.split(",") if args.policies else [*peers(), *OURS]
    for name in scenarios:
        load_scenario(name)  # fail early on a bad name
    for name in policies:
        load_policy(name)
    duration = QUICK_DURATION_S if args.quick else args.duration
    jobs = [(s, p) for s in scenarios for p in policies]
    started = time.perf_counter()
    done: dict[tuple[str, str], dict[str, Any]] = {}
    workers = max(1, min(MAX_WORKERS, args.workers, len(jobs)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {
            pool.submit(run_one, s, p, duration, args.seed, args.no_bursts): (s, p) for s, p in jobs
        }
        for future in as_completed(futures):
            key = futures[future]
            done[key] = future.result()
            print(
                f"[{len(done)}/{len(jobs)} {time.perf_counter() - started:.0f} s] "
                f"{key[0]} / {key[1]}: {done[key]['wall_s']:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    parts = []
    rows = []
    if args.objectives:
        text = "\n\n".join(objectives_table(s, [done[s, p] for p in policies]) for s in scenarios)
        print(text)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return 0
    for s in scenarios:
        results = [done[s, p] for p in policies]
        parts.append(scenario_table(s, results))
        row = verdict(s, results, args.candidate, args.default)
        if row is not None:
            rows.append(row)
    text = "\n\n".join(parts)
    if rows:
        text += "\n\n" + summary_header(args.candidate, args.default) + "\n" + "\n".join(rows)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"results": [done[s, p] for s in scenarios for p in policies]}, f, indent=1)
    return 0


def capacity(args: argparse.Namespace) -> int:
    """The capacity sweep (module docstring): one markdown row per policy and rate."""
    base = load_scenario(args.capacity)
    arrival = dict(base.workload.get("arrival") or {})
    if arrival.get("process") not in ("poisson", "constant"):
        print(f"{args.capacity}: the sweep needs poisson or constant arrivals", file=sys.stderr)
        return 2
    arrival.pop("bursts", None)
    policies = args.policies.split(",") if args.policies else ["prefixroute", "sglang-cache-aware"]
    duration = args.duration if args.duration is not None else 60.0
    print(
        "| policy | offered req/s | served req/s | hit rate | TTFT p50 | TTFT p99 | E2E p99 "
        "| sustained |\n|---|---|---|---|---|---|---|---|"
    )
    for policy in policies:
        for rate in (float(x) for x in args.rates.split(",")):
            workload = {**base.workload, "arrival": {**arrival, "rate_rps": rate}}
            sc = attrs.evolve(base.with_overrides(duration_s=duration), workload=workload)
            s = run_policy(sc, load_policy(policy)).summary
            p99 = s["ttft_s"]["p99"]
            sustained = p99 is not None and p99 <= SUSTAINED_TTFT_P99_S and not s["failed"]
            print(
                f"| {policy} | {rate:g} | {s['completed'] / duration:.1f} | {_pct(s['hit_rate'])} "
                f"| {_ms(s['ttft_s']['p50'])} | {_ms(p99)} | {_ms(s['e2e_s']['p99'])} "
                f"| {'yes' if sustained else 'no'} |",
                flush=True,
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--scenarios", default=None, help="default: every built-in scenario")
    parser.add_argument("--policies", default=None, help="default: every peer, then ours")
    parser.add_argument("--workers", type=int, default=MAX_WORKERS, help="at most 2")
    parser.add_argument("--duration", type=float, default=None, help="cap every scenario's (s)")
    parser.add_argument("--seed", type=int, default=None, help="override the scenarios' seed")
    parser.add_argument("--json", default=None, help="write every run's summary here")
    parser.add_argument("--out", default=None, help="write the markdown tables here")
    parser.add_argument("--quick", action="store_true", help="10 simulated seconds per run")
    parser.add_argument("--candidate", default=CANDIDATE, help="the policy judged on the targets")
    parser.add_argument("--default", default=DEFAULT, help="today's default, for the targets")
    parser.add_argument("--objectives", action="store_true", help="peers' p90s, rounded up")
    parser.add_argument("--no-bursts", action="store_true", help="remove arrival bursts")
    parser.add_argument("--capacity", default=None, help="sweep this scenario's arrival rate")
    parser.add_argument("--rates", default="80,120,160,200,250", help="rates for --capacity")
    args = parser.parse_args(argv)
    if args.capacity:
        return capacity(args)
    return compare(args)


if __name__ == "__main__":
    raise SystemExit(main())
