"""The prefix index: which endpoints hold which KV blocks, bounded per endpoint.

`PrefixIndex` maps 64-bit chained block keys (a key names a block *and* its
whole prefix, `prefixroute.blocks`) to the endpoints believed to hold them,
keeps an exact per-endpoint LRU bounded by that endpoint's KV capacity, and
answers longest-prefix matches for a request's chain. It knows nothing of
scoring (the prefix scorer reads `match`), and nothing of time except the
`now` and deadlines it is given: it is pure, with no I/O, clock or thread.

Design, chosen for memory (the index grows to millions of entries) and for
the speed of `match` and `insert`, which run on every request:

- **Holder masks.** Each endpoint gets an integer slot; one global
  ``dict[int, int]`` maps a key to the bitmask of the slots holding it. A key
  held by one endpoint (the common case) points at a shared one-bit int
  object, so its mask costs nothing beyond the dict slot; a key whose mask
  drops to 0 is deleted. Freed slots are reused, lowest first, so masks stay small.
- **Exact LRU without a linked list.** Per endpoint, a `collections.deque` of
  keys in touch order (oldest on the left) with lazy deletion: touching
  appends, and a sparse ``extra[key] = occurrences in the deque - (1 if
  held)`` (stored only when nonzero) says which occurrences are stale.
  Eviction pops from the left, skipping stale occurrences, until it meets a
  held key's last occurrence: that key is the least recently used. The deque
  is compacted (each held key's last occurrence kept, found in C by
  ``dict.fromkeys(reversed(deque))``) once it is longer than
  ``2 * size + 1024``, so it stays O(capacity) and compaction is amortised
  O(1) per touch. An `OrderedDict` LRU would add a linked-list node to every
  entry, which a dict plus a deque does not (bytes per entry measured in
  docs/performance.md); vLLM's `FreeKVCacheBlockQueue` builds its own
  doubly linked list for O(1) removal from the middle, which the lazy
  deletion here gets without a node object per block.
- **Reverse touch order.** `insert` touches a chain's keys from last to
  first, so the first block ends up most recently used and the tail is
  evicted first. This mirrors vLLM v1's `KVCacheManager.free`, which returns
  a finished request's blocks to the `FreeKVCacheBlockQueue` in reverse order
  "so that the tail blocks are evicted first": a chained key is useless
  without its prefix, so the prefix must be the last to go.
- **Rare cases in sparse side tables.** Per endpoint, a tier bitset only for
  entries not held exactly in GPU memory, and a deadline only for
  speculative entries (recorded optimistically by the router before the
  engine confirms). Deadlines also go into one min-heap of
  ``(deadline, seq, endpoint, keys)`` batches, one per `insert` call, with
  lazy deletion (an item counts only for keys whose current deadline it
  still equals); it is rebuilt when it holds more than ``2 * live + 4096``
  keys, so its size too stays bounded by the capacities.
- **`match` in C-level loops.** Masks are fetched with ``map(dict.get, ...)``
  in growing chunks. The running AND of the masks (who holds the whole
  prefix so far) only loses bits, and can only change where a mask differs
  from the one before it; ``compress(count(), map(ne, ...))`` finds those
  positions in C, and the Python loop visits only them (a handful for real
  chains) and stops when the AND hits 0. Each holder's match length is where
  its bit leaves the AND. When no entry anywhere is held outside GPU-only,
  the weighted length is ``blocks * weight[GPU]`` without looking at tiers.
  This measured faster than ``itertools.accumulate(masks, and_)`` plus a
  bisection over the popcounts for a 256-block full hit on a 1M-entry
  index, and far faster than a per-key walk (docs/performance.md), which
  is kept as `_match_walk`, the reference the tests hold `match` to.
- **`insert` in C-level passes too.** The router records every decision, a
  256-key chain, speculatively, and confirms it on completion. A per-key
  Python loop pays the interpreter for every key; `insert` makes a few
  passes over the chain with `map`, `compress` and dict methods instead,
  each looping in C. One ``holders.setdefault(k, bit)`` pass
  reads every mask and adds the keys nobody held, which are then the last
  keys of the dict (insertion order); when they are the chain's tail, the
  usual shape (a known prompt, then new blocks), the keys `ep` holds and the
  new ones are two slices. Held keys take their stale counts from
  ``collections._count_elements`` (the C helper of `Counter.update`, with a
  Python fallback) and their deadlines from ``dict.update(zip(keys,
  repeat(deadline)))``; a chain's speculative keys share one deadline
  object, so ``list.count`` by identity settles their refresh at once. Keys
  only other endpoints hold join with ``mask | bit``; any other shape (a hole
  in the held prefix, a repeated key) undoes the additions and takes the
  per-key walk, kept as `_record_walk`, the reference the tests hold
  `insert` to. Eviction pops the ``size - capacity`` oldest deque items in
  one call and, when none is stale, drops them with ``map(dict.pop, ...)``;
  otherwise a loop walks the deque in order. `benchmarks/test_bench_index.py`
  measures these passes against the per-key walk (figures in
  docs/performance.md). On a large index what is left is mostly the dict
  work itself, memory-bound even in C, plus a Python walk over the stale
  items a hot re-touched prefix leaves along the deque.

Memory is bounded by the sum of the endpoints' capacities whatever the
traffic: a flood of unique keys only cycles the LRUs.
"""

from __future__ import annotations

import collections
import enum
import heapq
import math
import operator
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain, compress, count, islice, repeat, starmap
from operator import and_, is_, lt, ne, not_, or_
from types import MappingProxyType
from typing import NamedTuple

import attrs
import numpy as np
import numpy.typing as npt

from prefixroute.endpoint import EndpointId

__all__ = [
    "DEFAULT_CAPACITY_BLOCKS",
    "DEFAULT_TIER_WEIGHTS",
    "IndexInvariantError",
    "IndexStats",
    "Keys",
    "PrefixIndex",
    "PrefixMatch",
    "Tier",
]


class Tier(enum.IntEnum):
    """Where an endpoint holds a block; lower is faster to reuse."""

    GPU = 0
    CPU = 1
    DISK = 2


DEFAULT_TIER_WEIGHTS: Mapping[Tier, float] = MappingProxyType(
    {Tier.GPU: 1.0, Tier.CPU: 0.8, Tier.DISK: 0.5}
)
"""How much a matched block is worth by the best tier it is held in."""

DEFAULT_CAPACITY_BLOCKS = 65_536
"""Index capacity (blocks) of an endpoint whose KV pool size is unknown.

2**16 blocks is 1,048,576 tokens at 16 tokens per block, the size of a large
real pool. An 8B model (128 KiB of KV per token in bf16) on one 80 GB GPU
has room for roughly 25k such blocks (72 GB at vLLM's default 0.9 memory
utilisation, less 16 GB of weights and some activation memory); a 70B model
(320 KiB per token) over eight 80 GB GPUs for roughly 80k. Erring large
keeps the index from forgetting blocks an engine still holds before the
driver reports the real size (the router replaces the default with the
endpoint's `kv_capacity_blocks` as soon as it is known), and the memory it
allows stays modest: 65,536 entries at under 120 B each is under 8 MB per
endpoint.
"""

_COMPACT_SLACK = 1024  # a deque may hold 2 * size + this many items before compaction
_HEAP_SLACK = 4096  # the deadline heap may hold 2 * live + this many keys before a rebuild
_FIRST_CHUNK = 32  # keys fetched by match's first chunk; chunks then double
_GPU_ONLY = 1 << Tier.GPU  # the tier bitset of a plain entry (not stored)

Keys = Sequence[int] | npt.NDArray[np.uint64]
"""A chain of block keys: ints in [0, 2**64), or a 1-D uint64 array (as `Blocker.keys` returns)."""


def _listed(keys: npt.NDArray[np.uint64]) -> list[int]:
    """A uint64 key array as a list of Python ints (what the dict-based index stores)."""
    out: list[int] = keys.tolist()
    return out


_consume = deque[object](maxlen=0).extend
"""Run an iterator to its end in C, discarding what it yields (``map`` for side effects)."""


def _count_into(counts: dict[int, int], keys: Iterable[int]) -> None:
    """``counts[k] += 1`` per occurrence of `k` in `keys`, absent counting as 0."""
    get = counts.get
    for k in keys:
        counts[k] = get(k, 0) + 1


# CPython's C helper behind `Counter.update` does `_count_into` in C on any dict;
# it is private, so fall back to the Python loop where it is missing.
_count_elements: Callable[[dict[int, int], Iterable[int]], None] = getattr(
    collections, "_count_elements", _count_into
)


class PrefixMatch(NamedTuple):
    """An endpoint's longest-prefix match for one chain.

    `blocks` is the number of leading blocks it holds; `weighted` sums, over
    those blocks, the weight of the best (lowest) tier it holds each in.
    """

    blocks: int
    weighted: float


@attrs.frozen
class IndexStats:
    """Counters and sizes of a `PrefixIndex` at one moment.

    `entries` counts (block, endpoint) pairs, `keys` distinct blocks,
    `speculative` the speculative entries; `inserted`, `evicted` (by
    capacity), `expired` (speculative deadline passed) and `removed` (by
    `remove`, `clear_endpoint`, `remove_endpoint`) count entries since
    construction. `per_endpoint` gives each registered endpoint's entry count.
    """

    entries: int
    keys: int
    endpoints: int
    speculative: int
    inserted: int
    evicted: int
    expired: int
    removed: int
    per_endpoint: Mapping[EndpointId, int]


class IndexInvariantError(AssertionError):
    """`PrefixIndex.check_invariants` found the index's bookkeeping inconsistent."""


class _Endpoint:
    """The per-endpoint state: slot, capacity, LRU deque and sparse side tables."""

    __slots__ = ("bit", "capacity", "extra", "id", "lru", "size", "slot", "spec", "tiers")

    def __init__(self, eid: EndpointId, slot: int, bit: int, capacity: int) -> None:
        self.id = eid
        self.slot = slot
        self.bit = bit
        self.capacity = capacity
        self.size = 0
        self.lru: deque[int] = deque()
        self.extra: dict[int, int] = {}
        self.tiers: dict[int, int] = {}
        self.spec: dict[int, float] = {}


_HeapItem = tuple[float, int, _Endpoint, tuple[int, ...]]


def _positive_int(value: object, name: str) -> int:
    if not isinstance(value, bool):
        try:
            n = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            pass
        else:
            if n > 0:
                return n
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _tier_weights(tier_weights: Mapping[Tier, float] | None) -> dict[Tier, float]:
    """`DEFAULT_TIER_WEIGHTS` overridden by `tier_weights`; `ValueError` naming the bad field."""
    weights = dict(DEFAULT_TIER_WEIGHTS)
    if tier_weights is not None:
        if not isinstance(tier_weights, Mapping):
            raise ValueError(f"tier_weights must be a mapping, got {tier_weights!r}")
        for tier, weight in tier_weights.items():
            try:
                t = Tier(tier)
            except ValueError:
                raise ValueError(f"tier_weights has an unknown tier {tier!r}") from None
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise ValueError(f"tier_weights[{t.name}] must be a number, got {weight!r}")
            if not 0.0 <= weight <= 1.0:
                raise ValueError(f"tier_weights[{t.name}] must be within [0, 1], got {weight!r}")
            weights[t] = float(weight)
    return weights


class PrefixIndex:
    """Block key -> holding endpoints, with a per-endpoint LRU bounded by capacity.

    See the module docstring for the data structures. All methods are pure
    functions of the arguments and the index's state; time is an argument.
    """

    # Slack before a deque compaction / heap rebuild; tests lower them to
    # exercise both paths on tiny indexes.
    _compact_slack = _COMPACT_SLACK
    _heap_slack = _HEAP_SLACK

    def __init__(
        self,
        *,
        default_capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
        tier_weights: Mapping[Tier, float] | None = None,
    ) -> None:
        """Build an empty index.

        `default_capacity_blocks` (> 0) bounds endpoints whose capacity was
        never set. `tier_weights` maps tiers to weights in [0, 1]; tiers it
        omits keep their `DEFAULT_TIER_WEIGHTS`. Invalid values raise
        `ValueError` naming the field.
        """
        self._default_capacity = _positive_int(default_capacity_blocks, "default_capacity_blocks")
        weights = _tier_weights(tier_weights)
        self._weights: Mapping[Tier, float] = MappingProxyType(weights)
        self._gpu_weight = weights[Tier.GPU]
        # Weight of a tier bitset = weight of its lowest (best) tier.
        self._bits_weight = [0.0] + [
            weights[Tier((b & -b).bit_length() - 1)] for b in range(1, 1 << len(Tier))
        ]

        self._holders: dict[int, int] = {}
        self._bit: list[int] = []  # slot -> the shared int object 1 << slot
        self._by_slot: list[_Endpoint | None] = []
        self._free_slots: list[int] = []  # a min-heap
        self._eps: dict[EndpointId, _Endpoint] = {}
        self._entries = 0
        self._n_tiered = 0  # entries with a tier bitset other than {GPU}
        self._n_spec = 0
        self._heap: list[_HeapItem] = []
        self._heap_keys = 0
        self._seq = 0
        self._inserted = 0
        self._evicted = 0
        self._expired = 0
        self._removed = 0

    @property
    def tier_weights(self) -> Mapping[Tier, float]:
        """The weight of each tier (read-only)."""
        return self._weights

    @property
    def default_capacity_blocks(self) -> int:
        """The capacity given to endpoints whose capacity was never set."""
        return self._default_capacity

    # -- endpoints ---------------------------------------------------------

    def _register(self, endpoint: EndpointId) -> _Endpoint:
        ep = self._eps.get(endpoint)
        if ep is not None:
            return ep
        if self._free_slots:
            slot = heapq.heappop(self._free_slots)
        else:
            slot = len(self._bit)
            self._bit.append(1 << slot)
            self._by_slot.append(None)
        ep = _Endpoint(endpoint, slot, self._bit[slot], self._default_capacity)
        self._by_slot[slot] = ep
        self._eps[endpoint] = ep
        return ep

    def set_capacity(self, endpoint: EndpointId, blocks: int) -> None:
        """Bound `endpoint` to `blocks` entries, registering it if new.

        Evicts its least recently used entries while it holds more. Cost:
        O(1), plus O(1) amortised per evicted entry. `blocks` must be a
        positive integer (`ValueError` otherwise).
        """
        blocks = _positive_int(blocks, "blocks")
        ep = self._register(endpoint)
        ep.capacity = blocks
        if ep.size > blocks:
            self._evict(ep)
            self._maybe_compact(ep)
            self._maybe_rebuild_heap()

    def capacity(self, endpoint: EndpointId) -> int:
        """The capacity of `endpoint`; the default for an unregistered one. O(1)."""
        ep = self._eps.get(endpoint)
        return self._default_capacity if ep is None else ep.capacity

    def endpoints(self) -> list[EndpointId]:
        """The registered endpoints, in registration order. O(endpoints)."""
        return list(self._eps)

    def size(self, endpoint: EndpointId) -> int:
        """The number of entries `endpoint` holds (0 if unknown). O(1): a kept count."""
        ep = self._eps.get(endpoint)
        return 0 if ep is None else ep.size

    def __len__(self) -> int:
        """The total number of (block, endpoint) entries. O(1): a kept count."""
        return self._entries

    # -- mutation ------------------------------------------------------------

    def insert(
        self,
        endpoint: EndpointId,
        keys: Keys,
        *,
        tier: Tier = Tier.GPU,
        speculative_until: float | None = None,
    ) -> None:
        """Record that `endpoint` holds the chain `keys` in `tier`.

        An unknown endpoint is registered with the default capacity. Every
        key is touched in reverse chain order, so `keys[0]` becomes the most
        recently used and the chain's tail is evicted first (as vLLM frees a
        request's blocks). `tier` joins each key's tiers. With
        `speculative_until=None` the entries are confirmed (speculative ones
        among them included); with a deadline, new entries are speculative
        until then, speculative ones keep the later of both deadlines and
        confirmed ones stay confirmed. Afterwards the endpoint's least
        recently used entries are evicted while it is over capacity, which
        can include keys of this chain when it is longer than the capacity.

        Cost: O(len(keys)) dict operations plus O(1) amortised per eviction,
        in C-level passes for the usual chain shapes (module docstring); one
        heap push per call for a speculative insert, not one per key.
        """
        tier = Tier(tier)
        deadline = None
        if isinstance(keys, np.ndarray):
            keys = _listed(keys)
        if speculative_until is not None:
            deadline = float(speculative_until)
            if math.isnan(deadline):
                raise ValueError("speculative_until must not be NaN")
        ep = self._register(endpoint)
        tbit = 1 << tier
        if tbit != _GPU_ONLY or ep.tiers:
            self._add_tier(ep, keys, tbit)

        added = self._record(ep, keys, deadline)
        ep.lru.extend(reversed(keys))
        ep.size += added
        self._entries += added
        self._inserted += added
        if ep.size > ep.capacity:
            self._evict(ep)
        self._maybe_compact(ep)
        self._maybe_rebuild_heap()

    def _record(self, ep: _Endpoint, keys: Sequence[int], deadline: float | None) -> int:
        """`insert`'s bookkeeping in C-level passes; returns the entries added.

        Sets the masks, stale counts and deadlines, not the deque or sizes,
        and ends in the state `_record_walk` would (but a deadline batch may
        name a key twice when the chain repeats one, which expiry ignores).
        It splits the chain into the keys `ep` holds, which get ``extra[k] +=
        1`` (one more deque occurrence) and, speculatively, the later
        deadline, or are confirmed; and the new ones, which get the deadline.
        One ``setdefault`` pass reads each key's mask and gives every key
        nobody held the shared one-bit mask of `ep`: those keys, and only
        they, are now the last ones in the dict. When they are the chain's
        tail (the usual shape: a known prompt, then new blocks), the split is
        two slices; keys before them that only other endpoints hold join by
        ``mask | bit``. Any other shape undoes the additions and walks.
        """
        holders = self._holders
        bit = ep.bit
        spec = ep.spec
        n = len(keys)
        before = len(holders)
        masks = list(map(holders.setdefault, keys, repeat(bit)))
        added = len(holders) - before
        cut = n - added
        # The added keys, newest first, must be the chain's tail, last key first.
        if cut and added and not all(map(is_, islice(reversed(holders), added), reversed(keys))):
            return self._undo_and_walk(ep, keys, deadline, added)
        held = keys[:cut] if added else keys
        new = keys[cut:] if cut else keys
        # Keys only ep holds have its shared one-bit mask (so do those just added).
        if masks.count(bit) != n and not all(map(and_, islice(masks, cut), repeat(bit))):
            own = list(map(and_, islice(masks, cut), repeat(bit)))
            joins = list(map(not_, own))
            others = list(compress(held, joins))
            if len(set(others)) != len(others):
                return self._undo_and_walk(ep, keys, deadline, added)
            holders.update(zip(others, map(or_, compress(masks, joins), repeat(bit)), strict=True))
            held = list(compress(held, own))
            new = [*others, *new]
            added += len(others)

        if held:
            _count_elements(ep.extra, held)
        later: Sequence[int] = ()
        if spec and held:
            if deadline is None:
                n_spec = len(spec)
                _consume(map(spec.pop, held, repeat(None)))
                self._n_spec -= n_spec - len(spec)
            else:  # speculative ones take the later deadline; confirmed ones (inf) stay so
                olds = list(map(spec.get, held, repeat(math.inf)))
                first = olds[0]
                if olds.count(first) == len(olds):  # often one float object: decide once
                    later = held if first < deadline else ()
                else:
                    later = list(compress(held, map(lt, olds, repeat(deadline))))
                spec.update(zip(later, repeat(deadline)))
        if deadline is not None:
            if added:
                spec.update(zip(new, repeat(deadline)))
                self._n_spec += added
            if added or later:
                self._push_deadline(ep, deadline, (*new, *later))
        return added

    def _undo_and_walk(
        self, ep: _Endpoint, keys: Sequence[int], deadline: float | None, added: int
    ) -> int:
        """`_record`'s way out: drop the `added` keys it just added, then walk."""
        holders = self._holders
        _consume(map(holders.pop, list(islice(reversed(holders), added))))
        return self._record_walk(ep, keys, deadline)

    def _record_walk(self, ep: _Endpoint, keys: Sequence[int], deadline: float | None) -> int:
        """The per-key reference for `_record`: the same bookkeeping, for any chain.

        Takes the shapes `_record` does not handle in C (keys nobody held
        before keys `ep` holds, some repeated keys), and the tests hold
        `_record` to it (STYLE.md 10).
        """
        bit = ep.bit
        holders = self._holders
        get = holders.get
        extra = ep.extra
        spec = ep.spec
        added = 0
        if deadline is None:
            for k in reversed(keys):
                m = get(k, 0)
                if m & bit:
                    extra[k] = extra.get(k, 0) + 1
                else:
                    holders[k] = m | bit if m else bit
                    added += 1
            if spec:
                confirmed = 0
                for k in keys:
                    if spec.pop(k, None) is not None:
                        confirmed += 1
                self._n_spec -= confirmed
        else:
            pushed: list[int] = []
            for k in reversed(keys):
                m = get(k, 0)
                if m & bit:
                    extra[k] = extra.get(k, 0) + 1
                    old = spec.get(k)
                    if old is not None and deadline > old:
                        spec[k] = deadline
                        pushed.append(k)
                else:
                    holders[k] = m | bit if m else bit
                    added += 1
                    spec[k] = deadline
                    pushed.append(k)
            self._n_spec += added
            if pushed:
                self._push_deadline(ep, deadline, tuple(pushed))
        return added

    def _push_deadline(self, ep: _Endpoint, deadline: float, keys: tuple[int, ...]) -> None:
        """Add one heap batch: `keys` of `ep` expire at `deadline` unless it changes."""
        self._seq += 1
        heapq.heappush(self._heap, (deadline, self._seq, ep, keys))
        self._heap_keys += len(keys)

    def _add_tier(self, ep: _Endpoint, keys: Sequence[int], tbit: int) -> None:
        """Add `tbit` to the tier bitsets of `keys` (before they are marked held)."""
        tiers = ep.tiers
        bit = ep.bit
        get = self._holders.get
        if tbit == _GPU_ONLY:
            # Only entries already in the side table change (absent means GPU only).
            for k in keys:
                b = tiers.get(k)
                if b is not None:
                    tiers[k] = b | tbit
            return
        for k in keys:
            b = tiers.get(k)
            if b is None:
                b = _GPU_ONLY if get(k, 0) & bit else 0
                self._n_tiered += 1
            tiers[k] = b | tbit

    def _unset(self, ep: _Endpoint, k: int) -> None:
        """Drop the held entry (ep, k) from the masks and side tables (not from the deque)."""
        m = self._holders[k] ^ ep.bit
        if m:
            if not m & (m - 1):
                m = self._bit[m.bit_length() - 1]  # share the one-bit int object
            self._holders[k] = m
        else:
            del self._holders[k]
        if ep.tiers and ep.tiers.pop(k, None) is not None:
            self._n_tiered -= 1
        if ep.spec and ep.spec.pop(k, None) is not None:
            self._n_spec -= 1
        ep.size -= 1
        self._entries -= 1

    def _drop(self, ep: _Endpoint, k: int) -> None:
        """Remove the held entry (ep, k); its deque occurrence becomes stale."""
        self._unset(ep, k)
        ep.extra[k] = ep.extra.get(k, 0) + 1

    def _evict(self, ep: _Endpoint) -> None:
        """Evict least recently used entries of `ep` while it is over capacity.

        Pops the ``size - capacity`` leftmost deque items in one C call. When
        none of their keys has stale occurrences (is in `extra`), each is a
        held key's only occurrence, so they are exactly the entries to evict.
        Otherwise they go back and a loop walks the deque in order, skipping
        stale occurrences, until it has that many held keys' last ones (a hot
        prefix re-touched by many requests leaves stale items all along the
        deque). Either way the evicted keys then leave the masks and the side
        tables in C-level passes. Cost: O(1) amortised per evicted entry.
        """
        need = ep.size - ep.capacity
        if need <= 0:
            return
        lru = ep.lru
        popleft = lru.popleft
        extra = ep.extra
        batch = list(starmap(popleft, repeat((), need)))
        if extra and any(map(extra.__contains__, batch)):
            lru.extendleft(reversed(batch))
            batch = []
            append = batch.append
            get = extra.get
            left = need
            for k in starmap(popleft, repeat(())):
                e = get(k)
                if not e:
                    append(k)
                    left -= 1
                    if not left:
                        break
                elif e == 1:
                    del extra[k]
                else:
                    extra[k] = e - 1
        holders = self._holders
        bit = ep.bit
        masks = list(map(holders.pop, batch))
        if masks.count(bit) != need:  # some are held by other endpoints too: put them back
            shared = self._bit
            for k, m in zip(batch, masks, strict=True):
                if m != bit:
                    m ^= bit
                    holders[k] = m if m & (m - 1) else shared[m.bit_length() - 1]
        if ep.tiers:
            n_tiers = len(ep.tiers)
            _consume(map(ep.tiers.pop, batch, repeat(None)))
            self._n_tiered -= n_tiers - len(ep.tiers)
        if ep.spec:
            n_spec = len(ep.spec)
            _consume(map(ep.spec.pop, batch, repeat(None)))
            self._n_spec -= n_spec - len(ep.spec)
        ep.size -= need
        self._entries -= need
        self._evicted += need

    def _maybe_compact(self, ep: _Endpoint) -> None:
        """Rebuild `ep`'s deque from each held key's last occurrence once it is too long."""
        lru = ep.lru
        if len(lru) <= 2 * ep.size + self._compact_slack:
            return
        # dict.fromkeys over the reversed deque keeps each key's last occurrence,
        # in C; only keys with stale occurrences (those in `extra`) can be unheld.
        last = dict.fromkeys(reversed(lru))
        stale = list(ep.extra)
        own = map(and_, map(self._holders.get, stale, repeat(0)), repeat(ep.bit))
        _consume(map(last.pop, compress(stale, map(not_, own))))
        ep.lru = deque(reversed(last))
        ep.extra = {}

    def _maybe_rebuild_heap(self) -> None:
        """Rebuild the deadline heap from the live deadlines once stale keys dominate it."""
        if self._heap_keys <= 2 * self._n_spec + self._heap_slack:
            return
        heap: list[_HeapItem] = []
        for ep in self._eps.values():
            groups: dict[float, list[int]] = {}
            for k, d in ep.spec.items():
                groups.setdefault(d, []).append(k)
            for d, ks in groups.items():
                self._seq += 1
                heap.append((d, self._seq, ep, tuple(ks)))
        heapq.heapify(heap)
        self._heap = heap
        self._heap_keys = self._n_spec

    def confirm(self, endpoint: EndpointId, keys: Keys) -> int:
        """Make `endpoint`'s speculative entries among `keys` confirmed.

        Returns how many changed. Does not touch the LRU. Cost:
        O(len(keys)) in one C-level pass of ``dict.pop``; O(1) when the
        endpoint has no speculative entry.
        """
        ep = self._eps.get(endpoint)
        if ep is None or not ep.spec:
            return 0
        if isinstance(keys, np.ndarray):
            keys = _listed(keys)
        spec = ep.spec
        before = len(spec)
        _consume(map(spec.pop, keys, repeat(None)))
        changed = before - len(spec)
        self._n_spec -= changed
        self._maybe_rebuild_heap()
        return changed

    def discard_speculative(
        self,
        endpoint: EndpointId,
        keys: Keys,
        *,
        not_after: float,
        at: float | None = None,
    ) -> int:
        """Take back `endpoint`'s speculative entries among `keys` due at or before `not_after`.

        With `at` None they are removed now: a prediction that turned out
        wrong (the engine refused the request). With `at` they expire at
        `at` instead, if that is sooner: a grace period for the engine's
        events to confirm them. Confirmed entries stay, and so do
        speculative ones a later decision refreshed (their deadline is past
        `not_after`). Returns how many changed. O(len(keys)); O(1) when the
        endpoint has no speculative entry.
        """
        ep = self._eps.get(endpoint)
        if ep is None or not ep.spec:
            return 0
        if isinstance(keys, np.ndarray):
            keys = _listed(keys)
        spec = ep.spec
        changed = 0
        if at is None:
            for k in keys:
                d = spec.get(k)
                if d is not None and d <= not_after:
                    self._drop(ep, k)
                    changed += 1
            self._removed += changed
            self._maybe_compact(ep)
        else:
            at = float(at)
            if math.isnan(at):
                raise ValueError("at must not be NaN")
            moved: list[int] = []
            for k in keys:
                d = spec.get(k)
                if d is not None and at < d <= not_after:
                    spec[k] = at
                    moved.append(k)
            if moved:
                self._push_deadline(ep, at, tuple(moved))
            changed = len(moved)
        self._maybe_rebuild_heap()
        return changed

    def remove(self, endpoint: EndpointId, keys: Keys, *, tier: Tier | None = None) -> int:
        """Clear `tier` of `endpoint`'s entries for `keys`; all tiers when `tier` is None.

        An entry left with no tier is removed. Unknown endpoints and keys are
        ignored (engine events can arrive for blocks already evicted here).
        Returns the number of entries removed. Cost: O(len(keys)), plus an
        amortised O(1) deque compaction.
        """
        ep = self._eps.get(endpoint)
        if ep is None or not ep.size:
            return 0
        if isinstance(keys, np.ndarray):
            keys = _listed(keys)
        bit = ep.bit
        get = self._holders.get
        tiers = ep.tiers
        removed = 0
        if tier is None:
            for k in keys:
                if get(k, 0) & bit:
                    self._drop(ep, k)
                    removed += 1
        else:
            tbit = 1 << Tier(tier)
            for k in keys:
                if not get(k, 0) & bit:
                    continue
                b = tiers.get(k, _GPU_ONLY)
                if not b & tbit:
                    continue
                b &= ~tbit
                if not b:
                    self._drop(ep, k)
                    removed += 1
                elif b == _GPU_ONLY:
                    del tiers[k]
                    self._n_tiered -= 1
                else:
                    if k not in tiers:
                        self._n_tiered += 1
                    tiers[k] = b
        self._removed += removed
        self._maybe_compact(ep)
        self._maybe_rebuild_heap()
        return removed

    def clear_endpoint(self, endpoint: EndpointId) -> None:
        """Drop every entry of `endpoint`, keeping its registration and capacity.

        For an engine that restarted or reset its cache. Unknown endpoints
        are ignored. Cost: O(length of its deque), which is O(capacity).
        """
        ep = self._eps.get(endpoint)
        if ep is None:
            return
        bit = ep.bit
        holders = self._holders
        shared = self._bit
        for k in dict.fromkeys(ep.lru):
            m = holders.get(k, 0)
            if m & bit:
                m ^= bit
                if m:
                    holders[k] = m if m & (m - 1) else shared[m.bit_length() - 1]
                else:
                    del holders[k]
        self._removed += ep.size
        self._entries -= ep.size
        self._n_tiered -= len(ep.tiers)
        self._n_spec -= len(ep.spec)
        ep.size = 0
        ep.lru = deque()
        ep.extra = {}
        ep.tiers = {}
        ep.spec = {}
        self._maybe_rebuild_heap()

    def remove_endpoint(self, endpoint: EndpointId) -> None:
        """Forget `endpoint` entirely: its entries, capacity and slot (reused later).

        Unknown endpoints are ignored. Cost: that of `clear_endpoint`.
        """
        ep = self._eps.get(endpoint)
        if ep is None:
            return
        self.clear_endpoint(endpoint)
        del self._eps[endpoint]
        self._by_slot[ep.slot] = None
        heapq.heappush(self._free_slots, ep.slot)

    def expire(self, now: float) -> int:
        """Drop speculative entries whose deadline is <= `now`; returns how many.

        Cost: O(log n) per heap batch due, O(1) per key in it; O(1) when
        nothing is due. The heap holds one batch per speculative `insert`
        call with lazy deletion, so confirming or extending a deadline never
        searches it.
        """
        heap = self._heap
        expired = 0
        touched: set[_Endpoint] = set()
        while heap and heap[0][0] <= now:
            deadline, _, ep, ks = heapq.heappop(heap)
            self._heap_keys -= len(ks)
            spec = ep.spec
            if not spec:
                continue
            for k in ks:
                if spec.get(k) == deadline:
                    self._drop(ep, k)
                    expired += 1
                    touched.add(ep)
        self._expired += expired
        for ep in touched:
            self._maybe_compact(ep)
        self._maybe_rebuild_heap()
        return expired

    # -- queries -------------------------------------------------------------

    def match(self, keys: Keys) -> dict[EndpointId, PrefixMatch]:
        """Each endpoint's longest prefix of `keys` held (any tier, speculative included).

        Only endpoints with at least one matched block appear. Reads do not
        touch the LRU. Cost: O(m) for the longest match m over all endpoints,
        in C-level loops (dict lookups through `map`, finding where the mask
        changes through `compress`), plus O(1) Python work per position where
        the holder mask changes (a handful for real chains), and O(m) per
        endpoint holding a matched block outside GPU-only memory. A miss on
        `keys[0]` is one dict lookup.
        """
        if isinstance(keys, np.ndarray):
            keys = _listed(keys)
        n = len(keys)
        if not n:
            return {}
        get = self._holders.get
        running = get(keys[0], 0)  # AND of the masks so far: who holds the whole prefix
        if not running:
            return {}
        ends: list[tuple[int, int]] = []  # (match length, slots whose match ends there)
        prev = running
        start = 1
        chunk = _FIRST_CHUNK
        while start < n:
            masks = list(map(get, keys[start : start + chunk], repeat(0)))
            # The AND can only change where a mask differs from the one before it.
            for j in compress(count(), map(ne, masks, chain((prev,), masks))):
                nxt = running & masks[j]
                if nxt != running:
                    ends.append((start + j, running ^ nxt))
                    running = nxt
                    if not running:
                        break
            if not running:
                break
            prev = masks[-1]
            start += chunk
            chunk *= 2
        if running:
            ends.append((n, running))
        return self._matches(keys, ends)

    def _matches(
        self, keys: Sequence[int], ends: list[tuple[int, int]]
    ) -> dict[EndpointId, PrefixMatch]:
        """Build the result from (match length, slot bits ending there) pairs."""
        by_slot = self._by_slot
        out: dict[EndpointId, PrefixMatch] = {}
        exact = self._n_tiered > 0
        gpu_w = self._gpu_weight
        new = tuple.__new__
        for length, gone in ends:
            while gone:
                low = gone & -gone
                gone ^= low
                ep = by_slot[low.bit_length() - 1]
                assert ep is not None
                if exact and ep.tiers:
                    w = self._bits_weight
                    weighted = math.fsum(
                        map(w.__getitem__, map(ep.tiers.get, keys[:length], repeat(_GPU_ONLY)))
                    )
                else:
                    weighted = length * gpu_w
                out[ep.id] = new(PrefixMatch, (length, weighted))
        return out

    def _match_walk(self, keys: Keys) -> dict[EndpointId, PrefixMatch]:
        """The plain-Python reference for `match`: a per-key, per-endpoint walk.

        Kept beside the fast path and tested against it (STYLE.md 10);
        `benchmarks/test_bench_index.py` measures both.
        """
        if isinstance(keys, np.ndarray):
            keys = _listed(keys)
        out: dict[EndpointId, PrefixMatch] = {}
        alive = list(self._eps.values())
        weights: dict[EndpointId, list[float]] = {ep.id: [] for ep in alive}
        for k in keys:
            m = self._holders.get(k, 0)
            still = []
            for ep in alive:
                if m & ep.bit:
                    still.append(ep)
                    weights[ep.id].append(self._bits_weight[ep.tiers.get(k, _GPU_ONLY)])
            alive = still
            if not alive:
                break
        for eid, ws in weights.items():
            if ws:
                out[eid] = PrefixMatch(len(ws), math.fsum(ws))
        return out

    def holders(self, key: int) -> frozenset[EndpointId]:
        """The endpoints holding `key` (any tier). O(holders)."""
        m = self._holders.get(key, 0)
        out = []
        while m:
            low = m & -m
            m ^= low
            ep = self._by_slot[low.bit_length() - 1]
            assert ep is not None
            out.append(ep.id)
        return frozenset(out)

    def is_speculative(self, endpoint: EndpointId, key: int) -> bool:
        """Whether `endpoint` holds `key` speculatively (False if not held). O(1)."""
        ep = self._eps.get(endpoint)
        return ep is not None and key in ep.spec

    def tiers(self, endpoint: EndpointId, key: int) -> frozenset[Tier]:
        """The tiers `endpoint` holds `key` in (empty if not held). O(1)."""
        ep = self._eps.get(endpoint)
        if ep is None or not self._holders.get(key, 0) & ep.bit:
            return frozenset()
        b = ep.tiers.get(key, _GPU_ONLY)
        return frozenset(t for t in Tier if b & (1 << t))

    def stats(self) -> IndexStats:
        """A snapshot of sizes and counters. O(endpoints)."""
        return IndexStats(
            entries=self._entries,
            keys=len(self._holders),
            endpoints=len(self._eps),
            speculative=self._n_spec,
            inserted=self._inserted,
            evicted=self._evicted,
            expired=self._expired,
            removed=self._removed,
            per_endpoint=MappingProxyType({eid: ep.size for eid, ep in self._eps.items()}),
        )

    # -- checking ------------------------------------------------------------

    def check_invariants(self) -> None:
        """Verify all bookkeeping; raise `IndexInvariantError` naming what is wrong.

        Checks masks against endpoints and slots, sizes and capacities, the
        deques' stale counts and length bound, tier and speculative side
        tables, that every speculative entry can still expire through the
        heap, and the global counters. Cost: O(entries + deque lengths +
        heap keys); meant for tests.
        """

        def fail(msg: str) -> None:
            raise IndexInvariantError(msg)

        # Slots.
        if len(self._bit) != len(self._by_slot):
            fail("slot tables differ in length")
        for slot, b in enumerate(self._bit):
            if b != 1 << slot:
                fail(f"bit of slot {slot} is {b}")
        free = set(self._free_slots)
        if len(free) != len(self._free_slots):
            fail("a free slot is listed twice")
        for slot, ep in enumerate(self._by_slot):
            if (ep is None) != (slot in free):
                fail(f"slot {slot} is neither free nor used, or both")
            if ep is not None and (ep.slot != slot or ep.bit is not self._bit[slot]):
                fail(f"endpoint {ep.id!r} disagrees with slot {slot}")
        if sorted(ep.slot for ep in self._eps.values()) != sorted(
            s for s, ep in enumerate(self._by_slot) if ep is not None
        ):
            fail("registered endpoints and used slots differ")
        for eid, ep in self._eps.items():
            if ep.id != eid or self._by_slot[ep.slot] is not ep:
                fail(f"endpoint {eid!r} is registered inconsistently")

        # Masks.
        used = 0
        for ep in self._eps.values():
            used |= ep.bit
        per_slot = [0] * len(self._bit)
        for k, m in self._holders.items():
            if m <= 0:
                fail(f"key {k} has mask {m}")
            if m & ~used:
                fail(f"key {k} has mask bits of unused slots: {m & ~used:#x}")
            if not m & (m - 1) and m is not self._bit[m.bit_length() - 1]:
                fail(f"key {k} has a one-bit mask that is not the shared object")
            while m:
                low = m & -m
                m ^= low
                per_slot[low.bit_length() - 1] += 1
        counts = {eid: per_slot[ep.slot] for eid, ep in self._eps.items()}

        total = spec_total = tier_total = 0
        live_deadlines: set[tuple[int, int, float]] = set()
        for eid, ep in self._eps.items():
            if ep.size != counts[eid]:
                fail(f"{eid!r}: size {ep.size} but {counts[eid]} keys carry its bit")
            if ep.size > ep.capacity:
                fail(f"{eid!r}: size {ep.size} over capacity {ep.capacity}")
            if len(ep.lru) > 2 * ep.size + self._compact_slack:
                fail(f"{eid!r}: deque of {len(ep.lru)} for {ep.size} entries")
            occ = Counter(ep.lru)
            for k, c in occ.items():
                held = 1 if self._holders.get(k, 0) & ep.bit else 0
                if ep.extra.get(k, 0) != c - held:
                    fail(f"{eid!r}: key {k} occurs {c}x, held={held}, extra={ep.extra.get(k)}")
            for k, e in ep.extra.items():
                if e <= 0 or k not in occ:
                    fail(f"{eid!r}: extra[{k}] = {e} for {occ.get(k, 0)} occurrences")
            held_in_deque = sum(1 for k in occ if self._holders.get(k, 0) & ep.bit)
            if held_in_deque != ep.size:
                fail(f"{eid!r}: {ep.size - held_in_deque} held keys missing from the deque")
            for k, b in ep.tiers.items():
                if not self._holders.get(k, 0) & ep.bit:
                    fail(f"{eid!r}: tiers for unheld key {k}")
                if not 0 < b < 1 << len(Tier) or b == _GPU_ONLY:
                    fail(f"{eid!r}: key {k} has tier bitset {b}")
            for k, d in ep.spec.items():
                if not self._holders.get(k, 0) & ep.bit:
                    fail(f"{eid!r}: deadline for unheld key {k}")
                if math.isnan(d):
                    fail(f"{eid!r}: key {k} has a NaN deadline")
                live_deadlines.add((id(ep), k, d))
            total += ep.size
            spec_total += len(ep.spec)
            tier_total += len(ep.tiers)

        # Deadline heap: every live deadline is findable; the size is bounded.
        heap_keys = 0
        in_heap: set[tuple[int, int, float]] = set()
        for i, (d, _, ep, ks) in enumerate(self._heap):
            heap_keys += len(ks)
            for child in (2 * i + 1, 2 * i + 2):
                if child < len(self._heap) and self._heap[child][:2] < (d, self._heap[i][1]):
                    fail("the deadline heap is out of order")
            in_heap.update((id(ep), k, d) for k in ks)
        if live_deadlines - in_heap:
            fail(f"{len(live_deadlines - in_heap)} speculative entries cannot expire")
        if heap_keys != self._heap_keys:
            fail(f"heap holds {heap_keys} keys, counted {self._heap_keys}")
        if heap_keys > 2 * spec_total + self._heap_slack:
            fail(f"heap holds {heap_keys} keys for {spec_total} speculative entries")

        if total != self._entries:
            fail(f"entries counted {self._entries}, held {total}")
        if spec_total != self._n_spec:
            fail(f"speculative counted {self._n_spec}, held {spec_total}")
        if tier_total != self._n_tiered:
            fail(f"tiered counted {self._n_tiered}, held {tier_total}")
        if self._inserted - self._evicted - self._expired - self._removed != total:
            fail("inserted - evicted - expired - removed != entries")
