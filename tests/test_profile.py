from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from prefixroute import EndpointState, Profile, RouteContext, WeightedScorer
from prefixroute.profile import score_reference
from tests.helpers import context, endpoint


@attrs.frozen
class Fixed:
    values: tuple[object, ...]

    def score(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[object]:
        return list(self.values[: len(candidates)])


scores = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 5)


@given(
    data=st.data(),
    n=st.integers(1, 6),
    weights=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=4),
)
def test_numpy_scoring_equals_the_reference(
    data: st.DataObject, n: int, weights: list[float]
) -> None:
    scorers = tuple(
        WeightedScorer(
            f"s{k}", Fixed(tuple(data.draw(st.lists(scores, min_size=n, max_size=n)))), w
        )
        for k, w in enumerate(weights)
    )
    profile = Profile(name="p", scorers=scorers)
    eps = [endpoint(i) for i in range(n)]
    raw, totals = profile.score(context(), eps)
    ref_raw, ref_totals = score_reference(profile, context(), eps)
    assert raw.tolist() == ref_raw
    assert totals == pytest.approx(ref_totals)
    assert all(0.0 <= x <= 1.0 for row in raw.tolist() for x in row)
    assert not raw.flags.writeable


@pytest.mark.parametrize("bad", [None, "0.5", [0.1], object()])
def test_non_numeric_scores_name_the_scorer(bad: object) -> None:
    profile = Profile(
        name="p",
        scorers=(
            WeightedScorer("fine", Fixed((0.5, 0.5))),
            WeightedScorer("odd", Fixed((0.5, bad))),
        ),
    )
    with pytest.raises(ValueError, match="'odd'"):
        profile.score(context(), [endpoint(0), endpoint(1)])


def test_edges_without_scorers_or_candidates() -> None:
    raw, totals = Profile(name="p").score(context(), [endpoint(0)])
    assert raw.shape == (0, 1) and totals == [0.0]
    profile = Profile(name="p", scorers=(WeightedScorer("s", Fixed(())),))
    raw, totals = profile.score(context(), [])
    assert raw.shape == (1, 0) and totals == []
    assert math.isfinite(sum(totals))
