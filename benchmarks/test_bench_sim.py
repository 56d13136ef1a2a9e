"""pytest-benchmark suite for the simulator: one engine step, and a short whole simulation.

- `test_decode_step`: one `begin_step` + `end_step` pair of an engine whose
  batch is all decodes (64 or 512 running sequences, Llama-3-8B costs). The
  engine keeps decoding sequences implicit (heaps keyed by step number), so
  the step itself does not visit them; what grows with the batch is block
  allocation: each sequence takes a new block every 16 steps, n / 16 heap
  pops and allocations per step on average (prompts of varied lengths
  spread them over the steps). Outputs are 100,000 tokens and the pool holds 2M tokens, so the timed
  steps never finish a request, never preempt and never run out of work.
- `test_short_simulation`: `run_policy` on `tenants-50` for 5 simulated
  seconds on 2 endpoints (about 400 requests), prefixroute and round-robin.

`benchmarks/sim_speed.py` measures whole scenarios; its figures are in
`docs/performance.md`.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from prefixroute import Request
from prefixroute.sim.compare import run_policy
from prefixroute.sim.cost import PROFILES
from prefixroute.sim.engine import Engine, EngineConfig
from prefixroute.sim.policy import load_policy
from prefixroute.sim.scenario import load_scenario
from prefixroute.sim.source import SimRequest

BLOCK = 16


def decoding_engine(running: int) -> Engine:
    """An engine whose `running` sequences have all finished prefill and decode."""
    engine = Engine(EngineConfig(kv_capacity_tokens=2_000_000), PROFILES["llama3-8b-h100"])
    rng = np.random.default_rng(0)
    keys = itertools.count()
    for i in range(running):
        n = int(rng.integers(256, 768))
        tokens = rng.integers(0, 128_000, n, dtype=np.uint32)
        sim = SimRequest(
            arrival_s=0.0,
            request=Request(model="m", token_ids=tokens),
            output_tokens=100_000,
            kind="bench",
            user=i,
        )
        engine.add(sim, [next(keys) for _ in range(n // BLOCK)], 0.0)
    now = 0.0
    while not (engine.itl_tokens and engine.itl_tokens[-1] == running):
        dt = engine.begin_step(now)
        assert dt is not None
        now += dt
        assert not engine.end_step(now)
    assert engine.running == running and engine.waiting == 0
    return engine


@pytest.mark.parametrize("running", [64, 512])
def test_decode_step(benchmark: Any, running: int) -> None:
    engine = decoding_engine(running)
    clock = [0.0]

    def step() -> None:
        dt = engine.begin_step(clock[0])
        assert dt is not None
        clock[0] += dt
        assert not engine.end_step(clock[0])

    benchmark.pedantic(step, rounds=2000, warmup_rounds=100)
    assert engine.stats.preemptions == 0
    assert engine.itl_tokens[-1] == running


@pytest.mark.parametrize("policy", ["prefixroute", "round-robin"])
def test_short_simulation(benchmark: Any, policy: str) -> None:
    scenario = load_scenario("tenants-50").with_overrides(endpoints=2, duration_s=5.0)
    chosen = load_policy(policy)

    def simulate() -> dict[str, Any]:
        return run_policy(scenario, chosen).summary

    summary = benchmark.pedantic(simulate, rounds=5, warmup_rounds=1)
    assert summary["requests"] > 300
    assert summary["completed"] == summary["requests"]
