"""VTC fair queueing: deferral, release order against a reference model, deadlines, bounds."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixroute.decision import Deferral, Rejection
from prefixroute.endpoint import EndpointId, EndpointState
from prefixroute.fairqueue import FairQueueAdmission
from prefixroute.load import LoadTracker
from prefixroute.plugins import AdmissionContext
from prefixroute.request import Request, Usage

EPS = [EndpointState(id="e0", address="10.0.0.1:8000")]


class NoTenants:
    def in_flight(self, tenant: str) -> int:
        return 0


NO_TENANTS = NoTenants()


def ctx(tenant: str, tokens: int, now: float, load: LoadTracker) -> AdmissionContext:
    request = Request(model="m", prompt="x" * tokens, tenant=tenant)
    return AdmissionContext(
        request=request,
        endpoints=EPS,
        now=now,
        prompt_tokens=tokens,
        load=load,
        tenants=NoTenants(),
    )


def fill(load: LoadTracker, n: int) -> None:
    for _ in range(n):
        load.start(EndpointId("e0"), 1)


class ReferenceVTC:
    """Sheng et al. (OSDI 2024) Algorithm 2, written plainly: lists and a scan for the minimum."""

    def __init__(self, weights: dict[str, float], wp: float, wq: float) -> None:
        self.c: dict[str, float] = {}
        self.queue: list[tuple[str, Request, int]] = []  # arrival order
        self.last = 0.0
        self.weights, self.wp, self.wq = weights, wp, wq
        # ties between equal counters: whoever (re)entered the competition first
        self.stamp: dict[str, int] = {}
        self.clock = 0

    def _enter(self, tenant: str) -> None:
        self.clock += 1
        self.stamp[tenant] = self.clock

    def backlogged(self) -> set[str]:
        return {t for t, _, _ in self.queue}

    def arrive(self, tenant: str, request: Request, tokens: int) -> None:
        if tenant not in self.backlogged():
            floor = min((self.c[t] for t in self.backlogged()), default=self.last)
            self.c[tenant] = max(self.c.get(tenant, floor), floor)
            self._enter(tenant)
        self.queue.append((tenant, request, tokens))

    def dispatch(self) -> Request:
        tenant = min(self.backlogged(), key=lambda t: (self.c[t], self.stamp[t]))
        i = next(i for i, (t, _, _) in enumerate(self.queue) if t == tenant)
        _, request, tokens = self.queue.pop(i)
        self.c[tenant] += self.wp * tokens / self.weights.get(tenant, 1.0)
        if tenant not in self.backlogged():
            self.last = self.c[tenant]
        else:
            self._enter(tenant)
        return request


def test_admits_at_once_with_room_and_defers_when_full() -> None:
    fq = FairQueueAdmission(max_in_flight_per_endpoint=2)
    load = LoadTracker()
    assert fq.admit(ctx("a", 10, 0.0, load)) is None
    fill(load, 2)
    verdict = fq.admit(ctx("a", 10, 0.0, load))
    assert isinstance(verdict, Deferral)
    assert verdict.deadline == 10.0
    assert fq.queued == 1
    # Still full: nothing to release; once a slot frees the queued request goes.
    assert fq.release(EPS, load, NO_TENANTS, 1.0) == []
    load.finish(EndpointId("e0"), 1)
    out = fq.release(EPS, load, NO_TENANTS, 1.0)
    assert [r is None for _, r in out] == [True]
    assert fq.queued == 0


def test_a_burst_does_not_starve_a_light_tenant() -> None:
    fq = FairQueueAdmission(max_in_flight_per_endpoint=1)
    load = LoadTracker()
    fill(load, 1)
    burst = [ctx("heavy", 100, 0.0, load) for _ in range(20)]
    for c in burst:
        assert isinstance(fq.admit(c), Deferral)
    light = ctx("light", 100, 0.1, load)
    assert isinstance(fq.admit(light), Deferral)
    order = []
    for _ in range(21):
        load.finish(EndpointId("e0"), 1)
        (request, verdict), *rest = fq.release(EPS, load, NO_TENANTS, 1.0)
        assert verdict is None and not rest
        order.append(request.tenant)
        fill(load, 1)
    assert order.index("light") <= 1  # served right after the heavy tenant's first


def test_deadline_rejects_with_503_never_drops() -> None:
    fq = FairQueueAdmission(max_in_flight_per_endpoint=1, max_wait_s=2.0)
    load = LoadTracker()
    fill(load, 1)
    fq.admit(ctx("a", 1, 0.0, load))
    fq.admit(ctx("b", 1, 1.0, load))
    out = fq.release(EPS, load, NO_TENANTS, 2.5)
    assert len(out) == 1
    request, verdict = out[0]
    assert request.tenant == "a"
    assert isinstance(verdict, Rejection)
    assert (verdict.status, verdict.kind) == (503, "deadline")
    assert verdict.retry_after_s is not None
    assert fq.queued == 1


def test_one_tenant_cannot_fill_the_queue() -> None:
    fq = FairQueueAdmission(max_in_flight_per_endpoint=1, max_queue=10, max_queue_per_tenant=2)
    load = LoadTracker()
    fill(load, 1)
    verdicts = [fq.admit(ctx("burst", 1, 0.0, load)) for _ in range(3)]
    assert isinstance(verdicts[2], Rejection)
    assert (verdicts[2].status, verdicts[2].kind) == (429, "queue-full")
    assert isinstance(fq.admit(ctx("other", 1, 0.0, load)), Deferral)


def test_queue_is_bounded() -> None:
    fq = FairQueueAdmission(max_in_flight_per_endpoint=1, max_queue=3)
    load = LoadTracker()
    fill(load, 1)
    verdicts = [fq.admit(ctx("a", 1, 0.0, load)) for _ in range(4)]
    assert all(isinstance(v, Deferral) for v in verdicts[:3])
    last = verdicts[3]
    assert isinstance(last, Rejection) and last.kind == "queue-full" and last.status == 503


def test_weights_share_service() -> None:
    fq = FairQueueAdmission(max_in_flight_per_endpoint=1, weights={"gold": 3.0})
    load = LoadTracker()
    fill(load, 1)
    for _ in range(40):
        fq.admit(ctx("gold", 10, 0.0, load))
        fq.admit(ctx("basic", 10, 0.0, load))
    served = []
    for _ in range(40):
        load.finish(EndpointId("e0"), 1)
        ((request, _),) = fq.release(EPS, load, NO_TENANTS, 0.5)
        served.append(request.tenant)
        fill(load, 1)
    assert served.count("gold") == 30  # three times the share


def test_bad_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="weights"):
        FairQueueAdmission(weights={"a": 0.0})


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("abcd"), st.integers(1, 50), st.booleans()),
        min_size=1,
        max_size=60,
    ),
    st.dictionaries(st.sampled_from("abcd"), st.floats(0.5, 4.0), max_size=4),
)
def test_release_order_matches_the_reference(
    script: Sequence[tuple[str, int, bool]], weights: dict[str, float]
) -> None:
    """Arrivals while full, interleaved with single releases: same order as Algorithm 2."""
    fq = FairQueueAdmission(max_in_flight_per_endpoint=1, weights=weights, max_queue=10_000)
    ref = ReferenceVTC(weights, fq.input_weight, fq.output_weight)
    load = LoadTracker()
    fill(load, 1)
    first = ctx("z", 1, 0.0, load)  # make the queue non-empty before anything else
    fq.admit(first)
    ref.arrive("z", first.request, 1)
    for tenant, tokens, release in script:
        c = ctx(tenant, tokens, 0.0, load)
        assert isinstance(fq.admit(c), Deferral)
        ref.arrive(tenant, c.request, tokens)
        if release and ref.queue:
            load.finish(EndpointId("e0"), 1)
            ((got, verdict),) = fq.release(EPS, load, NO_TENANTS, 0.0)
            assert verdict is None
            want = ref.dispatch()
            assert got is want
            fill(load, 1)
    while ref.queue:
        load.finish(EndpointId("e0"), 1)
        ((got, _),) = fq.release(EPS, load, NO_TENANTS, 0.0)
        assert got is ref.dispatch()
        fill(load, 1)
    assert fq.queued == 0


def test_light_use_while_there_is_room_banks_no_credit() -> None:
    """A tenant that sent little while the fleet had room cannot then burst ahead of others."""
    fq = FairQueueAdmission(max_in_flight_per_endpoint=4)
    load = LoadTracker()
    for _ in range(50):  # "busy" is served a lot while there is room
        assert fq.admit(ctx("busy", 100, 0.0, load)) is None
    assert fq.admit(ctx("quiet", 100, 0.0, load)) is None  # lifted to the last served
    assert fq.counter("quiet") == pytest.approx(fq.counter("busy") + 100)
    fill(load, 4)
    for _ in range(10):
        fq.admit(ctx("quiet", 100, 1.0, load))
    fq.admit(ctx("busy", 100, 1.0, load))
    load.finish(EndpointId("e0"), 1)
    load.finish(EndpointId("e0"), 1)
    first_two = [r.tenant for r, _ in fq.release(EPS, load, NO_TENANTS, 1.5)]
    assert "busy" in first_two  # the quiet tenant's backlog does not shut it out


class InFlight:
    """A stub `TenantView` with settable in-flight counts."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def in_flight(self, tenant: str) -> int:
        return self.counts.get(tenant, 0)


def test_per_tenant_cap_applies_at_release() -> None:
    fq = FairQueueAdmission(max_in_flight_per_endpoint=8, max_in_flight_per_tenant=2)
    load = LoadTracker()
    fill(load, 8)
    for _ in range(6):
        fq.admit(ctx("a", 10, 0.0, load))
    fq.admit(ctx("b", 10, 0.0, load))
    tenants = InFlight()
    tenants.counts["a"] = 1
    for _ in range(8):
        load.finish(EndpointId("e0"), 1)  # plenty of room now
    out = fq.release(EPS, load, tenants, 0.5)
    assert sorted(r.tenant for r, _ in out) == ["a", "b"]  # a: one more up to its cap of 2
    assert fq.queued == 5
    fq.check_invariants()
    tenants.counts["a"] = 0
    out = fq.release(EPS, load, tenants, 0.6)
    assert [r.tenant for r, _ in out] == ["a", "a"]
    fq.check_invariants()


def test_zero_charges_do_not_duplicate_heap_entries() -> None:
    fq = FairQueueAdmission(max_in_flight_per_endpoint=1, input_weight=0.0, output_weight=0.0)
    load = LoadTracker()
    fill(load, 1)
    for t in ("a", "a", "a", "a", "b", "b", "b", "b"):
        fq.admit(ctx(t, 10, 0.0, load))
    order = []
    for _ in range(8):
        load.finish(EndpointId("e0"), 1)
        ((request, _),) = fq.release(EPS, load, NO_TENANTS, 0.1)
        order.append(request.tenant)
        fill(load, 1)
        fq.check_invariants()
    assert order.count("a") == order.count("b") == 4


def test_infinite_parameters_are_refused() -> None:
    for bad in ({"max_wait_s": math.inf}, {"input_weight": math.inf}, {"weights": {"a": math.inf}}):
        with pytest.raises(ValueError):
            FairQueueAdmission(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weights"):
        FairQueueAdmission(weights=[1])  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["arrive", "release", "complete", "tick"]),
            st.sampled_from("abc"),
            st.integers(0, 40),
        ),
        max_size=80,
    )
)
def test_bookkeeping_holds_under_any_sequence(script: Sequence[tuple[str, str, int]]) -> None:
    """Arrivals, releases, completions and deadlines in any order: invariants hold, nothing is
    lost (every request is queued, released or expired exactly once)."""
    fq = FairQueueAdmission(max_in_flight_per_endpoint=2, max_wait_s=1.0, max_queue=20)
    load = LoadTracker()
    now = 0.0
    admitted = answered = deferred = 0
    for op, tenant, n in script:
        if op == "arrive":
            verdict = fq.admit(ctx(tenant, n, now, load))
            if verdict is None:
                admitted += 1
                load.start(EndpointId("e0"), 1)
            elif isinstance(verdict, Deferral):
                deferred += 1
        elif op == "release":
            for _, rejection in fq.release(EPS, load, NO_TENANTS, now):
                answered += 1
                if rejection is None:
                    load.start(EndpointId("e0"), 1)
        elif op == "complete" and load.in_flight():
            load.finish(EndpointId("e0"), 1)
            decision = type("D", (), {"request": Request(model="m", prompt="x", tenant=tenant)})
            fq.on_complete(decision, Usage(completion_tokens=n), now)  # type: ignore[arg-type]
        else:
            now += 0.4
        fq.check_invariants()
    assert deferred == answered + fq.queued
