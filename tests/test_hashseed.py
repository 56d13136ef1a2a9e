"""Decisions do not depend on `PYTHONHASHSEED`.

Python salts `hash()` of str and bytes per process, which changes the
iteration order of sets of strings (endpoint ids, tenants, models). A core
that let such an order reach a decision (a tie broken by set order, a sum
in set order) would route the same traffic differently in two replicas or
two runs. The test replays built-in scenarios through the simulator, under
every built-in policy, in subprocesses with different hash seeds, records
every answer the router gives (`route` and `release`: the endpoint, the
fallbacks, the matched blocks and each candidate's total, or the rejection
or deferral), and requires the records to be identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs

from prefixroute import Decision, Deferral, Rejection, Router

ROOT = Path(__file__).resolve().parent.parent
HASH_SEEDS = ("0", "1", "12345")
DURATION_S = 5.0

# A noisy neighbour squeezed into a few seconds, so the fair queue defers, releases
# and refuses within the run.
BURST: dict[str, Any] = {
    "name": "burst",
    "duration_s": DURATION_S,
    "seed": 3,
    "endpoints": {"count": 4, "profile": "llama3-8b-h100", "kv_capacity_tokens": 200_000},
    "workload": {
        "arrival": {"process": "poisson", "rate_rps": 24},
        "tenants": {
            "count": 20,
            "zipf_exponent": 0.8,
            "system_prompt_tokens": [1000, 3000],
            "rates": {"t0010": {"rate_rps": 120, "start_s": 1, "end_s": 3}},
        },
        "mix": {
            "tenant": {"weight": 9, "question_tokens": [20, 200], "max_tokens": [50, 300]},
            "cold": {"weight": 1, "prompt_tokens": [200, 1000], "max_tokens": [50, 300]},
        },
    },
}


def describe(outcome: Decision | Rejection | Deferral) -> list[Any]:
    """A JSON-able record of one answer; floats as repr, so any difference shows."""
    if isinstance(outcome, Decision):
        return [
            "decision",
            outcome.request.tenant,
            outcome.endpoint,
            list(outcome.fallbacks),
            list(outcome.candidates),
            outcome.matched_blocks,
            outcome.predicted_cached_tokens,
            [repr(t) for t in outcome.totals],
        ]
    if isinstance(outcome, Rejection):
        return ["rejection", outcome.status, outcome.kind, repr(outcome.retry_after_s)]
    return ["deferral", repr(outcome.deadline)]


def record(router: Router, log: list[Any]) -> None:
    """Wrap `router`'s `route` and `release` (on the instance) to log every answer."""
    route, release = router.route, router.release

    def logged_route(request: Any, endpoints: Any, now: float) -> Any:
        outcome = route(request, endpoints, now)
        log.append(["route", repr(now), describe(outcome)])
        return outcome

    def logged_release(endpoints: Any, now: float) -> Any:
        released = release(endpoints, now)
        log.extend(["release", repr(now), describe(o)] for _, o in released)
        return released

    router.route = logged_route  # type: ignore[method-assign]
    router.release = logged_release  # type: ignore[method-assign]


def runs() -> list[tuple[str, str]]:
    """(scenario, policy) pairs: every built-in policy on many tenants, sessions, a burst."""
    from prefixroute.sim.policy import builtin_policies

    pairs = [("tenants-50", p) for p in builtin_policies()]
    pairs += [("chat", "prefixroute"), ("chat", "session-hash")]
    pairs += [("burst", "prefixroute-fair-queue"), ("burst", "prefixroute-rate-limited")]
    return pairs


def replay() -> dict[str, list[Any]]:
    """Every answer of every run, keyed by "scenario/policy" (runs in the subprocess)."""
    from prefixroute.sim.compare import make_source
    from prefixroute.sim.policy import load_policy
    from prefixroute.sim.scenario import load_scenario
    from prefixroute.sim.simulation import Simulation

    out: dict[str, list[Any]] = {}
    for scenario_name, policy_name in runs():
        policy = load_policy(policy_name)
        if scenario_name == "burst":
            scenario = load_scenario(BURST)
            doc = json.loads(json.dumps(policy.document))
            for plugin in doc["plugins"]:
                if plugin["type"] == "fair-queue-admission":  # a queue the burst fills
                    plugin["parameters"] = {"max_in_flight_per_endpoint": 8, "max_wait_s": 2.0}
            policy = attrs.evolve(policy, document=doc)
        else:
            duration = 3 * DURATION_S if scenario_name == "chat" else DURATION_S  # chat ramps up
            scenario = load_scenario(scenario_name).with_overrides(duration_s=duration)
        router = policy.build(scenario.seed)
        log: list[Any] = []
        record(router, log)
        Simulation(
            router,
            make_source(scenario),
            endpoints=scenario.endpoints,
            engine=scenario.engine,
            cost=scenario.cost,
            duration_s=scenario.duration_s,
            metrics_interval_s=scenario.metrics_interval_s,
            kv_events=policy.kv_events,
        ).run()
        out[f"{scenario_name}/{policy_name}"] = log
    return out


def main() -> None:
    json.dump(replay(), sys.stdout)


def test_decisions_do_not_depend_on_the_hash_seed() -> None:
    procs = {
        seed: subprocess.Popen(
            [sys.executable, "-c", "from tests.test_hashseed import main; main()"],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in HASH_SEEDS
    }
    results: dict[str, dict[str, list[Any]]] = {}
    for seed, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"PYTHONHASHSEED={seed} failed:\n{stderr}"
        results[seed] = json.loads(stdout)

    first, *others = HASH_SEEDS
    base = results[first]
    assert set(base) == {f"{s}/{p}" for s, p in runs()}
    answers = [(call, what[0]) for log in base.values() for call, _, what in log]
    assert answers.count(("route", "decision")) > 1000
    for exercised in [("route", "deferral"), ("release", "decision"), ("route", "rejection")]:
        assert exercised in answers, exercised
    for seed in others:
        for run, log in base.items():
            other = results[seed][run]
            for i, (a, b) in enumerate(zip(log, other, strict=False)):
                assert a == b, (
                    f"{run}: answer {i} differs between PYTHONHASHSEED={first} and {seed}:\n"
                    f"  {a}\n  {b}"
                )
            assert len(log) == len(other), f"{run}: {len(log)} answers against {len(other)}"
