"""Twin tests: `CompiledPrefixIndex` against `PrefixIndex`, result for result.

Both indexes get the same operations (plain, speculative and tiered inserts,
confirm, discard_speculative with and without `at`, expire, remove with and
without a tier, clear_endpoint, remove_endpoint, capacity shrink and grow),
over 1..70 endpoints (so the compiled index's holder masks span two words),
with the compiled key table forced into collisions (its hash narrowed to a
few bits) and its deadline arena rebuilt often. After every step every
`match` of a set of probe chains must be equal item for item, in the same
iteration order and with bit-identical weights, and so must `stats`, the
return values, `holders`, `is_speculative` and `tiers`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from prefixroute import compiled_index, jit
from prefixroute.compiled_index import (
    M_KEEP,
    M_KLIMIT,
    M_KTOMB,
    M_SPEC,
    M_TICKMAX,
    SIZE,
    CompiledPrefixIndex,
    make_index,
)
from prefixroute.endpoint import EndpointId
from prefixroute.index import IndexInvariantError, PrefixIndex, PrefixMatch, Tier
from tests.strategies import BASE_CHAINS, KEY_UNIVERSE, chains, tiers

pytestmark = pytest.mark.skipif(not jit.AVAILABLE, reason="numba is not installed")

WEIGHTS = {Tier.GPU: 1.0, Tier.CPU: 0.8, Tier.DISK: 0.3}


def exact(result: dict[EndpointId, PrefixMatch]) -> list[tuple[EndpointId, int, str]]:
    """A match result as a list: iteration order and the weights' exact bits count."""
    return [(e, m.blocks, m.weighted.hex()) for e, m in result.items()]


class Twins:
    """A `PrefixIndex` and a `CompiledPrefixIndex` driven together, compared after each call."""

    def __init__(
        self, capacity: int, *, keep: int = -1, arena_slack: int = 0, tick_max: int = 0
    ) -> None:
        self.pure = PrefixIndex(default_capacity_blocks=capacity, tier_weights=WEIGHTS)
        self.fast = CompiledPrefixIndex(default_capacity_blocks=capacity, tier_weights=WEIGHTS)
        self.fast._meta[M_KEEP] = keep  # narrow the hash: many keys share a home row
        self.fast._arena_slack = arena_slack
        if tick_max:  # renumber the LRU ring's ticks often
            self.fast._meta[M_TICKMAX] = tick_max
        self.pure._compact_slack = 0
        self.pure._heap_slack = 0

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        got = []
        for index in (self.pure, self.fast):
            try:
                got.append(("ok", getattr(index, name)(*args, **kwargs)))
            except ValueError as e:
                got.append(("ValueError", str(e)))
        assert got[0] == got[1], (name, args, kwargs, got)
        return got[0][1]

    def compare(self, probes: Sequence[Sequence[int]], keys: Sequence[int] = ()) -> None:
        pure, fast = self.pure, self.fast
        for chain in probes:
            expected = exact(pure.match(chain))
            assert exact(fast.match(chain)) == expected, chain
            assert exact(fast.match(np.array(chain, dtype=np.uint64))) == expected
        assert fast.stats() == pure.stats()
        assert list(fast.stats().per_endpoint.items()) == list(pure.stats().per_endpoint.items())
        assert fast.endpoints() == pure.endpoints()
        assert len(fast) == len(pure)
        for e in pure.endpoints():
            assert fast.size(e) == pure.size(e)
            assert fast.capacity(e) == pure.capacity(e)
        for k in keys:
            assert fast.holders(k) == pure.holders(k)
            for e in pure.endpoints():
                assert fast.is_speculative(e, k) == pure.is_speculative(e, k)
                assert fast.tiers(e, k) == pure.tiers(e, k)


# -- hypothesis: the state machine ---------------------------------------------------

ENDPOINTS = [EndpointId(f"e{i}") for i in range(70)]
endpoints = st.sampled_from(ENDPOINTS[:5]) | st.sampled_from(ENDPOINTS)


class TwinMachine(RuleBasedStateMachine):
    """Random operations on both indexes; every result, match and stat compared."""

    @initialize(keep=st.sampled_from([-1, -1, 0, 7]), tick_max=st.sampled_from([0, 40]))
    def start(self, keep: int, tick_max: int) -> None:
        self.twins = Twins(6, keep=keep, tick_max=tick_max)
        self.now = 0.0

    @rule(e=endpoints, n=st.integers(1, 12) | st.just(0))
    def set_capacity(self, e: EndpointId, n: int) -> None:
        self.twins.call("set_capacity", e, n)

    @rule(e=endpoints, keys=chains(), tier=tiers, ttl=st.none() | st.integers(0, 8))
    def insert(self, e: EndpointId, keys: list[int], tier: Tier, ttl: int | None) -> None:
        until = None if ttl is None else self.now + ttl / 2
        self.twins.call("insert", e, keys, tier=tier, speculative_until=until)

    @rule(e=endpoints, keys=chains())
    def confirm(self, e: EndpointId, keys: list[int]) -> None:
        self.twins.call("confirm", e, keys)

    @rule(e=endpoints, keys=chains(), tier=st.none() | tiers)
    def remove(self, e: EndpointId, keys: list[int], tier: Tier | None) -> None:
        self.twins.call("remove", e, keys, tier=tier)

    @rule(e=endpoints, keys=chains(), dt=st.integers(0, 8), grace=st.none() | st.integers(0, 8))
    def discard_speculative(
        self, e: EndpointId, keys: list[int], dt: int, grace: int | None
    ) -> None:
        at = None if grace is None else self.now + grace / 2
        self.twins.call("discard_speculative", e, keys, not_after=self.now + dt / 2, at=at)

    @rule(e=endpoints)
    def clear_endpoint(self, e: EndpointId) -> None:
        self.twins.call("clear_endpoint", e)

    @rule(e=endpoints)
    def remove_endpoint(self, e: EndpointId) -> None:
        self.twins.call("remove_endpoint", e)

    @rule(dt=st.integers(0, 4))
    def expire(self, dt: int) -> None:
        self.now += dt / 2
        self.twins.call("expire", self.now)

    @rule(keys=chains())
    def match(self, keys: list[int]) -> None:
        self.twins.compare([keys])

    @invariant()
    def same(self) -> None:
        probes = [base[:cut] for base in BASE_CHAINS for cut in (1, 3, len(base))]
        self.twins.compare(probes, KEY_UNIVERSE)
        self.twins.fast.check_invariants()


TestTwinMachine = TwinMachine.TestCase
TestTwinMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


# -- a long seeded random run ------------------------------------------------------


def random_run(seed: int, steps: int, n_endpoints: int, keep: int) -> Twins:
    """Router-like traffic plus engine events on both indexes, compared after every step."""
    rng = random.Random(seed)
    twins = Twins(
        rng.choice([16, 64, 200]),
        keep=keep,
        arena_slack=rng.choice([0, 64]),
        tick_max=rng.choice([0, 2000]),
    )
    eids = [EndpointId(f"pod-{i}") for i in range(n_endpoints)]
    prefixes = [[rng.getrandbits(64) for _ in range(rng.randint(1, 24))] for _ in range(6)]
    prefixes.append([0, 1, 2**64 - 1, 2**63])  # edge keys
    recent: list[list[int]] = []
    now = 0.0

    def some_chain() -> list[int]:
        if recent and rng.random() < 0.4:
            old = rng.choice(recent)
            return old[: rng.randint(0, len(old))]
        base = rng.choice(prefixes)
        tail = [rng.getrandbits(64) for _ in range(rng.randint(0, 40))]
        if rng.random() < 0.1:
            tail += tail[:3]  # repeated keys in one chain
        return base[: rng.randint(1, len(base))] + tail

    for step in range(steps):
        now += rng.choice([0.0, 0.25, 1.0])
        op = rng.random()
        e = rng.choice(eids)
        keys = some_chain()
        as_array = rng.random() < 0.5
        arg: Any = np.array(keys, dtype=np.uint64) if as_array else keys
        if op < 0.35:
            ttl = rng.choice([None, None, 0.0, 1.0, 5.0, math.inf])
            until = None if ttl is None else now + ttl
            tier = rng.choice([Tier.GPU, Tier.GPU, Tier.GPU, Tier.CPU, Tier.DISK])
            twins.call("insert", e, arg, tier=tier, speculative_until=until)
            recent = [*recent[-30:], keys]
        elif op < 0.5:
            twins.call("confirm", e, arg)
        elif op < 0.58:
            at = rng.choice([None, now, now + 0.5])
            twins.call("discard_speculative", e, arg, not_after=now + rng.choice([0, 2, 9]), at=at)
        elif op < 0.68:
            twins.call("expire", now)
        elif op < 0.76:
            twins.call("remove", e, arg, tier=rng.choice([None, Tier.GPU, Tier.CPU, Tier.DISK]))
        elif op < 0.84:
            twins.call("set_capacity", e, rng.choice([1, 4, 16, 64, 300]))
        elif op < 0.87:
            twins.call("clear_endpoint", e)
        elif op < 0.9:
            twins.call("remove_endpoint", e)
        probes = [keys, *rng.sample(recent, min(3, len(recent)))]
        twins.compare(probes, keys[:4])
        if step % 50 == 0:
            twins.fast.check_invariants()
            twins.pure.check_invariants()
    twins.fast.check_invariants()
    return twins


@pytest.mark.parametrize(
    ("seed", "n_endpoints", "keep"),
    [(1, 1, -1), (2, 3, -1), (3, 8, 15), (4, 64, -1), (5, 65, 3), (6, 70, -1)],
)
def test_long_random_run_agrees(seed: int, n_endpoints: int, keep: int) -> None:
    twins = random_run(seed, 1500, n_endpoints, keep)
    assert twins.pure.stats().inserted > 1000  # the run did real work


# -- targeted cases ---------------------------------------------------------------


def test_factory_picks_the_class() -> None:
    assert type(make_index(compiled=True)) is CompiledPrefixIndex
    assert type(make_index(compiled=False)) is PrefixIndex
    assert type(make_index()) is CompiledPrefixIndex  # numba is here (module skip otherwise)
    index = make_index(default_capacity_blocks=7, tier_weights={Tier.DISK: 0.1}, compiled=True)
    assert index.default_capacity_blocks == 7
    assert index.tier_weights[Tier.DISK] == 0.1
    with pytest.raises(ValueError, match=r"^default_capacity_blocks"):
        make_index(default_capacity_blocks=0, compiled=True)


@pytest.mark.parametrize("capacity", [2**53, 2**53 + 1, 2**63, 2**70])
def test_capacities_past_int64_are_taken_as_given(capacity: int) -> None:
    """An engine may report any positive int: the kernels' int64 must not wrap it negative."""
    twins = Twins(capacity)
    chain = list(range(1, 40))
    twins.call("set_capacity", EndpointId("a"), capacity)
    twins.call("insert", EndpointId("a"), chain)
    twins.call("insert", EndpointId("b"), chain[:9], speculative_until=5.0)
    assert twins.call("capacity", EndpointId("a")) == capacity
    assert twins.call("capacity", EndpointId("b")) == capacity  # the default
    twins.call("set_capacity", EndpointId("a"), 4)
    twins.compare([chain])
    assert twins.call("size", EndpointId("a")) == 4
    twins.call("remove_endpoint", EndpointId("b"))
    assert twins.call("capacity", EndpointId("b")) == capacity
    twins.fast.check_invariants()


def test_growth_keeps_everything() -> None:
    """Past the first table, node pool and arena sizes, with >64 endpoints: still twins."""
    twins = Twins(5000)
    rng = random.Random(9)
    chains_ = [[rng.getrandbits(64) for _ in range(300)] for _ in range(20)]
    for i, chain in enumerate(chains_):
        e = EndpointId(f"e{i * 7 % 130}")
        twins.call("insert", e, chain, speculative_until=float(i % 3) if i % 2 else None)
        twins.call("insert", EndpointId("e129"), chain[:50], tier=Tier.CPU)
    twins.compare(chains_, chains_[0][:5])
    assert twins.call("expire", 10.0) > 0
    twins.compare(chains_)
    twins.fast.check_invariants()


def test_tombstone_purge_in_place_keeps_lru_and_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Churn full endpoints until tombstones fill both tables at a fixed size.

    The tables are then cleaned in place (rows moved back, LRU ring items
    repointed), not rebuilt: the row counts stay, and the index stays the
    pure one's twin (eviction order included).
    """
    purges: list[tuple[bool, bool, int]] = []
    kernel = compiled_index._k_purge

    def spy(kt: Any, ent: Any, meta: Any, keys: bool, entries: bool) -> Any:
        rows, metas = kernel(kt, ent, meta, keys, entries)
        purges.append((keys, entries, len(rows)))
        return rows, metas

    monkeypatch.setattr(compiled_index, "_k_purge", spy)
    twins = Twins(400)
    rng = random.Random(11)
    eids = [EndpointId(f"e{i}") for i in range(5)]
    shared = [rng.getrandbits(64) for _ in range(60)]
    for e in eids:
        twins.call("insert", e, shared)
    fast = twins.fast
    for step in range(600):
        chain = shared[: rng.randrange(60)] + [rng.getrandbits(64) for _ in range(40)]
        twins.call("insert", eids[step % 5], chain, speculative_until=float(step % 7))
        if step % 5 == 4:
            twins.call("confirm", eids[step % 5], chain)
        if step % 50 == 0:
            twins.compare([shared, chain])
    assert any(k for k, _, _ in purges)  # the key table was purged in place
    assert any(e and moved for _, e, moved in purges)  # and the entry table, moving rows
    assert fast._meta[M_KTOMB] < fast._meta[M_KLIMIT] // 2
    twins.compare([shared, shared[:30]], shared[:5])
    fast.check_invariants()


def test_numpy_keys_are_not_copied_and_views_work() -> None:
    index = CompiledPrefixIndex()
    keys = np.arange(10, dtype=np.uint64) * np.uint64(2**60)
    index.insert(EndpointId("a"), keys)
    view = keys[:5]
    view.flags.writeable = False
    assert index.match(view) == {EndpointId("a"): PrefixMatch(5, 5.0)}
    assert index.match(keys[::2]) == {EndpointId("a"): PrefixMatch(5, 5.0)}  # strided: copied
    assert index.confirm(EndpointId("a"), keys.tolist()) == 0
    assert index.match(keys.astype(np.int64)[:2]) == {EndpointId("a"): PrefixMatch(2, 2.0)}
    assert index.holders(int(keys[3])) == {EndpointId("a")}
    assert index.holders(-1) == frozenset() and index.holders(2**64) == frozenset()


def test_check_invariants_detects_corruption() -> None:
    index = CompiledPrefixIndex()
    index.insert(EndpointId("a"), [1, 2, 3], speculative_until=5.0)
    index.check_invariants()
    index._epa[0, SIZE] += 1
    with pytest.raises(IndexInvariantError, match="size"):
        index.check_invariants()
    index._epa[0, SIZE] -= 1
    index._meta[M_SPEC] += 1
    with pytest.raises(IndexInvariantError, match="speculative"):
        index.check_invariants()
    index._meta[M_SPEC] -= 1
    index._dead[:] = 99.0
    with pytest.raises(IndexInvariantError, match="cannot expire"):
        index.check_invariants()
    index._dead[:] = 5.0
    index.check_invariants()
    index._kt[:, 1] = 0  # masks lost
    with pytest.raises(IndexInvariantError, match="key row"):
        index.check_invariants()
