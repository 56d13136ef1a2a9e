from __future__ import annotations

import gc
import math
import sys
import tracemalloc
import types
from collections import Counter
from typing import cast

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from prefixroute.histogram import LatencySummary, LogHistogram
from prefixroute.ledger import (
    MAX_REJECTION_KINDS,
    TenantLedger,
    TenantSnapshot,
    jain_index,
)

REL = LogHistogram.RELATIVE_ERROR * (1 + 1e-9)


def close(got: float | None, want: float) -> bool:
    """Within the histogram's bound: relative above 100 us, absolute below."""
    assert got is not None
    if want < LogHistogram.MIN_VALUE:
        return abs(got - want) <= LogHistogram.MIN_VALUE
    return abs(got - want) <= REL * want


def decide(ledger: TenantLedger, tenant: str, prompt: int = 100, predicted: int = 0) -> None:
    ledger.on_decision(tenant, prompt_tokens=prompt, predicted_cached_tokens=predicted, now=0.0)


def complete(
    ledger: TenantLedger,
    tenant: str,
    prompt: int = 100,
    cached: int = 0,
    predicted: int = 0,
    ttft: float | None = None,
    e2e: float | None = None,
    ok: bool = True,
) -> None:
    ledger.on_complete(
        tenant,
        prompt_tokens=prompt,
        cached_tokens=cached,
        predicted_cached_tokens=predicted,
        ttft_s=ttft,
        e2e_s=e2e,
        ok=ok,
        now=0.0,
    )


def row(ledger: TenantLedger, tenant: str) -> TenantSnapshot:
    return next(s for s in ledger.snapshot().tenants if s.tenant == tenant)


# -- Jain's index ------------------------------------------------------------------------


def test_jain_index() -> None:
    assert jain_index([]) is None
    assert jain_index([0.0, 0.0]) == 1.0
    assert jain_index([0.5, 0.5, 0.5]) == pytest.approx(1.0)
    assert jain_index([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert jain_index([1.0, 3.0]) == pytest.approx(16 / 20)


# -- TenantLedger ------------------------------------------------------------------------


def test_accounting_of_one_tenant() -> None:
    ledger = TenantLedger()
    decide(ledger, "a", prompt=1000, predicted=600)
    decide(ledger, "a", prompt=500, predicted=0)
    decide(ledger, "a", prompt=200, predicted=100)
    assert ledger.in_flight("a") == 3 and ledger.total_in_flight() == 3
    complete(ledger, "a", prompt=1000, cached=800, predicted=600, ttft=0.1, e2e=1.0)
    complete(ledger, "a", prompt=500, cached=0, predicted=0, ttft=0.3, e2e=2.0)
    complete(ledger, "a", ok=False)
    ledger.on_rejection("a", kind="rate-limit", now=0.0)
    ledger.on_rejection("a", kind="rate-limit", now=0.0)
    ledger.on_rejection("a", kind="concurrency", now=0.0)
    ledger.check_invariants()
    a = row(ledger, "a")
    assert (a.requests, a.count_error, a.prompt_tokens, a.predicted_cached_tokens) == (
        3,
        0,
        1700,
        700,
    )
    assert (a.completed, a.failed, a.completed_prompt_tokens, a.cached_tokens) == (2, 1, 1500, 800)
    assert a.hit_rate == pytest.approx(800 / 1500)
    assert a.predicted_hit_rate == pytest.approx(700 / 1700)
    assert (a.completed_predicted_cached_tokens, a.prediction_abs_error_tokens) == (600, 200)
    assert a.in_flight == 0 and ledger.in_flight("a") == 0
    assert dict(a.rejections) == {"concurrency": 1, "rate-limit": 2} and a.rejected == 3
    assert a.ttft.count == 2 and a.ttft.mean == pytest.approx(0.2)
    assert close(a.ttft.p50, 0.1) and close(a.ttft.p99, 0.3)
    assert a.e2e.mean == pytest.approx(1.5)
    snap = ledger.snapshot()
    assert snap.total.tenant == "total" and snap.other.tenant == "other"
    assert snap.total.requests == 3 and snap.other.requests == 0
    assert snap.total.ttft == a.ttft
    fair = snap.fairness
    assert fair.prediction_bias == pytest.approx((600 - 800) / 1500)
    assert fair.prediction_mae == pytest.approx(200 / 1500)
    assert fair.jain_hit_rate == 1.0 and fair.jain_ttft == pytest.approx(1.0)
    hash(snap.total)  # frozen values stay hashable (the rejections map is left out)


def test_empty_ledger() -> None:
    snap = TenantLedger().snapshot()
    assert snap.tenants == ()
    assert snap.total == TenantSnapshot(tenant="total")
    assert snap.total.hit_rate is None and snap.total.predicted_hit_rate is None
    f = snap.fairness
    assert (f.jain_hit_rate, f.jain_ttft, f.head_hit_rate, f.tail_hit_rate) == (None,) * 4
    assert (f.prediction_bias, f.prediction_mae, f.tail_threshold) == (None, None, None)


def test_in_flight_is_exact_for_untracked_tenants_and_never_negative() -> None:
    ledger = TenantLedger(top_k=2)
    for t in ("a", "b", "c", "d", "c"):
        decide(ledger, t)
    assert len(ledger) == 2
    assert [ledger.in_flight(t) for t in "abcd"] == [1, 1, 2, 1]
    complete(ledger, "a")
    complete(ledger, "a")  # one too many: clamps at 0
    complete(ledger, "zzz")  # never routed
    assert ledger.in_flight("a") == 0 and ledger.in_flight("zzz") == 0
    assert ledger.total_in_flight() == 4
    snap = ledger.snapshot()
    assert sum(s.in_flight for s in snap.tenants) + snap.other.in_flight == 4
    ledger.check_invariants()


def test_space_saving_eviction() -> None:
    ledger = TenantLedger(top_k=2)
    for t in ("a", "a", "a", "b", "b"):
        decide(ledger, t)
    complete(ledger, "b", prompt=100, cached=50)
    decide(ledger, "c")  # evicts b (count 2): c enters with count 3, error 2
    assert "b" not in ledger and "c" in ledger
    snap = ledger.snapshot()
    assert [(s.tenant, s.requests, s.count_error) for s in snap.tenants] == [
        ("a", 3, 0),
        ("c", 3, 2),
    ]
    assert snap.evictions == 1
    assert (snap.other.requests, snap.other.cached_tokens, snap.other.count_error) == (2, 50, 0)
    # c's figures are exact since its entry: one request
    c = row(ledger, "c")
    assert c.prompt_tokens == 100 and c.requests - c.count_error == 1
    # events for an evicted tenant go to other and do not bring it back
    complete(ledger, "b", prompt=10, cached=10)
    ledger.on_rejection("b", kind="saturated", now=0.0)
    assert "b" not in ledger
    snap = ledger.snapshot()
    assert snap.other.completed_prompt_tokens == 110 and dict(snap.other.rejections) == {
        "saturated": 1
    }
    ledger.check_invariants()


def test_lazy_heap_evicts_the_true_minimum() -> None:
    ledger = TenantLedger(top_k=3)
    for t in ("a", "b", "c"):
        decide(ledger, t)
    for _ in range(5):  # a and b grow after their heap entries were pushed
        decide(ledger, "a")
        decide(ledger, "b")
    decide(ledger, "d")
    assert "c" not in ledger and {"a", "b", "d"} == {s.tenant for s in ledger.snapshot().tenants}
    decide(ledger, "e")  # d has count 2, the new minimum
    assert "d" not in ledger and row(ledger, "e").requests == 3
    ledger.check_invariants()


def test_pinned_tenants_are_never_evicted() -> None:
    ledger = TenantLedger(top_k=1, pinned=["vip", "idle"])
    decide(ledger, "vip")
    for i in range(50):
        decide(ledger, f"t{i}")
    assert "vip" in ledger and "idle" in ledger and len(ledger) == 3
    snap = ledger.snapshot()
    assert {s.tenant for s in snap.tenants} == {"vip", "idle", "t49"}
    assert row(ledger, "vip").count_error == 0 and row(ledger, "idle").requests == 0
    assert ledger.pinned == frozenset({"vip", "idle"}) and ledger.top_k == 1
    ledger.check_invariants()


def test_rejection_kinds_are_capped() -> None:
    ledger = TenantLedger()
    decide(ledger, "a")
    kinds = [f"kind-{i}" for i in range(MAX_REJECTION_KINDS + 5)]
    for kind in kinds:
        ledger.on_rejection("a", kind=kind, now=0.0)
    ledger.on_rejection("a", kind="kind-0", now=0.0)
    rej = row(ledger, "a").rejections
    assert len(rej) == MAX_REJECTION_KINDS + 1
    assert rej["other"] == 5 and rej["kind-0"] == 2 and sum(rej.values()) == len(kinds) + 1
    assert row(ledger, "a").requests == 1  # rejected requests are not routed requests
    assert dict(ledger.snapshot().total.rejections) == dict(rej)
    ledger.check_invariants()


def test_the_aggregate_hides_the_tail_but_head_and_tail_do_not() -> None:
    """Two heavy tenants hit 100%, twenty light ones always miss: 80% overall."""
    ledger = TenantLedger(top_k=4)
    stream = ["h1", "h2"] * 40 + [f"t{i}" for i in range(20)]
    for t in stream:
        decide(ledger, t, prompt=1000)
        complete(ledger, t, prompt=1000, cached=1000 if t.startswith("h") else 0)
    snap = ledger.snapshot()
    assert snap.total.hit_rate == pytest.approx(0.8)
    # the light tenants churn through the table's last two rows, inheriting counts
    assert [(s.tenant, s.requests, s.count_error) for s in snap.tenants] == [
        ("h1", 40, 0),
        ("h2", 40, 0),
        ("t18", 10, 9),
        ("t19", 10, 9),
    ]
    assert snap.other.requests == 18 and snap.evictions == 18
    f = snap.fairness
    assert (f.tail_threshold, f.head_tenants, f.tail_tenants) == (25.0, 2, 2)
    assert (f.head_hit_rate, f.tail_hit_rate) == (1.0, 0.0)
    assert f.jain_hit_rate == pytest.approx(0.5)
    ledger.check_invariants()


def test_head_and_tail_split() -> None:
    ledger = TenantLedger(tail_quantile=0.5)
    for t, n, cached in (("a", 10, 90), ("b", 6, 50), ("c", 2, 0), ("d", 1, 10)):
        for _ in range(n):
            decide(ledger, t)
            complete(ledger, t, prompt=100, cached=cached)
    f = ledger.snapshot().fairness
    assert f.tail_threshold == pytest.approx(4.0)  # median of (1, 2, 6, 10)
    assert (f.head_tenants, f.tail_tenants) == (2, 2)
    assert f.head_hit_rate == pytest.approx((900 + 300) / 1600)
    assert f.tail_hit_rate == pytest.approx(10 / 300)
    rates = [0.9, 0.5, 0.0, 0.1]
    assert f.jain_hit_rate == pytest.approx(sum(rates) ** 2 / (4 * sum(r * r for r in rates)))


def test_jain_ttft_uses_slowdowns() -> None:
    ledger = TenantLedger()
    for t, ttft in (("a", 0.1), ("a", 0.1), ("b", 0.4)):
        decide(ledger, t)
        complete(ledger, t, ttft=ttft)
    f = ledger.snapshot().fairness
    overall = 0.6 / 3
    slowdowns = [0.1 / overall, 0.4 / overall]
    assert f.jain_ttft == pytest.approx(jain_index(slowdowns))
    ledger = TenantLedger()
    decide(ledger, "a")
    complete(ledger, "a", ttft=0.0)
    assert ledger.snapshot().fairness.jain_ttft == 1.0


def test_failed_and_unknown_latencies() -> None:
    ledger = TenantLedger()
    decide(ledger, "a")
    complete(ledger, "a", prompt=100, cached=100, ttft=0.5, ok=False)
    for bad in (None, -1.0, math.nan, math.inf):
        decide(ledger, "a")
        complete(ledger, "a", ttft=bad, e2e=bad)
    a = row(ledger, "a")
    assert (a.failed, a.completed, a.cached_tokens, a.ttft.count, a.e2e.count) == (1, 4, 0, 0, 0)
    assert a.ttft == LatencySummary()


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="top_k"):
        TenantLedger(top_k=0)
    with pytest.raises(ValueError, match="tail_quantile"):
        TenantLedger(tail_quantile=1.5)
    with pytest.raises(ValueError, match="pinned"):
        TenantLedger(pinned=[""])
    ledger = TenantLedger()
    with pytest.raises(ValueError, match="prompt_tokens"):
        decide(ledger, "a", prompt=-1)
    with pytest.raises(ValueError, match="cached_tokens"):
        complete(ledger, "a", cached=-1)
    with pytest.raises(ValueError, match="kind"):
        ledger.on_rejection("a", kind="", now=0.0)
    assert ledger.snapshot().total == TenantSnapshot(tenant="total")  # nothing half-applied
    ledger.check_invariants()


def test_snapshot_orders_tenants_by_requests() -> None:
    ledger = TenantLedger(pinned=["p"])
    for t in ("b", "a", "b", "c", "b", "a"):
        decide(ledger, t)
    assert [s.tenant for s in ledger.snapshot().tenants] == ["b", "a", "c", "p"]


# -- the state machine against a naive model ---------------------------------------------

TENANTS = ("a", "b", "c", "d", "e", "f", "p")
PINNED = frozenset({"p"})
TOP_K = 3
KINDS = ("rate-limit", "concurrency", "saturated")
LATENCIES = st.none() | st.sampled_from([0.0, 0.00005, 0.002, 0.05, 0.3, 1.7, 42.0])


class ModelRow:
    """Exact figures for one tenant (or the total), as plain Python."""

    def __init__(self) -> None:
        self.requests = self.prompt = self.predicted = 0
        self.completed = self.failed = self.completed_prompt = self.cached = 0
        self.completed_predicted = self.abs_error = self.rejected = 0
        self.rejections: Counter[str] = Counter()
        self.ttft: list[float] = []
        self.e2e: list[float] = []

    def figures(self) -> tuple[object, ...]:
        return (
            self.prompt,
            self.predicted,
            self.completed,
            self.failed,
            self.completed_prompt,
            self.cached,
            self.completed_predicted,
            self.abs_error,
            self.rejected,
            dict(self.rejections),
        )


def figures(s: TenantSnapshot) -> tuple[object, ...]:
    return (
        s.prompt_tokens,
        s.predicted_cached_tokens,
        s.completed,
        s.failed,
        s.completed_prompt_tokens,
        s.cached_tokens,
        s.completed_predicted_cached_tokens,
        s.prediction_abs_error_tokens,
        s.rejected,
        dict(s.rejections),
    )


def check_latency(summary: LatencySummary, values: list[float]) -> None:
    assert summary.count == len(values)
    if not values:
        assert summary == LatencySummary()
        return
    assert summary.mean == pytest.approx(sum(values) / len(values))
    for q, got in ((0.5, summary.p50), (0.95, summary.p95), (0.99, summary.p99)):
        assert close(got, float(np.quantile(values, q, method="inverted_cdf")))


class LedgerMachine(RuleBasedStateMachine):
    """Drives a `TenantLedger` and exact per-tenant dicts with the same events."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = TenantLedger(top_k=TOP_K, pinned=PINNED)
        self.true_count: Counter[str] = Counter()  # all-time routed requests
        self.since: dict[str, ModelRow] = {t: ModelRow() for t in PINNED}  # since entry
        self.total = ModelRow()
        self.in_flight: Counter[str] = Counter()

    def _row(self, tenant: str) -> ModelRow | None:
        return self.since[tenant] if tenant in self.ledger else None

    @rule(tenant=st.sampled_from(TENANTS), prompt=st.integers(0, 50), predicted=st.integers(0, 50))
    def decision(self, tenant: str, prompt: int, predicted: int) -> None:
        before = {s.tenant: s for s in self.ledger.snapshot().tenants}
        unpinned = [s for t, s in before.items() if t not in PINNED]
        self.ledger.on_decision(
            tenant, prompt_tokens=prompt, predicted_cached_tokens=predicted, now=0.0
        )
        assert tenant in self.ledger
        if tenant not in before:
            self.since[tenant] = ModelRow()
            entered = row(self.ledger, tenant)
            if len(unpinned) == TOP_K:  # a tenant with the minimum count was evicted
                low = min(s.requests for s in unpinned)
                gone = [s for s in unpinned if s.tenant not in self.ledger]
                assert len(gone) == 1 and gone[0].requests == low
                assert (entered.requests, entered.count_error) == (low + 1, low)
            else:
                assert (entered.requests, entered.count_error) == (1, 0)
        self.true_count[tenant] += 1
        self.in_flight[tenant] += 1
        for r in (self.since[tenant], self.total):
            r.requests += 1
            r.prompt += prompt
            r.predicted += predicted

    @rule(tenant=st.sampled_from(TENANTS), kind=st.sampled_from(KINDS))
    def rejection(self, tenant: str, kind: str) -> None:
        target = self._row(tenant)
        self.ledger.on_rejection(tenant, kind=kind, now=0.0)
        for r in (target, self.total):
            if r is not None:
                r.rejected += 1
                r.rejections[kind] += 1

    @precondition(lambda self: bool(self.in_flight))
    @rule(
        data=st.data(),
        prompt=st.integers(0, 50),
        cached=st.integers(0, 50),
        predicted=st.integers(0, 50),
        ttft=LATENCIES,
        e2e=LATENCIES,
        ok=st.booleans(),
    )
    def completion(
        self,
        data: st.DataObject,
        prompt: int,
        cached: int,
        predicted: int,
        ttft: float | None,
        e2e: float | None,
        ok: bool,
    ) -> None:
        tenant = data.draw(st.sampled_from(sorted(self.in_flight)))
        self._complete(tenant, prompt, cached, predicted, ttft, e2e, ok)

    @rule(tenant=st.sampled_from(TENANTS), ok=st.booleans())
    def stray_completion(self, tenant: str, ok: bool) -> None:
        """A completion whatever the in-flight count (it may clamp at 0)."""
        self._complete(tenant, 10, 5, 7, 0.01, 0.1, ok)

    def _complete(
        self,
        tenant: str,
        prompt: int,
        cached: int,
        predicted: int,
        ttft: float | None,
        e2e: float | None,
        ok: bool,
    ) -> None:
        target = self._row(tenant)
        complete(self.ledger, tenant, prompt, cached, predicted, ttft, e2e, ok)
        if self.in_flight[tenant] > 0:
            self.in_flight[tenant] -= 1
            if not self.in_flight[tenant]:
                del self.in_flight[tenant]
        for r in (target, self.total):
            if r is None:
                continue
            if not ok:
                r.failed += 1
                continue
            r.completed += 1
            r.completed_prompt += prompt
            r.cached += cached
            r.completed_predicted += predicted
            r.abs_error += abs(predicted - cached)
            r.ttft += [] if ttft is None else [ttft]
            r.e2e += [] if e2e is None else [e2e]

    @invariant()
    def consistent(self) -> None:
        self.ledger.check_invariants()

    @invariant()
    def tracked_rows_equal_the_model_since_entry(self) -> None:
        snap = self.ledger.snapshot()
        for s in snap.tenants:
            model = self.since[s.tenant]
            assert s.requests - s.count_error == model.requests
            assert figures(s) == model.figures()
            check_latency(s.ttft, model.ttft)
            check_latency(s.e2e, model.e2e)
            assert s.in_flight == self.in_flight[s.tenant]

    @invariant()
    def totals_equal_the_model_and_the_parts_sum_to_them(self) -> None:
        snap = self.ledger.snapshot()
        total = snap.total
        assert total.requests == self.total.requests and total.count_error == 0
        assert figures(total) == self.total.figures()
        check_latency(total.ttft, self.total.ttft)
        check_latency(total.e2e, self.total.e2e)
        parts = [*snap.tenants, snap.other]
        assert sum(s.requests - s.count_error for s in parts) == total.requests
        *numbers, _ = figures(total)  # the last figure is the rejections map
        for i, value in enumerate(numbers):
            assert sum(cast(int, figures(s)[i]) for s in parts) == value
        summed: Counter[str] = Counter()
        for s in parts:
            summed.update(s.rejections)
        assert dict(summed) == dict(total.rejections)
        for name in ("ttft", "e2e"):
            assert sum(getattr(s, name).count for s in parts) == getattr(total, name).count
        assert sum(s.in_flight for s in parts) == total.in_flight == self.in_flight.total()

    @invariant()
    def space_saving_guarantee(self) -> None:
        tracked = {s.tenant: s for s in self.ledger.snapshot().tenants}
        stream = sum(n for t, n in self.true_count.items() if t not in PINNED)
        for t, n in self.true_count.items():
            if t in PINNED:
                assert t in tracked and tracked[t].requests == n
            elif n * TOP_K > stream:
                assert t in tracked, (t, n, stream)
            if t in tracked:
                s = tracked[t]
                assert s.requests - s.count_error <= n <= s.requests

    @invariant()
    def in_flight_is_exact(self) -> None:
        for t in TENANTS:
            assert self.ledger.in_flight(t) == self.in_flight[t]
        assert self.ledger.total_in_flight() == self.in_flight.total()


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)


# -- bounded memory ----------------------------------------------------------------------


def retained_bytes(root: object) -> int:
    """Bytes held by `root` and every object reachable from it (types and modules excluded)."""
    seen: set[int] = set()
    stack, total = [root], 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type | types.ModuleType | types.FunctionType):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total


def stream_distinct(ledger: TenantLedger, start: int, stop: int) -> None:
    decision, completion = ledger.on_decision, ledger.on_complete
    for i in range(start, stop):
        tenant = f"t{i}"
        decision(tenant, prompt_tokens=1000, predicted_cached_tokens=0, now=0.0)
        completion(
            tenant,
            prompt_tokens=1000,
            cached_tokens=500,
            predicted_cached_tokens=0,
            ttft_s=0.001 * (i % 1000),
            e2e_s=1.0,
            ok=True,
            now=0.0,
        )


@pytest.mark.slow
def test_a_million_distinct_tenants_keep_the_ledger_bounded() -> None:
    """1M distinct tenants: the table stays at top_k rows and the ledger does not grow.

    tracemalloc slows every allocation about tenfold, so it watches only the
    last 20,000 tenants; the retained size is compared before and after all.
    """
    top_k = 128
    ledger = TenantLedger(top_k=top_k)
    stream_distinct(ledger, 0, 10_000)  # warm: the table is full, the histograms populated
    before = retained_bytes(ledger)
    stream_distinct(ledger, 10_000, 980_000)
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        stream_distinct(ledger, 980_000, 1_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    after = retained_bytes(ledger)
    assert len(ledger) == top_k
    assert peak - start < 1_000_000, f"peak grew by {peak - start} bytes"
    assert after < 1_000_000 and abs(after - before) < 20_000, (before, after)
    snap = ledger.snapshot()
    assert snap.total.requests == 1_000_000 and len(snap.tenants) == top_k
    assert snap.other.requests == 1_000_000 - top_k and snap.evictions == 1_000_000 - top_k
    assert snap.total.ttft.count == 1_000_000
    ledger.check_invariants()
