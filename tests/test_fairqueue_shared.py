"""Shared virtual time for `FairQueueAdmission`: two replicas exchange charges through a store.

The store is a plain dict standing in for Redis' ``HINCRBYFLOAT`` hash: this
tests the core's arithmetic (what is charged, how global counters apply);
the real-Redis tests live with the shared-state driver and the replicas.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from prefixroute.decision import Deferral
from prefixroute.endpoint import EndpointId
from prefixroute.fairqueue import FairQueueAdmission
from prefixroute.load import LoadTracker
from prefixroute.plugins import AdmissionContext
from prefixroute.request import Request, Usage
from tests.test_fairqueue import EPS, NoTenants

E0 = EndpointId("e0")


def ctx(tenant: str, tokens: int, load: LoadTracker, now: float = 0.0) -> AdmissionContext:
    request = Request(model="m", prompt="x" * max(tokens, 1), tenant=tenant)
    return AdmissionContext(
        request=request,
        endpoints=EPS,
        now=now,
        prompt_tokens=tokens,
        load=load,
        tenants=NoTenants(),
    )


class Done:
    """What `on_complete` reads of a `Decision`: its request."""

    def __init__(self, tenant: str) -> None:
        self.request = Request(model="m", prompt="x", tenant=tenant)


def complete(fq: FairQueueAdmission, tenant: str, tokens: int) -> None:
    fq.on_complete(Done(tenant), Usage(completion_tokens=tokens), 0.0)  # type: ignore[arg-type]


def sync(fq: FairQueueAdmission, store: dict[str, float]) -> None:
    """What the driver does: HINCRBYFLOAT the charges, read the hash back, apply it."""
    for tenant, charge in fq.take_charges().items():
        store[tenant] = store.get(tenant, 0.0) + charge
    fq.apply_counters(store)


def release_one(fq: FairQueueAdmission, load: LoadTracker) -> str:
    load.finish(E0, 1)
    ((request, verdict),) = fq.release(EPS, load, NoTenants(), 0.5)
    assert verdict is None
    load.start(E0, 1)
    return request.tenant


# -- the point ----------------------------------------------------------------------------


def serve_heavy_on_a_then_release_on_b(shared: bool) -> list[str]:
    """Replica A serves "heavy" 50 x 100 tokens while it has room; replica B is saturated
    with 5 requests of "heavy" and 5 of "light" queued (heavy first): B's release order."""
    store: dict[str, float] = {}
    a = FairQueueAdmission(max_in_flight_per_endpoint=1)
    b = FairQueueAdmission(max_in_flight_per_endpoint=1)
    load_a, load_b = LoadTracker(), LoadTracker()
    for fq in (a, b):
        assert fq.take_charges() == {}  # starts the recording
    load_b.start(E0, 1)
    for _ in range(5):
        assert isinstance(b.admit(ctx("heavy", 100, load_b)), Deferral)
        assert isinstance(b.admit(ctx("light", 100, load_b)), Deferral)
    for _ in range(50):
        assert a.admit(ctx("heavy", 100, load_a)) is None  # A has room: admitted, charged
    if shared:
        sync(a, store)
        sync(b, store)
        assert store == {"heavy": 5000.0}
        assert b.counter("heavy") == 5000.0 and b.counter("light") == 0.0
    order = [release_one(b, load_b) for _ in range(10)]
    for fq in (a, b):
        fq.check_invariants()
    return order


def test_a_tenant_served_on_one_replica_waits_its_turn_on_the_other() -> None:
    assert serve_heavy_on_a_then_release_on_b(shared=True) == ["light"] * 5 + ["heavy"] * 5


def test_without_sharing_each_replica_is_fair_on_its_own_only() -> None:
    assert serve_heavy_on_a_then_release_on_b(shared=False) == ["heavy", "light"] * 5


def test_two_replicas_sharing_agree_on_the_counters() -> None:
    """Both serve both tenants; after a sync each, both count at least the fleet's service of
    each (plus their own lifts, which stay local: a lift is not service)."""
    store: dict[str, float] = {}
    replicas = [FairQueueAdmission(weights={"gold": 2.0}) for _ in range(2)]
    loads = [LoadTracker(), LoadTracker()]
    for fq in replicas:
        fq.take_charges()
    for (fq, load), served in zip(zip(replicas, loads, strict=True), (3, 7), strict=True):
        for _ in range(served):
            assert fq.admit(ctx("gold", 100, load)) is None
            assert fq.admit(ctx("basic", 100, load)) is None
            complete(fq, "basic", 10)
    alone = [fq.counter("basic") for fq in replicas]
    for fq in replicas:
        sync(fq, store)
    assert store == pytest.approx({"gold": 10 * 100 / 2.0, "basic": 10 * (100 + 2 * 10)})
    replicas[0].apply_counters(store)  # the second sync saw both replicas' charges
    for fq in replicas:
        for tenant in ("gold", "basic"):
            assert fq.counter(tenant) >= store[tenant]
        fq.check_invariants()
    # replica 0 served 3 requests of each: alone, it counted a fraction of basic's service
    assert alone[0] < store["basic"] <= replicas[0].counter("basic")


# -- the two calls ------------------------------------------------------------------------


def test_take_charges_returns_the_weighted_charges_since_the_last_call() -> None:
    fq = FairQueueAdmission(weights={"gold": 4.0})
    load = LoadTracker()
    assert fq.admit(ctx("a", 100, load)) is None
    assert fq.take_charges() == {}  # recording starts with the first call
    assert fq.admit(ctx("a", 100, load)) is None
    assert fq.admit(ctx("gold", 100, load)) is None
    complete(fq, "a", 10)  # output_weight 2
    complete(fq, "b", 0)  # nothing generated: no charge
    assert fq.take_charges() == {"a": 120.0, "gold": 25.0}
    assert fq.take_charges() == {}
    zero = FairQueueAdmission(input_weight=0.0)
    zero.take_charges()
    assert zero.admit(ctx("a", 100, load)) is None
    assert zero.take_charges() == {}  # zero charges are not shipped


def test_apply_raises_known_tenants_only_and_never_lowers() -> None:
    fq = FairQueueAdmission()
    load = LoadTracker()
    for tenant in ("a", "b"):
        assert fq.admit(ctx(tenant, 100, load)) is None
    before = (fq.counter("a"), fq.counter("b"))
    assert before == (100.0, 200.0)  # b was lifted to a's counter, then charged
    fq.apply_counters({"a": 150.0, "b": 50.0, "stranger": 1e9})
    assert (fq.counter("a"), fq.counter("b")) == (150.0, 200.0)
    assert fq.counter("stranger") == fq.counter("nobody")  # not created: reads as the floor
    fq.check_invariants()


def test_a_raised_last_tenant_raises_the_floor() -> None:
    """A newcomer on this replica is lifted to the fleet's virtual time, not a stale local one."""
    fq = FairQueueAdmission()
    load = LoadTracker()
    assert fq.admit(ctx("heavy", 100, load)) is None  # the last to leave: floor 100
    fq.apply_counters({"heavy": 9000.0})  # it was served elsewhere meanwhile
    assert fq.admit(ctx("newcomer", 100, load)) is None
    assert fq.counter("newcomer") == 9100.0


def test_bad_counters_are_refused_and_nothing_is_applied() -> None:
    fq = FairQueueAdmission()
    load = LoadTracker()
    for tenant in ("a", "b"):
        fq.admit(ctx(tenant, 100, load))
    for bad in (math.nan, math.inf, "12", True, None):
        with pytest.raises(ValueError, match="'b'"):
            fq.apply_counters({"a": 1e6, "b": bad})  # type: ignore[dict-item]
        assert fq.counter("a") == 100.0
    fq.apply_counters({"a": 1e6, "unknown": math.nan})  # a value it does not read: ignored
    assert fq.counter("a") == 1e6


def test_pending_charges_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FairQueueAdmission, "MAX_PENDING_TENANTS", 3)
    fq = FairQueueAdmission()
    load = LoadTracker()
    fq.take_charges()
    for tenant in ("a", "b", "c", "d", "e", "a"):
        assert fq.admit(ctx(tenant, 10, load)) is None
    assert fq.take_charges() == {"a": 20.0, "b": 10.0, "c": 10.0}
    assert fq.unshared_charges == 2
    assert fq.counter("e") > fq.counter("d") > 0  # the local counters still moved
    assert fq.admit(ctx("e", 10, load)) is None
    assert fq.take_charges() == {"e": 10.0}


# -- any interleaving -----------------------------------------------------------------------

TENANTS = ("a", "b", "c", "gold")
WEIGHTS = {"gold": 2.0}


class SharedVirtualTime(RuleBasedStateMachine):
    """Two replicas, a store, and charges in transit (taken, not yet added) between them.

    Checks: each replica's bookkeeping; counters never fall; `apply_counters`
    creates no tenant; what `take_charges` returns is exactly what was
    charged (computed here from the requests); after a replica applies the
    store, every tenant it knows is at least at its global value.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fqs = [
            FairQueueAdmission(max_in_flight_per_endpoint=2, weights=WEIGHTS, max_wait_s=1e9)
            for _ in range(2)
        ]
        self.loads = [LoadTracker(), LoadTracker()]
        self.queued: list[list[tuple[Request, int]]] = [[], []]
        self.store: dict[str, float] = {}
        self.transit: list[dict[str, float]] = [{}, {}]
        self.expected: list[dict[str, float]] = [{}, {}]  # charged since the last take
        self.prev: list[dict[str, float]] = [{}, {}]
        for fq in self.fqs:
            fq.take_charges()

    def _charged(self, i: int, tenant: str, cost: float) -> None:
        if cost:
            pending = self.expected[i]
            pending[tenant] = pending.get(tenant, 0.0) + cost / WEIGHTS.get(tenant, 1.0)

    @rule(i=st.integers(0, 1), tenant=st.sampled_from(TENANTS), tokens=st.integers(0, 300))
    def arrive(self, i: int, tenant: str, tokens: int) -> None:
        fq, load = self.fqs[i], self.loads[i]
        c = ctx(tenant, tokens, load)
        verdict = fq.admit(c)
        if verdict is None:
            load.start(E0, 1)
            self._charged(i, tenant, fq.input_weight * tokens)
        elif isinstance(verdict, Deferral):
            self.queued[i].append((c.request, tokens))

    @rule(i=st.integers(0, 1))
    def release(self, i: int) -> None:
        fq, load = self.fqs[i], self.loads[i]
        tokens = {id(r): n for r, n in self.queued[i]}
        for request, rejection in fq.release(EPS, load, NoTenants(), 0.0):
            assert rejection is None
            load.start(E0, 1)
            self._charged(i, request.tenant, fq.input_weight * tokens[id(request)])
            self.queued[i] = [(r, n) for r, n in self.queued[i] if r is not request]

    @precondition(lambda self: any(load.in_flight() for load in self.loads))
    @rule(data=st.data(), tenant=st.sampled_from(TENANTS), tokens=st.integers(0, 100))
    def complete(self, data: st.DataObject, tenant: str, tokens: int) -> None:
        i = data.draw(st.sampled_from([i for i in (0, 1) if self.loads[i].in_flight()]))
        self.loads[i].finish(E0, 1)
        complete(self.fqs[i], tenant, tokens)
        self._charged(i, tenant, self.fqs[i].output_weight * tokens)

    @rule(i=st.integers(0, 1))
    def take(self, i: int) -> None:
        charges = self.fqs[i].take_charges()
        assert all(c > 0 for c in charges.values())
        assert charges == pytest.approx(self.expected[i])
        self.expected[i] = {}
        for tenant, c in charges.items():
            self.transit[i][tenant] = self.transit[i].get(tenant, 0.0) + c

    @rule(i=st.integers(0, 1))
    def add_to_store(self, i: int) -> None:
        for tenant, c in self.transit[i].items():
            self.store[tenant] = self.store.get(tenant, 0.0) + c
        self.transit[i] = {}

    @rule(i=st.integers(0, 1))
    def apply(self, i: int) -> None:
        fq = self.fqs[i]
        known = set(self._counters(i))
        fq.apply_counters(dict(self.store))
        assert set(self._counters(i)) == known, "apply_counters created a tenant"
        for tenant, value in self.store.items():
            if tenant in known:
                assert fq.counter(tenant) >= value

    @rule(
        i=st.integers(0, 1),
        counters=st.dictionaries(
            st.sampled_from((*TENANTS, "zz")), st.floats(-1e3, 1e5, allow_nan=False)
        ),
    )
    def apply_anything(self, i: int, counters: dict[str, float]) -> None:
        """A store that restarted, or lost keys, or holds other numbers: still never lowers."""
        self.fqs[i].apply_counters(counters)

    def _counters(self, i: int) -> dict[str, float]:
        state: Any = self.fqs[i]._state  # the test peeks at which tenants a replica knows
        return dict(state.counters)

    @invariant()
    def bookkeeping_holds_and_counters_never_fall(self) -> None:
        for i, fq in enumerate(self.fqs):
            fq.check_invariants()
            self.loads[i].check_invariants()
            now = self._counters(i)
            for tenant, value in self.prev[i].items():
                assert now.get(tenant, math.inf) >= value, (tenant, value, now.get(tenant))
            self.prev[i] = now


TestSharedVirtualTime = SharedVirtualTime.TestCase
TestSharedVirtualTime.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
