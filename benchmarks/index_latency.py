"""A decision's index work, by fleet size: `match`, speculative `insert`, `confirm`.

    python -m benchmarks.index_latency [--endpoints 8,64,1000] [--entries N] [-n N] [--pure]
        [--baseline OLD_compiled_index.py] [--rounds N]

For each fleet size, fills an index to about `--entries` (block, endpoint)
entries (each endpoint's capacity is entries / endpoints, so it is full and
every decision evicts), with 256-block chains: one of 512 shared 128-block
prefixes, homed on 8 endpoints each, plus a unique 16..128-block tail. Then
times what the router does to the index per decision, as
`benchmarks/route_latency.py` drives it: `match` of a 256-key chain (the
prefix, held by the chosen endpoint and 7 others, plus 128 new keys), a
speculative `insert` of it into the chosen endpoint (128 held, 128 new, 128
evictions) and its `confirm`, each timed with perf_counter_ns (GC on).
Prints p50/p99 per call and of their total, for `CompiledPrefixIndex` and,
with `--pure`, `PrefixIndex` (given the chain as a list, as it stores
ints). Also prints the mean, p99.9 and maximum (the rare table
purges and ring compactions). `--baseline` loads another version of
compiled_index.py (e.g. ``git show HEAD:src/prefixroute/compiled_index.py
> /tmp/old.py``) and measures it alternately with the current one, for a
before/after in one run. The machine is shared and noisy: compare within
one run.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from prefixroute.compiled_index import CompiledPrefixIndex
from prefixroute.index import PrefixIndex

PREFIXES = 512
PREFIX_BLOCKS = 128
HOMES = 8


def build(cls: Any, endpoints: int, entries: int, seed: int = 0) -> tuple[Any, ...]:
    """A filled index, its endpoint ids, the prefixes, their homes and the generator."""
    rng = np.random.default_rng(seed)
    index = cls()
    eids = [f"pod-{i:03d}" for i in range(endpoints)]
    for e in eids:
        index.set_capacity(e, entries // endpoints)
    prefixes = rng.integers(0, 2**63, size=(PREFIXES, PREFIX_BLOCKS), dtype=np.uint64)
    homes = [rng.choice(endpoints, size=min(HOMES, endpoints), replace=False) for _ in prefixes]
    compiled = cls.__name__ == "CompiledPrefixIndex"
    i = 0
    while len(index) < entries * 0.99 and i < 4 * entries // PREFIX_BLOCKS:
        p = i % PREFIXES
        tail = rng.integers(0, 2**64 - 1, size=int(rng.integers(16, 129)), dtype=np.uint64)
        chain = np.concatenate([prefixes[p], tail])
        index.insert(eids[homes[p][i % len(homes[p])]], chain if compiled else chain.tolist())
        i += 1
    for p in range(PREFIXES):  # the measured decisions' endpoints hold their prefix
        index.insert(eids[homes[p][0]], prefixes[p] if compiled else prefixes[p].tolist())
    return index, eids, prefixes, homes, rng


def measure(cls: Any, endpoints: int, entries: int, decisions: int) -> None:
    t0 = time.perf_counter()
    index, eids, prefixes, homes, rng = build(cls, endpoints, entries)
    built = time.perf_counter() - t0
    compiled = cls.__name__ == "CompiledPrefixIndex"
    lat: dict[str, list[int]] = {"match": [], "insert": [], "confirm": [], "total": []}
    now = 1000.0
    gc.collect()
    for i in range(decisions):
        p = i % PREFIXES
        e = eids[homes[p][0]]
        new = rng.integers(0, 2**64 - 1, size=256 - PREFIX_BLOCKS, dtype=np.uint64)
        chain = np.concatenate([prefixes[p], new])
        keys = chain if compiled else chain.tolist()
        now += 0.001
        t0 = time.perf_counter_ns()
        matched = index.match(keys)
        t1 = time.perf_counter_ns()
        index.insert(e, keys, speculative_until=now + 30.0)
        t2 = time.perf_counter_ns()
        index.confirm(e, keys)
        t3 = time.perf_counter_ns()
        assert matched[e].blocks == PREFIX_BLOCKS
        for name, ns in (("match", t1 - t0), ("insert", t2 - t1), ("confirm", t3 - t2)):
            lat[name].append(ns)
        lat["total"].append(t3 - t0)
    size = f", arrays {index.memory_bytes() / len(index):.0f} B/entry" if compiled else ""
    label = getattr(cls, "_bench_label", cls.__name__)
    print(
        f"{label:20s} {endpoints:5d} endpoints {len(index):>9,} entries"
        f" (built in {built:.1f} s{size})"
    )
    cells = (
        f"{k} p50 {np.percentile(v, 50) / 1e3:6.1f} us p99 {np.percentile(v, 99) / 1e3:7.1f}"
        for k, v in lat.items()
    )
    print("   " + "  ".join(cells))
    tails = (
        f"{k} mean {np.mean(v) / 1e3:6.1f} us p99.9 {np.percentile(v, 99.9) / 1e3:7.1f}"
        f" max {np.max(v) / 1e3:7.1f}"
        for k, v in lat.items()
    )
    print("   " + "  ".join(tails))


def load_baseline(path: str) -> Any:
    """`CompiledPrefixIndex` from another version of compiled_index.py, labelled "baseline"."""
    name = "baseline_" + Path(path).stem  # numba's disk cache keys on it with the file
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    cls = module.CompiledPrefixIndex
    cls._bench_label = "baseline"
    return cls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoints", default="8,64,1000", help="comma-separated fleet sizes")
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("-n", "--decisions", type=int, default=3000)
    parser.add_argument("--pure", action="store_true", help="also measure PrefixIndex")
    parser.add_argument("--baseline", help="another compiled_index.py to measure alternately")
    parser.add_argument("--rounds", type=int, default=1, help="repeat each fleet size")
    args = parser.parse_args()
    baseline = load_baseline(args.baseline) if args.baseline else None
    for n in (int(x) for x in args.endpoints.split(",")):
        for _ in range(args.rounds):
            if baseline is not None:
                measure(baseline, n, args.entries, args.decisions)
            measure(CompiledPrefixIndex, n, args.entries, args.decisions)
            if args.pure:
                measure(PrefixIndex, n, args.entries, args.decisions)


if __name__ == "__main__":
    main()
