"""How fast the simulator runs, and how its cost grows with requests and with endpoints.

    python -m benchmarks.sim_speed [--quick] [--repeats N] [--parts abcdp] [--no-round-robin]

Every run goes through `prefixroute.sim.compare.run_policy`, so "wall" is
its `wall_s`: building the workload source, the engines and the router, then
the whole event loop (the summary's statistics are not included). The
router's methods (`route`, `on_complete`, `observe`) are wrapped with
`perf_counter` on the instance, so each run also reports the router's own
time and share; a wrapper costs 0.15-0.3 us per call, under 1% of a run.
CPU seconds (`process_time` around the call, so the summary is included)
are reported beside wall seconds: they do not count time spent waiting
for a core.

Parts (each prints a markdown table):

- a: the `seed` scenario in full (1 endpoint, ~57,600 requests), policy
  prefixroute, median of `--repeats` runs; target <= 10 s.
- b: the `mooncake` trace in full on 8 endpoints, prefixroute (and
  round-robin), one run each; target <= 60 s.
- c: `tenants-50` (8 endpoints, 80 req/s) for 30, 60, 120 and 240 simulated
  seconds: wall per request should stay flat if the cost is linear; then
  one more 240 s run, its wall time split by stretch of simulated time.
- d: `tenants-50` for 60 s on 2 to 32 endpoints at the same arrival rate,
  prefixroute against round-robin, runs interleaved so both see the same
  machine load. `Router.route` hashes, matches and records every prompt in
  the index whatever the profile, so round-robin's router is not free: the
  difference is what prefixroute's filters and scorers add.
- p: one `seed` run under cProfile, its time split by component (cProfile
  inflates call-heavy code, so the shares are approximate).

The machine is shared and noisy: quote medians, compare within one run.
`--quick` shortens every scenario so the whole script takes under a minute.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from prefixroute.router import Router
from prefixroute.sim.compare import run_policy
from prefixroute.sim.policy import Policy, load_policy
from prefixroute.sim.scenario import Scenario, load_scenario

SEED_TARGET_S = 10.0
MOONCAKE_TARGET_S = 60.0


class TimedPolicy:
    """A `Policy` stand-in whose routers time their own methods (duck-typed for run_policy)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.name = policy.name
        self.kv_events = policy.kv_events
        self.router_s = 0.0

    def build(self, seed: int) -> Router:
        router = self.policy.build(seed)
        self.router_s = 0.0
        for method in ("route", "on_complete", "observe"):
            setattr(router, method, self._timed(getattr(router, method)))
        return router

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        clock = time.perf_counter

        def timed(*args: Any) -> Any:
            t0 = clock()
            try:
                return fn(*args)
            finally:
                self.router_s += clock() - t0

        return timed


class Measured:
    """Medians over repeated runs of one (scenario, policy); counts must not vary."""

    def __init__(self, scenario: Scenario, policy: str) -> None:
        self.scenario = scenario
        self.policy = TimedPolicy(load_policy(policy))
        self.walls: list[float] = []
        self.cpus: list[float] = []
        self.router: list[float] = []
        self.summary: dict[str, Any] = {}

    def run(self) -> None:
        cpu = time.process_time()
        s = run_policy(self.scenario, self.policy).summary  # type: ignore[arg-type]
        self.cpus.append(time.process_time() - cpu)
        if self.summary:
            assert (s["requests"], s["events"]) == (
                self.summary["requests"],
                self.summary["events"],
            )
        self.summary = s
        self.walls.append(s["wall_s"])
        self.router.append(self.policy.router_s)

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def cpu(self) -> float:
        """Median CPU seconds of the process (less sensitive to other load than wall)."""
        return statistics.median(self.cpus)

    @property
    def cpu_us(self) -> float:
        """Median CPU time per request, in microseconds."""
        return self.cpu / self.requests * 1e6

    @property
    def requests(self) -> int:
        return int(self.summary["requests"])

    @property
    def events(self) -> int:
        return int(self.summary["events"])

    @property
    def per_request_us(self) -> float:
        return self.wall / self.requests * 1e6

    @property
    def router_us(self) -> float:
        """Median router time per request, in microseconds."""
        return statistics.median(self.router) / self.requests * 1e6

    @property
    def router_share(self) -> float:
        return statistics.median(r / w for r, w in zip(self.router, self.walls, strict=True))

    def spread(self) -> str:
        if len(self.walls) < 2:
            return f"{self.wall:.2f}"
        return f"{self.wall:.2f} ({min(self.walls):.2f}-{max(self.walls):.2f})"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(wall: float, target: float, scaled: bool) -> str:
    if scaled:
        return "n/a (--quick)"
    return f"{'met' if wall <= target else 'missed'} (<= {target:g} s)"


def repeat(cases: Sequence[Measured], times: int) -> None:
    """Run every case `times` times, interleaved, so drift in machine load hits all alike."""
    for _ in range(times):
        for case in cases:
            case.run()


def row(m: Measured) -> list[str]:
    """The columns every part shares: counts, wall, CPU, events/s and the router's cost."""
    return [
        f"{m.requests:,}",
        f"{m.events:,}",
        m.spread(),
        f"{m.per_request_us:,.0f}",
        f"{m.cpu_us:,.0f}",
        f"{m.events / m.wall:,.0f}",
        f"{m.router_us:,.0f}",
        f"{m.router_share:.0%}",
    ]


HEADERS = ["requests", "events", "wall s (min-max)", "wall us/req", "CPU us/req", "events/s"]
HEADERS += ["router us/req", "router share"]


def part_a(quick: bool, repeats: int) -> None:
    scenario = load_scenario("seed")
    if quick:
        scenario = scenario.with_overrides(duration_s=180)
    m = Measured(scenario, "prefixroute")
    repeat([m], repeats)
    print(f"\n### a. seed, {scenario.duration_s:g} s, 1 endpoint, median of {repeats}\n")
    target = verdict(m.wall, SEED_TARGET_S, quick)
    print(table(["policy", *HEADERS, "target"], [["prefixroute", *row(m), target]]))


def part_b(quick: bool, round_robin: bool) -> None:
    scenario = load_scenario("mooncake").with_overrides(endpoints=8)
    if quick:
        scenario = scenario.with_overrides(duration_s=300)
    policies = ["prefixroute", "round-robin"] if round_robin else ["prefixroute"]
    cases = [Measured(scenario, p) for p in policies]
    repeat(cases, 1)
    print(f"\n### b. mooncake, {scenario.duration_s:g} s, 8 endpoints, one run each\n")
    rows = [[m.policy.name, *row(m), verdict(m.wall, MOONCAKE_TARGET_S, quick)] for m in cases]
    print(table(["policy", *HEADERS, "target"], rows))


def part_c(quick: bool, repeats: int) -> None:
    base = load_scenario("tenants-50")
    durations = [10, 20, 40] if quick else [30, 60, 120, 240]
    cases = [Measured(base.with_overrides(duration_s=d), "prefixroute") for d in durations]
    repeat(cases, repeats)
    print(f"\n### c. tenants-50, 8 endpoints, prefixroute, by duration, median of {repeats}\n")
    rows = [[f"{m.scenario.duration_s:g}", *row(m)] for m in cases]
    print(table(["simulated s", *HEADERS], rows))
    stretches(cases[-1].scenario, 4 if quick else 8)


def stretches(scenario: Scenario, n: int) -> None:
    """One more run of `scenario`, its wall time split into `n` stretches of simulated time.

    Uses `run_policy`'s progress callback (called every 64th event that is a
    metrics refresh), so the stretch edges are approximate.
    """
    marks: list[tuple[float, float]] = []

    def progress(t: float) -> None:
        marks.append((t, time.perf_counter()))

    start = time.perf_counter()
    run_policy(scenario, load_policy("prefixroute"), progress=progress)
    marks.insert(0, (0.0, start))
    edges = [scenario.duration_s * i / n for i in range(1, n + 1)]
    rows = []
    prev = marks[0]
    for edge in edges:
        mark = next((m for m in marks if m[0] >= edge), marks[-1])
        if mark[0] > prev[0]:
            per = (mark[1] - prev[1]) / (mark[0] - prev[0]) * 1e3
            rows.append([f"{prev[0]:.0f}-{mark[0]:.0f}", f"{per:.1f}"])
        prev = mark
    print(f"\nOne {scenario.duration_s:g} s run by stretch of simulated time:\n")
    print(table(["simulated s", "wall ms per simulated s"], rows))


def part_d(quick: bool, repeats: int) -> None:
    duration = 15 if quick else 60
    counts = [2, 8, 32] if quick else [2, 4, 8, 16, 32]
    base = load_scenario("tenants-50").with_overrides(duration_s=duration)
    pairs = [
        (Measured(base.with_overrides(endpoints=n), "prefixroute"),
         Measured(base.with_overrides(endpoints=n), "round-robin"))
        for n in counts
    ]  # fmt: skip
    repeat([m for pair in pairs for m in pair], repeats)
    print(f"\n### d. tenants-50, {duration} s at 80 req/s, by endpoints, median of {repeats}\n")
    rows = [[str(m.scenario.endpoints), m.policy.name, *row(m)] for pair in pairs for m in pair]
    print(table(["endpoints", "policy", *HEADERS], rows))
    print("\nprefixroute against round-robin (medians of the paired runs' ratios):\n")
    rows = [
        [
            str(pr.scenario.endpoints),
            f"{pr.summary['failed']:,} / {rr.summary['failed']:,}",
            f"{statistics.median(a / b for a, b in zip(pr.walls, rr.walls, strict=True)):.2f}",
            f"{statistics.median(a / b for a, b in zip(pr.cpus, rr.cpus, strict=True)):.2f}",
            f"{statistics.median(a / b for a, b in zip(pr.router, rr.router, strict=True)):.2f}",
        ]
        for pr, rr in pairs
    ]
    print(table(["endpoints", "failed pr / rr", "wall", "CPU", "router time"], rows))


# (file name, function name) -> component; cumulative times, chosen not to overlap.
COMPONENTS: dict[tuple[str, str], str] = {
    ("router.py", "route"): "router: `Router.route`",
    ("router.py", "on_complete"): "router: `on_complete`, `observe`",
    ("router.py", "observe"): "router: `on_complete`, `observe`",
    ("engine.py", "begin_step"): "engine: `begin_step` + `end_step`",
    ("engine.py", "end_step"): "engine: `begin_step` + `end_step`",
    ("engine.py", "add"): "engine: `add`",
    ("workload.py", "arrivals"): "workload: arrivals and follow-ups",
    ("workload.py", "follow_up"): "workload: arrivals and follow-ups",
    ("trace.py", "arrivals"): "workload: arrivals and follow-ups",
    ("trace.py", "follow_up"): "workload: arrivals and follow-ups",
    ("compare.py", "make_source"): "setup: workload source, engines",
    ("simulation.py", "__init__"): "setup: workload source, engines",
    ("simulation.py", "_refresh"): "driver: metric snapshots (`_refresh`)",
    ("simulation.py", "add"): "driver: `Outcomes.add`",
    ("simulation.py", "_push"): "driver: event heap push/pop",
}


def part_p(quick: bool) -> None:
    scenario = load_scenario("seed")
    if quick:
        scenario = scenario.with_overrides(duration_s=180)
    policy = load_policy("prefixroute")
    profiler = cProfile.Profile()
    profiler.enable()
    run = run_policy(scenario, policy)
    profiler.disable()
    stats: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = 0.0
    shares: dict[str, float] = {}
    for (path, _, func), (_, _, _, cumtime, callers) in stats.items():
        name = (os.path.basename(path), func)
        if name == ("compare.py", "run_policy"):
            total = cumtime
        elif name in COMPONENTS:
            shares[COMPONENTS[name]] = shares.get(COMPONENTS[name], 0.0) + cumtime
        elif "heappop" in func:  # the loop's own pops (the engines' are in their steps)
            for (cpath, _, cfunc), caller in callers.items():
                if os.path.basename(cpath) == "simulation.py" and cfunc == "run":
                    key = COMPONENTS[("simulation.py", "_push")]
                    shares[key] = shares.get(key, 0.0) + caller[3]
    rows = [
        [k, f"{v:.2f}", f"{v / total:.0%}"] for k, v in sorted(shares.items(), key=lambda x: -x[1])
    ]
    rest = total - sum(shares.values())
    rows.append(
        [
            "event loop and driver glue (`run`, `_step_end`, ...)",
            f"{rest:.2f}",
            f"{rest / total:.0%}",
        ]
    )
    rows.append(["total (`run_policy`, under cProfile)", f"{total:.2f}", "100%"])
    print(
        f"\n### p. where a seed run's time goes ({scenario.duration_s:g} s, prefixroute, "
        f"cProfile; {run.summary['wall_s']:.1f} s profiled)\n"
    )
    print(table(["component", "cumulative s", "share"], rows))
    print("\nTop functions by own time:\n")
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:12]
    print(
        table(
            ["function", "calls", "own s", "own share"],
            [
                [f"`{os.path.basename(p)}:{line} {f}`", f"{v[1]:,}", f"{v[2]:.2f}",
                 f"{v[2] / total:.0%}"]
                for (p, line, f), v in top
            ],
        )
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short scenarios (< 1 min in all)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (median)")
    parser.add_argument("--parts", default="abcdp", help="which parts to run (letters)")
    parser.add_argument("--no-round-robin", action="store_true", help="skip round-robin in part b")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    started = time.perf_counter()
    if "a" in args.parts:
        part_a(args.quick, repeats)
    if "b" in args.parts:
        part_b(args.quick, not args.no_round_robin)
    if "c" in args.parts:
        part_c(args.quick, repeats)
    if "d" in args.parts:
        part_d(args.quick, repeats)
    if "p" in args.parts:
        part_p(args.quick)
    print(f"\n({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
