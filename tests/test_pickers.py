from __future__ import annotations

from collections import Counter

import pytest

from prefixroute import LoadTracker, Request
from prefixroute.endpoint import EndpointId
from prefixroute.pickers import (
    CacheAwarePicker,
    MaxScorePicker,
    PowerOfTwoPicker,
    RandomPicker,
    RoundRobinPicker,
    SoftmaxPicker,
    WeightedRandomPicker,
)
from tests.helpers import context, endpoint


def test_max_score_picks_the_best_and_ranks_the_rest() -> None:
    assert MaxScorePicker().pick(context(), [0.1, 0.9, 0.5]) == [1, 2, 0]


def test_max_score_breaks_ties_at_random_over_all_tied() -> None:
    ctx = context(seed=3)
    firsts = Counter(MaxScorePicker().pick(ctx, [1.0, 0.2, 1.0, 1.0])[0] for _ in range(600))
    assert set(firsts) == {0, 2, 3}
    assert min(firsts.values()) > 120


def test_weighted_random_follows_the_weights() -> None:
    ctx = context(seed=1)
    firsts = Counter(WeightedRandomPicker().pick(ctx, [1.0, 3.0, 0.0])[0] for _ in range(4000))
    assert firsts[2] == 0
    assert firsts[1] / firsts[0] == pytest.approx(3.0, rel=0.15)


def test_weighted_random_all_zero_is_uniform() -> None:
    ctx = context(seed=2)
    firsts = Counter(WeightedRandomPicker().pick(ctx, [0.0, 0.0])[0] for _ in range(1000))
    assert set(firsts) == {0, 1}


def test_power_of_two_never_picks_the_worst_of_three() -> None:
    ctx = context(seed=5)
    firsts = Counter(PowerOfTwoPicker().pick(ctx, [0.1, 0.5, 0.9])[0] for _ in range(900))
    assert firsts[0] == 0
    assert firsts[2] > firsts[1] > 0


def test_softmax_temperature_controls_greediness() -> None:
    greedy, flat = SoftmaxPicker(temperature=0.01), SoftmaxPicker(temperature=100.0)
    ctx = context(seed=1)
    cold = Counter(greedy.pick(ctx, [0.5, 1.0])[0] for _ in range(500))
    hot = Counter(flat.pick(ctx, [0.5, 1.0])[0] for _ in range(2000))
    assert cold[0] == 0
    assert 0.4 < hot[0] / 2000 < 0.6
    with pytest.raises(ValueError, match="temperature"):
        SoftmaxPicker(temperature=0)


def test_round_robin_cycles_and_ranks_the_rest_by_score() -> None:
    picker = RoundRobinPicker()
    ctx = context()
    totals = [0.1, 0.9, 0.5]
    assert [picker.pick(ctx, totals) for _ in range(4)] == [
        [0, 1, 2],
        [1, 2, 0],
        [2, 1, 0],
        [0, 1, 2],
    ]
    assert picker.pick(ctx, [0.0, 0.0]) == [0, 1]  # turn 4 mod 2: the counter is global


def test_random_picker_is_uniform_and_ignores_scores() -> None:
    ctx = context(seed=4)
    firsts = Counter(RandomPicker().pick(ctx, [0.0, 5.0, 1.0, 0.0])[0] for _ in range(4000))
    assert set(firsts) == {0, 1, 2, 3}
    assert min(firsts.values()) > 850


def _loaded(**requests: int) -> LoadTracker:
    load = LoadTracker()
    for eid, n in requests.items():
        for _ in range(n):
            load.start(EndpointId(eid), 0)
    return load


def test_cache_aware_follows_the_longest_match_above_the_threshold() -> None:
    eps = [endpoint(0), endpoint(1), endpoint(2)]
    picker = CacheAwarePicker()
    warm = Request(model="m", prompt="system prompt; question one")
    picker.pick(context(warm, candidates=eps, seed=1), [0, 0, 0])
    tree = picker.tree("m")
    assert tree is not None
    (owner,) = tree.match(warm.prompt or "")
    same = Request(model="m", prompt="system prompt; question two")
    # 15 of 27 characters matched (0.56 > 0.3): the owner wins, despite being busier.
    load = _loaded(**{str(owner): 3})
    for seed in range(10):
        ctx = context(same, candidates=eps, load=load, seed=seed)
        assert eps[picker.pick(ctx, [0.0, 0.0, 0.0])[0]].id == owner


def test_cache_aware_sends_misses_and_imbalance_to_the_least_loaded() -> None:
    eps = [endpoint(0), endpoint(1), endpoint(2)]
    picker = CacheAwarePicker(balance_abs_threshold=4, balance_rel_threshold=1.5)
    load = _loaded(e0=2, e1=1, e2=2)
    prompt = Request(model="m", prompt="abcdefghij")
    assert picker.pick(context(prompt, candidates=eps, load=load), [0.9, 0.1, 0.5]) == [1, 0, 2]
    # now e1 holds the prompt, but e1 is overloaded: imbalance wins over the cache
    load = _loaded(e0=1, e1=9, e2=3)
    assert picker.pick(context(prompt, candidates=eps, load=load), [0, 0, 0])[0] == 0
    # while imbalanced, every prompt goes to the least loaded
    firsts = Counter(
        picker.pick(
            context(Request(model="m", prompt=f"cold {s:03d}"), candidates=eps, seed=s, load=load),
            [0, 0, 0],
        )[0]
        for s in range(40)
    )
    assert firsts[0] == 40
    # balanced: cold prompts (no match above 0.3) go to the least loaded, ties at random
    colder = [Request(model="m", prompt=f"{s:03d} colder") for s in range(40)]
    firsts = Counter(
        picker.pick(context(r, candidates=eps, seed=s, load=_loaded(e1=1)), [0, 0, 0])[0]
        for s, r in enumerate(colder)
    )
    assert set(firsts) == {0, 2}


def test_cache_aware_matches_token_ids_and_keeps_one_tree_per_model() -> None:
    eps = [endpoint(0), endpoint(1)]
    picker = CacheAwarePicker()
    first = picker.pick(context(Request(model="a", token_ids=[5, 6, 7, 8]), candidates=eps), [0, 0])
    for seed in range(8):
        again = Request(model="a", token_ids=[5, 6, 7, 9])
        assert picker.pick(context(again, candidates=eps, seed=seed), [0, 0])[0] == first[0]
    assert picker.tree("b") is None
    tree = picker.tree("a")
    assert tree is not None and tree.size(eps[first[0]].id) == 5


def test_cache_aware_evicts_every_interval_of_now() -> None:
    eps = [endpoint(0)]
    picker = CacheAwarePicker(eviction_interval_s=10.0, max_tree_size=4)
    for now, text in [(0.0, "aaaaaaaa"), (5.0, "bbbbbbbb")]:
        picker.pick(context(Request(model="m", prompt=text), candidates=eps, now=now), [0.0])
    tree = picker.tree("m")
    assert tree is not None and tree.size(eps[0].id) == 16  # not yet due
    picker.pick(context(Request(model="m", prompt="cc"), candidates=eps, now=10.0), [0.0])
    assert tree.size(eps[0].id) == 2  # evicted to 4 (both 8-char runs), then "cc" added
    never = CacheAwarePicker(eviction_interval_s=0, max_tree_size=1)
    for now in (0.0, 1e6):
        never.pick(context(Request(model="m", prompt="abc"), candidates=eps, now=now), [0.0])
    kept = never.tree("m")
    assert kept is not None and kept.size(eps[0].id) == 3


def test_cache_aware_needs_the_candidates_and_checks_its_parameters() -> None:
    with pytest.raises(ValueError, match="candidates"):
        CacheAwarePicker().pick(context(), [0.0, 1.0])
    with pytest.raises(ValueError, match="cache_threshold"):
        CacheAwarePicker(cache_threshold=1.5)
    with pytest.raises(ValueError, match="max_tree_size"):
        CacheAwarePicker(max_tree_size=0)
