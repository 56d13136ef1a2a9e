"""Latency objectives in the simulator: scenarios set them, the report judges them (issue 16).

Also the on/off arrival bursts the `overload` scenario uses, the held-out
scenarios, the latency model's error in the report and its cold start from
the engine profile.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from prefixroute.latency import LatencyPrior
from prefixroute.request import Request
from prefixroute.sim.compare import make_source, run_policy
from prefixroute.sim.cost import PROFILES
from prefixroute.sim.engine import EngineConfig
from prefixroute.sim.policy import Policy, load_policy
from prefixroute.sim.report import format_fairness, format_table, summarize
from prefixroute.sim.scenario import builtin_scenarios, load_scenario
from prefixroute.sim.schema import Fields, ScenarioError
from prefixroute.sim.simulation import Simulation
from prefixroute.sim.source import SimRequest
from prefixroute.sim.workload import Bursts
from prefixroute.sim.workload_schema import build_workload

SMALL: dict[str, Any] = {
    "name": "small",
    "duration_s": 10,
    "seed": 1,
    "endpoints": {"count": 2, "profile": "llama3-8b-h100", "kv_capacity_tokens": 20_000},
    "objectives": {"ttft_ms": 200, "tpot_ms": 20, "tenants": {"t0001": {"ttft_ms": 50}}},
    "workload": {
        "arrival": {"process": "poisson", "rate_rps": 20},
        "tenants": {"count": 3, "system_prompt_tokens": [200, 400]},
        "mix": {"tenant": {"question_tokens": [5, 20], "max_tokens": [5, 30]}},
    },
}


def small(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(SMALL)
    doc.update(changes)
    return doc


# -- objectives reach the requests ----------------------------------------------------------


def test_objectives_reach_every_request_by_tenant() -> None:
    sims = list(make_source(load_scenario(small())).arrivals())
    assert len({s.request.tenant for s in sims}) == 3
    for s in sims:
        r = s.request
        expected = 0.05 if r.tenant == "t0001" else 0.2
        assert (r.slo_ttft_s, r.slo_tpot_s) == (pytest.approx(expected), pytest.approx(0.02))


def test_without_objectives_requests_carry_none() -> None:
    doc = small()
    del doc["objectives"]
    for s in make_source(load_scenario(doc)).arrivals():
        assert s.request.slo_ttft_s is None and s.request.slo_tpot_s is None


def test_closed_loop_follow_ups_and_traces_carry_them(tmp_path: Path) -> None:
    doc = small(
        workload={
            "arrival": {"process": "closed-loop", "users": 4, "think_s": [0.1, 0.2]},
            "tenants": {"count": 2},
            "mix": {"chat": {"turns": [2, 3], "user_tokens": [5, 10], "reply_tokens": [3, 6]}},
        },
        objectives={"tpot_ms": 40},
    )
    run = run_policy(load_scenario(doc), load_policy("round-robin"))
    out = run.simulation.outcomes
    assert len(out.status) > 20  # follow-ups, not just the four first turns
    assert all(math.isnan(x) for x in out.slo_ttft_s)
    assert out.slo_tpot_s == [pytest.approx(0.04)] * len(out.status)
    assert run.summary["slo"]["requests"] == len(out.status)

    trace = tmp_path / "t.jsonl"
    lines = [
        {"timestamp": 100 * i, "input_length": 600, "output_length": 4, "hash_ids": [1, 2]}
        for i in range(3)
    ]
    trace.write_text("\n".join(json.dumps(x) for x in lines))
    doc = small(
        workload={"trace": {"path": str(trace)}},
        objectives={"ttft_ms": 1000, "tenants": {"default": {"tpot_ms": 30}}},
    )
    sims = list(make_source(load_scenario(doc)).arrivals())
    assert [(s.request.slo_ttft_s, s.request.slo_tpot_s) for s in sims] == [(1.0, 0.03)] * 3


@pytest.mark.parametrize(
    ("objectives", "path"),
    [
        ({"ttft_ms": 0}, "objectives.ttft_ms"),
        ({"tpot_ms": -5}, "objectives.tpot_ms"),
        ({"tpot_ms": "fast"}, "objectives.tpot_ms"),
        ({"ttft": 100}, "objectives.ttft"),
        ({"tenants": {"t0001": {"ttft_ms": 0}}}, "objectives.tenants.t0001.ttft_ms"),
        ({"tenants": {"t0001": {"p99_ms": 3}}}, "objectives.tenants.t0001.p99_ms"),
        ({"tenants": {"t0001": 5}}, "objectives.tenants.t0001"),
        ({"tenants": [1]}, "objectives.tenants"),
        ("fast", "objectives"),
    ],
)
def test_bad_objectives_name_their_field(objectives: Any, path: str) -> None:
    with pytest.raises(ScenarioError) as err:
        load_scenario(small(objectives=objectives))
    assert err.value.path == path


def test_objectives_for_an_unknown_tenant_are_refused_when_the_workload_is_built() -> None:
    sc = load_scenario(small(objectives={"ttft_ms": 100, "tenants": {"t0009": {"ttft_ms": 5}}}))
    with pytest.raises(ScenarioError) as err:
        make_source(sc)
    assert err.value.path == "objectives.tenants.t0009"
    assert "not one of the scenario's tenants" in str(err.value)


# -- attainment, by hand ------------------------------------------------------------------


class ListSource:
    """Fixed requests, one per second (each runs alone on the engine)."""

    def __init__(self, sims: list[SimRequest]) -> None:
        self.sims = sims

    def arrivals(self) -> Iterator[SimRequest]:
        return iter(self.sims)

    def follow_up(self, done: SimRequest, finished_s: float, ok: bool) -> SimRequest | None:
        return None


def _sim(
    i: int,
    tenant: str,
    *,
    ttft: float | None = None,
    tpot: float | None = None,
    output: int = 10,
    prompt: int = 100,
) -> SimRequest:
    tokens = np.arange(i * 10_000, i * 10_000 + prompt, dtype=np.uint32)
    request = Request(
        model="m",
        token_ids=tokens,
        tenant=tenant,
        max_tokens=output,
        slo_ttft_s=ttft,
        slo_tpot_s=tpot,
    )
    return SimRequest(float(i), request, output, "cold")


def test_attainment_counted_by_hand() -> None:
    """Requests served alone on one Qwen3-0.6B engine: TTFT >= 5 ms of front end, TPOT >= 4 ms.

    met: a generous TTFT; a 1 ms TPOT on a one-token answer (no TPOT: not
    judged on it); generous TTFT and TPOT. Missed: a 1 ms TTFT; a 1 ms TPOT
    on ten tokens; a generous TTFT on a prompt no engine can hold (400).
    Not judged: no objective at all.
    """
    sims = [
        _sim(0, "a", ttft=1.0),  # met
        _sim(1, "b", ttft=0.001),  # missed: the front end alone is 5 ms
        _sim(2, "b", tpot=0.001),  # missed: a decode step is >= 4 ms
        _sim(3, "a", tpot=0.001, output=1),  # met: one token, no TPOT
        _sim(4, "c"),  # no objectives: not counted
        _sim(5, "c", ttft=1.0, prompt=5000),  # missed: refused (400)
        _sim(6, "a", ttft=1.0, tpot=1.0),  # met
    ]
    sim = Simulation(
        load_policy("round-robin").build(0),
        ListSource(sims),
        endpoints=1,
        engine=EngineConfig(kv_capacity_tokens=4096),
        cost=PROFILES["qwen3-0.6b-h100"],
        duration_s=10.0,
    )
    out = sim.run()
    assert out.status == [200, 200, 200, 200, 200, 400, 200]
    ttft = np.asarray(out.ttft_s)
    assert ttft[0] > 0.005 and ttft[0] < 0.05  # what the objectives above assume
    summary = summarize(sim, scenario="hand", policy="round-robin", wall_s=1.0)
    slo = summary["slo"]
    makespan = max(x for x in out.finished_s if not math.isnan(x))
    assert slo == {
        "requests": 6,
        "met": 3,
        "attainment": 0.5,
        "goodput_rps": pytest.approx(3 / makespan),
    }
    per = {t["tenant"]: t["slo"] for t in summary["tenants"]["per_tenant"]}
    assert per["a"] == {"requests": 3, "met": 3, "attainment": 1.0}
    assert per["b"] == {"requests": 2, "met": 0, "attainment": 0.0}
    assert per["c"] == {"requests": 1, "met": 0, "attainment": 0.0}
    tenants = summary["tenants"]  # tail: b (2 requests, c's tie broken by name); head: a, c
    assert tenants["tail_attainment"] == 0.0
    assert tenants["head_attainment"] == pytest.approx(3 / 4)
    assert "slo met" in format_table([summary]) and "50.0%" in format_table([summary])
    assert "tail slo" in format_fairness([summary])


def test_runs_without_objectives_have_no_slo_columns() -> None:
    doc = small(duration_s=3)
    del doc["objectives"]
    summary = run_policy(load_scenario(doc), load_policy("round-robin")).summary
    assert summary["slo"] == {"requests": 0, "met": 0, "attainment": None, "goodput_rps": 0.0}
    assert "slo met" not in format_table([summary])


# -- the latency model: its error in the report, its cold start ------------------------------


def test_latency_model_error_is_reported() -> None:
    run = run_policy(load_scenario(small()), load_policy("prefixroute"))
    model = run.summary["latency_model"]
    assert set(model) == {
        "samples",
        "ttft_mae_s",
        "ttft_bias_s",
        "tpot_samples",
        "tpot_mae_s",
        "tpot_bias_s",
    }
    assert model["samples"] == run.summary["completed"] > 100
    assert 0 < model["tpot_samples"] <= model["samples"]
    assert 0 < model["ttft_mae_s"] < 1.0 and abs(model["ttft_bias_s"]) <= model["ttft_mae_s"]
    assert 0 < model["tpot_mae_s"] < 1.0 and abs(model["tpot_bias_s"]) <= model["tpot_mae_s"]
    error = run.simulation.router.latency.error()
    assert model["ttft_mae_s"] == pytest.approx(error.ttft_abs_s / error.ttft_samples)


def test_latency_model_error_sums_over_replicas() -> None:
    doc = small(routers={"replicas": 2})
    run = run_policy(load_scenario(doc), load_policy("prefixroute"))
    each = [r.latency.error() for r in run.simulation.replicas]
    assert all(e.ttft_samples > 0 for e in each)
    assert run.summary["latency_model"]["samples"] == sum(e.ttft_samples for e in each)


def test_routers_start_from_the_engine_profiles_rates() -> None:
    cost = PROFILES["llama3-8b-h100"]
    prior = cost.latency_prior()
    # what the cost model says: an idle engine prefills about 35,000 tokens/s,
    # a lone decode step over 1,000 tokens is about 9 ms
    assert 2e-5 < prior.prefill_s_per_token < 4e-5
    assert 0.005 < prior.tpot_base_s < 0.012
    assert prior.ttft_base_s > cost.frontend_latency_s
    run = run_policy(load_scenario(small(duration_s=1)), load_policy("prefixroute"))
    assert run.simulation.router.latency.prior == prior
    assert load_policy("prefixroute").build(0).latency.prior == LatencyPrior()
    # a policy document's own prior wins
    own = Policy(name="own", document={"latency": {"prior": {"ttft_base_s": 0.5}}})
    assert own.build(0, latency_prior=prior).latency.prior == LatencyPrior(ttft_base_s=0.5)


# -- bursts ---------------------------------------------------------------------------------


def test_bursts_schedule() -> None:
    b = Bursts(rate_rps=100, every_s=20, for_s=5, start_s=10)
    assert b.phase(0.0, 10) == (10, 10.0)
    assert b.phase(10.0, 10) == (100, 15.0)
    assert b.phase(14.0, 10) == (100, 15.0)
    assert b.phase(15.0, 10) == (10, 30.0)
    assert b.phase(31.0, 10) == (100, 35.0)
    with pytest.raises(ValueError, match="for_s"):
        Bursts(rate_rps=1, every_s=5, for_s=6)


def _arrivals(arrival: dict[str, Any], duration_s: float) -> np.ndarray:
    doc = {"arrival": arrival, "mix": {"cold": {}}}
    source = build_workload(Fields(doc, "workload"), seed=0, duration_s=duration_s, model="m")
    return np.array([s.arrival_s for s in source.arrivals()])


def test_poisson_bursts_have_their_rates() -> None:
    bursts = {"rate_rps": 400, "every_s": 20, "for_s": 5, "start_s": 10}
    t = _arrivals({"process": "poisson", "rate_rps": 40, "bursts": bursts}, 60.0)
    assert np.all(np.diff(t) >= 0) and t[-1] < 60
    inside = ((t >= 10) & (t < 15)) | ((t >= 30) & (t < 35)) | ((t >= 50) & (t < 55))
    # 3 x 5 s at 400/s and 45 s at 40/s: means 6,000 and 1,800 (sd 77 and 42)
    assert abs(inside.sum() - 6000) < 400
    assert abs((~inside).sum() - 1800) < 250


def test_constant_bursts_are_evenly_spaced() -> None:
    bursts = {"rate_rps": 10, "every_s": 4, "for_s": 1}
    t = _arrivals({"process": "constant", "rate_rps": 2, "bursts": bursts}, 4.0)
    expected = [0.1 * k for k in range(10)] + [1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
    assert t.tolist() == pytest.approx(expected)


@pytest.mark.parametrize(
    ("arrival", "path"),
    [
        (
            {"process": "poisson", "rate_rps": 5, "bursts": {"rate_rps": 9, "every_s": 1}},
            "workload.arrival.bursts.for_s",
        ),
        (
            {
                "process": "poisson",
                "rate_rps": 5,
                "bursts": {"rate_rps": 9, "every_s": 1, "for_s": 2},
            },
            "workload.arrival.bursts.for_s",
        ),
        (
            {
                "process": "poisson",
                "rate_rps": 5,
                "bursts": {"rate_rps": 9, "every_s": 2, "for_s": 1, "end_s": 3},
            },
            "workload.arrival.bursts.end_s",
        ),
        (
            {"process": "closed-loop", "users": 2, "bursts": {"rate_rps": 9}},
            "workload.arrival.bursts",
        ),
    ],
)
def test_bad_bursts_name_their_field(arrival: dict[str, Any], path: str) -> None:
    doc = {"arrival": arrival, "mix": {"cold": {}}}
    with pytest.raises(ScenarioError) as err:
        build_workload(Fields(doc, "workload"), seed=0, duration_s=5.0, model="m")
    assert err.value.path == path


# -- the scenarios ---------------------------------------------------------------------------

LOAD_MATTERS = ("tenants-5000", "mooncake", "overload", "heldout-agentic", "heldout-mooncake")


def test_scenarios_where_load_matters_have_objectives() -> None:
    assert set(LOAD_MATTERS) <= set(builtin_scenarios())
    for name in LOAD_MATTERS:
        sc = load_scenario(name)
        assert sc.objectives.ttft_s is not None and sc.objectives.tpot_s is not None, name


def test_overload_bursts_to_twice_the_measured_capacity() -> None:
    sc = load_scenario("overload")
    arrival = sc.workload["arrival"]
    capacity = 160.0  # req/s this fleet sustains on this traffic (docs/simulator.md)
    assert arrival["bursts"]["rate_rps"] == 2 * capacity
    assert arrival["rate_rps"] < capacity
    t = np.array([s.arrival_s for s in make_source(sc.with_overrides(duration_s=30)).arrivals()])
    burst = (t >= 20) & (t < 25)
    assert 1400 < burst.sum() < 1800  # 5 s at 320 req/s
    assert 2200 < (~burst).sum() < 2600  # 25 s at 96 req/s
    short = sc.with_overrides(duration_s=2)
    runs = [run_policy(short, load_policy(p)) for p in ("round-robin", "prefixroute")]
    assert runs[0].summary["slo"]["requests"] == runs[0].summary["requests"] > 100
    # every policy gets the same arrivals, though chat turns depend on completions
    times = [sorted(r.simulation.outcomes.arrival_s) for r in runs]
    assert times[0] == times[1]


def test_held_out_scenarios_say_so_and_load() -> None:
    for name in ("heldout-agentic", "heldout-mooncake"):
        sc = load_scenario(name)
        assert sc.description.startswith("Held out")
        run = run_policy(sc.with_overrides(duration_s=3), load_policy("round-robin"))
        assert run.summary["completed"] > 10
        assert run.summary["slo"]["requests"] == run.summary["requests"]


# -- the benchmark ----------------------------------------------------------------------------


def test_the_predictive_benchmark_short_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import predictive

    out = tmp_path / "runs.json"
    argv = ["--duration", "2", "--workers", "1", "--scenarios", "overload,seed"]
    argv += ["--policies", "round-robin,least-request,prefixroute", "--json", str(out)]
    argv += ["--candidate", "prefixroute", "--default", "round-robin"]
    assert predictive.main(argv) == 0
    text = capsys.readouterr().out
    targets = {line.split(" | ")[0]: line for line in text.splitlines() if "| targets" not in line}
    assert "p99 <= 0.7x" in targets["| overload"] and "goodput >= 1.3x" in targets["| overload"]
    assert "not worse than default" in targets["| seed"] and "goodput" not in targets["| seed"]
    assert "**overload** (" in text and "objectives: TTFT 100.0 ms, TPOT 20.0 ms" in text
    assert "**seed** (" in text and "no objectives" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")]
    ours = [r for r in rows if r[0] == "| **prefixroute**"]
    assert len(ours) == 2
    assert ours[0][6].endswith("pt") and ours[0][7].endswith("x") and ours[0][8].endswith("x |")
    runs = json.loads(out.read_text())["results"]
    assert [(r["scenario"], r["policy"]) for r in runs] == [
        (s, p)
        for s in ("overload", "seed")
        for p in ("round-robin", "least-request", "prefixroute")
    ]
    assert all(r["slo"]["requests"] == r["requests"] for r in runs[:3])
    assert all(r["slo"]["requests"] == 0 for r in runs[3:])


def test_the_capacity_sweep(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import predictive

    argv = ["--capacity", "overload", "--rates", "20,600", "--duration", "2"]
    assert predictive.main([*argv, "--policies", "round-robin"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| policy | offered req/s | served req/s |")
    assert rows[1].startswith("| round-robin | 20 |") and rows[1].endswith("| yes |")
    assert rows[2].startswith("| round-robin | 600 |") and rows[2].endswith("| no |")


def test_the_objectives_rule(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import predictive

    assert [predictive.round_up(x) for x in (53, 100, 120, 193, 1466, 18.6, 22.8, 25.3)] == [
        100,
        100,
        200,
        200,
        2000,
        20,
        25,
        30,
    ]
    argv = ["--objectives", "--no-bursts", "--duration", "2", "--workers", "1"]
    argv += ["--scenarios", "overload", "--policies", "round-robin,least-request,prefixroute"]
    assert predictive.main(argv) == 0
    text = capsys.readouterr().out
    rows = {line.split(" | ")[0]: line.split(" | ") for line in text.splitlines()}
    assert set(rows) >= {"| round-robin", "| least-request", "| prefixroute"}
    p90 = {
        k.removeprefix("| "): float(v[1])
        for k, v in rows.items()
        if k.startswith("| ") and v[1][0].isdigit()
    }
    best = min(p90["round-robin"], p90["least-request"])  # peers only
    assert f"Lowest peer p90: TTFT {best:.1f} (" in text
