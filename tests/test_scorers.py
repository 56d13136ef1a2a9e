from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from prefixroute import LoadTracker, Request
from prefixroute.endpoint import EndpointId
from prefixroute.scorers import (
    ColdSpreadScorer,
    ConsistentHashScorer,
    InflightScorer,
    KVCostScorer,
    KVUtilisationScorer,
    LoraAffinityScorer,
    PrefixAffinityScorer,
    QueueDepthScorer,
    SessionAffinityScorer,
)
from tests.helpers import context, endpoint


def test_prefix_affinity_is_matched_over_total_plus_length_term() -> None:
    eps = [endpoint(0), endpoint(1), endpoint(2)]
    ctx = context(total_blocks=100, matches={"e0": 100, "e1": 50})
    s = PrefixAffinityScorer(length_weight=0.2, length_ref_tokens=1600).score(ctx, eps)
    # e0: 0.8 * 1.0 + 0.2 * min(1, 1600/1600); e1: 0.8 * 0.5 + 0.2 * (800/1600)
    assert s == pytest.approx([1.0, 0.5, 0.0])
    pure = PrefixAffinityScorer(length_weight=0.0).score(ctx, eps)
    assert pure == pytest.approx([1.0, 0.5, 0.0])


def test_prefix_affinity_zero_for_prompts_without_full_blocks() -> None:
    eps = [endpoint(0)]
    assert PrefixAffinityScorer().score(context(total_blocks=0), eps) == [0.0]


def test_queue_depth_saturates() -> None:
    eps = [endpoint(0, waiting=0), endpoint(1, waiting=8), endpoint(2, waiting=1000)]
    s = QueueDepthScorer(scale=8).score(context(), eps)
    assert s[0] == 1.0 and s[1] == pytest.approx(0.5) and s[2] < 0.01


def test_kv_utilisation_prefers_free_cache() -> None:
    eps = [endpoint(0, kv_usage=0.25), endpoint(1, kv_usage=1.0)]
    assert KVUtilisationScorer().score(context(), eps) == [0.75, 0.0]


def test_inflight_counts_router_tracked_requests_and_tokens() -> None:
    load = LoadTracker()
    load.start(EndpointId("e1"), 16384)
    for _ in range(8):
        load.start(EndpointId("e2"), 0)
    eps = [endpoint(0), endpoint(1), endpoint(2)]
    s = InflightScorer(request_scale=8, token_scale=16384, token_weight=0.5).score(
        context(load=load), eps
    )
    assert s[0] == 1.0
    assert s[1] == pytest.approx(0.5 / (1 + 1 / 8) + 0.5 * 0.5)
    assert s[2] == pytest.approx(0.5 * 0.5 + 0.5)


def test_session_affinity_prefers_the_last_endpoint_of_the_session() -> None:
    load = LoadTracker()
    load.bind_session(("default", "s"), EndpointId("e1"))
    eps = [endpoint(0), endpoint(1)]
    assert SessionAffinityScorer().score(
        context(Request(model="m", prompt="x", session="s"), load=load), eps
    ) == [0.0, 1.0]
    assert SessionAffinityScorer().score(
        context(Request(model="m", prompt="x"), load=load), eps
    ) == [0.0, 0.0]


def test_lora_affinity() -> None:
    eps = [endpoint(0, adapters={"a"}), endpoint(1)]
    assert LoraAffinityScorer().score(context(Request(model="m", prompt="x", lora="a")), eps) == [
        1.0,
        0.0,
    ]
    assert LoraAffinityScorer().score(context(), eps) == [0.0, 0.0]


def test_cold_spread_prefers_endpoints_without_recent_cold_work() -> None:
    load = LoadTracker()
    load.note_cold(EndpointId("e0"), 9.9)
    load.note_cold(EndpointId("e1"), 5.0)
    eps = [endpoint(0), endpoint(1), endpoint(2)]
    s = ColdSpreadScorer(tau_s=1.0).score(context(now=10.0, total_blocks=4, load=load), eps)
    assert s[0] < s[1] < s[2] == 1.0
    warm = context(now=10.0, total_blocks=4, matches={"e0": 1}, load=load)
    assert ColdSpreadScorer().score(warm, eps) == [0.0, 0.0, 0.0]


def _owner(scorer: ConsistentHashScorer, request: Request, n: int, drop: int | None = None) -> str:
    eps = [endpoint(i) for i in range(n) if i != drop]
    scores = scorer.score(context(request), eps)
    return eps[scores.index(max(scores))].id


def test_consistent_hash_spreads_keys_and_moves_only_a_removed_endpoints_keys() -> None:
    scorer = ConsistentHashScorer(key="session")
    sessions = [Request(model="m", prompt="x", session=f"s{i}") for i in range(600)]
    owners = [_owner(scorer, r, 6) for r in sessions]
    counts = {e: owners.count(e) for e in set(owners)}
    assert len(counts) == 6 and min(counts.values()) > 60
    after = [_owner(scorer, r, 6, drop=3) for r in sessions]
    assert all(a == b for a, b in zip(owners, after, strict=True) if a != "e3")
    assert all(a != "e3" for a in after)


def test_consistent_hash_keys() -> None:
    with_session = Request(model="m", prompt="x", tenant="acme", session="s1")
    no_session = Request(model="m", prompt="x", tenant="acme")
    eps = [endpoint(i) for i in range(4)]
    by_session = ConsistentHashScorer(key="session")
    assert by_session.score(context(no_session), eps) == [0.0] * 4
    assert ConsistentHashScorer(key="session-or-tenant").score(context(no_session), eps) == (
        ConsistentHashScorer(key="tenant").score(context(with_session), eps)
    )
    assert ConsistentHashScorer().score(context(with_session), eps) == by_session.score(
        context(with_session), eps
    )
    assert all(0.0 <= s < 1.0 for s in by_session.score(context(with_session), eps))
    with pytest.raises(ValueError, match="key"):
        ConsistentHashScorer(key="user")


def test_consistent_hash_is_the_same_in_every_process() -> None:
    code = (
        "from prefixroute import Request; from prefixroute.scorers import ConsistentHashScorer;"
        "from tests.helpers import context, endpoint;"
        "print(ConsistentHashScorer().score(context(Request(model='m', prompt='x', "
        "session='s')), [endpoint(0), endpoint(1)]))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1


def test_kv_cost_is_dynamos_prefill_plus_decode_blocks() -> None:
    load = LoadTracker()
    load.start(EndpointId("e1"), 320)  # 20 blocks of in-flight work
    eps = [endpoint(0), endpoint(1), endpoint(2)]
    ctx = context(total_blocks=40, matches={"e0": 10, "e1": 40}, load=load)
    s = KVCostScorer(overlap_score_weight=1.0, scale=64.0).score(ctx, eps)
    # costs: e0 30 + 0, e1 0 + 20, e2 40 + 0
    assert s == pytest.approx([1 / (1 + 30 / 64), 1 / (1 + 20 / 64), 1 / (1 + 40 / 64)])
    heavy = KVCostScorer(overlap_score_weight=2.0, scale=10.0).score(ctx, eps)
    assert heavy == pytest.approx([1 / (1 + 60 / 10), 1 / (1 + 20 / 10), 1 / (1 + 80 / 10)])
    assert KVCostScorer(overlap_score_weight=0.0).score(ctx, eps)[0] == 1.0
    with pytest.raises(ValueError, match="overlap_score_weight"):
        KVCostScorer(overlap_score_weight=float("inf"))
    with pytest.raises(ValueError, match="scale"):
        KVCostScorer(scale=0.0)
