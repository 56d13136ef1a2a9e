"""KV events in the simulator: delay, loss and gaps, restarts, precise mode, vLLM's block pool."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from prefixroute.blocks import Blocker
from prefixroute.config import ConfigError
from prefixroute.request import Request
from prefixroute.sim.compare import make_source, run_policy
from prefixroute.sim.cost import PROFILES
from prefixroute.sim.engine import Engine, EngineConfig, replay_cached_tokens
from prefixroute.sim.policy import load_policy
from prefixroute.sim.scenario import load_scenario
from prefixroute.sim.schema import ScenarioError
from prefixroute.sim.simulation import EventLink, Restart, Simulation
from prefixroute.sim.source import SimRequest

COST = PROFILES["qwen3-0.6b-h100"]


def scenario(**extra: Any) -> dict[str, Any]:
    """A small fleet under KV pressure: 2 engines of 400 blocks, 30 tenants, 20 s."""
    doc: dict[str, Any] = {
        "name": "events-test",
        "duration_s": 20,
        "endpoints": {"count": 2, "kv_capacity_tokens": 16 * 400},
        "workload": {
            "arrival": {"process": "poisson", "rate_rps": 12},
            "tenants": {"count": 30, "zipf_exponent": 1.0, "system_prompt_tokens": [200, 900]},
            "mix": {"tenant": {"weight": 1, "question_tokens": [10, 60], "max_tokens": [5, 30]}},
        },
    }
    if "kv_events" in extra:
        doc["endpoints"]["kv_events"] = extra.pop("kv_events")
    doc.update(extra)
    return doc


def engine_hashes(engine: Engine) -> set[int]:
    return set(engine._cached)


# -- vLLM 0.32's block pool -------------------------------------------------------------


def test_a_fully_cached_prompt_recomputes_its_last_block() -> None:
    # vLLM: max_cache_hit_length = num_tokens - 1, whole blocks (kv_cache_manager.py)
    prompt = list(range(96))  # 3 blocks of 32
    assert replay_cached_tokens([prompt, prompt, prompt[:95], [*prompt, 7]], num_blocks=16) == [
        0,
        64,  # (96 - 1) // 32 blocks
        64,  # a prefix of it: 2 whole blocks of its 94 reusable tokens
        96,  # one token more: every block is reusable
    ]


def test_the_null_block_holds_nothing() -> None:
    # vLLM's BlockPool keeps block 0 back: num_gpu_blocks - 1 blocks hold tokens. Each
    # request takes 3 blocks (2 full, 1 partial); the partial one goes back to the free
    # queue's head, the full ones to its tail, a's tail block before its head block.
    a, b = list(range(65)), list(range(1000, 1065))
    assert replay_cached_tokens([a, b, a], num_blocks=6) == [0, 0, 64]  # 5 usable: room
    assert replay_cached_tokens([a, b, a], num_blocks=5) == [0, 0, 32]  # a's tail evicted
    assert replay_cached_tokens([a, b, a], num_blocks=4) == [0, 0, 0]  # all of a
    with pytest.raises(ValueError, match="KV capacity"):
        replay_cached_tokens([a], num_blocks=3)


def test_generated_blocks_are_cached_and_hit_by_the_next_turn() -> None:
    prompt, reply = list(range(50)), list(range(500, 530))
    turn2 = prompt + reply + [9] * 5
    without = replay_cached_tokens([prompt, turn2], num_blocks=32, output_tokens=30)
    with_ids = replay_cached_tokens(
        [prompt, turn2], num_blocks=32, output_tokens=30, output_token_ids=[reply, None]
    )
    assert without == [0, 32]  # only the prompt's full block
    assert with_ids == [0, 64]  # the reply's tokens filled a second block the engine hashed


def test_duplicate_blocks_are_stored_twice_and_removed_per_block() -> None:
    # BlockHashToBlockMap keeps both blocks; events are per block
    blocker = Blocker()
    engine = Engine(
        EngineConfig(kv_capacity_tokens=32 * 6, block_size=32), COST, record_events=True
    )
    tokens = np.arange(64, dtype=np.uint32)
    keys = blocker.hash_tokens(tokens, 0, 32).tolist()

    def serve(toks: np.ndarray, ks: list[int]) -> int:
        sim = SimRequest(0.0, Request(model="m", token_ids=toks, max_tokens=1), 1, "t")
        h = engine.add(sim, ks, 0.0)
        while not engine.finished(h):
            dt = engine.begin_step(0.0)
            assert dt is not None
            engine.end_step(dt)
            engine.check_invariants()
        return engine.cached_tokens(h) or 0

    assert serve(tokens, keys) == 0
    assert serve(tokens, keys) == 32  # the last block recomputed into a new block ...
    stored, _ = engine.drain_events()
    assert stored.count(keys[1]) == 2  # ... and cached again under the same hash
    other = np.arange(1000, 1096, dtype=np.uint32)  # 3 blocks: evicts the older copy
    serve(other, blocker.hash_tokens(other, 0, 32).tolist())
    _, removed = engine.drain_events()
    assert keys[1] in removed
    assert engine.cached_prefix_blocks(keys) == 2  # the other copy still holds it


# -- events: delay, loss, replay ------------------------------------------------------------


def test_precise_index_equals_the_engines_caches_with_lossless_events() -> None:
    run = run_policy(load_scenario(scenario()), load_policy("prefixroute-precise"))
    sim = run.simulation
    router = sim.router
    assert router.precise_endpoints == frozenset(sim.ids)
    assert sim.event_stats.batches > 0 and sim.event_stats.gaps == 0
    assert sum(e.stats.preemptions for e in sim.engines) == 0
    router.index.expire(float("inf"))  # what is left is what the events confirmed
    for eid, engine in zip(sim.ids, sim.engines, strict=True):
        held = engine_hashes(engine)
        assert held and router.index.size(eid) == len(held)
        assert all(eid in router.index.holders(k) for k in held)
    p = run.summary["prediction"]
    assert p["exact"] + p["over"] + p["under"] == pytest.approx(1.0)
    assert p["exact"] > 0.9  # misses: speculation ahead of a concurrent prefill's events


def test_lost_batches_make_gaps_that_clear_the_endpoint_and_drift_the_index() -> None:
    doc = scenario(kv_events={"delay_s": 0.02, "loss": 0.05})
    run = run_policy(load_scenario(doc), load_policy("prefixroute-precise"))
    st = run.simulation.event_stats
    assert st.lost > 0 and st.gaps > 0
    assert st.cleared >= st.gaps and st.replayed == 0
    lossless = run_policy(load_scenario(scenario()), load_policy("prefixroute-precise"))
    # cleared endpoints forget blocks their engines still hold: the index under-predicts
    assert run.summary["prediction"]["under"] > lossless.summary["prediction"]["under"]


def test_replay_recovers_every_lost_batch() -> None:
    doc = scenario(kv_events={"delay_s": 0.02, "loss": 0.05, "replay": True})
    run = run_policy(load_scenario(doc), load_policy("prefixroute-precise"))
    sim = run.simulation
    st = sim.event_stats
    assert st.lost > 0 and st.gaps > 0 and st.cleared == 0
    assert st.replayed <= st.lost  # a lost last batch is never asked for
    sim.router.index.expire(float("inf"))
    for eid, engine in zip(sim.ids, sim.engines, strict=True):
        held = engine_hashes(engine)
        # exact but for the batches lost after the last batch that arrived
        assert abs(sim.router.index.size(eid) - len(held)) <= 64


def test_delayed_events_arrive_after_the_delay() -> None:
    sc = load_scenario(scenario(duration_s=2))
    policy = load_policy("prefixroute-precise")
    sim = Simulation(
        policy.build(0),
        make_source(sc),
        endpoints=1,
        engine=sc.engine,
        cost=sc.cost,
        duration_s=sc.duration_s,
        kv_events=True,
        precise=True,
        link=EventLink(delay_s=10.0),  # longer than the run: nothing arrives in time
    )
    sim.run()
    assert sim.event_stats.batches > 0
    sim.router.index.expire(float("inf"))
    assert sim.router.index.size(sim.ids[0]) == 0


# -- restarts -------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["prefixroute", "prefixroute-precise", "round-robin"])
def test_a_restart_loses_no_request_and_the_engine_serves_again(policy: str) -> None:
    doc = scenario(duration_s=30, restarts=[{"endpoint": 1, "at_s": 8, "down_s": 6}])
    run = run_policy(load_scenario(doc), load_policy(policy))
    sim = run.simulation
    out = sim.outcomes
    assert sim.event_stats.restarts == 1 and len(sim.retired) == 1
    assert len(out.status) == run.summary["requests"]
    assert set(out.status) <= {200, 502, 503}
    failed = sum(s != 200 for s in out.status)
    assert failed == sim.event_stats.failed and failed < 0.05 * len(out.status)
    on_e1 = [
        (a, s) for a, e, s in zip(out.arrival_s, out.endpoint, out.status, strict=True) if e == 1
    ]
    # nothing routed there while it was down (scrapes every 50 ms; 5 ms to reach it)
    assert not [a for a, s in on_e1 if 8.0 < a < 14.0 and s == 200]
    assert [a for a, s in on_e1 if a > 15.0 and s == 200]  # and it serves again
    assert sim.event_stats.cleared >= 1  # the router forgot its old blocks


def test_restart_scenario_fields_are_checked() -> None:
    sc = load_scenario(scenario(restarts=[{"endpoint": 1, "at_s": 5, "down_s": 2}]))
    assert sc.restarts == (Restart(endpoint=1, at_s=5.0, down_s=2.0),)
    with pytest.raises(ScenarioError, match=r"restarts\[0\].endpoint"):
        load_scenario(scenario(restarts=[{"endpoint": 2, "at_s": 5}]))
    with pytest.raises(ScenarioError, match=r"endpoints\.kv_events\.loss"):
        load_scenario(scenario(kv_events={"loss": 1.5}))
    with pytest.raises(ScenarioError, match=r"kv_events\.lag"):
        load_scenario(scenario(kv_events={"lag": 1}))
    assert load_scenario("kv-pressure-restarts").restarts


def test_precise_policy_needs_kv_events(tmp_path: Any) -> None:
    assert load_policy("prefixroute-precise").precise
    bad = tmp_path / "p.yaml"
    bad.write_text("simulator: {precise: true}\n")
    with pytest.raises(ConfigError, match=r"simulator\.precise"):
        load_policy(bad)


def test_keeping_the_index_on_a_gap_clears_nothing() -> None:
    doc = scenario(kv_events={"delay_s": 0.02, "loss": 0.05, "on_gap": "keep"})
    st = run_policy(load_scenario(doc), load_policy("prefixroute-precise")).simulation.event_stats
    assert st.gaps > 0 and st.cleared == 0 and st.replayed == 0


def test_a_request_admitted_in_the_same_step_hits_the_blocks_being_computed() -> None:
    # vLLM hashes blocks when their step is scheduled (allocate_slots -> cache_blocks)
    blocker = Blocker()
    engine = Engine(EngineConfig(kv_capacity_tokens=16 * 64), COST)
    handles = []
    for tail in (1, 2):
        tokens = np.asarray([*range(100), tail], dtype=np.uint32)
        sim = SimRequest(0.0, Request(model="m", token_ids=tokens, max_tokens=1), 1, "t")
        handles.append(engine.add(sim, blocker.hash_tokens(tokens, 0, 16).tolist(), 0.0))
    dt = engine.begin_step(0.0)  # both prefills in one step
    assert dt is not None
    engine.end_step(dt)
    engine.check_invariants()
    assert [engine.cached_tokens(h) for h in handles] == [0, 96]
