"""The prefix index in flat arrays with compiled kernels: `CompiledPrefixIndex`.

`CompiledPrefixIndex` has the public API and the semantics of
`prefixroute.index.PrefixIndex`, bit for bit: the same `match` results (same
keys, same `PrefixMatch` values, same iteration order), the same exact LRU
(a chain touched in reverse order, so its tail is evicted first), the same
speculative deadlines, tiers, counters and errors. The tests drive both side
by side on random traffic and compare every result (tests/test_compiled_index.py).
Its state is a handful of numpy arrays, and each operation is one call to a
kernel compiled by numba (`prefixroute.jit`); without numba, use
`PrefixIndex` (`make_index` here picks; it lives in this module, not in
index.py, so that index.py need not import this one back).

Design, for a request's chain of a few hundred uint64 keys on an index of
millions of (block, endpoint) entries. On such an index nearly every
access to a key's row is a cache miss; the design keeps them few and
independent of each other, so the processor overlaps them (a chain of
dependent misses, such as a linked-list walk, cannot overlap and costs a
full memory latency per step):

- **Two open-addressing tables** with linear probing (Knuth, TAOCP vol. 3,
  6.4) over power-of-two row counts, each at most 70% full counting
  tombstones, rebuilt (doubled when needed) to at most half full, so a
  rebuild is amortised O(1) per insertion. Keys are hashed by a xor-shift
  and a Fibonacci multiply. The *key table* has a row per distinct key:
  the key and its holder bitmask, one 64-bit word per 64 endpoint slots (16
  bytes up to 64 endpoints), as `PrefixIndex`'s masks. The *entry table*
  has a row per (key, endpoint) entry: the key; the endpoint's slot, tier
  bits, a speculative flag and the entry's last-touch tick packed in one
  word; and the deadline (24 bytes). Deleting leaves a tombstone, so a row
  stays put until the next rebuild. When tombstones alone fill a table
  (its live rows still fit at its size), it is cleaned in place rather
  than rebuilt into a second one: one sequential pass from an empty row
  turns tombstones into empty rows and moves each live row back to the
  first empty row from its home, the same-size rehash of linear probing
  (no table-sized allocation; a fraction of the rows move). A moved
  entry's LRU ring item is repointed: a ring holds its slot's ticks in
  order, so the item of tick t is at a known position. Only growth
  rebuilds into a new, doubled table.
- **`match`** is one key-table probe per key and an AND of the masks, in one
  kernel call: each endpoint's match length is where its bit leaves the
  running AND, as in `PrefixIndex.match`. Probes load a chunk of keys' home
  rows first (independent loads), then branch on data already in cache.
- **Exact LRU as a ring of touches per endpoint** (a circular uint64 array
  of ``tick << 32 | entry row``): touching an entry gives it the endpoint's
  next tick and appends it; eviction pops the oldest items, skipping those
  whose entry has since been touched again (its tick differs) or dropped.
  This is `PrefixIndex`'s deque with lazy deletion, with the stale test
  moved from a counts dict into the entry's tick; a ring is compacted (live
  items kept in order, ticks renumbered from 0) when full, and grows when
  more than 40% of it is live, so it stays O(capacity) and
  compaction is amortised O(1) per touch. A doubly linked list in the
  style of vLLM v1's `FreeKVCacheBlockQueue` (vllm/v1/core/kv_cache_utils.py)
  was the first version: it needs no compaction, but its pointer chasing
  (a node's neighbours, an eviction's next victim) serialises cache misses
  and measured slower here (docs/performance.md).
- **Reverse touch order**, as `PrefixIndex` (and vLLM's
  `KVCacheManager.free`, which frees a request's blocks tail first):
  `insert` walks the chain from its last key to its first, so the first
  block is the most recently used and the tail is evicted first.
- **Deadlines**: a min-heap of (deadline, sequence, batch, endpoint) items,
  one per `insert` (or `discard_speculative` with `at`) that set a
  deadline, whose batch is a range of keys in an append-only arena; an item
  counts only for entries still speculative with exactly its deadline
  (lazy deletion, as `PrefixIndex`'s heap). When the arena is full it is
  rebuilt from the items still live, grouped by deadline, or doubled if
  most are live (emptied at once when nothing is speculative, the usual
  case between bursts): its size stays O(speculative entries) and the
  rebuild is amortised O(1) per key pushed.
- **Tier weights**: entries keep tier bits; `match` counts, for an endpoint
  with any entry held outside GPU-only memory, how many matched blocks have
  each best tier, and sums the weights with `math.fsum`, exactly rounded and
  so equal to `PrefixIndex`'s `fsum` over the same weights in any order;
  other endpoints get ``blocks * weight[GPU]``, as there.

Memory per entry: an entry row (24 B at 35-70% load), a share of its key's
row (16 B up to 64 endpoints, 8 B more per further 64 endpoint slots, at
the same load, divided among the key's holders) and 8 B per ring item (a
ring has room for at most 2.5 items per entry);
benchmarks/index_memory.py measures it (docs/performance.md). Slots are
limited to 65,536 endpoints (16 bits).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from itertools import chain, repeat
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from prefixroute import jit
from prefixroute.endpoint import EndpointId
from prefixroute.index import (
    DEFAULT_CAPACITY_BLOCKS,
    IndexInvariantError,
    IndexStats,
    PrefixIndex,
    PrefixMatch,
    Tier,
    _positive_int,
    _tier_weights,
)
from prefixroute.jit import njit

__all__ = ["CompiledPrefixIndex", "Index", "make_index"]

_CAPACITY_CEILING = 2**53
"""The largest capacity the kernels see: an int64 holds it and a float64 holds it exactly.

A larger one (an engine may report any positive int) bounds nothing no index
reaches either, so the kernels get this and `capacity()` returns the exact
value from a side table.
"""

Keys = npt.NDArray[np.uint64]

# Entry columns (uint64 matrix `ent`: one row per (key, endpoint) entry).
E_KEY, E_META, E_DEAD = 0, 1, 2  # E_DEAD: the deadline's float64 bits
# E_META packs: bits 0..2 the tiers, SPEC, MARK; bits 8..23 the endpoint slot; bits 32..63 the tick.
SPEC = 8  # speculative
MARK = 16  # collected by a deadline-heap rebuild (transient)
TIER_BITS = 7
GPU_ONLY = 1
MAX_SLOTS = 1 << 16
ETOMB = 0x80  # E_META of a deleted entry row (a tombstone)
KTOMB = 1  # the key column of a deleted key row (its masks are 0)

_MAX_LOAD = 0.7  # of either hash table, before it doubles
_MIN_KEY_ROWS = 16
_MIN_ENTRY_ROWS = 64
_MIN_RING = 64
_MIN_ARENA = 1 << 16  # keys (512 KiB): a reset or rebuild every few hundred decisions
_ARENA_SLACK = 4096
_TICK_MAX = (1 << 32) - 1
_WARM = 64  # keys whose rows are loaded ahead of their probes

# Endpoint columns (int64 matrix `epa`, one row per slot).
SIZE, CAP, NSPEC, NTIER, TICK, RHEAD, RLEN = 0, 1, 2, 3, 4, 5, 6
EP_COLS = 7

# Global scalars (int64 vector `meta`).
M_ENTRIES, M_KEYS, M_SPEC, M_TIERED = 0, 1, 2, 3
M_INSERTED, M_EVICTED, M_EXPIRED, M_REMOVED = 4, 5, 6, 7
M_HEAPLEN, M_ARENA, M_SEQ = 8, 9, 10
M_KLIMIT, M_KSHIFT, M_ELIMIT, M_ESHIFT = 11, 12, 13, 14
M_KEEP, M_TICKMAX, M_SINK, M_KTOMB, M_ETOMB = 15, 16, 17, 18, 19
META_LEN = 20

# Key table (uint64 matrix `kt`): column 0 the key, then the holder masks (a row is empty
# when its masks are all 0). Heap items (float64 matrix `hp`): deadline, sequence,
# arena start, length, slot.
K_MASK = 1
H_COLS = 5

_U1 = np.uint64(1)
_U8 = np.uint64(8)
_U29 = np.uint64(29)
_U31 = np.uint64(31)
_U32 = np.uint64(32)
_FIB = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xBF58476D1CE4E5B9)
_LOW32 = np.uint64(0xFFFFFFFF)


# -- kernels -----------------------------------------------------------------------
# Helpers are compiled into the kernels that call them; the kernels (`_k_*`) are
# the entry points (few, so that first-use compilation stays short).


@njit
def _mixed(k: Any, meta: Any) -> Any:
    h = k & np.uint64(meta[M_KEEP])
    h ^= h >> _U31
    return h * _FIB


@njit
def _khome(k: Any, meta: Any, mask: Any) -> Any:
    """The key-table row where key `k`'s probe run starts."""
    return np.int64(_mixed(k, meta) >> np.uint64(meta[M_KSHIFT])) & mask


@njit
def _ehome(k: Any, s: Any, meta: Any, mask: Any) -> Any:
    """The entry-table row where (key `k`, slot `s`)'s probe run starts."""
    h = _mixed(k, meta) ^ (np.uint64(s + 1) * _MIX)
    h ^= h >> _U29
    h *= _MIX
    return np.int64(h >> np.uint64(meta[M_ESHIFT])) & mask


@njit
def _kempty(kt: Any, i: Any) -> Any:
    for c in range(K_MASK, kt.shape[1]):  # noqa: SIM110 (numba: no generator in all())
        if kt[i, c]:
            return False
    return True


@njit
def _kfind(kt: Any, meta: Any, k: Any) -> Any:
    """The key-table row of `k`, or ``-1 - row`` of the row where it would go.

    That row is the probe run's first tombstone, else the empty row ending it.
    """
    mask = kt.shape[0] - 1
    i = _khome(k, meta, mask)
    free = -1
    while True:
        if not _kempty(kt, i):
            if kt[i, 0] == k:
                return i
        elif kt[i, 0] == 0:
            return -1 - (i if free < 0 else free)
        elif free < 0:
            free = i
        i = (i + 1) & mask


@njit
def _efind(ent: Any, meta: Any, k: Any, s: Any) -> Any:
    """The entry row of (`k`, slot `s`), or ``-1 - row`` where it would go (as `_kfind`)."""
    mask = ent.shape[0] - 1
    i = _ehome(k, s, meta, mask)
    want = np.uint64(s)
    free = -1
    while True:
        m = ent[i, E_META]
        if m == 0:
            return -1 - (i if free < 0 else free)
        if m == ETOMB:
            if free < 0:
                free = i
        elif ent[i, E_KEY] == k and (m >> _U8) & np.uint64(0xFFFF) == want:
            return i
        i = (i + 1) & mask


@njit
def _warm_k(kt: Any, meta: Any, keys: Any, lo: Any, hi: Any) -> None:
    """Load the home rows of ``keys[lo:hi]`` ahead of their probes.

    The loads are independent, so the processor overlaps their cache misses;
    the probes that follow branch on data already in cache. Without this, a
    probe's data-dependent branches serialise the misses.
    """
    mask = kt.shape[0] - 1
    acc = np.uint64(0)
    for i in range(lo, hi):
        acc ^= kt[_khome(keys[i], meta, mask), 0]
    meta[M_SINK] ^= np.int64(acc & _LOW32)


@njit
def _warm_e(ent: Any, meta: Any, keys: Any, s: Any, lo: Any, hi: Any) -> None:
    """Load the entry-table home rows of ``(keys[lo:hi], s)`` ahead of their probes."""
    mask = ent.shape[0] - 1
    acc = np.uint64(0)
    for i in range(lo, hi):
        acc ^= ent[_ehome(keys[i], s, meta, mask), E_META]
    meta[M_SINK] ^= np.int64(acc & _LOW32)


@njit
def _kdelete(kt: Any, meta: Any, i: Any) -> None:
    """Make key row `i` (its masks already 0) a tombstone; rehashing drops tombstones."""
    kt[i, 0] = KTOMB
    meta[M_KEYS] -= 1
    meta[M_KTOMB] += 1


@njit
def _edelete(ent: Any, meta: Any, i: Any) -> None:
    """Make entry row `i` a tombstone."""
    ent[i, E_KEY] = 0
    ent[i, E_META] = ETOMB
    meta[M_ETOMB] += 1


@njit
def _drop(kt: Any, ent: Any, dead: Any, epa: Any, meta: Any, e: Any) -> None:
    """Remove entry row `e`: its mask bit (and key row if now unheld), its row, the counts."""
    k = ent[e, E_KEY]
    m = ent[e, E_META]
    s = np.int64((m >> _U8) & np.uint64(0xFFFF))
    r = _kfind(kt, meta, k)
    kt[r, K_MASK + (s >> 6)] &= ~(_U1 << np.uint64(s & 63))
    if _kempty(kt, r):
        _kdelete(kt, meta, r)
    if m & np.uint64(SPEC):
        epa[s, NSPEC] -= 1
        meta[M_SPEC] -= 1
    if (m & np.uint64(TIER_BITS)) != GPU_ONLY:
        epa[s, NTIER] -= 1
        meta[M_TIERED] -= 1
    epa[s, SIZE] -= 1
    meta[M_ENTRIES] -= 1
    _edelete(ent, meta, e)


@njit
def _live(ent: Any, item: Any, s: Any) -> Any:
    """The entry row a ring item of slot `s` names, or -1 when the item is stale.

    An item is ``tick << 32 | row``; it is live while that row holds an entry
    of `s` last touched at that tick (entry rows stay put between rehashes).
    """
    e = np.int64(item & _LOW32)
    if e >= ent.shape[0]:
        return -1
    m = ent[e, E_META]
    if m == 0 or m == ETOMB or (m >> _U32) != (item >> _U32):
        return -1
    if np.int64((m >> _U8) & np.uint64(0xFFFF)) != s:
        return -1
    return e


@njit
def _compact(ent: Any, meta: Any, epa: Any, ring: Any, s: Any) -> None:
    """Rewrite slot `s`'s ring with its live items only, oldest first, ticks renumbered 0..n-1."""
    cap = ring.shape[0]
    head = epa[s, RHEAD]
    n = epa[s, RLEN]
    rows = np.empty(epa[s, SIZE], np.int64)
    kept = 0
    limit = np.uint64(ent.shape[0])
    for j in range(n):
        if j % _WARM == 0:  # load the next items' entry rows ahead (independent misses)
            acc = np.uint64(0)
            for q in range(j, min(n, j + _WARM)):
                p = head + q
                row = ring[p - cap if p >= cap else p] & _LOW32
                if row < limit:
                    acc ^= ent[np.int64(row), E_META]
            meta[M_SINK] ^= np.int64(acc & _LOW32)
        p = head + j
        if p >= cap:
            p -= cap
        e = _live(ent, ring[p], s)
        if e >= 0:
            ent[e, E_META] = (ent[e, E_META] & _LOW32) | (np.uint64(kept) << _U32)
            rows[kept] = e
            kept += 1
    for j in range(kept):
        ring[j] = (np.uint64(j) << _U32) | np.uint64(rows[j])
    epa[s, RHEAD] = 0
    epa[s, RLEN] = kept
    epa[s, TICK] = kept


@njit
def _room(ent: Any, meta: Any, epa: Any, ring: Any, s: Any, n: Any) -> Any:
    """Make room for `n` ring items, compacting when full; False unless <= 40% is then used.

    Growing the ring whenever a compaction leaves it over 40% full makes
    every compaction free at least 60% of it: compactions are rare (a hot
    prefix re-touched by every request leaves one stale item per touch) and
    amortised O(1) per touch.
    """
    cap = ring.shape[0]
    if epa[s, RLEN] + n <= cap and epa[s, TICK] + n < meta[M_TICKMAX]:
        return True
    _compact(ent, meta, epa, ring, s)
    return 5 * (epa[s, RLEN] + n) <= 2 * cap and epa[s, TICK] + n < meta[M_TICKMAX]


@njit
def _touch(ent: Any, epa: Any, ring: Any, s: Any, e: Any) -> None:
    """Make entry row `e` (of slot `s`) the most recently used: a fresh tick, appended."""
    t = np.uint64(epa[s, TICK])
    epa[s, TICK] += 1
    ent[e, E_META] = (ent[e, E_META] & _LOW32) | (t << _U32)
    p = epa[s, RHEAD] + epa[s, RLEN]
    if p >= ring.shape[0]:
        p -= ring.shape[0]
    ring[p] = (t << _U32) | np.uint64(e)
    epa[s, RLEN] += 1


@njit
def _evict(kt: Any, ent: Any, dead: Any, epa: Any, meta: Any, ring: Any, s: Any) -> None:
    """Pop `s`'s least recently used entries while it is over capacity (stale items skipped)."""
    need = epa[s, SIZE] - epa[s, CAP]
    if need <= 0:
        return
    meta[M_EVICTED] += need
    cap = ring.shape[0]
    kmask = kt.shape[0] - 1
    rows = ent.shape[0]
    ahead = 0  # ring items whose rows were loaded ahead
    while need > 0:
        if ahead == 0:
            ahead = min(max(need, 8), _WARM, epa[s, RLEN])
            acc = np.uint64(0)
            for j in range(ahead):  # the entry rows, then (from their keys) the key rows
                p = epa[s, RHEAD] + j
                e = np.int64(ring[p - cap if p >= cap else p] & _LOW32)
                if e < rows:
                    acc ^= ent[e, E_KEY]
            for j in range(ahead):
                p = epa[s, RHEAD] + j
                e = np.int64(ring[p - cap if p >= cap else p] & _LOW32)
                if e < rows:
                    acc ^= kt[_khome(ent[e, E_KEY], meta, kmask), 0]
            meta[M_SINK] ^= np.int64(acc & _LOW32)
        ahead -= 1
        p = epa[s, RHEAD]
        epa[s, RHEAD] = p + 1 if p + 1 < cap else 0
        epa[s, RLEN] -= 1
        e = _live(ent, ring[p], s)
        if e >= 0:
            _drop(kt, ent, dead, epa, meta, e)
            need -= 1


@njit
def _heap_less(hp: Any, a: Any, b: Any) -> Any:
    return hp[a, 0] < hp[b, 0] or (hp[a, 0] == hp[b, 0] and hp[a, 1] < hp[b, 1])


@njit
def _heap_push(hp: Any, meta: Any, deadline: Any, start: Any, length: Any, s: Any) -> None:
    """Push the batch ``arena[start:start+length]`` of slot `s`, due at `deadline`."""
    meta[M_SEQ] += 1
    i = meta[M_HEAPLEN]
    meta[M_HEAPLEN] = i + 1
    hp[i, 0] = deadline
    hp[i, 1] = float(meta[M_SEQ])
    hp[i, 2] = float(start)
    hp[i, 3] = float(length)
    hp[i, 4] = float(s)
    while i > 0:
        p = (i - 1) >> 1
        if not _heap_less(hp, i, p):
            break
        for c in range(H_COLS):
            hp[i, c], hp[p, c] = hp[p, c], hp[i, c]
        i = p


@njit
def _heap_pop(hp: Any, meta: Any) -> None:
    """Remove the heap's top item."""
    n = meta[M_HEAPLEN] - 1
    meta[M_HEAPLEN] = n
    for c in range(H_COLS):
        hp[0, c] = hp[n, c]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and _heap_less(hp, c + 1, c):
            c += 1
        if not _heap_less(hp, c, i):
            break
        for j in range(H_COLS):
            hp[i, j], hp[c, j] = hp[c, j], hp[i, j]
        i = c


@njit
def _k_match(kt: Any, ent: Any, epa: Any, meta: Any, keys: Any, out: Any) -> Any:
    """Longest-prefix match: fills `out` rows (blocks, slot, CPU-best, DISK-best); returns rows.

    Rows come by blocks, then slot, ascending (the order `PrefixIndex.match`
    builds its dict in). The tier counts are filled only for endpoints with
    entries outside GPU-only memory (zero otherwise).
    """
    n = keys.shape[0]
    if n == 0:
        return 0
    r = _kfind(kt, meta, keys[0])
    if r < 0:
        return 0
    words = kt.shape[1] - K_MASK
    rows = 0
    if words == 1:
        run = kt[r, K_MASK]
        i = 1
        while i < n:
            if i % _WARM == 1:
                _warm_k(kt, meta, keys, i, min(n, i + _WARM))
            r = _kfind(kt, meta, keys[i])
            m = kt[r, K_MASK] if r >= 0 else np.uint64(0)
            gone = run & ~m
            if gone:
                b = 0
                while gone:
                    if gone & _U1:
                        out[rows, 0] = i
                        out[rows, 1] = b
                        rows += 1
                    gone >>= _U1
                    b += 1
                run &= m
                if not run:
                    break
            i += 1
        b = 0
        while run:
            if run & _U1:
                out[rows, 0] = n
                out[rows, 1] = b
                rows += 1
            run >>= _U1
            b += 1
    else:
        # Only the words holding a bit of the first key's mask can hold a bit of the AND.
        act = np.empty(words, np.int64)
        runs = np.empty(words, np.uint64)
        na = 0
        for w in range(words):
            if kt[r, K_MASK + w]:
                act[na] = w
                runs[na] = kt[r, K_MASK + w]
                na += 1
        alive = True
        i = 1
        while i < n and alive:
            if i % _WARM == 1:
                _warm_k(kt, meta, keys, i, min(n, i + _WARM))
            r = _kfind(kt, meta, keys[i])
            alive = False
            for a in range(na):
                w = act[a]
                m = kt[r, K_MASK + w] if r >= 0 else np.uint64(0)
                cur = runs[a]
                gone = cur & ~m
                b = 0
                while gone:
                    if gone & _U1:
                        out[rows, 0] = i
                        out[rows, 1] = w * 64 + b
                        rows += 1
                    gone >>= _U1
                    b += 1
                cur &= m
                runs[a] = cur
                if cur:
                    alive = True
            i += 1
        if alive:
            for a in range(na):
                cur = runs[a]
                b = 0
                while cur:
                    if cur & _U1:
                        out[rows, 0] = n
                        out[rows, 1] = act[a] * 64 + b
                        rows += 1
                    cur >>= _U1
                    b += 1
    for j in range(rows):
        out[j, 2] = 0
        out[j, 3] = 0
    if meta[M_TIERED] > 0:
        for j in range(rows):
            s = out[j, 1]
            if epa[s, NTIER] > 0:
                for t in range(out[j, 0]):
                    b = ent[_efind(ent, meta, keys[t], s), E_META] & np.uint64(TIER_BITS)
                    if not b & _U1:
                        if b & np.uint64(2):
                            out[j, 2] += 1
                        else:
                            out[j, 3] += 1
    return rows


@njit
def _k_insert(
    kt: Any,
    ent: Any,
    dead: Any,
    epa: Any,
    meta: Any,
    hp: Any,
    ar: Any,
    ring: Any,
    keys: Any,
    s: Any,
    deadline: Any,
    spec: Any,
    tbit: Any,
) -> Any:
    """`insert`: touch every key of the chain in reverse order, then evict.

    Returns -1, changing nothing (but maybe compacting the ring), when a
    table lacks room for the chain (the caller grows it and calls again),
    else 0.
    """
    n = keys.shape[0]
    if (
        meta[M_KEYS] + meta[M_KTOMB] + n > meta[M_KLIMIT]
        or meta[M_ENTRIES] + meta[M_ETOMB] + n > meta[M_ELIMIT]
        or (spec and (meta[M_ARENA] + n > ar.shape[0] or meta[M_HEAPLEN] >= hp.shape[0]))
        or not _room(ent, meta, epa, ring, s, n)
    ):
        return -1
    w = K_MASK + (s >> 6)
    bit = _U1 << np.uint64(s & 63)
    ubit = np.uint64(tbit)
    uspec = np.uint64(SPEC)
    a0 = meta[M_ARENA]
    added = 0
    for i in range(n - 1, -1, -1):
        if (n - 1 - i) % _WARM == 0:
            _warm_e(ent, meta, keys, s, max(0, i + 1 - _WARM), i + 1)
            _warm_k(kt, meta, keys, max(0, i + 1 - _WARM), i + 1)
        k = keys[i]
        e = _efind(ent, meta, k, s)
        if e >= 0:
            m = ent[e, E_META]
            t = m & np.uint64(TIER_BITS)
            if (t | ubit) != t:
                if t == GPU_ONLY:
                    epa[s, NTIER] += 1
                    meta[M_TIERED] += 1
                m |= ubit
            if m & uspec:
                if not spec:
                    m &= ~uspec
                    epa[s, NSPEC] -= 1
                    meta[M_SPEC] -= 1
                elif deadline > dead[e]:
                    dead[e] = deadline
                    ar[meta[M_ARENA]] = k
                    meta[M_ARENA] += 1
            ent[e, E_META] = m
        else:
            e = -1 - e
            if ent[e, E_META] == ETOMB:
                meta[M_ETOMB] -= 1
            r = _kfind(kt, meta, k)
            if r < 0:
                r = -1 - r
                if kt[r, 0] == KTOMB:
                    meta[M_KTOMB] -= 1
                kt[r, 0] = k
                meta[M_KEYS] += 1
            kt[r, w] |= bit
            m = ubit | (np.uint64(s) << _U8)
            if tbit != GPU_ONLY:
                epa[s, NTIER] += 1
                meta[M_TIERED] += 1
            if spec:
                m |= uspec
                dead[e] = deadline
                ar[meta[M_ARENA]] = k
                meta[M_ARENA] += 1
                epa[s, NSPEC] += 1
                meta[M_SPEC] += 1
            ent[e, E_KEY] = k
            ent[e, E_META] = m
            added += 1
            epa[s, SIZE] += 1
        _touch(ent, epa, ring, s, e)
    meta[M_ENTRIES] += added
    meta[M_INSERTED] += added
    if meta[M_ARENA] > a0:
        _heap_push(hp, meta, deadline, a0, meta[M_ARENA] - a0, s)
    _evict(kt, ent, dead, epa, meta, ring, s)
    return 0


@njit
def _k_update(
    kt: Any,
    ent: Any,
    dead: Any,
    epa: Any,
    meta: Any,
    hp: Any,
    ar: Any,
    ring: Any,
    keys: Any,
    s: Any,
    op: Any,
    x: Any,
    y: Any,
) -> Any:
    """The per-key updates of one endpoint's entries; returns how many changed.

    `op` 0: confirm; 1: discard speculative entries due at or before `x`; 2:
    move those due in (`y`, `x`] to `y` (-1 if the arena lacks room, nothing
    changed); 3: remove (tier bit `int(x)`, 0 for all tiers); 4: set the
    capacity to `int(x)` and evict; 5: drop every entry (clear).
    """
    if op == 4:
        epa[s, CAP] = np.int64(x)
        _evict(kt, ent, dead, epa, meta, ring, s)
        return 0
    if op == 5:
        n = epa[s, SIZE]
        cap = ring.shape[0]
        for j in range(epa[s, RLEN]):
            p = epa[s, RHEAD] + j
            e = _live(ent, ring[p - cap if p >= cap else p], s)
            if e >= 0:
                _drop(kt, ent, dead, epa, meta, e)
        epa[s, RHEAD] = 0
        epa[s, RLEN] = 0
        epa[s, TICK] = 0
        meta[M_REMOVED] += n
        return n
    n = keys.shape[0]
    if op == 2 and (meta[M_ARENA] + n > ar.shape[0] or meta[M_HEAPLEN] >= hp.shape[0]):
        return -1
    uspec = np.uint64(SPEC)
    tbit = np.uint64(np.int64(x)) if op == 3 else np.uint64(0)
    a0 = meta[M_ARENA]
    changed = 0
    for i in range(n):
        if i % _WARM == 0:
            _warm_e(ent, meta, keys, s, i, min(n, i + _WARM))
        k = keys[i]
        e = _efind(ent, meta, k, s)
        if e < 0:
            continue
        m = ent[e, E_META]
        if op == 3:
            if tbit == 0:
                _drop(kt, ent, dead, epa, meta, e)
                changed += 1
                continue
            t = m & np.uint64(TIER_BITS)
            if not t & tbit:
                continue
            t &= ~tbit
            if t == 0:
                _drop(kt, ent, dead, epa, meta, e)
                changed += 1
            else:
                if t == GPU_ONLY:
                    epa[s, NTIER] -= 1
                    meta[M_TIERED] -= 1
                ent[e, E_META] = (m & ~np.uint64(TIER_BITS)) | t
            continue
        if not m & uspec:
            continue
        if op == 0:
            ent[e, E_META] = m & ~uspec
            epa[s, NSPEC] -= 1
            meta[M_SPEC] -= 1
            changed += 1
        elif op == 1:
            if dead[e] <= x:
                _drop(kt, ent, dead, epa, meta, e)
                changed += 1
        elif y < dead[e] <= x:
            dead[e] = y
            ar[meta[M_ARENA]] = k
            meta[M_ARENA] += 1
            changed += 1
    if op == 1 or op == 3:
        meta[M_REMOVED] += changed
    if meta[M_ARENA] > a0:
        _heap_push(hp, meta, y, a0, meta[M_ARENA] - a0, s)
    return changed


@njit
def _k_expire(kt: Any, ent: Any, dead: Any, epa: Any, meta: Any, hp: Any, ar: Any, now: Any) -> Any:
    """Drop speculative entries due at or before `now`; returns how many."""
    expired = 0
    uspec = np.uint64(SPEC)
    while meta[M_HEAPLEN] > 0 and hp[0, 0] <= now:
        d = hp[0, 0]
        start = np.int64(hp[0, 2])
        stop = start + np.int64(hp[0, 3])
        s = np.int64(hp[0, 4])
        _heap_pop(hp, meta)
        for j in range(start, stop):
            e = _efind(ent, meta, ar[j], s)
            if e >= 0 and ent[e, E_META] & uspec and dead[e] == d:
                _drop(kt, ent, dead, epa, meta, e)
                expired += 1
    meta[M_EXPIRED] += expired
    return expired


@njit
def _k_live_deadlines(ent: Any, dead: Any, meta: Any, hp: Any, ar: Any) -> Any:
    """The heap's live (key, slot, deadline) triples, each once: arrays for a rebuild."""
    total = meta[M_SPEC]
    keys = np.empty(total, np.uint64)
    slots = np.empty(total, np.int64)
    deads = np.empty(total, np.float64)
    rows = np.empty(total, np.int64)
    mark = np.uint64(MARK)
    uspec = np.uint64(SPEC)
    n = 0
    for i in range(meta[M_HEAPLEN]):
        d = hp[i, 0]
        first = np.int64(hp[i, 2])
        s = np.int64(hp[i, 4])
        for j in range(first, first + np.int64(hp[i, 3])):
            e = _efind(ent, meta, ar[j], s)
            if e < 0:
                continue
            m = ent[e, E_META]
            if m & uspec and not m & mark and dead[e] == d:
                ent[e, E_META] = m | mark
                keys[n] = ar[j]
                slots[n] = s
                deads[n] = d
                rows[n] = e
                n += 1
    for j in range(n):
        ent[rows[j], E_META] &= ~mark
    return keys[:n], slots[:n], deads[:n]


@njit
def _k_rehash(
    kt: Any,
    ent: Any,
    dead: Any,
    new_kt: Any,
    new_ent: Any,
    new_dead: Any,
    meta: Any,
    keys: Any,
    entries: Any,
) -> Any:
    """Insert the live rows of the old tables into new, empty ones (meta's shifts already new).

    Only the key table when `keys`, only the entry table when `entries`.
    Returns each old entry row's new row (``2**32 - 1`` for none), to renumber
    the LRU rings.
    """
    moved = np.full(ent.shape[0] if entries else 0, 0xFFFFFFFF, np.uint64)
    if keys:
        mask = new_kt.shape[0] - 1
        cols = kt.shape[1]
        for i in range(kt.shape[0]):
            if _kempty(kt, i):
                continue
            j = _khome(kt[i, 0], meta, mask)
            while not _kempty(new_kt, j):
                j = (j + 1) & mask
            for c in range(cols):
                new_kt[j, c] = kt[i, c]
    if entries:
        mask = new_ent.shape[0] - 1
        for i in range(ent.shape[0]):
            m = ent[i, E_META]
            if m == 0 or m == ETOMB:
                continue
            s = np.int64((m >> _U8) & np.uint64(0xFFFF))
            j = _ehome(ent[i, E_KEY], s, meta, mask)
            while new_ent[j, E_META] != 0:
                j = (j + 1) & mask
            new_ent[j, E_KEY] = ent[i, E_KEY]
            new_ent[j, E_META] = m
            new_dead[j] = dead[i]
            moved[i] = j
    return moved


@njit
def _k_purge(kt: Any, ent: Any, meta: Any, keys: Any, entries: Any) -> Any:
    """Drop the tombstones of a table in place, moving no row more than needed.

    The same-size rebuild of linear probing without a second table: one
    cyclic pass from an empty row (no probe run crosses it) turns each
    tombstone into an empty row and moves each live row back to the first
    empty row at or after its home, which the pass has already cleaned; a
    row it vacates is on no cleaned row's probe run. Only the key table when
    `keys`, only the entry table when `entries`. O(rows), sequential, with
    no allocation of the table's size. Returns the moved entries' new rows
    and their metas (``-1``-padded), for the caller to repoint their LRU
    ring items.
    """
    if keys:
        mask = kt.shape[0] - 1
        cols = kt.shape[1]
        start = 0
        while not (kt[start, 0] == 0 and _kempty(kt, start)):
            start += 1
        for q in range(1, kt.shape[0]):
            i = (start + q) & mask
            if _kempty(kt, i):
                kt[i, 0] = 0
                continue
            j = _khome(kt[i, 0], meta, mask)
            while j != i and not _kempty(kt, j):
                j = (j + 1) & mask
            if j != i:
                for c in range(cols):
                    kt[j, c] = kt[i, c]
                    kt[i, c] = 0
        meta[M_KTOMB] = 0
    rows = np.empty(1024 if entries else 0, np.int64)
    metas = np.empty(rows.shape[0], np.uint64)
    moves = 0
    if entries:
        mask = ent.shape[0] - 1
        start = 0
        while ent[start, E_META] != 0:
            start += 1
        for q in range(1, ent.shape[0]):
            i = (start + q) & mask
            m = ent[i, E_META]
            if m == 0:
                continue
            if m == ETOMB:
                ent[i, E_META] = 0
                continue
            sl = np.int64((m >> _U8) & np.uint64(0xFFFF))
            j = _ehome(ent[i, E_KEY], sl, meta, mask)
            while j != i and ent[j, E_META] != 0:
                j = (j + 1) & mask
            if j == i:
                continue
            for c in range(3):
                ent[j, c] = ent[i, c]
                ent[i, c] = 0
            if moves == rows.shape[0]:
                bigger = np.empty(2 * moves, np.int64)
                bigger[:moves] = rows
                rows = bigger
                more = np.empty(2 * moves, np.uint64)
                more[:moves] = metas
                metas = more
            rows[moves] = j
            metas[moves] = m
            moves += 1
        meta[M_ETOMB] = 0
    return rows[:moves], metas[:moves]


@njit
def _k_lookup(kt: Any, ent: Any, meta: Any, key: Any, s: Any) -> Any:
    """The key row of `key` (-1 if absent) when `s` < 0, else its entry's meta for slot `s` (-1)."""
    if s < 0:
        return _kfind(kt, meta, key)
    e = _efind(ent, meta, key, s)
    return np.int64(ent[e, E_META] & np.uint64(0xFF)) if e >= 0 else -1


# -- the index -------------------------------------------------------------------


def _as_keys(keys: Sequence[int] | Keys) -> Keys:
    """`keys` as a 1-D uint64 array (no copy when it already is one)."""
    if type(keys) is np.ndarray and keys.dtype == _U64 and keys.strides == _STRIDES:
        return keys  # read-only too (numba compiles a variant for those on first use)
    try:
        return np.ascontiguousarray(keys, dtype=np.uint64).reshape(-1)
    except OverflowError:  # a negative or >= 2**64 Python int
        raise ValueError("block keys must be integers in [0, 2**64)") from None


def _rows_for(n: int, minimum: int) -> int:
    """The smallest power-of-two row count >= `minimum` at most half filled by `n` rows.

    A table is rebuilt when its rows and tombstones pass `_MAX_LOAD`; starting
    at most half full, a rebuild comes after O(rows) insertions at the
    earliest, so its cost is amortised O(1) per insertion.
    """
    rows = minimum
    while 2 * n > rows:
        rows *= 2
    return rows


class CompiledPrefixIndex:
    """`PrefixIndex`'s API and semantics in flat arrays and compiled kernels.

    See the module docstring for the data structures, and `PrefixIndex` for
    what each method does; the docstrings here give the costs. Every method
    accepts the keys as a sequence of ints in [0, 2**64) or a 1-D uint64
    array (used without a copy when C-contiguous).
    """

    # Arena slack before a deadline-heap rebuild; tests lower it.
    _arena_slack = _ARENA_SLACK

    def __init__(
        self,
        *,
        default_capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
        tier_weights: Mapping[Tier, float] | None = None,
    ) -> None:
        """Build an empty index; arguments and errors as `PrefixIndex`."""
        self._default_capacity = _positive_int(default_capacity_blocks, "default_capacity_blocks")
        weights = _tier_weights(tier_weights)
        self._weights: Mapping[Tier, float] = MappingProxyType(weights)
        self._wg = weights[Tier.GPU]
        self._wc = weights[Tier.CPU]
        self._wd = weights[Tier.DISK]

        self._eps: dict[EndpointId, int] = {}  # id -> slot, in registration order
        self._huge: dict[EndpointId, int] = {}  # capacities above _CAPACITY_CEILING, exact
        self._by_slot: list[EndpointId | None] = []
        self._free_slots: list[int] = []  # a min-heap
        self._meta = np.zeros(META_LEN, np.int64)
        self._meta[M_KEEP] = -1  # hash the whole key (tests narrow it to force collisions)
        self._meta[M_TICKMAX] = _TICK_MAX
        self._kt = self._key_table(_MIN_KEY_ROWS, 1)
        self._ent, self._dead = self._entry_table(_MIN_ENTRY_ROWS)
        self._epa = np.zeros((8, EP_COLS), np.int64)
        self._rings: list[npt.NDArray[np.uint64]] = []  # per slot: LRU ring, tick << 32 | row
        self._hp = np.zeros((64, H_COLS), np.float64)
        self._ar = np.zeros(_MIN_ARENA, np.uint64)
        self._out = np.zeros((8, 4), np.int64)

    def _key_table(self, rows: int, words: int) -> npt.NDArray[np.uint64]:
        self._meta[M_KSHIFT] = 64 - (rows.bit_length() - 1)
        self._meta[M_KLIMIT] = int(rows * _MAX_LOAD)
        return np.zeros((rows, K_MASK + words), np.uint64)

    def _entry_table(self, rows: int) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.float64]]:
        """An empty entry table and its deadline column as float64 (a view, in the same rows)."""
        self._meta[M_ESHIFT] = 64 - (rows.bit_length() - 1)
        self._meta[M_ELIMIT] = int(rows * _MAX_LOAD)
        ent = np.zeros((rows, 3), np.uint64)
        return ent, ent.view(np.float64)[:, E_DEAD]

    @property
    def tier_weights(self) -> Mapping[Tier, float]:
        """The weight of each tier (read-only)."""
        return self._weights

    @property
    def default_capacity_blocks(self) -> int:
        """The capacity given to endpoints whose capacity was never set."""
        return self._default_capacity

    # -- growth ------------------------------------------------------------

    def _grow(self, n: int, slot: int) -> None:
        """Make room for `n` more keys, entries, ring items of `slot` and arena items.

        Tables double (rehashing), so growth is amortised O(1) per item.
        """
        meta = self._meta
        kt, ent, dead = self._kt, self._ent, self._dead
        keys, entries = int(meta[M_KEYS]), int(meta[M_ENTRIES])
        rekey = keys + int(meta[M_KTOMB]) + n > int(meta[M_KLIMIT])
        reent = entries + int(meta[M_ETOMB]) + n > int(meta[M_ELIMIT])
        # Tombstones alone fill a table: drop them in place (no second table).
        pkey = rekey and _rows_for(keys + n, kt.shape[0]) == kt.shape[0]
        pent = reent and _rows_for(entries + n, ent.shape[0]) == ent.shape[0]
        if pkey or pent:
            rows, metas = _k_purge(kt, ent, meta, pkey, pent)
            if len(rows):
                self._repoint(rows, metas)
            rekey, reent = rekey and not pkey, reent and not pent
        if rekey:  # a rebuild drops the tombstones and leaves the table at most half full
            self._kt = self._key_table(_rows_for(keys + n, kt.shape[0]), kt.shape[1] - K_MASK)
            meta[M_KTOMB] = 0
        if reent:
            self._ent, self._dead = self._entry_table(_rows_for(entries + n, ent.shape[0]))
            meta[M_ETOMB] = 0
        if rekey or reent:
            moved = _k_rehash(kt, ent, dead, self._kt, self._ent, self._dead, meta, rekey, reent)
            if reent:  # renumber the rings' rows; stale items may point anywhere, or nowhere
                for s in self._eps.values():
                    self._rings[s] = self._ring_in_order(s, self._rings[s].shape[0], moved)
        if slot >= 0:
            # Keep a compaction freeing >= 60%: grow when the live items (what a
            # compaction keeps) and the chain pass 40%. Not the ring's length, which
            # counts stale items: this runs for any table's or the heap's growth too.
            ring, length = self._rings[slot], int(self._epa[slot, RLEN])
            live = int(self._epa[slot, SIZE])
            if 5 * (live + n) > 2 * ring.shape[0]:
                size = max((5 * (live + n)) // 2 + 1, length + n)
                self._rings[slot] = self._ring_in_order(slot, size, None)
        if int(meta[M_ARENA]) + n > self._ar.shape[0] or meta[M_HEAPLEN] >= self._hp.shape[0]:
            if not meta[M_SPEC]:  # nothing speculative: every item is stale
                meta[M_HEAPLEN] = meta[M_ARENA] = 0
            elif int(meta[M_ARENA]) > 2 * int(meta[M_SPEC]) + self._arena_slack:
                self._rebuild_heap()
            if int(meta[M_ARENA]) + n > self._ar.shape[0]:
                ar = np.zeros(max(2 * self._ar.shape[0], int(meta[M_ARENA]) + n), np.uint64)
                ar[: self._ar.shape[0]] = self._ar
                self._ar = ar
            if meta[M_HEAPLEN] >= self._hp.shape[0]:
                hp = np.zeros((2 * self._hp.shape[0], H_COLS), np.float64)
                hp[: self._hp.shape[0]] = self._hp
                self._hp = hp

    def _repoint(self, rows: npt.NDArray[np.int64], metas: npt.NDArray[np.uint64]) -> None:
        """Point moved entries' LRU ring items at their new `rows`.

        A slot's ring holds its ticks ``TICK - RLEN .. TICK - 1`` in order
        from RHEAD, so the item of an entry touched at tick t is at
        ``RHEAD + t - (TICK - RLEN)`` (mod the ring's size). O(moves).
        """
        slots = ((metas >> _U8) & np.uint64(0xFFFF)).astype(np.uint16)
        ticks = metas >> _U32
        order = np.argsort(slots, kind="stable")  # a radix sort for 16-bit keys: O(moves)
        slots, ticks, rows = slots[order], ticks[order], rows[order]
        bounds = np.flatnonzero(np.diff(slots)) + 1
        for lo, hi in zip(
            np.concatenate(([0], bounds)).tolist(),
            np.concatenate((bounds, [len(slots)])).tolist(),
            strict=True,
        ):
            s = int(slots[lo])
            ring, epa = self._rings[s], self._epa[s]
            first = int(epa[TICK]) - int(epa[RLEN])
            pos = (int(epa[RHEAD]) + ticks[lo:hi].astype(np.int64) - first) % ring.shape[0]
            ring[pos] = (ticks[lo:hi] << _U32) | rows[lo:hi].astype(np.uint64)

    def _ring_in_order(
        self, slot: int, size: int, moved: npt.NDArray[np.uint64] | None
    ) -> npt.NDArray[np.uint64]:
        """Slot's ring items, oldest first, in a new ring of `size`; rows renumbered by `moved`."""
        ring = self._rings[slot]
        head, length = int(self._epa[slot, RHEAD]), int(self._epa[slot, RLEN])
        items = ring[(head + np.arange(length)) % max(ring.shape[0], 1)]
        if moved is not None:
            rows = (items & _LOW32).astype(np.int64)
            new_rows = np.full(length, 0xFFFFFFFF, np.uint64)
            inside = rows < moved.shape[0]
            new_rows[inside] = moved[rows[inside]]
            items = (items & ~_LOW32) | new_rows
        out = np.zeros(size, np.uint64)
        out[:length] = items
        self._epa[slot, RHEAD] = 0
        return out

    def _rebuild_heap(self) -> None:
        """Rebuild the deadline heap from its live items, one batch per (deadline, slot).

        O(arena) to collect, O(s log s) to sort the s speculative entries.
        """
        meta = self._meta
        keys, slots, deads = _k_live_deadlines(self._ent, self._dead, meta, self._hp, self._ar)
        order = np.lexsort((slots, deads))  # by deadline, then slot
        keys, slots, deads = keys[order], slots[order], deads[order]
        n = len(keys)
        new_batch = (deads[1:] != deads[:-1]) | (slots[1:] != slots[:-1])
        starts = np.flatnonzero(np.concatenate(([n > 0], new_batch)))
        items = len(starts)
        # Sorted by (deadline, sequence), the items already form a min-heap.
        hp = np.zeros((max(64, 2 * items), H_COLS), np.float64)
        hp[:items, 0] = deads[starts]
        hp[:items, 1] = int(meta[M_SEQ]) + 1 + np.arange(items)
        hp[:items, 2] = starts
        hp[:items, 3] = np.diff(np.concatenate((starts, [n])))
        hp[:items, 4] = slots[starts]
        ar = np.zeros(max(self._ar.shape[0], 2 * n), np.uint64)
        ar[:n] = keys
        meta[M_SEQ] += items
        meta[M_HEAPLEN] = items
        meta[M_ARENA] = n
        self._hp, self._ar = hp, ar

    # -- endpoints ---------------------------------------------------------

    def _register(self, endpoint: EndpointId) -> int:
        slot = self._eps.get(endpoint)
        if slot is not None:
            return slot
        if self._free_slots:
            slot = heapq.heappop(self._free_slots)
        else:
            slot = len(self._by_slot)
            if slot >= MAX_SLOTS:
                raise ValueError(f"an index holds at most {MAX_SLOTS} endpoints")
            self._by_slot.append(None)
            self._rings.append(_EMPTY)
            if slot >= self._epa.shape[0]:
                epa = np.zeros((2 * self._epa.shape[0], EP_COLS), np.int64)
                epa[: self._epa.shape[0]] = self._epa
                self._epa = epa
                self._out = np.zeros((epa.shape[0], 4), np.int64)
            words = self._kt.shape[1] - K_MASK
            if slot >= 64 * words:
                kt = np.zeros((self._kt.shape[0], K_MASK + words + 1), np.uint64)
                kt[:, : K_MASK + words] = self._kt
                self._kt = kt
        self._epa[slot] = (0, min(self._default_capacity, _CAPACITY_CEILING), 0, 0, 0, 0, 0)
        if self._default_capacity > _CAPACITY_CEILING:
            self._huge[endpoint] = self._default_capacity
        self._rings[slot] = np.zeros(_MIN_RING, np.uint64)
        self._by_slot[slot] = endpoint
        self._eps[endpoint] = slot
        return slot

    def set_capacity(self, endpoint: EndpointId, blocks: int) -> None:
        """Bound `endpoint` to `blocks` entries, registering it if new.

        O(1), plus O(1) amortised per evicted entry. `ValueError` unless
        `blocks` is a positive integer.
        """
        blocks = _positive_int(blocks, "blocks")
        slot = self._register(endpoint)
        if blocks > _CAPACITY_CEILING:
            self._huge[endpoint] = blocks
        else:
            self._huge.pop(endpoint, None)
        self._update(slot, _EMPTY, 4, float(min(blocks, _CAPACITY_CEILING)), 0.0)

    def capacity(self, endpoint: EndpointId) -> int:
        """The capacity of `endpoint`; the default for an unregistered one. O(1)."""
        slot = self._eps.get(endpoint)
        if slot is None:
            return self._default_capacity
        return self._huge.get(endpoint) or int(self._epa[slot, CAP])

    def endpoints(self) -> list[EndpointId]:
        """The registered endpoints, in registration order. O(endpoints)."""
        return list(self._eps)

    def size(self, endpoint: EndpointId) -> int:
        """The number of entries `endpoint` holds (0 if unknown). O(1)."""
        slot = self._eps.get(endpoint)
        return 0 if slot is None else int(self._epa[slot, SIZE])

    def __len__(self) -> int:
        """The total number of (block, endpoint) entries. O(1)."""
        return int(self._meta[M_ENTRIES])

    # -- mutation ------------------------------------------------------------

    def insert(
        self,
        endpoint: EndpointId,
        keys: Sequence[int] | Keys,
        *,
        tier: Tier = Tier.GPU,
        speculative_until: float | None = None,
    ) -> None:
        """Record that `endpoint` holds the chain `keys` in `tier` (as `PrefixIndex.insert`).

        Cost: one kernel call: O(len(keys)) expected probes and O(1) ring
        appends, plus O(1) amortised per evicted entry; one heap push per
        speculative call.
        """
        tbit = _TIER_BIT.get(tier)
        if tbit is None:
            tbit = 1 << Tier(tier)
        deadline = 0.0
        spec = speculative_until is not None
        if spec:
            deadline = float(speculative_until)  # type: ignore[arg-type]
            if math.isnan(deadline):
                raise ValueError("speculative_until must not be NaN")
        slot = self._eps.get(endpoint)
        if slot is None:
            slot = self._register(endpoint)
        arr = _as_keys(keys)
        if self._insert(arr, slot, deadline, spec, tbit) < 0:
            self._grow(len(arr), slot)
            if self._insert(arr, slot, deadline, spec, tbit) < 0:  # pragma: no cover
                raise RuntimeError("the index could not make room for the chain")

    def _insert(self, arr: Keys, slot: int, deadline: float, spec: bool, tbit: int) -> int:
        return _k_insert(  # type: ignore[no-any-return]
            self._kt,
            self._ent,
            self._dead,
            self._epa,
            self._meta,
            self._hp,
            self._ar,
            self._rings[slot],
            arr,
            slot,
            deadline,
            spec,
            tbit,
        )

    def _update(self, slot: int, arr: Keys, op: int, x: float, y: float) -> int:
        return _k_update(  # type: ignore[no-any-return]
            self._kt,
            self._ent,
            self._dead,
            self._epa,
            self._meta,
            self._hp,
            self._ar,
            self._rings[slot],
            arr,
            slot,
            op,
            x,
            y,
        )

    def confirm(self, endpoint: EndpointId, keys: Sequence[int] | Keys) -> int:
        """Make `endpoint`'s speculative entries among `keys` confirmed; how many changed.

        O(len(keys)) expected probes in one kernel call; O(1) when the
        endpoint has no speculative entry.
        """
        slot = self._eps.get(endpoint)
        if slot is None or not self._epa[slot, NSPEC]:
            return 0
        return self._update(slot, _as_keys(keys), 0, 0.0, 0.0)

    def discard_speculative(
        self,
        endpoint: EndpointId,
        keys: Sequence[int] | Keys,
        *,
        not_after: float,
        at: float | None = None,
    ) -> int:
        """Take back speculative entries due at or before `not_after` (as `PrefixIndex`).

        O(len(keys)) expected probes in one kernel call.
        """
        slot = self._eps.get(endpoint)
        if slot is None or not self._epa[slot, NSPEC]:
            return 0
        arr = _as_keys(keys)
        limit = float(not_after)
        if at is None:
            return self._update(slot, arr, 1, limit, 0.0)
        at = float(at)
        if math.isnan(at):
            raise ValueError("at must not be NaN")
        changed = self._update(slot, arr, 2, limit, at)
        if changed < 0:
            self._grow(len(arr), -1)
            changed = self._update(slot, arr, 2, limit, at)
        return changed

    def remove(
        self, endpoint: EndpointId, keys: Sequence[int] | Keys, *, tier: Tier | None = None
    ) -> int:
        """Clear `tier` (all when None) of `endpoint`'s entries for `keys`; entries removed.

        O(len(keys)) expected probes in one kernel call.
        """
        slot = self._eps.get(endpoint)
        if slot is None or not self._epa[slot, SIZE]:
            return 0
        tbit = 0 if tier is None else 1 << Tier(tier)
        return self._update(slot, _as_keys(keys), 3, float(tbit), 0.0)

    def clear_endpoint(self, endpoint: EndpointId) -> None:
        """Drop every entry of `endpoint`, keeping its registration and capacity.

        O(length of its LRU ring), which is O(capacity).
        """
        slot = self._eps.get(endpoint)
        if slot is not None:
            self._update(slot, _EMPTY, 5, 0.0, 0.0)

    def remove_endpoint(self, endpoint: EndpointId) -> None:
        """Forget `endpoint` entirely: entries, capacity and slot (reused later)."""
        slot = self._eps.get(endpoint)
        if slot is None:
            return
        self.clear_endpoint(endpoint)
        del self._eps[endpoint]
        self._huge.pop(endpoint, None)
        self._by_slot[slot] = None
        self._rings[slot] = _EMPTY
        heapq.heappush(self._free_slots, slot)

    def expire(self, now: float) -> int:
        """Drop speculative entries whose deadline is <= `now`; returns how many.

        O(log n) per heap batch due, O(1) expected per key in it; O(1) when
        nothing is due.
        """
        if not self._meta[M_HEAPLEN] or not self._hp[0, 0] <= now:
            return 0
        return _k_expire(  # type: ignore[no-any-return]
            self._kt,
            self._ent,
            self._dead,
            self._epa,
            self._meta,
            self._hp,
            self._ar,
            float(now),
        )

    # -- queries -------------------------------------------------------------

    def match(self, keys: Sequence[int] | Keys) -> dict[EndpointId, PrefixMatch]:
        """Each endpoint's longest prefix of `keys` held (as `PrefixIndex.match`).

        One kernel call: O(m) expected probes for the longest match m and
        O(words) mask ANDs per key (a word per 64 endpoint slots); plus O(m)
        probes for an endpoint holding some entry outside GPU-only memory.
        """
        rows = _k_match(self._kt, self._ent, self._epa, self._meta, _as_keys(keys), self._out)
        if not rows:
            return {}
        by_slot = self._by_slot
        new = tuple.__new__
        wg = self._wg
        out: dict[EndpointId, PrefixMatch] = {}
        for length, slot, cpu, disk in self._out[:rows].tolist():
            if cpu or disk:
                parts = (repeat(wg, length - cpu - disk), repeat(self._wc, cpu))
                weighted = math.fsum(chain(*parts, repeat(self._wd, disk)))
            else:
                weighted = length * wg
            out[by_slot[slot]] = new(PrefixMatch, (length, weighted))
        return out

    def _lookup(self, key: int, slot: int) -> int:
        if isinstance(key, int | np.integer) and 0 <= key < 1 << 64:
            return int(_k_lookup(self._kt, self._ent, self._meta, np.uint64(key), slot))
        return -1

    def holders(self, key: int) -> frozenset[EndpointId]:
        """The endpoints holding `key` (any tier). O(words + holders)."""
        row = self._lookup(key, -1)
        if row < 0:
            return frozenset()
        out = []
        for w, m in enumerate(self._kt[row, K_MASK:].tolist()):
            while m:
                low = m & -m
                m ^= low
                eid = self._by_slot[64 * w + low.bit_length() - 1]
                assert eid is not None
                out.append(eid)
        return frozenset(out)

    def is_speculative(self, endpoint: EndpointId, key: int) -> bool:
        """Whether `endpoint` holds `key` speculatively (False if not held). O(1) expected."""
        slot = self._eps.get(endpoint)
        if slot is None:
            return False
        flags = self._lookup(key, slot)
        return flags >= 0 and bool(flags & SPEC)

    def tiers(self, endpoint: EndpointId, key: int) -> frozenset[Tier]:
        """The tiers `endpoint` holds `key` in (empty if not held). O(1) expected."""
        slot = self._eps.get(endpoint)
        if slot is None:
            return frozenset()
        flags = self._lookup(key, slot)
        if flags < 0:
            return frozenset()
        return frozenset(t for t in Tier if flags & (1 << t))

    def stats(self) -> IndexStats:
        """A snapshot of sizes and counters. O(endpoints)."""
        m = self._meta.tolist()
        sizes = self._epa[:, SIZE].tolist()
        return IndexStats(
            entries=m[M_ENTRIES],
            keys=m[M_KEYS],
            endpoints=len(self._eps),
            speculative=m[M_SPEC],
            inserted=m[M_INSERTED],
            evicted=m[M_EVICTED],
            expired=m[M_EXPIRED],
            removed=m[M_REMOVED],
            per_endpoint=MappingProxyType({eid: sizes[s] for eid, s in self._eps.items()}),
        )

    def memory_bytes(self) -> int:
        """Bytes of the index's arrays (their capacity, not just what is in use). O(endpoints)."""
        arrays = (self._kt, self._ent, self._epa, self._hp, self._ar, self._meta)
        rings = sum(ring.nbytes for ring in self._rings)
        return sum(a.nbytes for a in arrays) + rings + self._out.nbytes

    # -- checking ------------------------------------------------------------

    def check_invariants(self) -> None:
        """Verify all bookkeeping; raise `IndexInvariantError` naming what is wrong.

        Checks that every row of both tables is reachable from its home, the
        masks against the entries, each endpoint's ring (one live item per
        entry, oldest first, ticks below the counter), sizes and capacities,
        speculative and tier counts, that every speculative entry can still
        expire through the heap, the heap's order, and the global counters.
        O(rows + ring items + arena); meant for tests.
        """

        def fail(msg: str) -> None:
            raise IndexInvariantError(msg)

        meta = self._meta.tolist()
        epa = self._epa.tolist()
        used = set(self._eps.values())
        if sorted(used) != [s for s, e in enumerate(self._by_slot) if e is not None]:
            fail("registered endpoints and used slots differ")
        for eid, s in self._eps.items():
            if self._by_slot[s] != eid:
                fail(f"endpoint {eid!r} is registered inconsistently")
        if sorted(self._free_slots) != [s for s, e in enumerate(self._by_slot) if e is None]:
            fail("free slots differ from unused slots")
        words = self._kt.shape[1] - K_MASK
        if 64 * words < len(self._by_slot):
            fail("too few mask words for the slots")
        keep = meta[M_KEEP] & (2**64 - 1)

        def mixed(k: int) -> int:
            h = k & keep
            h ^= h >> 31
            return (h * 0x9E3779B97F4A7C15) & (2**64 - 1)

        def reachable(
            table: list[list[int]], i: int, home: int, empty: Callable[[int], bool]
        ) -> None:
            j = home
            while j != i:
                if empty(j):
                    fail(f"row {i} is unreachable from its home {home}")
                j = (j + 1) % len(table)

        # Key table.
        kt = self._kt.tolist()
        kshift = meta[M_KSHIFT]
        masks: dict[int, list[int]] = {}
        tombs = 0
        for i, (key, *ms) in enumerate(kt):
            if not any(ms):
                if key not in (0, KTOMB):
                    fail(f"empty key row {i} is not zeroed")
                tombs += key == KTOMB
                continue
            if key in masks:
                fail(f"key {key} is in two rows")
            masks[key] = ms
            reachable(kt, i, mixed(key) >> kshift, lambda j: kt[j] == [0] * len(kt[j]))
        if len(masks) != meta[M_KEYS] or tombs != meta[M_KTOMB]:
            fail(f"keys counted {meta[M_KEYS]}, rows hold {len(masks)}; {tombs} tombstones")
        if len(masks) + tombs > meta[M_KLIMIT]:
            fail("the key table is over its load limit")

        # Entry table.
        ent = self._ent.tolist()
        dead = self._dead.tolist()
        eshift = meta[M_ESHIFT]
        entries: dict[
            tuple[int, int], tuple[int, int, float]
        ] = {}  # (key, slot) -> flags, tick, deadline
        seen: dict[int, list[int]] = {}
        by_row: dict[int, tuple[int, int]] = {}  # entry row -> slot, tick
        tombs = 0
        for i, (key, m, _) in enumerate(ent):
            if m in (0, ETOMB):
                if key:
                    fail(f"empty entry row {i} is not zeroed")
                tombs += m == ETOMB
                continue
            flags, s, tick = m & 0xFF, (m >> 8) & 0xFFFF, m >> 32
            if s not in used:
                fail(f"entry row {i} names unused slot {s}")
            if (key, s) in entries:
                fail(f"entry ({key}, {s}) is in two rows")
            if flags & ~(SPEC | TIER_BITS) or not flags & TIER_BITS:
                fail(f"entry ({key}, {s}) has flags {flags}")
            entries[(key, s)] = (flags, tick, dead[i])
            by_row[i] = (s, tick)
            h = mixed(key) ^ (((s + 1) * 0xBF58476D1CE4E5B9) & (2**64 - 1))
            h ^= h >> 29
            h = (h * 0xBF58476D1CE4E5B9) & (2**64 - 1)
            reachable(ent, i, h >> eshift, lambda j: ent[j][E_META] == 0)
            bits = seen.setdefault(key, [0] * words)
            bits[s >> 6] |= 1 << (s & 63)
        if seen != masks:
            fail("the key table's masks differ from the entries")
        if len(entries) != meta[M_ENTRIES] or tombs != meta[M_ETOMB]:
            fail(f"entries counted {meta[M_ENTRIES]}, rows hold {len(entries)}; {tombs} tombstones")
        if len(entries) + tombs > meta[M_ELIMIT]:
            fail("the entry table is over its load limit")

        # Rings and per-endpoint counts.
        total = spec_total = tier_total = 0
        for s in used:
            size, cap, n_spec, n_tier, tick, head, length = epa[s]
            ring = self._rings[s].tolist()
            if length > len(ring) or not 0 <= head < max(len(ring), 1):
                fail(f"slot {s}: ring of {len(ring)} with head {head}, length {length}")
            live = 0
            last = -1
            for j in range(length):
                item = ring[(head + j) % len(ring)]
                t = item >> 32
                if t >= tick or t <= last:
                    fail(f"slot {s}: ring ticks out of order at item {j}")
                last = t
                if by_row.get(item & 0xFFFFFFFF) == (s, t):
                    live += 1
            mine = [v for (_, es), v in entries.items() if es == s]
            if live != len(mine) or size != len(mine):
                fail(f"slot {s}: size {size}, {len(mine)} entries, {live} live ring items")
            if size > cap or cap <= 0:
                fail(f"slot {s}: size {size} over capacity {cap}")
            sp = sum(1 for f, _, _ in mine if f & SPEC)
            ti = sum(1 for f, _, _ in mine if f & TIER_BITS != GPU_ONLY)
            if (sp, ti) != (n_spec, n_tier):
                fail(f"slot {s}: {sp} speculative, {ti} tiered; counted {n_spec}, {n_tier}")
            total += size
            spec_total += sp
            tier_total += ti
        for s, ring in enumerate(self._rings):
            if s not in used and (ring.shape[0] or epa[s][RLEN]):
                fail(f"unused slot {s} keeps a ring")

        # Deadline heap.
        hp = self._hp[: meta[M_HEAPLEN]].tolist()
        ar = self._ar.tolist()
        findable: set[tuple[int, int]] = set()
        for i, (d, q, start, n, s) in enumerate(hp):
            for c in (2 * i + 1, 2 * i + 2):
                if c < len(hp) and (hp[c][0], hp[c][1]) < (d, q):
                    fail("the deadline heap is out of order")
            if start + n > meta[M_ARENA]:
                fail("a heap item reaches past the arena")
            findable.update(
                (k, int(s))
                for k in ar[int(start) : int(start + n)]
                if entries.get((k, int(s)), (0, 0, None))[2] == d
            )
        pending = {ks for ks, (f, _, _) in entries.items() if f & SPEC}
        if pending - findable:
            fail(f"{len(pending - findable)} speculative entries cannot expire")

        if spec_total != meta[M_SPEC]:
            fail(f"speculative counted {meta[M_SPEC]}, held {spec_total}")
        if tier_total != meta[M_TIERED]:
            fail(f"tiered counted {meta[M_TIERED]}, held {tier_total}")
        if meta[M_INSERTED] - meta[M_EVICTED] - meta[M_EXPIRED] - meta[M_REMOVED] != total:
            fail("inserted - evicted - expired - removed != entries")


_EMPTY: Keys = np.zeros(0, np.uint64)
_U64 = np.dtype(np.uint64)
_STRIDES = (8,)  # a contiguous 1-D uint64 array's
_TIER_BIT: dict[object, int] = {t: 1 << t for t in Tier}


Index = PrefixIndex | CompiledPrefixIndex
"""Either prefix index: the same public API and behaviour (tests/test_compiled_index.py)."""


def make_index(
    *,
    default_capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
    tier_weights: Mapping[Tier, float] | None = None,
    compiled: bool | None = None,
) -> Index:
    """A prefix index: `CompiledPrefixIndex` when `compiled`, else `PrefixIndex`.

    `compiled=None` means compiled when numba is installed
    (`prefixroute.jit.AVAILABLE`). Both have the same API and behaviour
    (tests/test_compiled_index.py); the compiled one is faster on large
    indexes (docs/performance.md). Arguments and errors as `PrefixIndex`.
    """
    if compiled is None:
        compiled = jit.AVAILABLE
    if compiled:
        return CompiledPrefixIndex(
            default_capacity_blocks=default_capacity_blocks, tier_weights=tier_weights
        )
    return PrefixIndex(default_capacity_blocks=default_capacity_blocks, tier_weights=tier_weights)
