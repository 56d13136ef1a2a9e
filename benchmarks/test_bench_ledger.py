"""pytest-benchmark suite for `TenantLedger`: `on_decision` + `on_complete` per request.

Each round accounts a batch of `BATCH` requests (a decision, then its
completion with TTFT and end-to-end latencies), so a round's time divided by
`BATCH` is the cost per request. Two streams, on the default `top_k` (128):

- *zipf*: 1,000 tenants with Zipf(1.1) popularity. The head stays in the
  table; the tail churns through its last rows (the eviction path, for 26%
  of the requests);
- *distinct*: every request from a new tenant, so every decision evicts the
  minimum and merges it into ``other`` (the worst case).

`snapshot` of the full ledger is timed too: it is what an exporter pays.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from prefixroute.ledger import TenantLedger

BATCH = 1000
TENANTS = 1000
STREAM = 100_000


def _zipf_stream(seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, TENANTS + 1) ** 1.1
    ranks = rng.choice(TENANTS, size=STREAM, p=weights / weights.sum())
    return [f"tenant-{r}" for r in ranks]


def _latencies(seed: int = 1) -> list[float]:
    return [float(v) for v in np.random.default_rng(seed).lognormal(-2.0, 1.0, STREAM)]


def _account(ledger: TenantLedger, tenants: list[str], latencies: list[float]) -> None:
    decision, completion = ledger.on_decision, ledger.on_complete
    for tenant, ttft in zip(tenants, latencies, strict=True):
        decision(tenant, prompt_tokens=4096, predicted_cached_tokens=2048, now=0.0)
        completion(
            tenant,
            prompt_tokens=4096,
            cached_tokens=1024,
            predicted_cached_tokens=2048,
            ttft_s=ttft,
            e2e_s=ttft * 8,
            ok=True,
            now=0.0,
        )


def _bench_stream(
    benchmark: Any, ledger: TenantLedger, batches: Any, latencies: list[float]
) -> None:
    def setup() -> tuple[tuple[TenantLedger, list[str], list[float]], dict[str, Any]]:
        return (ledger, next(batches), latencies[:BATCH]), {}

    benchmark.pedantic(_account, setup=setup, rounds=200, warmup_rounds=5)
    ledger.check_invariants()


def test_ledger_zipf_1000_tenants(benchmark: Any) -> None:
    stream, latencies = _zipf_stream(), _latencies()
    ledger = TenantLedger()
    _account(ledger, stream[:10_000], latencies[:10_000])  # warm: the table is full
    chunks = [stream[i : i + BATCH] for i in range(0, STREAM, BATCH)]
    _bench_stream(benchmark, ledger, itertools.cycle(chunks), latencies)


def test_ledger_distinct_tenants(benchmark: Any) -> None:
    ledger = TenantLedger()
    names = (f"new-{i}" for i in itertools.count())
    _account(ledger, [next(names) for _ in range(BATCH)], _latencies()[:BATCH])
    batches = ([next(names) for _ in range(BATCH)] for _ in itertools.count())
    _bench_stream(benchmark, ledger, batches, _latencies())


@pytest.fixture(scope="module")
def full_ledger() -> TenantLedger:
    ledger = TenantLedger()
    _account(ledger, _zipf_stream(), _latencies())
    return ledger


def test_ledger_snapshot(benchmark: Any, full_ledger: TenantLedger) -> None:
    snap = benchmark(full_ledger.snapshot)
    assert len(snap.tenants) == full_ledger.top_k
