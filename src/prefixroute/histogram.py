"""`LogHistogram`: latency samples in fixed logarithmic buckets, in bounded memory.

Buckets grow by 1.08 from 100 us to about 1,045 s, each reported by
``2 lo hi / (lo + hi)``, the value whose relative error is the same at both
bucket edges, so a quantile's relative error is at most
``(1.08 - 1) / (1.08 + 1)``, 3.85% (the construction of DDSketch: Masson,
Rim and Lee, "DDSketch: A Fast and Fully-Mergeable Quantile Sketch with
Relative-Error Guarantees", VLDB 2019). Histograms merge by adding counts,
which is how the tenant ledger (`prefixroute.ledger`) folds an evicted
tenant into ``other`` (and how replicas would combine). Counts live in a
sparse ``dict[bucket, count]``, not a dense array: most tenants that pass
through the ledger's table have a handful of samples, so creating, merging
and clearing one costs O(occupied buckets) instead of O(212).
`summary()` gives the frozen `LatencySummary` the ledger's snapshots carry.
It is pure: no I/O, no clock, no thread.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import attrs

__all__ = ["LatencySummary", "LogHistogram"]

_GROWTH = 1.08
_MIN_VALUE = 1e-4
_BUCKETS = math.ceil(math.log(1e7) / math.log(_GROWTH))  # 210 buckets up to ~1,045 s
_MAX_VALUE = _MIN_VALUE * _GROWTH**_BUCKETS
_INV_MIN = 1.0 / _MIN_VALUE
_INV_LOG_GROWTH = 1.0 / math.log(_GROWTH)
_OVERFLOW = _BUCKETS + 1
_INF = math.inf
_log = math.log


def _representative(bucket: int) -> float:
    """The value reported for `bucket`: equal relative error at both of its edges."""
    if bucket <= 0:
        return _MIN_VALUE
    if bucket >= _OVERFLOW:
        return _INF
    lo = _MIN_VALUE * _GROWTH ** (bucket - 1)
    return 2.0 * lo * _GROWTH / (1.0 + _GROWTH)


def _bucket(value: float) -> int:
    """The bucket of a finite `value` >= 0 (0: below 100 us; `_OVERFLOW`: above the top)."""
    if value < _MIN_VALUE:
        return 0
    if value >= _MAX_VALUE:
        return _OVERFLOW
    # Rounding may put a value just under the top into the overflow bucket, which
    # reports the exact maximum: no harm done.
    return int(_log(value * _INV_MIN) * _INV_LOG_GROWTH) + 1


@attrs.frozen(slots=True)
class LatencySummary:
    """Count, mean and p50/p95/p99 of a latency, in seconds (None when `count` is 0)."""

    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None


class LogHistogram:
    """Latency samples (seconds) in fixed logarithmic buckets, in bounded memory.

    Buckets grow by `GROWTH` (1.08) from `MIN_VALUE` (100 us) to `MAX_VALUE`
    (about 1,045 s), plus one below and one above. `quantile(q)` is the
    sample of rank ``ceil(q * count)`` (numpy's ``inverted_cdf``), reported
    by its bucket's representative clamped to the exact minimum and maximum
    (the first and last ranks are those, exactly). Its relative error is at
    most `RELATIVE_ERROR`, ``(GROWTH - 1) / (GROWTH + 1)`` = 3.85%, within
    the buckets; below 100 us the absolute error is under 100 us, and a rank
    above the top bucket reports the largest sample. `count`, `mean`, `min`
    and `max` are exact. `add` is O(1); `merge` O(occupied buckets);
    `quantiles` O(b log b) for b occupied buckets (at most 212).
    """

    GROWTH = _GROWTH
    MIN_VALUE = _MIN_VALUE
    MAX_VALUE = _MAX_VALUE
    RELATIVE_ERROR = (_GROWTH - 1.0) / (_GROWTH + 1.0)

    __slots__ = ("counts", "max", "min", "n", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0
        self.total = 0.0
        self.min = _INF
        self.max = -_INF

    @property
    def count(self) -> int:
        """How many samples were added."""
        return self.n

    def add(self, value: float) -> None:
        """Add one sample; ValueError unless it is a finite number >= 0."""
        if not 0.0 <= value < _INF:
            raise ValueError(f"a latency must be finite and >= 0, got {value!r}")
        self._add(_bucket(value), value)

    def offer(self, value: float | None) -> bool:
        """Add `value` if it is a finite number >= 0, else ignore it; True when added.

        For samples reported from outside (an engine's TTFT may be missing or
        nonsense): the ledger records what it can rather than failing. O(1).
        """
        if value is None or not 0.0 <= value < _INF:
            return False
        self._add(_bucket(value), value)
        return True

    def _add(self, bucket: int, value: float) -> None:
        counts = self.counts
        counts[bucket] = counts.get(bucket, 0) + 1
        self.n += 1
        self.total += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value

    def merge(self, other: LogHistogram) -> None:
        """Add `other`'s samples to this histogram (exactly as if added one by one)."""
        if not other.n:
            return
        counts = self.counts
        for bucket, n in other.counts.items():
            counts[bucket] = counts.get(bucket, 0) + n
        self.n += other.n
        self.total += other.total
        if other.min < self.min:
            self.min = other.min
        if other.max > self.max:
            self.max = other.max

    def clear(self) -> None:
        """Forget every sample."""
        self.counts.clear()
        self.n = 0
        self.total = 0.0
        self.min = _INF
        self.max = -_INF

    def mean(self) -> float | None:
        """The exact mean of the samples, None when empty."""
        return self.total / self.n if self.n else None

    def quantile(self, q: float) -> float | None:
        """The `q`-quantile (0 <= q <= 1) within `RELATIVE_ERROR`, None when empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be within [0, 1], got {q!r}")
        return self.quantiles((q,))[0] if self.n else None

    def quantiles(self, qs: Iterable[float]) -> list[float]:
        """Several quantiles of a non-empty histogram in one pass over the sorted buckets."""
        n = self.n
        ranks = [max(1, math.ceil(q * n)) for q in qs]
        out = [0.0] * len(ranks)
        pending = sorted(range(len(ranks)), key=ranks.__getitem__)
        seen, i = 0, 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            while i < len(pending) and ranks[pending[i]] <= seen:
                rank = ranks[pending[i]]
                if rank == 1:
                    value = self.min
                elif rank == n:
                    value = self.max
                else:
                    value = min(max(_representative(bucket), self.min), self.max)
                out[pending[i]] = value
                i += 1
            if i == len(pending):
                break
        if i < len(pending):
            raise AssertionError("bucket counts do not add up to the sample count")
        return out

    def summary(self) -> LatencySummary:
        """Count, mean, p50, p95 and p99 as a frozen value."""
        if not self.n:
            return LatencySummary()
        p50, p95, p99 = self.quantiles((0.5, 0.95, 0.99))
        return LatencySummary(count=self.n, mean=self.mean(), p50=p50, p95=p95, p99=p99)

    def check_invariants(self) -> None:
        """Raise AssertionError if the counts are inconsistent."""
        if any(n <= 0 or not 0 <= b <= _OVERFLOW for b, n in self.counts.items()):
            raise AssertionError(f"bad bucket counts: {self.counts}")
        if sum(self.counts.values()) != self.n:
            raise AssertionError("bucket counts do not add up to the sample count")
        if self.n and not (0.0 <= self.min <= self.max and self.total >= 0.0):
            raise AssertionError(f"bad extremes: min {self.min}, max {self.max}")
        if not self.n and (self.counts or self.total):
            raise AssertionError("an empty histogram holds samples")
