"""Tenancy in the simulator: per-tenant rates and priorities, deferral, per-tenant reports."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from prefixroute.sim.compare import make_source, run_policy
from prefixroute.sim.policy import Policy, load_policy
from prefixroute.sim.scenario import load_scenario
from prefixroute.sim.schema import ScenarioError

BASE: dict[str, Any] = {
    "name": "burst",
    "duration_s": 12,
    "seed": 1,
    "endpoints": {"count": 2, "profile": "llama3-8b-h100", "kv_capacity_tokens": 60_000},
    "workload": {
        "arrival": {"process": "poisson", "rate_rps": 6},
        "tenants": {
            "count": 6,
            "zipf_exponent": 0.5,
            "system_prompt_tokens": [300, 800],
            "priorities": {"t0003": -1},
            "rates": {"t0005": {"rate_rps": 60, "start_s": 3, "end_s": 8}},
        },
        "mix": {"tenant": {"weight": 1, "question_tokens": [10, 30], "max_tokens": [20, 80]}},
    },
}


def scenario(**workload_changes: Any) -> Any:
    doc = json.loads(json.dumps(BASE))
    doc["workload"]["tenants"].update(workload_changes)
    return load_scenario(doc)


def test_rates_add_a_burst_and_priorities_mark_requests() -> None:
    source = make_source(scenario())
    arrivals = list(source.arrivals())
    times = [r.arrival_s for r in arrivals]
    assert times == sorted(times)
    burst = [r for r in arrivals if r.request.tenant == "t0005"]
    inside = [r for r in burst if 3 <= r.arrival_s < 8]
    assert len(inside) > 200  # 60 req/s for 5 s on top of its share
    assert all(r.request.priority == -1 for r in arrivals if r.request.tenant == "t0003")
    assert all(r.request.priority == 0 for r in arrivals if r.request.tenant != "t0003")


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        ({"priorities": {"nobody": 1}}, "workload.tenants.priorities.nobody"),
        ({"priorities": {"t0001": "high"}}, "workload.tenants.priorities.t0001"),
        ({"rates": {"t0001": {}}}, "workload.tenants.rates.t0001.rate_rps"),
        ({"rates": {"t0001": {"rate_rps": 1, "end_s": 0}}}, "workload.tenants.rates.t0001.end_s"),
        ({"rates": {"t0001": {"rate_rps": 1, "speed": 2}}}, "workload.tenants.rates.t0001.speed"),
    ],
)
def test_bad_tenant_fields_name_their_path(changes: dict[str, Any], path: str) -> None:
    with pytest.raises(ScenarioError) as info:
        make_source(scenario(**changes))
    assert info.value.path == path


def outcome_statuses(run: Any, tenant: str) -> dict[int, int]:
    out = run.simulation.outcomes
    t = np.asarray(out.tenant)
    st = np.asarray(out.status)
    return {int(s): int(((t == tenant) & (st == s)).sum()) for s in set(st[t == tenant].tolist())}


def test_fair_queue_defers_and_every_request_is_answered() -> None:
    doc = {
        "plugins": [
            {
                "type": "fair-queue-admission",
                "name": "fair",
                "parameters": {
                    "max_in_flight_per_endpoint": 4,
                    "max_wait_s": 2.0,
                    "max_queue_per_tenant": 40,
                },
            },
            {"type": "prefix-affinity-scorer", "name": "prefix"},
        ],
        "profiles": [
            {"name": "fq", "plugins": [{"pluginRef": "fair"}, {"pluginRef": "prefix", "weight": 1}]}
        ],
    }
    run = run_policy(scenario(), Policy(name="fq", document=doc))
    sim = run.simulation
    out = sim.outcomes
    assert sim.router.counters.deferrals > 0
    assert len(out.status) == len(list(make_source(scenario()).arrivals()))
    burster = outcome_statuses(run, "t0005")
    assert burster.get(429, 0) + burster.get(503, 0) > 0  # its excess, answered, not dropped
    assert set(np.asarray(out.status).tolist()) <= {200, 429, 503}
    assert sim.router.load.in_flight() == 0
    assert sim.router.ledger.snapshot().total.in_flight == 0


def test_rate_limit_answers_the_burster_with_retry_after() -> None:
    run = run_policy(scenario(), load_policy("prefixroute-rate-limited"))
    out = run.simulation.outcomes
    t = np.asarray(out.tenant)
    st = np.asarray(out.status)
    hints = np.asarray(out.retry_after_s)[(t == "t0005") & (st == 429)]
    assert hints.size > 0 and np.all(hints >= 0) and np.all(np.isfinite(hints))
    assert not ((t != "t0005") & (st == 429)).any()  # nobody else is limited


def test_reports_carry_per_tenant_figures() -> None:
    summary = run_policy(scenario(), load_policy("prefixroute")).summary
    tenants = summary["tenants"]
    assert {"per_tenant", "jain_ttft", "tail", "head_hit_rate"} <= set(tenants)
    rows = tenants["per_tenant"]
    assert rows[0]["tenant"] == "t0005"  # the burster sent most
    assert [r["requests"] for r in rows] == sorted((r["requests"] for r in rows), reverse=True)
    assert sum(r["requests"] for r in rows) == summary["requests"]  # 6 tenants < top 10
    assert 0 < tenants["jain_ttft"] <= 1
