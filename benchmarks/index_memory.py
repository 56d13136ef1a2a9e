"""Bytes per (block, endpoint) entry of the prefix indexes at 1,000,000 entries over 64 endpoints.

Run: ``python benchmarks/index_memory.py`` (about half a minute). Both
`PrefixIndex` and, where numba is installed, `CompiledPrefixIndex` are
measured. Measured
with `tracemalloc`, which counts the bytes Python asked its allocators for,
so the figures are for the index alone, not the process RSS. Two figures per
composition:

- *keys not counted*: the key ints are built before tracing starts, as
  while a request is being routed: its chain (and its `Decision`) owns them
  and the index only references them;
- *keys counted*: the key ints are built while tracing and only the index
  keeps them, the steady state for entries that outlive their request.

Compositions (each endpoint's capacity is the default 65,536 blocks, so
nothing is evicted while filling):

- *unique*: 256-block chains of fresh keys, round-robin over the endpoints
  (replication 1: every key is held by one endpoint);
- *mix*: 512 shared 128-block prefixes (system prompts), each on 8 of the
  endpoints, plus a unique 16..128-block tail per request; requests re-touch
  their prefix, so the LRU deques carry stale items as they do in service.

The compiled index keeps its keys in uint64 arrays, not as Python ints, so
both figures are the same for it up to the transient arrays of one call;
numpy reports its array memory to tracemalloc, so its figures are its
arrays' sizes (capacity, not just what is in use), which
`CompiledPrefixIndex.memory_bytes` also sums.

The target (issue) is <= 120 bytes per entry at 1,000,000 entries.
tracemalloc reports requested sizes: pymalloc rounds small objects up to 16
bytes, so a full-width key int (36 B requested) really occupies 48 B, and
the "counted" figures understate by up to 12 B per distinct key. Big tables
(the dict, deque blocks) come from malloc and are counted exactly.
"""

from __future__ import annotations

import functools
import gc
import random
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

from prefixroute import jit
from prefixroute.compiled_index import CompiledPrefixIndex
from prefixroute.endpoint import EndpointId
from prefixroute.index import PrefixIndex

ENTRIES = 1_000_000
ENDPOINTS = 64
CHAIN = 256
PREFIXES = 512
PREFIX_BLOCKS = 128
REPLICAS = 8
TAIL_MIN, TAIL_MAX = 16, 128
TARGET_BYTES = 120

Workload = list[tuple[EndpointId, list[int]]]


def endpoint_ids(n: int = ENDPOINTS) -> list[EndpointId]:
    return [EndpointId(f"pod-{i:02d}") for i in range(n)]


def _fresh_keys(rng: random.Random) -> Iterator[int]:
    """Distinct-enough random 64-bit keys (collisions are 1 in 2**64 per pair)."""
    bits = rng.getrandbits
    while True:
        yield bits(64)


def unique_workload(entries: int = ENTRIES, seed: int = 1) -> Workload:
    """Round-robin 256-block chains of fresh keys until `entries` entries."""
    rng = random.Random(seed)
    keys = _fresh_keys(rng)
    eids = endpoint_ids()
    out: Workload = []
    total = 0
    i = 0
    while total < entries:
        n = min(CHAIN, entries - total)
        out.append((eids[i % ENDPOINTS], [next(keys) for _ in range(n)]))
        total += n
        i += 1
    return out


class MixedWorkload:
    """Shared prefixes on `REPLICAS` endpoints each, plus unique tails per request."""

    def __init__(self, seed: int = 2) -> None:
        self.rng = random.Random(seed)
        self.keys = _fresh_keys(self.rng)
        self.eids = endpoint_ids()
        self.prefixes = [[next(self.keys) for _ in range(PREFIX_BLOCKS)] for _ in range(PREFIXES)]
        self.homes = [self.rng.sample(self.eids, REPLICAS) for _ in range(PREFIXES)]

    def request(self) -> tuple[EndpointId, list[int]]:
        """One request's (endpoint, chain): a shared prefix on one of its homes, a fresh tail."""
        p = self.rng.randrange(PREFIXES)
        tail = [next(self.keys) for _ in range(self.rng.randint(TAIL_MIN, TAIL_MAX))]
        return self.rng.choice(self.homes[p]), self.prefixes[p] + tail

    def fill(self, index: Any, entries: int = ENTRIES) -> None:
        """Insert requests until `index` holds at least `entries` entries."""
        while len(index) < entries:
            eid, chain = self.request()
            index.insert(eid, chain)


def _traced(build: Callable[[], Any]) -> tuple[Any, int]:
    """Run `build()` under tracemalloc; the bytes still held afterwards, and its result."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    index = build()
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return index, held


def breakdown(index: PrefixIndex) -> dict[str, int]:
    """Approximate bytes by part, from `sys.getsizeof` (keys' ints excluded)."""
    holders = index._holders
    shared = {id(b) for b in index._bit}
    masks = {id(m): m for m in holders.values() if id(m) not in shared}
    eps = list(index._eps.values())
    return {
        "holders dict": sys.getsizeof(holders),
        "multi-holder masks": sum(sys.getsizeof(m) for m in masks.values()),
        "LRU deques": sum(sys.getsizeof(ep.lru) for ep in eps),
        "side tables": sum(
            sys.getsizeof(ep.extra) + sys.getsizeof(ep.tiers) + sys.getsizeof(ep.spec) for ep in eps
        ),
    }


def replay(requests: Workload, cls: Callable[[], Any] = PrefixIndex) -> Any:
    """A fresh index of `cls` with `requests` inserted in order."""
    index = cls()
    for eid, chain in requests:
        index.insert(eid, chain)
    return index


def unique_counted(cls: Callable[[], Any] = PrefixIndex) -> Any:
    """The unique composition with its key ints created (and so traced) here."""
    return replay(unique_workload(), cls)


def mix_requests(entries: int = ENTRIES, seed: int = 2) -> Workload:
    """The mixed composition's requests, enough to reach `entries` entries."""
    mix = MixedWorkload(seed)
    probe = PrefixIndex()
    requests: Workload = []
    while len(probe) < entries:
        req = mix.request()
        requests.append(req)
        probe.insert(*req)
    return requests


def mix_counted(cls: Callable[[], Any] = PrefixIndex) -> Any:
    """The mixed composition with its key ints created (and so traced) here."""
    index = cls()
    MixedWorkload().fill(index)
    return index


def compiled_breakdown(index: CompiledPrefixIndex) -> dict[str, int]:
    """Bytes by array of a `CompiledPrefixIndex` (capacity)."""
    return {
        "key table": index._kt.nbytes,
        "entry table": index._ent.nbytes,
        "LRU rings": sum(ring.nbytes for ring in index._rings),
        "rest": index.memory_bytes()
        - index._kt.nbytes
        - index._ent.nbytes
        - sum(ring.nbytes for ring in index._rings),
    }


Row = tuple[str, str, int, int, float]


def _row(composition: str, keys: str, index: Any, held: int) -> Row:
    return (composition, keys, len(index), index.stats().keys, held / len(index))


def measure() -> list[Row]:
    """Measure both compositions, keys counted and not, for both indexes; print tables."""
    rows = measure_class(PrefixIndex)
    if jit.AVAILABLE:
        rows += measure_class(CompiledPrefixIndex)
    return rows


def measure_class(cls: Callable[[], Any]) -> list[Row]:
    """Measure one index class; print its table and breakdown."""
    rows: list[Row] = []
    parts: dict[str, dict[str, int]] = {}
    name = getattr(cls, "__name__", str(cls))
    compiled = cls is CompiledPrefixIndex
    if compiled:
        replay(unique_workload(1000), cls)  # compile the kernels before tracing
    for composition, make_requests, counted in (
        ("unique", unique_workload, unique_counted),
        ("mix", mix_requests, mix_counted),
    ):
        requests = make_requests()  # built before tracing: keys not counted
        index, held = _traced(functools.partial(replay, requests, cls))
        index.check_invariants()
        rows.append(_row(composition, "not counted", index, held))
        parts[composition] = compiled_breakdown(index) if compiled else breakdown(index)
        del index, requests
        index, held = _traced(functools.partial(counted, cls))
        rows.append(_row(composition, "counted", index, held))
        del index

    print(f"{name} memory, {ENDPOINTS} endpoints, tracemalloc (target <= {TARGET_BYTES} B)")
    header = ("composition", "key ints", "entries", "keys", "repl", "B/entry")
    print("{:<12} {:<12} {:>10} {:>10} {:>5} {:>8}".format(*header))
    for comp, keys, entries, distinct, per in rows:
        ok = "ok" if per <= TARGET_BYTES else "OVER"
        print(
            f"{comp:<12} {keys:<12} {entries:>10,} {distinct:>10,} "
            f"{entries / distinct:>5.2f} {per:>8.1f}  {ok}"
        )
    how = "array sizes" if compiled else "sys.getsizeof"
    for part_of, by_part in parts.items():
        entries = next(r[2] for r in rows if r[0] == part_of)
        cells = ", ".join(f"{k} {v / entries:.1f}" for k, v in by_part.items())
        print(f"breakdown ({part_of}, {how}, B/entry): {cells}")
    return rows


if __name__ == "__main__":
    measure()
