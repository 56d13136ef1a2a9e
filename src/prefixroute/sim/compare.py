"""Run a scenario under one or several policies: what `prefixroute simulate` and `compare` do."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs

from prefixroute.sim.policy import Policy
from prefixroute.sim.report import summarize
from prefixroute.sim.scenario import Scenario
from prefixroute.sim.schema import Fields
from prefixroute.sim.simulation import Simulation
from prefixroute.sim.source import Source
from prefixroute.sim.workload_schema import build_workload

__all__ = ["Run", "make_source", "run_policy"]


@attrs.frozen
class Run:
    """One finished run: its summary (the `--json` record) and the simulation behind it."""

    summary: dict[str, Any]
    simulation: Simulation


def make_source(scenario: Scenario) -> Source:
    """The scenario's workload, built fresh (sources are stateful)."""
    doc = dict(scenario.workload)
    trace = doc.get("trace")
    if isinstance(trace, dict) and isinstance(trace.get("path"), str):
        path = scenario.base_dir / trace["path"]
        doc["trace"] = {**trace, "path": str(path)}
    return build_workload(
        Fields(doc, "workload"),
        seed=scenario.seed,
        duration_s=scenario.duration_s,
        model=scenario.cost.name.rsplit("-", 1)[0],
        objectives=scenario.objectives,
    )


def run_policy(
    scenario: Scenario,
    policy: Policy,
    *,
    progress: Callable[[float], None] | None = None,
) -> Run:
    """Simulate `scenario` routed by `policy`; deterministic given the scenario's seed.

    The router replicas are the policy's `simulator.routers` when it sets
    them, else the scenario's `routers` (`prefixroute.sim.replicas`). Each
    router's latency model starts from the engine profile's rates
    (`CostModel.latency_prior`), as a deployment configured with its
    engines' profile would.
    """
    started = time.perf_counter()
    routers = policy.routers if policy.routers is not None else scenario.routers
    prior = scenario.cost.latency_prior()
    sim = Simulation(
        [
            policy.build(scenario.seed, replica=k, latency_prior=prior)
            for k in range(routers.replicas)
        ],
        make_source(scenario),
        endpoints=scenario.endpoints,
        engine=scenario.engine,
        cost=scenario.cost,
        duration_s=scenario.duration_s,
        metrics_interval_s=scenario.metrics_interval_s,
        kv_events=policy.kv_events,
        progress=progress,
        link=scenario.link,
        restarts=scenario.restarts,
        precise=policy.precise,
        seed=scenario.seed,
        routers=routers,
    )
    sim.run()
    wall = time.perf_counter() - started
    summary = summarize(sim, scenario=scenario.name, policy=policy.name, wall_s=wall)
    return Run(summary=summary, simulation=sim)
