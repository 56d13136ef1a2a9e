"""Tests of `prefixroute.index`: a model-based state machine plus targeted cases."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from prefixroute import jit
from prefixroute.compiled_index import CompiledPrefixIndex
from prefixroute.endpoint import EndpointId
from prefixroute.index import (
    DEFAULT_CAPACITY_BLOCKS,
    DEFAULT_TIER_WEIGHTS,
    IndexInvariantError,
    PrefixIndex,
    PrefixMatch,
    Tier,
    _count_elements,
    _count_into,
)
from tests.strategies import (
    BASE_CHAINS,
    KEY_UNIVERSE,
    chains,
    endpoint_ids,
    tiers,
    unique_chains,
)

E0, E1, E2, E3 = (EndpointId(f"e{i}") for i in range(4))

# Tests taking `make` run against both index classes (the compiled one where numba
# is installed); tests that look at `PrefixIndex`'s internals construct it directly.
INDEX_CLASSES: list[Callable[..., Any]] = [PrefixIndex]
if jit.AVAILABLE:
    INDEX_CLASSES.append(CompiledPrefixIndex)


@pytest.fixture(params=INDEX_CLASSES, ids=lambda cls: cls.__name__)
def make(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """An index class: `PrefixIndex`, then `CompiledPrefixIndex`."""
    cls: Callable[..., Any] = request.param
    return cls


# Weights chosen so float sums are not trivially exact (0.8 is not binary).
WEIGHTS = {Tier.GPU: 1.0, Tier.CPU: 0.8, Tier.DISK: 0.3}


# -- the reference model ---------------------------------------------------------


class ModelIndex:
    """A naive reference: per endpoint a recency-ordered list and plain dicts."""

    def __init__(self, default_capacity: int, weights: dict[Tier, float]) -> None:
        self.default = default_capacity
        self.weights = weights
        self.cap: dict[EndpointId, int] = {}
        self.lru: dict[EndpointId, list[int]] = {}  # least recently used first
        self.tiers: dict[EndpointId, dict[int, set[Tier]]] = {}
        self.spec: dict[EndpointId, dict[int, float]] = {}
        self.inserted = self.evicted = self.expired = self.removed = 0

    def register(self, e: EndpointId) -> None:
        if e not in self.cap:
            self.cap[e] = self.default
            self.lru[e] = []
            self.tiers[e] = {}
            self.spec[e] = {}

    def drop(self, e: EndpointId, k: int) -> None:
        self.lru[e].remove(k)
        del self.tiers[e][k]
        self.spec[e].pop(k, None)

    def evict(self, e: EndpointId) -> None:
        while len(self.lru[e]) > self.cap[e]:
            self.drop(e, self.lru[e][0])
            self.evicted += 1

    def set_capacity(self, e: EndpointId, n: int) -> None:
        self.register(e)
        self.cap[e] = n
        self.evict(e)

    def insert(self, e: EndpointId, keys: Sequence[int], tier: Tier, until: float | None) -> None:
        self.register(e)
        lru, tiers_, spec = self.lru[e], self.tiers[e], self.spec[e]
        for k in reversed(keys):
            if k in tiers_:
                lru.remove(k)
                lru.append(k)
                tiers_[k].add(tier)
                if until is None:
                    spec.pop(k, None)
                elif k in spec:
                    spec[k] = max(spec[k], until)
            else:
                self.inserted += 1
                lru.append(k)
                tiers_[k] = {tier}
                if until is not None:
                    spec[k] = until
        self.evict(e)

    def confirm(self, e: EndpointId, keys: Sequence[int]) -> int:
        if e not in self.cap:
            return 0
        return sum(1 for k in keys if self.spec[e].pop(k, None) is not None)

    def discard_speculative(
        self, e: EndpointId, keys: Sequence[int], not_after: float, at: float | None
    ) -> int:
        if e not in self.cap:
            return 0
        n = 0
        for k in dict.fromkeys(keys):
            d = self.spec[e].get(k)
            if d is None or d > not_after:
                continue
            if at is None:
                self.drop(e, k)
                n += 1
            elif at < d:
                self.spec[e][k] = at
                n += 1
        if at is None:
            self.removed += n
        return n

    def remove(self, e: EndpointId, keys: Sequence[int], tier: Tier | None) -> int:
        if e not in self.cap:
            return 0
        n = 0
        for k in keys:
            held = self.tiers[e].get(k)
            if held is None:
                continue
            if tier is not None:
                held.discard(tier)
            if tier is None or not held:
                self.drop(e, k)
                n += 1
        self.removed += n
        return n

    def clear_endpoint(self, e: EndpointId) -> None:
        if e in self.cap:
            self.removed += len(self.lru[e])
            self.lru[e], self.tiers[e], self.spec[e] = [], {}, {}

    def remove_endpoint(self, e: EndpointId) -> None:
        if e in self.cap:
            self.clear_endpoint(e)
            del self.cap[e], self.lru[e], self.tiers[e], self.spec[e]

    def expire(self, now: float) -> int:
        n = 0
        for e, spec in self.spec.items():
            for k, d in list(spec.items()):
                if d <= now:
                    self.drop(e, k)
                    n += 1
        self.expired += n
        return n

    def match(self, keys: Sequence[int]) -> dict[EndpointId, PrefixMatch]:
        out = {}
        for e, tiers_ in self.tiers.items():
            m = 0
            while m < len(keys) and keys[m] in tiers_:
                m += 1
            if m:
                ws = [self.weights[min(tiers_[k])] for k in keys[:m]]
                out[e] = PrefixMatch(m, math.fsum(ws))
        return out


# -- the per-key reference for insert ----------------------------------------------


class WalkIndex(PrefixIndex):
    """`PrefixIndex` whose `insert` always takes the per-key reference walk."""

    def _record(self, ep: Any, keys: Sequence[int], deadline: float | None) -> int:
        return self._record_walk(ep, keys, deadline)


def snapshot(index: PrefixIndex) -> dict[str, Any]:
    """All of an index's state but the deadline heap's batching, to compare twins.

    The heap is left out because `insert`'s fast path may list a repeated key
    twice in a batch; `check_invariants` already ties the heap to the
    deadlines, which are compared.
    """
    return {
        "holders": dict(index._holders),
        "endpoints": {
            eid: (
                ep.slot,
                ep.capacity,
                ep.size,
                list(ep.lru),
                dict(ep.extra),
                dict(ep.tiers),
                dict(ep.spec),
            )
            for eid, ep in index._eps.items()
        },
        "counters": (
            index._entries,
            index._n_tiered,
            index._n_spec,
            index._inserted,
            index._evicted,
            index._expired,
            index._removed,
        ),
    }


# -- the state machine -----------------------------------------------------------


class IndexMachine(RuleBasedStateMachine):
    """Drives `PrefixIndex` and `ModelIndex` with the same operations and compares them.

    A `WalkIndex` twin gets the same operations too: `insert`'s fast path must
    leave exactly the state of the per-key walk, deque order and stale counts
    included.
    """

    compiled = False  # CompiledIndexMachine drives CompiledPrefixIndex instead

    def __init__(self) -> None:
        super().__init__()
        self.index: Any
        self.twin: WalkIndex | None = None
        if self.compiled:
            self.index = CompiledPrefixIndex(default_capacity_blocks=6, tier_weights=WEIGHTS)
            self.index._arena_slack = 0  # deadline-heap rebuilds on these tiny sizes
        else:
            self.index = PrefixIndex(default_capacity_blocks=6, tier_weights=WEIGHTS)
            self.twin = WalkIndex(default_capacity_blocks=6, tier_weights=WEIGHTS)
            # No slack: deque compaction and heap rebuilds happen on these tiny sizes.
            for index in (self.index, self.twin):
                index._compact_slack = 0
                index._heap_slack = 0
        self.model = ModelIndex(6, WEIGHTS)
        self.now = 0.0

    @rule(e=endpoint_ids(), n=st.integers(1, 12))
    def set_capacity(self, e: EndpointId, n: int) -> None:
        self.index.set_capacity(e, n)
        if self.twin is not None:
            self.twin.set_capacity(e, n)
        self.model.set_capacity(e, n)

    @rule(
        e=endpoint_ids(),
        keys=chains(),
        tier=tiers,
        ttl=st.none() | st.integers(0, 8),
    )
    def insert(self, e: EndpointId, keys: list[int], tier: Tier, ttl: int | None) -> None:
        until = None if ttl is None else self.now + ttl / 2
        self.index.insert(e, keys, tier=tier, speculative_until=until)
        if self.twin is not None:
            self.twin.insert(e, keys, tier=tier, speculative_until=until)
        self.model.insert(e, keys, tier, until)

    @rule(e=endpoint_ids(), keys=chains())
    def confirm(self, e: EndpointId, keys: list[int]) -> None:
        assert self.index.confirm(e, keys) == self.model.confirm(e, keys)
        if self.twin is not None:
            self.twin.confirm(e, keys)

    @rule(e=endpoint_ids(), keys=chains(), tier=st.none() | tiers)
    def remove(self, e: EndpointId, keys: list[int], tier: Tier | None) -> None:
        assert self.index.remove(e, keys, tier=tier) == self.model.remove(e, keys, tier)
        if self.twin is not None:
            self.twin.remove(e, keys, tier=tier)

    @rule(
        e=endpoint_ids(),
        keys=chains(),
        dt=st.integers(0, 8),
        grace=st.none() | st.integers(0, 8),
    )
    def discard_speculative(
        self, e: EndpointId, keys: list[int], dt: int, grace: int | None
    ) -> None:
        not_after = self.now + dt / 2
        at = None if grace is None else self.now + grace / 2
        got = self.index.discard_speculative(e, keys, not_after=not_after, at=at)
        assert got == self.model.discard_speculative(e, keys, not_after, at)
        if self.twin is not None:
            self.twin.discard_speculative(e, keys, not_after=not_after, at=at)

    @rule(e=endpoint_ids())
    def clear_endpoint(self, e: EndpointId) -> None:
        self.index.clear_endpoint(e)
        if self.twin is not None:
            self.twin.clear_endpoint(e)
        self.model.clear_endpoint(e)

    @rule(e=endpoint_ids())
    def remove_endpoint(self, e: EndpointId) -> None:
        self.index.remove_endpoint(e)
        if self.twin is not None:
            self.twin.remove_endpoint(e)
        self.model.remove_endpoint(e)

    @rule(dt=st.integers(0, 4))
    def expire(self, dt: int) -> None:
        self.now += dt / 2
        assert self.index.expire(self.now) == self.model.expire(self.now)
        if self.twin is not None:
            self.twin.expire(self.now)

    @rule(keys=chains())
    def match(self, keys: list[int]) -> None:
        assert self.index.match(keys) == self.model.match(keys)

    @invariant()
    def bookkeeping_is_consistent(self) -> None:
        self.index.check_invariants()

    @invariant()
    def insert_fast_path_equals_walk(self) -> None:
        if self.twin is not None:
            assert snapshot(self.index) == snapshot(self.twin)

    @invariant()
    def same_contents(self) -> None:
        index, model = self.index, self.model
        assert sorted(index.endpoints()) == sorted(model.cap)
        assert len(index) == sum(len(v) for v in model.lru.values())
        for e in map(EndpointId, ("e0", "e1", "e2", "e3")):
            assert index.size(e) == len(model.lru.get(e, ()))
            assert index.capacity(e) == model.cap.get(e, 6)
        stats = index.stats()
        assert dict(stats.per_endpoint) == {e: len(v) for e, v in model.lru.items()}
        assert stats.speculative == sum(len(v) for v in model.spec.values())
        assert (stats.inserted, stats.evicted, stats.expired, stats.removed) == (
            model.inserted,
            model.evicted,
            model.expired,
            model.removed,
        )
        for k in KEY_UNIVERSE:
            assert index.holders(k) == {e for e, t in model.tiers.items() if k in t}
            for e, t in model.tiers.items():
                assert index.is_speculative(e, k) == (k in model.spec[e])
                assert index.tiers(e, k) == t.get(k, set())

    @invariant()
    def same_matches(self) -> None:
        for base in BASE_CHAINS:
            for cut in (1, 3, len(base)):
                keys = list(base[:cut])
                expected = self.model.match(keys)
                assert self.index.match(keys) == expected
                assert self.index.match(np.array(keys, dtype=np.uint64)) == expected
                if not self.compiled:
                    assert self.index._match_walk(keys) == expected


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


class CompiledIndexMachine(IndexMachine):
    """The same state machine against `CompiledPrefixIndex` and the naive model."""

    compiled = True


TestCompiledIndexMachine = pytest.mark.skipif(not jit.AVAILABLE, reason="numba not installed")(
    CompiledIndexMachine.TestCase
)
TestCompiledIndexMachine.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)


# -- targeted tests ----------------------------------------------------------------


def test_reverse_touch_evicts_the_tail_and_keeps_the_prefix(make: Callable[..., Any]) -> None:
    index = make(default_capacity_blocks=4)
    index.insert(E0, [1, 2, 3, 4])
    index.insert(E0, [10, 11])  # 2 over capacity: the first chain's tail goes
    assert index.match([1, 2, 3, 4]) == {E0: PrefixMatch(2, 2.0)}
    assert index.holders(4) == frozenset()
    assert index.holders(3) == frozenset()
    index.check_invariants()


def test_chain_longer_than_capacity_keeps_its_first_blocks(make: Callable[..., Any]) -> None:
    index = make(default_capacity_blocks=3)
    index.insert(E0, [1, 2, 3, 4, 5])
    assert index.size(E0) == 3
    assert index.match([1, 2, 3, 4, 5]) == {E0: PrefixMatch(3, 3.0)}
    assert index.stats().evicted == 2
    index.check_invariants()


def test_retouching_a_chain_protects_it(make: Callable[..., Any]) -> None:
    index = make(default_capacity_blocks=4)
    index.insert(E0, [1, 2])
    index.insert(E0, [3, 4])
    index.insert(E0, [1, 2])  # [3, 4] is now least recently used
    index.insert(E0, [5])
    assert index.holders(4) == frozenset()
    assert index.match([1, 2]) == {E0: PrefixMatch(2, 2.0)}
    assert index.match([3]) == {E0: PrefixMatch(1, 1.0)}


def test_match_is_a_read_and_does_not_touch_lru(make: Callable[..., Any]) -> None:
    index = make(default_capacity_blocks=2)
    index.insert(E0, [1])
    index.insert(E0, [2])
    for _ in range(3):
        index.match([1])
    index.insert(E0, [3])  # 1 is still the least recently used
    assert index.holders(1) == frozenset()
    assert index.holders(2) == {E0}


def test_duplicate_keys_in_one_call(make: Callable[..., Any]) -> None:
    index = make(default_capacity_blocks=3)
    index.insert(E0, [7, 7, 8, 7])
    assert index.size(E0) == 2
    assert index.match([7, 7, 8, 7, 9]) == {E0: PrefixMatch(4, 4.0)}
    assert index.remove(E0, [7, 7]) == 1
    index.check_invariants()


def test_match_edge_cases(make: Callable[..., Any]) -> None:
    index = make()
    assert index.match([]) == {}
    index.insert(E0, [1, 2, 3])
    assert index.match([9, 1, 2]) == {}
    assert index.match([1, 9, 3]) == {E0: PrefixMatch(1, 1.0)}


def test_match_lengths_per_endpoint_and_shared_prefixes(make: Callable[..., Any]) -> None:
    index = make()
    index.insert(E0, [1, 2, 3, 4])
    index.insert(E1, [1, 2])
    index.insert(E2, [1, 2, 3, 4, 5])
    index.insert(E3, [2, 3, 4])  # no first block: no match
    assert index.match([1, 2, 3, 4, 5, 6]) == {
        E0: PrefixMatch(4, 4.0),
        E1: PrefixMatch(2, 2.0),
        E2: PrefixMatch(5, 5.0),
    }
    assert index.holders(2) == {E0, E1, E2, E3}


def test_tier_weights_use_the_best_tier_held(make: Callable[..., Any]) -> None:
    index = make()
    w = DEFAULT_TIER_WEIGHTS
    index.insert(E0, [1, 2, 3, 4])
    index.insert(E0, [3, 4], tier=Tier.CPU)  # now GPU and CPU: GPU counts
    index.insert(E1, [1, 2], tier=Tier.CPU)
    index.insert(E1, [3], tier=Tier.DISK)
    index.insert(E1, [4], tier=Tier.DISK)
    index.insert(E1, [4], tier=Tier.CPU)  # DISK and CPU: CPU counts
    got = index.match([1, 2, 3, 4])
    assert got[E0] == PrefixMatch(4, 4 * w[Tier.GPU])
    assert got[E1].blocks == 4
    assert got[E1].weighted == pytest.approx(3 * w[Tier.CPU] + w[Tier.DISK])
    assert index.tiers(E1, 4) == {Tier.CPU, Tier.DISK}

    # Removing one tier keeps the entry in the others; removing the last drops it.
    assert index.remove(E0, [3, 4], tier=Tier.GPU) == 0
    assert index.match([1, 2, 3, 4])[E0].weighted == pytest.approx(2 + 2 * w[Tier.CPU])
    assert index.remove(E0, [3], tier=Tier.CPU) == 1
    assert index.match([1, 2, 3, 4])[E0] == PrefixMatch(2, 2.0)
    assert index.remove(E1, [4], tier=Tier.GPU) == 0  # not held in GPU: nothing
    assert index.tiers(E1, 4) == {Tier.CPU, Tier.DISK}
    index.check_invariants()


def test_custom_tier_weights_override_defaults_per_tier(make: Callable[..., Any]) -> None:
    index = make(tier_weights={Tier.GPU: 0.5, Tier.DISK: 0.0})
    assert index.tier_weights == {Tier.GPU: 0.5, Tier.CPU: 0.8, Tier.DISK: 0.0}
    index.insert(E0, [1, 2, 3])
    assert index.match([1, 2, 3]) == {E0: PrefixMatch(3, 1.5)}
    index.insert(E1, [1, 2], tier=Tier.DISK)
    assert index.match([1, 2, 3])[E1] == PrefixMatch(2, 0.0)


def test_capacity_shrink_evicts_least_recently_used(make: Callable[..., Any]) -> None:
    index = make()
    index.insert(E0, [1, 2, 3])
    index.insert(E0, [4, 5, 6])
    index.set_capacity(E0, 4)  # oldest first: 3 2 1 6 5 4 -> 3 and 2 go
    assert index.size(E0) == 4
    assert index.capacity(E0) == 4
    assert index.holders(3) == frozenset() and index.holders(2) == frozenset()
    assert index.match([1, 2, 3]) == {E0: PrefixMatch(1, 1.0)}
    assert index.match([4, 5, 6]) == {E0: PrefixMatch(3, 3.0)}
    index.set_capacity(E0, 1)
    assert index.match([4, 5, 6]) == {E0: PrefixMatch(1, 1.0)}
    assert index.holders(1) == frozenset()
    assert index.stats().evicted == 5
    index.set_capacity(E0, 100)  # growing evicts nothing
    assert index.size(E0) == 1
    index.check_invariants()


def test_set_capacity_registers_and_unknown_endpoints_read_as_empty(
    make: Callable[..., Any],
) -> None:
    index = make(default_capacity_blocks=10)
    assert index.capacity(E0) == 10
    assert index.size(E0) == 0
    assert index.endpoints() == []
    index.set_capacity(E1, 3)
    assert index.endpoints() == [E1]
    assert index.capacity(E1) == 3
    assert index.remove(E2, [1]) == 0
    assert index.confirm(E2, [1]) == 0
    index.clear_endpoint(E2)
    index.remove_endpoint(E2)
    assert index.endpoints() == [E1]
    assert not index.is_speculative(E2, 1)


def test_flood_of_unique_keys_stays_bounded() -> None:
    cap = 1000
    index = PrefixIndex(default_capacity_blocks=cap)
    next_key = 0
    for round_ in range(400):
        chain = list(range(next_key, next_key + 256))
        next_key += 256
        until = None if round_ % 2 else float(round_)
        index.insert(E0, chain, speculative_until=until)
        index.insert(E1, chain[:128], tier=Tier.CPU)
    assert len(index) == 2 * cap
    assert len(index._holders) <= 2 * cap
    for ep in index._eps.values():
        assert len(ep.lru) <= 2 * ep.size + 1024
        assert len(ep.tiers) <= cap and len(ep.spec) <= cap
    assert sum(len(item[3]) for item in index._heap) <= 2 * cap + 4096
    index.check_invariants()


def test_retouching_the_same_chain_keeps_the_deque_bounded() -> None:
    index = PrefixIndex(default_capacity_blocks=300)
    chain = list(range(256))
    for _ in range(2000):
        index.insert(E0, chain, speculative_until=1e9)
        index.insert(E0, chain)
    ep = index._eps[E0]
    assert ep.size == 256
    assert len(ep.lru) <= 2 * 256 + 1024
    assert index._heap_keys <= 4096
    index.check_invariants()


def test_compaction_keeps_the_lru_order() -> None:
    index = PrefixIndex(default_capacity_blocks=2000)
    a, b = list(range(1000)), list(range(1000, 2000))
    index.insert(E0, a)
    index.insert(E0, b)
    ep = index._eps[E0]
    lengths = []
    for _ in range(4):  # a's first occurrences are older than b's, its last ones newer
        index.insert(E0, a)
        lengths.append(len(ep.lru))
    assert max(lengths) <= 2 * 2000 + 1024
    assert lengths != sorted(lengths)  # it did compact
    index.check_invariants()
    index.insert(E0, list(range(5000, 5999)))  # evicts b[999] .. b[1]: the oldest
    assert index.match(b) == {E0: PrefixMatch(1, 1.0)}
    assert index.match(a) == {E0: PrefixMatch(1000, 1000.0)}
    index.check_invariants()


def test_speculate_then_confirm_keeps_the_deadline_heap_bounded() -> None:
    """The router's pattern: record speculatively at route time, confirm on completion."""
    index = PrefixIndex(default_capacity_blocks=4096)
    for i in range(500):
        chain = list(range(i * 64, i * 64 + 64))
        index.insert(E0, chain, speculative_until=i + 30.0)
        index.insert(E0, chain)
        assert index._heap_keys <= 2 * index.stats().speculative + 4096
    assert index.stats().speculative == 0
    assert index.expire(1e9) == 0
    index.check_invariants()


def test_mass_removal_compacts_the_deque() -> None:
    index = PrefixIndex()
    chain = list(range(5000))
    index.insert(E0, chain)
    assert index.remove(E0, chain[:4000]) == 4000
    assert len(index._eps[E0].lru) <= 2 * 1000 + 1024
    index.check_invariants()


def test_expire_drops_due_speculative_entries_only(make: Callable[..., Any]) -> None:
    index = make()
    index.insert(E0, [1, 2, 3], speculative_until=10.0)
    index.insert(E0, [4])  # confirmed
    index.insert(E0, [4, 5], speculative_until=5.0)  # 4 stays confirmed
    index.insert(E1, [1, 2], speculative_until=10.0)
    assert index.is_speculative(E0, 1) and not index.is_speculative(E0, 4)
    assert index.expire(4.9) == 0
    assert index.expire(5.0) == 1  # deadline <= now
    assert index.holders(5) == frozenset()
    assert index.confirm(E0, [1, 9]) == 1
    index.insert(E0, [2], speculative_until=20.0)  # extended to the later deadline
    index.insert(E0, [3], speculative_until=1.0)  # keeps the later deadline
    assert index.expire(10.0) == 3  # E0's 3, E1's 1 and 2
    assert index.match([1, 2, 3, 4]) == {E0: PrefixMatch(2, 2.0)}
    assert index.expire(19.0) == 0
    assert index.expire(20.0) == 1
    assert index.match([1, 2, 3]) == {E0: PrefixMatch(1, 1.0)}
    stats = index.stats()
    assert stats.expired == 5 and stats.speculative == 0
    index.check_invariants()


def test_confirmed_insert_confirms_speculation(make: Callable[..., Any]) -> None:
    index = make()
    index.insert(E0, [1, 2], speculative_until=1.0)
    index.insert(E0, [1, 2])
    assert index.expire(2.0) == 0
    assert index.size(E0) == 2


def test_remove_endpoint_frees_and_reuses_its_slot() -> None:
    index = PrefixIndex()
    index.insert(E0, [1, 2])
    index.insert(E1, [1, 2, 3], speculative_until=5.0)
    index.insert(E2, [1])
    slot_e1 = index._eps[E1].slot
    index.remove_endpoint(E1)
    assert index.endpoints() == [E0, E2]
    assert index.holders(1) == {E0, E2}
    assert index.holders(3) == frozenset()
    index.set_capacity(E3, 5)
    assert index._eps[E3].slot == slot_e1  # the freed slot, not a new one
    assert index.holders(1) == {E0, E2}
    assert index.match([1, 2]) == {E0: PrefixMatch(2, 2.0), E2: PrefixMatch(1, 1.0)}
    index.insert(E3, [1, 2, 3], speculative_until=5.0)
    assert index.expire(5.0) == 3  # the old E1 batch must not touch E3 twice
    assert index.stats().removed == 3
    index.check_invariants()


def test_clear_endpoint_keeps_registration_and_capacity(make: Callable[..., Any]) -> None:
    index = make()
    index.set_capacity(E0, 7)
    index.insert(E0, [1, 2, 3], tier=Tier.DISK, speculative_until=3.0)
    index.insert(E1, [1])
    index.clear_endpoint(E0)
    assert index.endpoints() == [E0, E1]
    assert index.capacity(E0) == 7
    assert index.size(E0) == 0
    assert index.holders(1) == {E1}
    assert index.expire(3.0) == 0
    assert index.stats().removed == 3
    index.check_invariants()


def test_stats_counts(make: Callable[..., Any]) -> None:
    index = make(default_capacity_blocks=2)
    index.insert(E0, [1, 2, 3])
    index.insert(E1, [1], speculative_until=1.0)
    index.remove(E0, [1])
    stats = index.stats()
    assert (stats.entries, stats.keys, stats.endpoints, stats.speculative) == (2, 2, 2, 1)
    assert (stats.inserted, stats.evicted, stats.expired, stats.removed) == (4, 1, 0, 1)
    assert dict(stats.per_endpoint) == {E0: 1, E1: 1}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"default_capacity_blocks": 0}, "default_capacity_blocks"),
        ({"default_capacity_blocks": -5}, "default_capacity_blocks"),
        ({"default_capacity_blocks": 1.5}, "default_capacity_blocks"),
        ({"default_capacity_blocks": True}, "default_capacity_blocks"),
        ({"default_capacity_blocks": "64"}, "default_capacity_blocks"),
        ({"tier_weights": {Tier.CPU: 1.5}}, "tier_weights[CPU]"),
        ({"tier_weights": {Tier.DISK: -0.1}}, "tier_weights[DISK]"),
        ({"tier_weights": {Tier.GPU: math.nan}}, "tier_weights[GPU]"),
        ({"tier_weights": {Tier.GPU: "1"}}, "tier_weights[GPU]"),
        ({"tier_weights": {7: 0.5}}, "tier_weights"),
        ({"tier_weights": [0.5]}, "tier_weights"),
    ],
)
def test_invalid_configuration_names_the_field(
    make: Callable[..., Any], kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(field)):
        make(**kwargs)


def test_invalid_arguments(make: Callable[..., Any]) -> None:
    index = make()
    with pytest.raises(ValueError, match=r"^blocks"):
        index.set_capacity(E0, 0)
    with pytest.raises(ValueError, match="speculative_until"):
        index.insert(E0, [1], speculative_until=math.nan)
    with pytest.raises(ValueError):
        index.insert(E0, [1], tier=5)  # type: ignore[arg-type]
    assert index.capacity(E0) == DEFAULT_CAPACITY_BLOCKS


def test_check_invariants_detects_corruption() -> None:
    index = PrefixIndex()
    index.insert(E0, [1, 2, 3])
    index.check_invariants()
    index._eps[E0].size += 1
    with pytest.raises(IndexInvariantError, match="size"):
        index.check_invariants()
    index._eps[E0].size -= 1
    index._holders[99] = 1 << 5
    with pytest.raises(IndexInvariantError, match="unused slots"):
        index.check_invariants()
    del index._holders[99]
    index._eps[E0].extra[2] = 1
    with pytest.raises(IndexInvariantError, match="extra"):
        index.check_invariants()


@settings(max_examples=100, deadline=None)
@given(
    chain=unique_chains(min_size=1, max_size=300),
    lengths=st.lists(st.integers(0, 300), min_size=1, max_size=8),
    cpu_every=st.integers(0, 5),
    probe=st.integers(0, 310),
)
def test_match_fast_path_equals_walk_on_long_chains(
    chain: list[int], lengths: list[int], cpu_every: int, probe: int
) -> None:
    """Long chains cross match's chunk boundaries; each endpoint holds a prefix."""
    for cls in INDEX_CLASSES:
        long_chain_matches(cls(), chain, lengths, cpu_every, probe)


def long_chain_matches(
    index: Any, chain: list[int], lengths: list[int], cpu_every: int, probe: int
) -> None:
    expected: dict[EndpointId, PrefixMatch] = {}
    for i, n in enumerate(lengths):
        e = EndpointId(f"e{i}")
        held = chain[:n]
        index.insert(e, held)
        if cpu_every and held:
            index.remove(e, held[::cpu_every], tier=Tier.GPU)  # whole entries removed
            index.insert(e, held[::cpu_every], tier=Tier.CPU)
        m = len(held)
        if m:
            cpu = len(held[::cpu_every]) if cpu_every else 0
            gpu_w, cpu_w = DEFAULT_TIER_WEIGHTS[Tier.GPU], DEFAULT_TIER_WEIGHTS[Tier.CPU]
            w = [gpu_w] * (m - cpu) + [cpu_w] * cpu
            expected[e] = PrefixMatch(m, math.fsum(w))
    assert index.match(chain) == expected
    probe_keys = chain[:probe] + [2**64 - 1 - i for i in range(3)]
    if isinstance(index, PrefixIndex):
        assert index._match_walk(chain) == expected
        assert index.match(probe_keys) == index._match_walk(probe_keys)
    else:
        pure = PrefixIndex()
        for i, n in enumerate(lengths):
            pure.insert(EndpointId(f"e{i}"), chain[:n])
            if cpu_every and n:
                pure.remove(EndpointId(f"e{i}"), chain[:n][::cpu_every], tier=Tier.GPU)
                pure.insert(EndpointId(f"e{i}"), chain[:n][::cpu_every], tier=Tier.CPU)
        assert list(index.match(probe_keys).items()) == list(pure.match(probe_keys).items())


# -- insert's fast path against the per-key walk -------------------------------------


class CountingIndex(PrefixIndex):
    """`PrefixIndex` counting how often `insert` falls back to the per-key walk."""

    walks = 0

    def _record_walk(self, ep: Any, keys: Sequence[int], deadline: float | None) -> int:
        self.walks += 1
        return super()._record_walk(ep, keys, deadline)


A = [100 + i for i in range(8)]  # a chain; its keys are distinct

# (steps before, the insert measured, whether it walks). A step is (op, endpoint, keys).
INSERT_SHAPES = {
    "all new": ([], (E0, A), False),
    "all held": ([("insert", E0, A)], (E0, A), False),
    "held prefix, new tail": ([("insert", E0, A[:4])], (E0, A), False),
    "prefix held elsewhere": ([("insert", E1, A[:4])], (E0, A), False),
    "prefix partly held here": (
        [("insert", E1, A[:4]), ("insert", E0, A[:2])],
        (E0, A),
        False,
    ),
    "held by both, then new": ([("insert", E1, A[:6]), ("insert", E0, A[:6])], (E0, A), False),
    "a new key twice at the end": ([], (E0, [7, 7]), False),
    "a held key twice": ([("insert", E0, A)], (E0, [A[0], A[1], A[0]]), False),
    "a hole in the held prefix": ([("insert", E0, A), ("remove", E0, A[2:3])], (E0, A), True),
    "a new key twice in the tail": ([], (E0, [1, 2, 3, 2]), True),
    "a key held elsewhere, twice": ([("insert", E1, [5])], (E0, [5, 5, 6]), True),
    "new keys before held ones": ([("insert", E0, A[4:])], (E0, A), True),
}


@pytest.mark.parametrize("until", [None, 10.0])
@pytest.mark.parametrize("shape", INSERT_SHAPES)
def test_insert_shapes_fast_path_equals_walk(shape: str, until: float | None) -> None:
    """The chain shapes `insert` handles in C, and the ones it walks, agree with the walk."""
    steps, (endpoint, keys), walks = INSERT_SHAPES[shape]
    index, twin = CountingIndex(), WalkIndex()
    for idx in (index, twin):
        idx.set_capacity(E0, 6)  # the longer chains evict
        for op, e, ks in steps:
            if op == "insert":
                idx.insert(e, ks, speculative_until=5.0)
            else:
                idx.remove(e, ks)
    index.walks = 0
    index.insert(endpoint, keys, speculative_until=until)
    twin.insert(endpoint, keys, speculative_until=until)
    assert index.walks == int(walks)
    assert snapshot(index) == snapshot(twin)
    index.check_invariants()


@settings(max_examples=60, deadline=None)
@given(
    pool=unique_chains(min_size=8, max_size=120),
    steps=st.lists(
        st.tuples(
            st.sampled_from(["insert", "insert", "insert", "remove", "confirm", "capacity"]),
            endpoint_ids(3),
            st.integers(0, 120),  # start of the pool slice (inserts start at 0 half the time)
            st.integers(0, 120),  # its length
            st.none() | st.integers(0, 4),  # speculative TTL (from now), or confirmed
            tiers,
        ),
        min_size=1,
        max_size=30,
    ),
)
def test_insert_fast_path_equals_walk_on_long_chains(
    pool: list[int], steps: list[tuple[str, EndpointId, int, int, int | None, Tier]]
) -> None:
    """Long chains with shared prefixes, holes and evictions: state equal to the walk's."""
    index, twin = PrefixIndex(default_capacity_blocks=64), WalkIndex(default_capacity_blocks=64)
    for idx in (index, twin):
        idx._compact_slack = idx._heap_slack = 0
    for i, (op, e, start, length, until, tier) in enumerate(steps):
        if op == "insert" and i % 2:
            start = 0  # a chain from the first block: shared prefixes
        keys = pool[start : start + length]
        for idx in (index, twin):
            if op == "insert":
                deadline = None if until is None else i / 2 + until
                idx.insert(e, keys, tier=tier, speculative_until=deadline)
            elif op == "remove":
                idx.remove(e, keys)
            elif op == "confirm":
                idx.confirm(e, keys)
            else:
                idx.set_capacity(e, 8 + length)
            idx.expire(i / 2)
        assert snapshot(index) == snapshot(twin)
    index.check_invariants()


def test_count_into_matches_the_c_helper() -> None:
    """The pure-Python fallback for `collections._count_elements` counts the same."""
    keys = [3, 1, 3, 2**64 - 1, 3]
    by_python, by_c = {1: 2}, {1: 2}
    _count_into(by_python, keys)
    _count_elements(by_c, keys)
    assert by_python == by_c == {1: 3, 3: 3, 2**64 - 1: 1} == Counter(keys) + Counter({1: 2})


def test_keys_as_uint64_arrays(make: Callable[..., Any]) -> None:
    """Every method takes the chain as a list or as a 1-D uint64 array, with the same result."""
    index = make(default_capacity_blocks=10)
    keys = np.array([1, 2**64 - 1, 3, 2**63], dtype=np.uint64)
    index.insert(E0, keys, speculative_until=5.0)
    index.insert(E1, keys[:2], tier=Tier.CPU)
    assert (
        index.match(keys)
        == index.match(keys.tolist())
        == {
            E1: PrefixMatch(2, 2 * DEFAULT_TIER_WEIGHTS[Tier.CPU]),
            E0: PrefixMatch(4, 4.0),
        }
    )
    assert index.holders(2**64 - 1) == {E0, E1}
    assert index.confirm(E0, keys[:1]) == 1
    assert index.discard_speculative(E0, keys[1:2], not_after=5.0, at=1.0) == 1
    assert index.discard_speculative(E0, keys[2:3], not_after=5.0) == 1
    assert index.remove(E1, keys[1:], tier=Tier.CPU) == 1
    assert index.expire(1.0) == 1
    assert index.match(keys) == {
        E1: PrefixMatch(1, DEFAULT_TIER_WEIGHTS[Tier.CPU]),
        E0: PrefixMatch(1, 1.0),
    }
    assert index.match(np.zeros(0, dtype=np.uint64)) == {}
