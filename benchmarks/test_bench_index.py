"""pytest-benchmark suite for the prefix indexes on a warm 1,000,000-entry index over 64 endpoints.

Every benchmark runs on `PrefixIndex` and, where numba is installed, on
`CompiledPrefixIndex` (the `warm` fixture's two parameters; the compiled
index gets its chains as uint64 arrays, as the router passes them); the
reference walks are `PrefixIndex`-only.

Chains are 256 keys: a 4,096-token prompt at 16 tokens per block. The index
is the mixed composition of `benchmarks/index_memory.py` (shared 128-block
prefixes on 8 endpoints each, unique tails), built once per module, plus:

- a 256-block conversation on one endpoint whose first 128 blocks are a
  shared prefix (so it is the *full hit*: one endpoint matches 256 blocks,
  the prefix's 7 other homes match 128);
- a dedicated endpoint, full to its capacity, that the insert benchmarks
  write to, so inserting new keys evicts as many entries per round and never
  touches the chains the match benchmarks read. It also holds a shared
  128-block prefix (one of the workload's, so 8 other endpoints hold it too)
  and a 256-block chain of its own, which the speculative benchmarks re-touch.

The speculative benchmarks use the router's deadlines, ``now + 30`` with
``now`` advancing every round, so already-held speculative keys get their
deadline extended (and pushed to the deadline heap) as in service. They pass
held keys as new int objects, as the router's hashing makes them for every
request: a dict lookup then compares the stored key's value, not its
identity, which reads one more cold object per key.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from benchmarks.index_memory import ENTRIES, MixedWorkload
from prefixroute import jit
from prefixroute.compiled_index import CompiledPrefixIndex
from prefixroute.endpoint import EndpointId
from prefixroute.index import PrefixIndex

CHAIN = 256
INSERT_EP = EndpointId("pod-insert")
INSERT_CAPACITY = 16_384
SPEC_TTL = 30.0


class Warm:
    def __init__(self, cls: Callable[[], Any] = PrefixIndex) -> None:
        self.index = cls()
        self.compiled = cls is CompiledPrefixIndex
        work = MixedWorkload(seed=3)
        work.fill(self.index, ENTRIES - INSERT_CAPACITY)
        self.rng = random.Random(4)
        self.fresh = itertools.count(2**63)  # disjoint from the workload's random keys
        prefix = work.prefixes[0]
        for home in work.homes[0]:  # every home holds the prefix, whatever the draw
            self.index.insert(home, prefix)
        self.home = work.homes[0][0]
        self.full = self.chain(prefix + self.new_keys(CHAIN - len(prefix)))
        self.index.insert(self.home, self.full)
        self.half = self.chain(prefix + self.new_keys(CHAIN - len(prefix)))
        self.miss = self.chain(self.new_keys(CHAIN))
        self.index.set_capacity(INSERT_EP, INSERT_CAPACITY)
        for _ in range(INSERT_CAPACITY // CHAIN):
            self.index.insert(INSERT_EP, self.new_keys(CHAIN))
        self.shared = work.prefixes[1]  # a system prompt 8 other endpoints hold too
        self.repeat = self.new_keys(CHAIN)
        self.clock = itertools.count(1)

    def new_keys(self, n: int) -> list[int]:
        return list(itertools.islice(self.fresh, n))

    def chain(self, keys: list[int]) -> Any:
        """`keys` as the index takes them from the router: a uint64 array for the compiled one."""
        return np.array(keys, dtype=np.uint64) if self.compiled else keys

    def rehashed(self, keys: list[int]) -> Any:
        """`keys` as new, equal int objects (``x ^ 0`` makes a new int above 2**30).

        For the compiled index, a new uint64 array (as hashing makes one per request).
        """
        if self.compiled:
            return np.array(keys, dtype=np.uint64)
        out = [k ^ 0 for k in keys]
        assert out == keys and out[0] is not keys[0]
        return out

    def deadline(self) -> float:
        """The router's ``now + speculative_ttl_s``, with ``now`` one second later each call."""
        return float(next(self.clock)) + SPEC_TTL


INDEX_CLASSES: list[Callable[[], Any]] = [PrefixIndex]
if jit.AVAILABLE:
    INDEX_CLASSES.append(CompiledPrefixIndex)


@pytest.fixture(scope="module", params=INDEX_CLASSES, ids=lambda cls: cls.__name__)
def warm(request: pytest.FixtureRequest) -> Warm:
    return Warm(request.param)


def pure_only(warm: Warm) -> None:
    if warm.compiled:
        pytest.skip("a reference walk of PrefixIndex")


def test_index_is_warm(warm: Warm) -> None:
    assert len(warm.index) >= ENTRIES
    assert len(warm.index.endpoints()) == 65
    assert len(warm.index.match(warm.full)) == 8


def test_match_full_hit(benchmark: Any, warm: Warm) -> None:
    got = benchmark(warm.index.match, warm.full)
    assert got[warm.home].blocks == CHAIN
    assert sorted(m.blocks for m in got.values()) == [128] * 7 + [CHAIN]


def test_match_full_hit_reference_walk(benchmark: Any, warm: Warm) -> None:
    """The plain-Python walk `match` is tested against, for comparison (STYLE.md 10)."""
    pure_only(warm)
    got = benchmark(warm.index._match_walk, warm.full)
    assert got == warm.index.match(warm.full)


def test_match_half_hit(benchmark: Any, warm: Warm) -> None:
    got = benchmark(warm.index.match, warm.half)
    assert sorted(m.blocks for m in got.values()) == [128] * 8


def test_match_miss(benchmark: Any, warm: Warm) -> None:
    got = benchmark(warm.index.match, warm.miss)
    assert got == {}


def test_insert_new_chain_with_evictions(benchmark: Any, warm: Warm) -> None:
    index = warm.index

    def setup() -> tuple[tuple[EndpointId, list[int]], dict[str, Any]]:
        return (INSERT_EP, warm.chain(warm.new_keys(CHAIN))), {}

    before = index.stats().evicted
    benchmark.pedantic(index.insert, setup=setup, rounds=2000, warmup_rounds=50)
    assert index.size(INSERT_EP) == INSERT_CAPACITY
    assert index.stats().evicted > before


def test_insert_speculative_retouch(benchmark: Any, warm: Warm) -> None:
    """The router's record step for a hit: re-insert a held chain speculatively."""
    index = warm.index
    before = len(index)
    benchmark(index.insert, warm.home, warm.full, speculative_until=1e9)
    assert len(index) == before
    index.check_invariants()


def _speculative_insert(benchmark: Any, warm: Warm, chain: Any) -> int:
    """Time ``insert(INSERT_EP, chain(), speculative_until=now + 30)``, fresh args per round.

    Returns how many inserts ran (one when benchmarks are disabled).
    """
    calls = 0

    def setup() -> tuple[tuple[EndpointId, list[int]], dict[str, Any]]:
        nonlocal calls
        calls += 1
        return (INSERT_EP, chain()), {"speculative_until": warm.deadline()}

    benchmark.pedantic(warm.index.insert, setup=setup, rounds=2000, warmup_rounds=50)
    return calls


def test_insert_speculative_half_held(benchmark: Any, warm: Warm) -> None:
    """The router's record step for a request sharing a held system prompt: 128 held, 128 new."""
    index = warm.index
    index.insert(INSERT_EP, warm.shared)  # confirmed; each round re-touches it
    before = index.stats().evicted
    _speculative_insert(
        benchmark, warm, lambda: warm.rehashed(warm.shared + warm.new_keys(CHAIN // 2))
    )
    assert index.size(INSERT_EP) == INSERT_CAPACITY
    assert index.stats().evicted > before
    assert index.match(warm.shared)[INSERT_EP].blocks == len(warm.shared)
    assert not index.is_speculative(INSERT_EP, warm.shared[0])  # stays confirmed


def test_insert_speculative_half_held_reference_walk(benchmark: Any, warm: Warm) -> None:
    """The same with `insert`'s bookkeeping done by the per-key walk it is tested against."""
    pure_only(warm)
    index = warm.index
    index._record = index._record_walk  # type: ignore[method-assign]
    try:
        _speculative_insert(
            benchmark, warm, lambda: warm.rehashed(warm.shared + warm.new_keys(CHAIN // 2))
        )
    finally:
        del index._record
    assert index.match(warm.shared)[INSERT_EP].blocks == len(warm.shared)


def test_insert_speculative_all_held(benchmark: Any, warm: Warm) -> None:
    """The router's record step for a repeated prompt: every key held and speculative."""
    index = warm.index
    index.insert(INSERT_EP, warm.repeat, speculative_until=warm.deadline())
    before = index.stats().inserted
    _speculative_insert(benchmark, warm, lambda: warm.rehashed(warm.repeat))
    assert index.stats().inserted == before
    assert index.match(warm.repeat)[INSERT_EP].blocks == CHAIN
    assert index.is_speculative(INSERT_EP, warm.repeat[-1])


def test_insert_speculative_all_new(benchmark: Any, warm: Warm) -> None:
    """The router's record step for a miss: 256 new keys, 256 evictions."""
    index = warm.index
    before = index.stats().evicted
    calls = _speculative_insert(benchmark, warm, lambda: warm.chain(warm.new_keys(CHAIN)))
    assert index.size(INSERT_EP) == INSERT_CAPACITY
    assert index.stats().evicted >= before + calls * CHAIN


def test_insert_confirm_speculative_chain(benchmark: Any, warm: Warm) -> None:
    """The router's complete step: a confirmed insert of a chain held speculatively."""
    index = warm.index

    def setup() -> tuple[tuple[EndpointId, list[int]], dict[str, Any]]:
        keys = warm.rehashed(warm.repeat)  # the decision's keys, recorded then confirmed
        index.insert(INSERT_EP, keys, speculative_until=warm.deadline())
        return (INSERT_EP, keys), {}

    benchmark.pedantic(index.insert, setup=setup, rounds=2000, warmup_rounds=50)
    assert not index.is_speculative(INSERT_EP, warm.repeat[0])
    assert index.match(warm.repeat)[INSERT_EP].blocks == CHAIN


def test_confirm(benchmark: Any, warm: Warm) -> None:
    """`confirm` of a 256-key chain whose entries are all speculative."""
    index = warm.index

    def setup() -> tuple[tuple[EndpointId, list[int]], dict[str, Any]]:
        keys = warm.rehashed(warm.repeat)  # the decision's keys, recorded then confirmed
        index.insert(INSERT_EP, keys, speculative_until=warm.deadline())
        return (INSERT_EP, keys), {}

    benchmark.pedantic(index.confirm, setup=setup, rounds=2000, warmup_rounds=50)
    assert index.confirm(INSERT_EP, warm.repeat) == 0
    index.check_invariants()


def test_route_record_and_confirm(benchmark: Any, warm: Warm) -> None:
    """What the router does to the index per decision: match a 256-key chain (128 held
    by 9 endpoints, 128 new), insert it speculatively, then confirm it on completion."""
    index = warm.index

    def setup() -> tuple[tuple[Any, float], dict[str, Any]]:
        return (warm.rehashed(warm.shared + warm.new_keys(CHAIN // 2)), warm.deadline()), {}

    def decide(keys: Any, deadline: float) -> int:
        matched = index.match(keys)
        index.insert(INSERT_EP, keys, speculative_until=deadline)
        return index.confirm(INSERT_EP, keys) + len(matched)

    index.insert(INSERT_EP, warm.shared)
    benchmark.pedantic(decide, setup=setup, rounds=2000, warmup_rounds=50)
    assert index.size(INSERT_EP) == INSERT_CAPACITY
    assert index.match(warm.shared)[INSERT_EP].blocks == len(warm.shared)
    assert index.stats().speculative == 0 or not index.is_speculative(INSERT_EP, warm.shared[0])
