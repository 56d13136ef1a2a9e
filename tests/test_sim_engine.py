"""The modelled vLLM engine: prefix caching, eviction order, preemption, chunking, costs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixroute.blocks import Blocker
from prefixroute.request import Request
from prefixroute.sim.cost import PROFILES, cost_profile
from prefixroute.sim.engine import Completion, Engine, EngineConfig
from prefixroute.sim.source import SimRequest

COST = PROFILES["qwen3-0.6b-h100"]
BLOCKER = Blocker()


def make(tokens: list[int] | np.ndarray, output: int = 4, t: float = 0.0) -> SimRequest:
    req = Request(model="m", token_ids=np.asarray(tokens, dtype=np.uint32), max_tokens=output)
    return SimRequest(arrival_s=t, request=req, output_tokens=output, kind="test")


def keys(sim: SimRequest) -> list[int]:
    return BLOCKER.keys(sim.request).tolist()  # type: ignore[no-any-return]


def run(engine: Engine, sims: list[SimRequest]) -> list[Completion]:
    """Add `sims` at t=0 and step the engine until it is idle."""
    for s in sims:
        engine.add(s, keys(s), 0.0)
    return drain(engine)


def drain(engine: Engine, t: float = 0.0) -> list[Completion]:
    done: list[Completion] = []
    for _ in range(100_000):
        dt = engine.begin_step(t)
        if dt is None:
            break
        t += dt
        done += engine.end_step(t)
        engine.check_invariants()
    return done


def test_repeat_prompt_hits_all_but_the_last_token() -> None:
    engine = Engine(EngineConfig(kv_capacity_tokens=16 * 64), COST)
    first = run(engine, [make(range(100))])
    second = run(engine, [make(range(100))])
    assert first[0].cached_tokens == 0
    assert second[0].cached_tokens == 96  # 6 full blocks of 100 tokens
    exact = run(engine, [make(range(32))])
    assert exact[0].cached_tokens == 16  # a full hit recomputes the last token: one block less
    s = engine.stats
    assert s.prefix_queries == 100 + 100 + 32
    assert s.prefix_hits == 96 + 16


def test_shared_prefix_hits_only_whole_shared_blocks() -> None:
    engine = Engine(EngineConfig(kv_capacity_tokens=16 * 64), COST)
    run(engine, [make(list(range(40)) + [7] * 10)])
    other = run(engine, [make(list(range(40)) + [9] * 10)])
    assert other[0].cached_tokens == 32


def test_outputs_are_exact_and_first_token_comes_first() -> None:
    engine = Engine(EngineConfig(kv_capacity_tokens=16 * 256), COST)
    sims = [make(range(i * 100, i * 100 + 50), output=n) for i, n in enumerate((1, 2, 17, 40))]
    done = run(engine, sims)
    assert sorted(c.output_tokens for c in done) == [1, 2, 17, 40]
    for c in done:
        assert c.received_s <= c.first_token_s <= c.finished_s
    assert engine.running == engine.waiting == 0
    assert engine.kv_usage == 0.0


def test_eviction_takes_least_recently_freed_and_tails_first() -> None:
    engine = Engine(EngineConfig(kv_capacity_tokens=16 * 9), COST)  # 8 + the null block
    a = make(range(0, 64), output=1)  # 4 blocks, freed first
    b = make(range(1000, 1064), output=1)  # 4 blocks, freed later
    run(engine, [a])
    run(engine, [b])
    ka, kb = keys(a), keys(b)
    assert engine.cached_prefix_blocks(ka) == 4 and engine.cached_prefix_blocks(kb) == 4
    # A one-block request whose blocks must be reused evicts a's tail first.
    c = make(range(5000, 5010), output=1)
    run(engine, [c])
    assert engine.cached_prefix_blocks(ka) == 3  # a's last block went first
    assert engine.cached_prefix_blocks(kb) == 4
    # c's block (partial: never hashed) went back to the queue's head, as vLLM's
    # free_blocks prepends unhashed blocks: the next allocation reuses it first.
    d = make(range(6000, 6040), output=1)  # 3 blocks
    run(engine, [d])
    assert engine.cached_prefix_blocks(ka) == 1  # c's block, then a's, tail to head
    assert engine.cached_prefix_blocks(kb) == 4


def test_hit_on_a_free_block_protects_it_from_eviction() -> None:
    engine = Engine(EngineConfig(kv_capacity_tokens=16 * 9), COST)
    a = make(range(0, 64), output=1)
    b = make(range(1000, 1064), output=1)
    run(engine, [a])
    run(engine, [b])
    run(engine, [make([*range(64), 1], output=1)])  # touches a's blocks again
    run(engine, [make(range(7000, 7060), output=1)])  # needs 4 blocks: b's are now oldest
    assert engine.cached_prefix_blocks(keys(a)) == 4
    assert engine.cached_prefix_blocks(keys(b)) < 4


def test_preemption_when_decode_outgrows_the_pool() -> None:
    engine = Engine(EngineConfig(kv_capacity_tokens=16 * 10), COST)
    sims = [make(range(i * 1000, i * 1000 + 30), output=60) for i in range(2)]
    done = run(engine, sims)
    assert engine.stats.preemptions > 0
    assert sorted(c.output_tokens for c in done) == [60, 60]
    assert max(c.preemptions for c in done) >= 1
    assert engine.stats.recompute_queries > 0


def test_chunked_prefill_spreads_a_long_prompt_over_steps() -> None:
    cfg = EngineConfig(kv_capacity_tokens=16 * 4096, max_num_batched_tokens=1024)
    engine = Engine(cfg, COST)
    engine.add(make(range(3000), output=1), keys(make(range(3000))), 0.0)
    steps = 0
    done: list[Completion] = []
    t = 0.0
    while not done:
        dt = engine.begin_step(t)
        assert dt is not None
        t += dt
        done = engine.end_step(t)
        steps += 1
    assert steps == 3  # 1024 + 1024 + 952 tokens


def test_max_num_seqs_bounds_the_batch() -> None:
    engine = Engine(EngineConfig(kv_capacity_tokens=16 * 512, max_num_seqs=2), COST)
    for i in range(5):
        s = make(range(i * 100, i * 100 + 20), output=10)
        engine.add(s, keys(s), 0.0)
    t = 0.0
    seen = 0
    while (dt := engine.begin_step(t)) is not None:
        assert engine.running <= 2
        t += dt
        seen += len(engine.end_step(t))
    assert seen == 5


def test_request_larger_than_the_pool_is_refused() -> None:
    engine = Engine(EngineConfig(kv_capacity_tokens=16 * 4), COST)
    big = make(range(100), output=1)
    assert not engine.fits(big)
    with pytest.raises(ValueError, match="KV capacity"):
        engine.add(big, keys(big), 0.0)


def test_cached_context_is_not_free() -> None:
    cold = COST.step_time(new_tokens=100, seqs=1, pairs=100 * 50.5, kv_tokens=100)
    warm = COST.step_time(new_tokens=100, seqs=1, pairs=100 * (4000 + 50.5), kv_tokens=4100)
    assert warm > cold
    full = COST.step_time(new_tokens=4100, seqs=1, pairs=4100 * 2050.5, kv_tokens=4100)
    assert warm < full  # but far cheaper than computing it


def test_cost_terms() -> None:
    llama = cost_profile("llama3-8b-h100")
    # Decode at batch 1 is bandwidth bound: about weights / bandwidth + overhead.
    one = llama.step_time(1, 1, 1000, 1000)
    weights_s = llama.weight_bytes / llama.hbm_bytes_per_s
    assert weights_s < one < weights_s + llama.step_overhead_s + 1e-3
    # A large prefill is compute bound: linear in tokens at the linear FLOP rate.
    big = llama.step_time(8192, 1, 8192 * 4096.5, 8192)
    assert big > 8192 * llama.linear_flops_per_token / llama.flops_per_s
    assert llama.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    with pytest.raises(KeyError, match="known"):
        cost_profile("gpt-5")


def test_usage_reports_what_vllm_reports() -> None:
    engine = Engine(EngineConfig(kv_capacity_tokens=16 * 64), COST)
    s = make(range(64), output=8)
    engine.add(s, keys(s), 0.0)
    assert engine.waiting == 1 and engine.running == 0
    dt = engine.begin_step(0.0)
    assert dt is not None
    assert engine.waiting == 0 and engine.running == 1
    assert 0.0 < engine.kv_usage <= 5 / 63  # the null block is not counted


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 3),  # shared prefix id
            st.integers(1, 120),  # prompt tail length
            st.integers(1, 40),  # output tokens
            st.integers(0, 3),  # steps before the next arrival
        ),
        min_size=1,
        max_size=25,
    ),
    st.integers(8, 40),
    st.integers(16, 256),
)
def test_every_request_finishes_and_invariants_hold(
    reqs: list[tuple[int, int, int, int]], blocks: int, budget: int
) -> None:
    cfg = EngineConfig(
        kv_capacity_tokens=16 * blocks, max_num_batched_tokens=budget, max_num_seqs=6
    )
    engine = Engine(cfg, COST)
    t = 0.0
    done: list[Completion] = []
    added = 0
    for prefix, tail, out, gap in reqs:
        tokens = list(range(prefix * 10_000, prefix * 10_000 + 40)) + [added + 50_000] * tail
        s = make(tokens, output=out)
        if not engine.fits(s):
            continue
        engine.add(s, keys(s), t)
        added += 1
        for _ in range(gap):
            if engine.busy:
                break
            dt = engine.begin_step(t)
            if dt is None:
                break
            t += dt
            done += engine.end_step(t)
            engine.check_invariants()
    done += drain(engine, t)
    assert len(done) == added
    for c in done:
        assert c.output_tokens == c.sim.output_tokens
        assert 0 <= c.cached_tokens < c.prompt_tokens
    s = engine.stats
    assert s.generated_tokens == sum(c.output_tokens for c in done)
    assert engine.kv_usage == 0.0
