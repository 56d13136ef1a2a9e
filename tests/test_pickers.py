from __future__ import annotations

from collections import Counter

import pytest

from prefixroute.pickers import (
    MaxScorePicker,
    PowerOfTwoPicker,
    SoftmaxPicker,
    WeightedRandomPicker,
)
from tests.helpers import context


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
