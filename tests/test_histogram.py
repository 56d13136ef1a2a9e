"""The logarithmic latency histogram (`prefixroute.histogram`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from prefixroute.histogram import LatencySummary, LogHistogram, _bucket, _representative

REL = LogHistogram.RELATIVE_ERROR * (1 + 1e-9)
SAMPLES = st.sampled_from([0.0, 0.00003, 0.0001, 0.002, 0.05, 0.3, 1.7, 42.0, 999.0, 5000.0])


def close(got: float | None, want: float) -> bool:
    """Within the histogram's bound: relative above 100 us, absolute below."""
    assert got is not None
    if want < LogHistogram.MIN_VALUE:
        return abs(got - want) <= LogHistogram.MIN_VALUE
    return abs(got - want) <= REL * want


def test_empty_histogram() -> None:
    h = LogHistogram()
    assert (h.count, h.mean(), h.quantile(0.5)) == (0, None, None)
    assert h.summary() == LatencySummary()
    h.check_invariants()


@pytest.mark.parametrize("seed", range(5))
def test_quantiles_match_numpy_within_the_bound(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.lognormal(mean=-3.0, sigma=2.0, size=5000)
    values = values[(values >= 1e-4) & (values < 1000)]
    h = LogHistogram()
    for v in values:
        h.add(float(v))
    h.check_invariants()
    for q in (0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0):
        want = float(np.quantile(values, q, method="inverted_cdf"))
        got = h.quantile(q)
        assert got is not None and abs(got - want) <= REL * want, (q, got, want)
        if 0.25 <= q <= 0.9:  # where samples are dense, numpy's default is as close
            assert abs(got - float(np.quantile(values, q))) <= 2 * REL * want
    assert h.mean() == pytest.approx(float(values.mean()), rel=1e-12)
    assert h.count == len(values)
    s = h.summary()
    assert (s.count, s.p50, s.p99) == (len(values), h.quantile(0.5), h.quantile(0.99))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 900.0), min_size=1, max_size=60), st.floats(0.0, 1.0))
def test_quantile_of_any_sample_is_within_the_bound(values: list[float], q: float) -> None:
    h = LogHistogram()
    for v in values:
        h.add(v)
    want = float(np.quantile(values, q, method="inverted_cdf"))
    assert close(h.quantile(q), want)
    assert min(values) <= h.quantile(q) <= max(values)  # type: ignore[operator]


def test_merge_equals_adding_everything() -> None:
    rng = np.random.default_rng(7)
    a_vals, b_vals = rng.exponential(0.3, 300), rng.exponential(3.0, 200)
    a, b, both = LogHistogram(), LogHistogram(), LogHistogram()
    for v in a_vals:
        a.add(float(v))
        both.add(float(v))
    for v in b_vals:
        b.add(float(v))
        both.add(float(v))
    a.merge(b)
    a.merge(LogHistogram())
    assert a.counts == both.counts and (a.n, a.min, a.max) == (both.n, both.min, both.max)
    assert a.total == pytest.approx(both.total)
    for q in (0.0, 0.5, 0.99, 1.0):
        assert a.quantile(q) == both.quantile(q)
    a.clear()
    assert a.count == 0 and a.counts == {}
    a.check_invariants()


def test_out_of_range_and_invalid_values() -> None:
    h = LogHistogram()
    for v in (0.0, 0.00003, 0.00009):
        h.add(v)
    assert h.quantile(0.0) == 0.0 and h.quantile(1.0) == 0.00009  # exact extremes
    assert close(h.quantile(0.5), 0.00003)  # below 100 us: absolute error under 100 us
    h.add(5000.0)  # above the top bucket: reported as the largest sample
    assert h.quantile(1.0) == 5000.0
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="latency"):
            h.add(bad)
    with pytest.raises(ValueError, match="q must"):
        h.quantile(1.5)
    assert LogHistogram.MAX_VALUE > 1000.0
    h.check_invariants()


def test_bucket_boundaries_keep_the_bound() -> None:
    g, lo = LogHistogram.GROWTH, LogHistogram.MIN_VALUE
    for i in range(0, 210):
        edge = lo * g**i
        for v in (edge, edge * (1 + 1e-12), edge * (1 - 1e-12), edge * math.sqrt(g)):
            if lo <= v < LogHistogram.MAX_VALUE:
                assert close(_representative(_bucket(v)), v), (i, v)
    assert _bucket(0.0) == 0 and _bucket(LogHistogram.MAX_VALUE) == _bucket(1e9)


def test_offer_adds_valid_samples_and_ignores_the_rest() -> None:
    h, same = LogHistogram(), LogHistogram()
    for v in (None, -1.0, math.nan, math.inf, -math.inf):
        assert not h.offer(v)
    assert h.count == 0 and h.counts == {}
    for v in (0.0, 0.2, 3.0):
        assert h.offer(v)
        same.add(v)
    assert (h.counts, h.n, h.min, h.max, h.total) == (
        same.counts,
        same.n,
        same.min,
        same.max,
        same.total,
    )
    h.check_invariants()


class HistogramMachine(RuleBasedStateMachine):
    """`LogHistogram` against a plain list of its samples."""

    def __init__(self) -> None:
        super().__init__()
        self.h = LogHistogram()
        self.samples: list[float] = []

    @rule(value=SAMPLES)
    def add(self, value: float) -> None:
        self.h.add(value)
        self.samples.append(value)

    @rule(values=st.lists(SAMPLES, max_size=5))
    def merge(self, values: list[float]) -> None:
        other = LogHistogram()
        for v in values:
            other.add(v)
        self.h.merge(other)
        self.samples.extend(values)

    @rule()
    def clear(self) -> None:
        self.h.clear()
        self.samples.clear()

    @invariant()
    def agrees_with_the_samples(self) -> None:
        self.h.check_invariants()
        assert self.h.count == len(self.samples)
        if not self.samples:
            assert self.h.summary() == LatencySummary()
            return
        assert (self.h.min, self.h.max) == (min(self.samples), max(self.samples))
        assert self.h.mean() == pytest.approx(sum(self.samples) / len(self.samples))
        for q in (0.0, 0.5, 0.95, 1.0):
            want = float(np.quantile(self.samples, q, method="inverted_cdf"))
            assert close(self.h.quantile(q), want), (q, want)


HistogramMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None
)
TestHistogramMachine = HistogramMachine.TestCase
