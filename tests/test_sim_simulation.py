"""The simulation loop: determinism, stale metrics, KV events, usage feedback, failures."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs
import pytest

from prefixroute.decision import Rejection
from prefixroute.endpoint import EndpointState
from prefixroute.plugins import AdmissionContext, RouteContext
from prefixroute.profile import Profile
from prefixroute.router import Router, default_profile
from prefixroute.sim.compare import make_source, run_policy
from prefixroute.sim.policy import Policy, load_policy
from prefixroute.sim.scenario import Scenario, load_scenario
from prefixroute.sim.simulation import Simulation

TENANTS = {
    "name": "small",
    "duration_s": 20,
    "seed": 3,
    "metrics_interval_s": 0.05,
    "endpoints": {"count": 3, "profile": "llama3-8b-h100", "kv_capacity_tokens": 20_000},
    "workload": {
        "arrival": {"process": "poisson", "rate_rps": 20},
        "tenants": {"count": 30, "zipf_exponent": 1.0, "system_prompt_tokens": [500, 1500]},
        "mix": {
            "tenant": {"weight": 4, "question_tokens": [10, 40], "max_tokens": [20, 60]},
            "cold": {"weight": 1, "prompt_tokens": [50, 200], "max_tokens": [20, 60]},
        },
    },
}


def scenario(**changes: Any) -> Scenario:
    doc = json.loads(json.dumps(TENANTS))
    doc.update(changes)
    return load_scenario(doc)


def comparable(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in ("wall_s", "events_per_s")}


def test_same_seed_same_result() -> None:
    sc = scenario()
    policy = load_policy("prefixroute")
    a = run_policy(sc, policy).summary
    b = run_policy(sc, policy).summary
    assert comparable(a) == comparable(b)
    c = run_policy(sc.with_overrides(seed=4), policy).summary
    assert comparable(c) != comparable(a)


def test_usage_reaches_the_router_and_nothing_is_lost() -> None:
    run = run_policy(scenario(), load_policy("prefixroute"))
    sim = run.simulation
    out = sim.outcomes
    counters = sim.router.counters
    assert counters.decisions == counters.completions == len(out.status)
    assert counters.actual_cached_tokens == sum(out.cached_tokens)
    assert all(s == 200 for s in out.status)
    assert sim.router.load.in_flight() == 0
    assert run.summary["requests"] == run.summary["completed"] > 300
    assert 0.0 < run.summary["hit_rate"] < 1.0
    for engine in sim.engines:
        engine.check_invariants()
        assert engine.running == engine.waiting == 0


@attrs.frozen
class Spy:
    """A filter that records how old each candidate's metrics were at decision time."""

    ages: list[float] = attrs.field(factory=list)

    def filter(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[EndpointState]:
        for e in candidates:
            assert e.observed_at is not None
            self.ages.append(ctx.now - e.observed_at)
        return list(candidates)


def test_router_sees_metrics_only_as_fresh_as_the_scrape_interval() -> None:
    sc = scenario(metrics_interval_s=0.5)
    spy = Spy()
    base = default_profile()
    profile = Profile(
        name="spy", filters=(("spy", spy), *base.filters), scorers=base.scorers, picker=base.picker
    )
    sim = Simulation(
        Router(profile),
        make_source(sc),
        endpoints=sc.endpoints,
        engine=sc.engine,
        cost=sc.cost,
        duration_s=sc.duration_s,
        metrics_interval_s=sc.metrics_interval_s,
    )
    sim.run()
    assert spy.ages
    assert min(spy.ages) >= 0.0
    assert max(spy.ages) <= 0.5 + 1e-9
    assert sum(a > 0.1 for a in spy.ages) > len(spy.ages) / 2  # mostly stale, as scraped


def test_kv_events_keep_the_index_exact() -> None:
    run = run_policy(scenario(), load_policy("dynamo-kv"))
    sim = run.simulation
    index = sim.router.index
    assert index.stats().entries > 0
    for i, engine in enumerate(sim.engines):
        held = {h for h in engine._cached}  # the engine's cached hashes ...
        eid = sim.ids[i]
        indexed = {k for k in held if eid in index.holders(k)}
        assert indexed == held  # ... are all in the index, as the events said


def test_kv_events_need_token_blocks_of_the_engine_size() -> None:
    sc = scenario()
    policy = Policy(name="text", document={"hashing": {"mode": "text"}}, kv_events=True)
    try:
        run_policy(sc, policy)
    except ValueError as exc:
        assert "kv_events" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("text hashing with KV events must be refused")


@attrs.frozen
class RejectAll:
    def admit(self, ctx: AdmissionContext) -> Rejection | None:
        return Rejection(429, "over quota", retry_after_s=1.0)


def test_rejections_and_oversized_requests_are_counted_not_lost() -> None:
    sc = scenario()
    sim = Simulation(
        Router(admission=RejectAll()),
        make_source(sc),
        endpoints=2,
        engine=sc.engine,
        cost=sc.cost,
        duration_s=5.0,
    )
    out = sim.run()
    assert out.status and set(out.status) == {429}
    tiny = scenario(endpoints={"count": 1, "profile": "llama3-8b-h100", "kv_capacity_tokens": 512})
    run = run_policy(tiny, load_policy("round-robin"))
    statuses = set(run.simulation.outcomes.status)
    assert 400 in statuses  # prompts that can never fit get vLLM's 400
    assert run.summary["failures_by_status"]["400"] == run.summary["failed"]


def _pair_of_prompts(tenants: tuple[str, str], shared: int, total: int) -> Any:
    """A source of two requests sharing their first `shared` tokens, one second apart."""
    import numpy as np

    from prefixroute.request import Request
    from prefixroute.sim.source import SimRequest

    class Pair:
        def arrivals(self) -> Any:
            for i, tenant in enumerate(tenants):
                tokens = np.concatenate(
                    [
                        np.arange(shared),
                        np.arange(10_000 * (i + 1), 10_000 * (i + 1) + total - shared),
                    ]
                ).astype(np.uint32)
                request = Request(model="m", token_ids=tokens, tenant=tenant, max_tokens=1)
                yield SimRequest(float(i), request, 1, "test")

        def follow_up(self, done: Any, finished_s: float, ok: bool) -> None:
            return None

    return Pair()


def test_engine_blocks_follow_the_scenario_block_size_whatever_the_policy() -> None:
    from prefixroute.sim.cost import PROFILES
    from prefixroute.sim.engine import EngineConfig

    for policy in ("gie-default", "prefixroute"):
        sim = Simulation(
            load_policy(policy).build(0),
            _pair_of_prompts(("a", "a"), shared=32, total=96),
            endpoints=1,
            engine=EngineConfig(kv_capacity_tokens=32 * 64, block_size=32),
            cost=PROFILES["llama3-8b-h100"],
            duration_s=5.0,
        )
        out = sim.run()
        assert out.cached_tokens == [0, 32], policy  # one shared 32-token block, not 64


def test_router_isolation_does_not_change_what_the_engine_shares() -> None:
    from prefixroute.sim.cost import PROFILES
    from prefixroute.sim.engine import EngineConfig
    from prefixroute.sim.simulation import PolicyMismatch

    isolated = Policy(name="iso", document={"hashing": {"isolate_tenants": True}})
    sim = Simulation(
        isolated.build(0),
        _pair_of_prompts(("a", "b"), shared=200, total=200),
        endpoints=1,
        engine=EngineConfig(kv_capacity_tokens=16 * 64),
        cost=PROFILES["llama3-8b-h100"],
        duration_s=5.0,
    )
    out = sim.run()
    assert out.cached_tokens == [0, 192]  # vLLM shares unless cache_salt differs
    with pytest.raises(PolicyMismatch, match="isolation"):
        Simulation(
            isolated.build(0),
            _pair_of_prompts(("a", "b"), shared=200, total=200),
            endpoints=1,
            engine=EngineConfig(kv_capacity_tokens=16 * 64),
            cost=PROFILES["llama3-8b-h100"],
            duration_s=5.0,
            kv_events=True,
        )
