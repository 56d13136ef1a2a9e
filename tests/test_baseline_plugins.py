"""The simulator's baseline policies (`sim/policies/*.yaml`) load and do what they say."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from prefixroute import Decision, Request, Router, Usage
from prefixroute.blocks import HashMode
from prefixroute.pickers import CacheAwarePicker, RandomPicker, RoundRobinPicker
from prefixroute.scorers import ConsistentHashScorer, KVCostScorer
from prefixroute.sim.policy import load_policy
from tests.helpers import endpoint

POLICIES = Path(__file__).resolve().parent.parent / "src" / "prefixroute" / "sim" / "policies"
BASELINES = [
    "round-robin",
    "random",
    "least-request",
    "p2c",
    "session-hash",
    "sglang-cache-aware",
    "dynamo-kv",
]
EPS = [endpoint(i) for i in range(3)]


def load(name: str) -> Router:
    return load_policy(name).build(0)


def route(router: Router, request: Request, now: float = 0.0) -> Decision:
    decision = router.route(request, EPS, now)
    assert isinstance(decision, Decision)
    return decision


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_loads_and_says_what_it_models(name: str) -> None:
    text = (POLICIES / f"{name}.yaml").read_text(encoding="utf-8")
    header = text.split("\n\n")[0].splitlines()
    assert header[0].startswith("# Baseline:")
    assert any(line.startswith("# Source:") for line in header)
    assert any(line.startswith("# Parameters:") for line in header)
    router = load(name)
    assert router.profile.name == name
    assert [n for n, _ in router.profile.filters] == ["healthy-filter", "model-filter"]


def test_baseline_parameters_are_the_peers_defaults() -> None:
    assert isinstance(load("round-robin").profile.picker[1], RoundRobinPicker)
    assert isinstance(load("random").profile.picker[1], RandomPicker)
    assert load("sglang-cache-aware").profile.picker[1] == CacheAwarePicker()
    assert load("sglang-cache-aware").profile.weights == (0.0,)
    dynamo = load("dynamo-kv")
    assert dynamo.blocker.mode is HashMode.TOKEN and dynamo.blocker.block_size == 16
    assert dynamo.confirm_on_complete is False
    assert dynamo.profile.scorers[0].scorer == KVCostScorer()
    session = load("session-hash").profile.scorers[0].scorer
    assert session == ConsistentHashScorer(key="session-or-tenant")


def test_round_robin_cycles_through_the_endpoints() -> None:
    router = load("round-robin")
    chosen = [route(router, Request(model="m", prompt=f"p{i}")).endpoint for i in range(6)]
    assert chosen == ["e0", "e1", "e2", "e0", "e1", "e2"]


def test_least_request_and_p2c_follow_in_flight_requests() -> None:
    least = load("least-request")
    chosen = [route(least, Request(model="m", prompt=f"p{i}")).endpoint for i in range(6)]
    assert Counter(chosen) == {"e0": 2, "e1": 2, "e2": 2}
    p2c = load("p2c")
    chosen = [route(p2c, Request(model="m", prompt=f"p{i}")).endpoint for i in range(30)]
    assert max(Counter(chosen).values()) - min(Counter(chosen).values()) <= 2


def test_session_hash_pins_sessions_and_balances_the_rest() -> None:
    router = load("session-hash")
    for s in range(5):
        owners = {
            route(router, Request(model="m", prompt=f"t{t}", session=f"s{s}")).endpoint
            for t in range(4)
        }
        assert len(owners) == 1
    # Without a session the tenant is the key: one tenant, one endpoint.
    loose = load("session-hash")
    chosen = [
        route(loose, Request(model="m", prompt=f"p{i}", tenant="acme")).endpoint for i in range(6)
    ]
    assert len(set(chosen)) == 1
    spread = {
        route(loose, Request(model="m", prompt="p", tenant=f"t{i}")).endpoint for i in range(30)
    }
    assert spread == {"e0", "e1", "e2"}


def test_sglang_cache_aware_keeps_a_shared_prefix_on_one_endpoint() -> None:
    router = load("sglang-cache-aware")
    system = "You are a helpful assistant. " * 4
    first = route(router, Request(model="m", prompt=system + "Q1")).endpoint
    for i in range(2, 8):
        assert route(router, Request(model="m", prompt=system + f"Q{i}")).endpoint == first
    # `first` has 7 requests in flight (within the balance thresholds): misses go elsewhere
    cold = {route(router, Request(model="m", prompt=f"{i} other")).endpoint for i in range(6)}
    assert first not in cold


def test_dynamo_kv_trades_cached_blocks_against_in_flight_blocks() -> None:
    router = load("dynamo-kv")
    tokens = list(range(160))  # 10 blocks of 16
    warm = route(router, Request(model="m", token_ids=tokens, max_tokens=0))
    longer = Request(model="m", token_ids=[*tokens, *range(1000, 1160)], max_tokens=0)
    # With `warm` in flight its endpoint costs (20 - 10) + 10, the others 20 + 0: a tie.
    tied = route(router, longer, 0.5)  # within the 1 s the guesses live without events
    assert len(set(tied.totals)) == 1
    router.on_complete(warm, Usage(prompt_tokens=160), 0.6)
    router.on_complete(tied, Usage(prompt_tokens=320), 0.6)
    # Idle again: the endpoint holding all 20 (speculative) blocks costs 0, the rest 20 or 10.
    for now in (0.7, 0.8, 0.9):
        decision = route(router, longer, now)
        assert decision.endpoint == tied.endpoint
        router.on_complete(decision, Usage(prompt_tokens=320), now)
