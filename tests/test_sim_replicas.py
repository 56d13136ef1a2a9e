"""Router replicas in the simulator (`prefixroute.sim.replicas`): balance, sharing, validation."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from benchmarks import replicas as replicas_benchmark

from prefixroute.config import ConfigError
from prefixroute.request import Request
from prefixroute.schema import DocumentError
from prefixroute.sim.compare import make_source, run_policy
from prefixroute.sim.policy import load_policy
from prefixroute.sim.replicas import CARRIES, Balancer, Routers
from prefixroute.sim.report import format_fairness, format_table
from prefixroute.sim.scenario import Scenario
from prefixroute.sim.schema import ScenarioError
from prefixroute.sim.simulation import Simulation
from prefixroute.sim.source import SimRequest

# `scenario`: test_sim_simulation's 30 Zipf tenants, whose prompts (about 30k tokens) fit the
# fleet's KV (60k) but not one pod's: where a tenant's prefix lands decides its hits.
from tests.test_sim_simulation import scenario


def comparable(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in ("wall_s", "events_per_s", "routers")}


def columns(sim: Simulation) -> dict[str, list[Any]]:
    """Every per-request outcome column (NaN-safe: as text)."""
    out = sim.outcomes
    return {
        name: [repr(v) for v in getattr(out, name)]
        for name in ("arrival_s", "tenant", "endpoint", "status", "cached_tokens", "ttft_s")
    }


def hit(sc: Scenario, policy: str = "prefixroute", **routers: Any) -> float:
    summary = run_policy(sc.with_overrides(routers=Routers(**routers)), load_policy(policy)).summary
    return float(summary["hit_rate"])


# -- one replica is the simulator as it was ---------------------------------------------


@pytest.mark.parametrize("policy", ["prefixroute", "prefixroute-precise", "prefixroute-fair-queue"])
def test_one_replica_is_identical_to_no_routers_option(policy: str) -> None:
    plain = run_policy(scenario(), load_policy(policy))
    assert plain.summary["routers"] == {
        "replicas": 1,
        "balance": "round-robin",
        "sharing": "none",
        "delay_s": 0.0,
        "carry": ["completions", "sessions"],
        "requests": [plain.summary["requests"]],
    }
    # every other setting is moot with one replica: nothing to balance or share
    for routers in (
        {"replicas": 1},
        {"replicas": 1, "balance": "random", "sharing": "decisions", "delay_s": 0.5},
        {"replicas": 1, "balance": "hash", "sharing": "none"},
    ):
        run = run_policy(scenario(routers=routers), load_policy(policy))
        assert comparable(run.summary) == comparable(plain.summary)
        assert columns(run.simulation) == columns(plain.simulation)


# -- sharing ------------------------------------------------------------------------------


def test_four_replicas_sharing_nothing_lose_hit_rate() -> None:
    """Each replica sees a quarter of the traffic: prefixes scatter. Fails if they shared."""
    for seed in (3, 4):
        sc = scenario(seed=seed)
        one = hit(sc)
        four = hit(sc, replicas=4, sharing="none")
        assert four < one - 0.05, (seed, one, four)


def test_sharing_decisions_recovers_most_of_the_loss() -> None:
    for seed in (3, 4):
        sc = scenario(seed=seed)
        one = hit(sc)
        none = hit(sc, replicas=4, sharing="none")
        shared = hit(sc, replicas=4, sharing="decisions")
        late = hit(sc, replicas=4, sharing="decisions", delay_s=0.05)
        assert shared >= one - 0.01, (seed, one, shared)
        assert late - none >= 0.8 * (one - none), (seed, one, none, late)


def test_sharing_events_agrees_for_a_precise_policy_and_shares_nothing_for_an_approximate_one() -> (
    None
):
    sc = scenario()
    one = hit(sc, "prefixroute-precise")
    events = hit(sc, "prefixroute-precise", replicas=4, sharing="events")
    none = hit(sc, "prefixroute-precise", replicas=4, sharing="none")
    assert events >= one - 0.01
    assert none < one - 0.05  # no replica subscribes: approximate, each on its own
    # an approximate policy reads no events: `events` is `none`
    a = run_policy(
        scenario(routers={"replicas": 4, "sharing": "events"}), load_policy("prefixroute")
    )
    b = run_policy(scenario(routers={"replicas": 4, "sharing": "none"}), load_policy("prefixroute"))
    assert comparable(a.summary) == comparable(b.summary)
    assert a.summary["kv_events"]["enabled"] is False


@pytest.mark.parametrize("sharing", ["none", "decisions"])
def test_each_replica_counts_in_flight_what_it_shares(sharing: str) -> None:
    """With `decisions` (no delay) a replica's counts are every replica's; with `none` its own."""
    seen = []

    def check(_t: float) -> None:
        sim = box[0]
        pending = list(sim._pending.values())
        everyone = Counter(d.endpoint for _, d, _ in pending)
        for j, router in enumerate(sim.replicas):
            own = Counter(d.endpoint for _, d, k in pending if k == j)
            assert router.load.local_requests_view() == dict(own)
            if sharing == "decisions":
                sim._sync_peers(j)  # what the next route of replica j does first
                want = everyone
            else:
                want = own
            for eid in sim.ids:
                assert router.load.requests(eid) == want.get(eid, 0), (j, eid)
            router.load.check_invariants()
        seen.append(sum(everyone.values()))

    sc = scenario(routers={"replicas": 3, "sharing": sharing})
    box: list[Simulation] = []
    policy = load_policy("prefixroute")
    sim = Simulation(
        [policy.build(sc.seed, replica=k) for k in range(3)],
        make_source(sc),
        endpoints=sc.endpoints,
        engine=sc.engine,
        cost=sc.cost,
        duration_s=sc.duration_s,
        progress=check,
        seed=sc.seed,
        routers=sc.routers,
    )
    box.append(sim)
    sim.run()
    assert max(seen) > 3  # the check saw requests in flight on several replicas


class Scripted:
    """The same 2,000-token prompt at the given times (one tenant, no follow-ups)."""

    def __init__(self, times: list[float]) -> None:
        self.times = times

    def arrivals(self) -> Iterator[SimRequest]:
        tokens = np.arange(2_000, dtype=np.uint32)
        for n, t in enumerate(self.times):
            request = Request("m", token_ids=tokens, max_tokens=10, request_id=f"r{n}")
            yield SimRequest(arrival_s=t, request=request, output_tokens=10, kind="tenant")

    def follow_up(self, done: SimRequest, finished_s: float, ok: bool) -> None:
        return None


def matched(times: list[float], **routers: Any) -> list[int]:
    """Blocks each decision matched, for requests sent round-robin to `routers.replicas`."""
    sc = scenario()
    routing = Routers(**routers)
    policy = load_policy("prefixroute")
    sim = Simulation(
        [policy.build(0, replica=k) for k in range(routing.replicas)],
        Scripted(times),
        endpoints=3,
        engine=sc.engine,
        cost=sc.cost,
        duration_s=max(times) + 1,
        routers=routing,
    )
    seen: list[int] = []
    for router in sim.replicas:
        route = router.route

        def watched(*args: Any, _route: Any = route, **kwargs: Any) -> Any:
            out = _route(*args, **kwargs)
            seen.append(out.matched_blocks)
            return out

        router.route = watched  # type: ignore[method-assign]
    sim.run()
    return seen


def test_a_shared_decision_reaches_the_others_delay_s_later_and_expires_after_its_ttl() -> None:
    """Replica 0 decides at 0 s; replica 1 routes the same prompt at 0.5 s, replica 2 at 40 s."""
    times = [0.0, 0.5, 40.0]
    full = 2_000 // 16  # blocks of the prompt
    assert matched(times, replicas=3) == [0, 0, 0]  # sharing nothing
    # records of blocks only, 0.1 s late: replica 1 knows replica 0's decision; replica 2 at
    # 40 s no longer does (both decisions expired 30 s after they arrived)
    blocks = matched(times, replicas=3, sharing="decisions", delay_s=0.1, carry=[])
    assert blocks == [0, full, 0]
    # with completions carried, the others confirm the blocks as the deciding replica does
    assert matched(times, replicas=3, sharing="decisions", delay_s=0.1) == [0, full, full]
    # 1 s late: replica 0's decision has not arrived when replica 1 routes
    assert matched(times, replicas=3, sharing="decisions", delay_s=1.0)[:2] == [0, 0]
    # one replica confirms its own decision at completion: it keeps it
    assert matched([0.0, 40.0], replicas=1) == [0, full]


def test_replicas_sharing_everything_at_once_decide_as_one_router() -> None:
    """Decision records with everything a router records, no delay: one router's run."""
    one = run_policy(scenario(), load_policy("prefixroute"))
    four = run_policy(
        scenario(routers={"replicas": 4, "sharing": "decisions", "carry": list(CARRIES)}),
        load_policy("prefixroute"),
    )
    # the same run but for which endpoint a random tie-break named (replicas' own seeds)
    a, b = comparable(four.summary), comparable(one.summary)
    # with `latency` carried every replica's model learned every completion: the same errors,
    # counted once per replica
    ma, mb = a.pop("latency_model"), b.pop("latency_model")
    assert ma["samples"] == 4 * mb["samples"] and ma["ttft_mae_s"] == mb["ttft_mae_s"]
    assert sorted(a.pop("endpoint_requests")) == sorted(b.pop("endpoint_requests"))
    assert a == b
    same = columns(four.simulation)
    del same["endpoint"]
    like_one = columns(one.simulation)
    del like_one["endpoint"]
    assert same == like_one
    # without the cold placements the cold-request spreader of each replica goes its own way
    apart = run_policy(
        scenario(routers={"replicas": 4, "sharing": "decisions"}), load_policy("prefixroute")
    )
    assert columns(apart.simulation)["ttft_s"] != like_one["ttft_s"]


# -- balance ------------------------------------------------------------------------------


def test_round_robin_spreads_evenly_and_hash_keeps_a_tenant_on_one_replica() -> None:
    rr = run_policy(scenario(routers={"replicas": 3}), load_policy("prefixroute"))
    counts = rr.summary["routers"]["requests"]
    assert max(counts) - min(counts) <= 1 and sum(counts) == rr.summary["requests"]

    balancer = Balancer(Routers(replicas=4, balance="hash"), seed=0)
    picks = {
        t: {balancer.pick(Request("m", tenant=t, prompt="x")) for _ in range(5)} for t in "abcdefgh"
    }
    assert all(len(p) == 1 for p in picks.values())
    spread = Counter(balancer.pick(Request("m", tenant=f"t{i}", prompt="x")) for i in range(4000))
    assert set(spread) == {0, 1, 2, 3} and min(spread.values()) > 600  # a ring of 1,024 points
    # a session moves a request of its tenant onto the session's own point of the ring
    sessions = {
        balancer.pick(Request("m", tenant="a", session=f"s{i}", prompt="x")) for i in range(50)
    }
    assert len(sessions) > 1


def test_random_balance_is_seeded() -> None:
    def picks(seed: int) -> list[int]:
        balancer = Balancer(Routers(replicas=8, balance="random"), seed=seed)
        return [balancer.pick(Request("m", prompt="x")) for _ in range(200)]

    assert picks(1) == picks(1) != picks(2)
    assert set(picks(1)) == set(range(8))


def test_same_seed_same_result_with_replicas() -> None:
    routers = {"replicas": 4, "balance": "random", "sharing": "decisions", "delay_s": 0.02}
    policy = load_policy("prefixroute")
    a = run_policy(scenario(routers=routers), policy)
    b = run_policy(scenario(routers=routers), policy)
    assert comparable(a.summary) == comparable(b.summary)
    assert columns(a.simulation) == columns(b.simulation)
    c = run_policy(scenario(routers=routers, seed=4), policy)
    assert comparable(c.summary) != comparable(a.summary)


# -- reports ------------------------------------------------------------------------------


def test_reports_name_the_replicas_and_merge_the_ledgers() -> None:
    one = run_policy(scenario(), load_policy("prefixroute")).summary
    four = run_policy(
        scenario(routers={"replicas": 4, "sharing": "decisions", "delay_s": 0.01}),
        load_policy("prefixroute"),
    ).summary
    table = format_table([one, four])
    assert "prefixroute x4 decisions 10ms" in table
    assert "prefixroute x4 decisions 10ms" in format_fairness([one, four])
    assert table.splitlines()[2].startswith("prefixroute ")
    assert four["tenants"]["prediction_mae"] is not None
    assert four["routers"]["requests"] == [
        four["requests"] // 4 + (k < four["requests"] % 4) for k in range(4)
    ]


# -- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("routers", "path", "words"),
    [
        ({"replicas": 0}, "routers.replicas", "must be >= 1, got 0"),
        ({"replicas": 2.5}, "routers.replicas", "must be an integer"),
        ({"balance": "least-loaded"}, "routers.balance", "round-robin, random, hash"),
        ({"sharing": "redis"}, "routers.sharing", "none, decisions, events"),
        ({"delay_s": -1}, "routers.delay_s", "must be >= 0"),
        ({"replica": 2}, "routers.replica", "unknown key"),
        ({"carry": ["blocks"]}, "routers.carry", "among completions, cold, sessions"),
        ({"carry": ["cold", "cold"]}, "routers.carry", "twice"),
        ({"carry": "cold"}, "routers.carry", "must be a list"),
        ([4], "routers", "must be a mapping"),
    ],
)
def test_invalid_routers_are_document_errors_naming_the_field(
    routers: object, path: str, words: str
) -> None:
    with pytest.raises(ScenarioError) as err:
        scenario(routers=routers)
    assert err.value.path == path
    assert words in str(err.value)


def test_a_policy_sets_its_own_routers_and_wins_over_the_scenario(tmp_path: Path) -> None:
    good = tmp_path / "four.yaml"
    good.write_text("simulator:\n  routers: {replicas: 4, sharing: decisions}\n")
    policy = load_policy(good)
    assert policy.routers == Routers(replicas=4, sharing="decisions")
    run = run_policy(scenario(routers={"replicas": 2}), policy)
    assert run.summary["routers"]["replicas"] == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("simulator:\n  routers: {replicas: 0}\n")
    with pytest.raises(ConfigError) as err:
        load_policy(bad)
    assert isinstance(err.value, DocumentError)
    assert err.value.path == "simulator.routers.replicas"


def test_routers_values_are_checked_when_built_in_code() -> None:
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        Routers(replicas=0)
    with pytest.raises(ValueError, match="balance must be one of"):
        Routers(balance="least")
    with pytest.raises(ValueError, match="sharing must be one of"):
        Routers(sharing="all")
    with pytest.raises(ValueError, match="delay_s must be finite"):
        Routers(delay_s=float("inf"))
    with pytest.raises(ValueError, match="carry items must be among"):
        Routers(carry=["everything"])
    assert Routers(carry=["sessions", "cold"]).carry == ("cold", "sessions")
    sc = scenario()
    policy = load_policy("prefixroute")
    with pytest.raises(ValueError, match=r"routers\.replicas is 2 but 1 routers were given"):
        Simulation(
            policy.build(0),
            make_source(sc),
            endpoints=1,
            engine=sc.engine,
            cost=sc.cost,
            duration_s=1,
            routers=Routers(replicas=2),
        )


# -- the benchmark ------------------------------------------------------------------------


def test_the_replicas_benchmark_quick_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs.json"
    argv = ["--quick", "--scenarios", "tenants-500,noisy-neighbour", "--replicas", "1,4"]
    assert replicas_benchmark.main([*argv, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| scenario | replicas | sharing | hit rate |")
    body = rows[1:]
    assert [r.split(" | ")[1:3] for r in body] == [
        ["1", "-"],
        ["4", "none"],
        ["4", "decisions 50ms"],
    ] * 2
    assert "tenants-500: 4 replicas sharing decisions: hit rate" in text
    assert "noisy-neighbour: 4 replicas sharing decisions: hit rate" in text
    runs = json.loads(out.read_text())["results"]
    assert [r["routers"]["replicas"] for r in runs] == [1, 4, 4] * 2
    # sharing nothing loses hit rate on the prefix-heavy scenario even in a few seconds
    assert runs[1]["hit_rate"] < runs[0]["hit_rate"] - 0.05
