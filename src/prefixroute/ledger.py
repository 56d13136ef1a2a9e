"""Per-tenant accounting: the `TenantLedger`, with bounded memory per tenant and overall.

An 80% aggregate prefix-cache hit rate can hide long-tail tenants that always
miss: the head's hits dominate the token-weighted mean. The ledger keeps, per
tenant, what the router predicted and what the engines reported (prompt and
cached tokens, completions, failures, rejections by kind, TTFT and end-to-end
latency), and summarises how evenly the cache serves tenants (`Fairness`).
It is pure: no I/O, no clock (`now` is an argument), no thread.

Memory is bounded whatever the number of tenants:

- **Space-Saving** (Metwally, Agrawal and El Abbadi, "Efficient Computation of
  Frequent and Top-k Elements in Data Streams", ICDT 2005) keeps a table of at
  most `top_k` tenants by request count. A tenant outside a full table evicts
  the one with the smallest count *c* and enters with count ``c + 1`` and
  error ``c``; the evicted row's statistics merge into the ``other``
  aggregate, and the newcomer's statistics are exact from its entry on. With
  *N* requests, every tenant with more than ``N / top_k`` requests is in the
  table, and a tracked tenant's true count lies in ``[count - error, count]``.
  The minimum is found with a min-heap of ``(count, seq, tenant)`` holding one
  entry per tracked tenant, updated lazily: counts only grow, so an entry can
  only understate its tenant's count; the top entry is re-pushed with the
  current count until it is current, and then it is the minimum. Each re-push
  is paid for by an earlier increment, so eviction is O(log k) amortised,
  and an increment is a plain ``+= 1`` (no heap work on the hot path).
  Pinned tenants are always in the table, outside the heap and `top_k`.
- **Logarithmic histograms** (`prefixroute.histogram.LogHistogram`)
  summarise latencies within 3.85% relative error in bounded memory (the
  DDSketch construction). Histograms merge by adding counts, which is how an
  evicted tenant folds into ``other``.
- **Jain's fairness index** (Jain, Chiu and Hawe, "A Quantitative Measure of
  Fairness and Discrimination for Resource Allocation in Shared Computer
  Systems", DEC-TR-301, 1984): ``(sum x)^2 / (n sum x^2)``, 1 when every
  tenant gets the same, ``1/n`` when one gets everything.

`in_flight(tenant)` is exact for every tenant, tracked or not (admission's
concurrency caps rely on it): a dict holds only tenants with requests in
flight, so its size is bounded by the requests actually in flight.

Ledgers merge (`TenantLedger.merge`): each replica of a gateway or picker
keeps its own, and one view of several is a merge. Sums and histograms add
up; the Space-Saving tables combine as in Parallel Space Saving (Cafaro,
Pulimeno and Tempesta, "A parallel space saving algorithm for frequent items
and the Hurwitz zeta distribution", Information Sciences 329, 2016,
arXiv:1401.0702; the same combine step as ClickHouse's
``SpaceSaving::merge``), which keeps the guarantees above for the union of
the two streams.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType

import attrs

from prefixroute.histogram import LatencySummary, LogHistogram
from prefixroute.latency import Objectives

__all__ = [
    "DEFAULT_TOP_K",
    "MAX_REJECTION_KINDS",
    "Fairness",
    "LedgerSnapshot",
    "TenantLedger",
    "TenantSnapshot",
    "jain_index",
]

DEFAULT_TOP_K = 128
"""Tenants tracked exactly (besides pinned ones) by default."""

MAX_REJECTION_KINDS = 16
"""Distinct rejection kinds kept per tenant; further kinds count as ``"other"``."""

OTHER = "other"
TOTAL = "total"
_NO_LATENCY = LatencySummary()

# -- snapshots ---------------------------------------------------------------------------


def _frozen_counts(value: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(sorted(value.items())))


def _ratio(num: int | float, den: int | float) -> float | None:
    return num / den if den else None


@attrs.frozen(slots=True)
class TenantSnapshot:
    """One tenant's figures (or the ``other`` and ``total`` aggregates'), at snapshot time.

    `requests` is the Space-Saving count: the tenant's true number of routed
    requests lies in ``[requests - count_error, requests]`` (`count_error`
    is 0 for a tenant tracked since its first request, for pinned tenants
    and for the aggregates). Every other figure is exact and covers the
    ``requests - count_error`` requests since the tenant entered the table;
    what came before went to ``other``. Token figures: `prompt_tokens` and
    `predicted_cached_tokens` at decision time; `completed_prompt_tokens`,
    `cached_tokens` (the engine's report) and `completed_predicted_cached_tokens`
    for requests that completed ok; `prediction_abs_error_tokens` sums
    ``|predicted - actual|`` over them. `hit_rate` is cached / completed
    prompt tokens, `predicted_hit_rate` predicted / decided prompt tokens
    (None when the denominator is 0). `in_flight` is exact. `rejections`
    maps a kind (``rate-limit``, ``concurrency``, ...) to a count.
    `slo_requests` counts the requests held to a latency objective that
    ended (completed, failed or rejected) and `slo_met` those that completed
    ok within every objective set; `attainment` is their ratio (goodput is
    `slo_met` per second, a rate of the counter).
    """

    tenant: str
    requests: int = 0
    count_error: int = 0
    prompt_tokens: int = 0
    predicted_cached_tokens: int = 0
    completed: int = 0
    failed: int = 0
    completed_prompt_tokens: int = 0
    cached_tokens: int = 0
    completed_predicted_cached_tokens: int = 0
    prediction_abs_error_tokens: int = 0
    in_flight: int = 0
    rejected: int = 0
    rejections: Mapping[str, int] = attrs.field(factory=dict, converter=_frozen_counts, hash=False)
    slo_requests: int = 0
    slo_met: int = 0
    ttft: LatencySummary = _NO_LATENCY
    e2e: LatencySummary = _NO_LATENCY

    @property
    def hit_rate(self) -> float | None:
        """Actual cached / completed prompt tokens; None when nothing completed."""
        return _ratio(self.cached_tokens, self.completed_prompt_tokens)

    @property
    def predicted_hit_rate(self) -> float | None:
        """Predicted cached / prompt tokens at decision; None when nothing was routed."""
        return _ratio(self.predicted_cached_tokens, self.prompt_tokens)

    @property
    def attainment(self) -> float | None:
        """Requests within their latency objectives / requests held to one; None when none."""
        return _ratio(self.slo_met, self.slo_requests)


@attrs.frozen(slots=True)
class Fairness:
    """How evenly the prefix cache serves tenants.

    `jain_hit_rate`: Jain's index of the tracked tenants' hit rates (tenants
    with no completed prompt tokens left out; 1.0 when all are 0; None with
    no tenant). `jain_ttft`: Jain's index of the tracked tenants' TTFT
    slowdowns (tenant mean TTFT / overall mean TTFT; None with no data).
    `tail_threshold` is the `tail_quantile` quantile (linear interpolation)
    of the request counts of tracked tenants with at least one request; the
    tail is those tenants below it (`tail_tenants` of them) plus ``other``,
    the head the rest; `head_hit_rate` and `tail_hit_rate` are token-weighted
    (None without completed prompt tokens). Over requests that completed ok,
    `prediction_bias` is (predicted - actual cached tokens) / prompt tokens
    (positive: the index over-promises) and `prediction_mae` the mean
    absolute error in the same unit.
    """

    jain_hit_rate: float | None = None
    jain_ttft: float | None = None
    head_hit_rate: float | None = None
    tail_hit_rate: float | None = None
    head_tenants: int = 0
    tail_tenants: int = 0
    tail_threshold: float | None = None
    prediction_bias: float | None = None
    prediction_mae: float | None = None


@attrs.frozen(slots=True)
class LedgerSnapshot:
    """The ledger at one moment: tracked tenants (by requests, descending), aggregates, fairness.

    The tenants' figures plus `other`'s add up to `total`'s (for `requests`,
    count ``requests - count_error`` per tenant). `evictions` counts
    Space-Saving replacements since the ledger was built (a merged ledger:
    both ledgers' plus the rows the merge folded into ``other``).
    """

    tenants: tuple[TenantSnapshot, ...]
    other: TenantSnapshot
    total: TenantSnapshot
    fairness: Fairness
    evictions: int = 0


def jain_index(values: Iterable[float]) -> float | None:
    """Jain's fairness index ``(sum x)^2 / (n sum x^2)``: None if empty, 1.0 if all are 0."""
    xs = list(values)
    if not xs:
        return None
    squares = sum(x * x for x in xs)
    if squares == 0:
        return 1.0
    return sum(xs) ** 2 / (len(xs) * squares)


def _linear_quantile(sorted_values: list[int], q: float) -> float:
    """numpy's default (linear interpolation) quantile of a non-empty sorted list."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


# -- the ledger --------------------------------------------------------------------------


class _Account:
    """One row's running figures (a tenant's since entry, or an aggregate's). Mutable, hot."""

    __slots__ = (
        "abs_error",
        "cached",
        "completed",
        "completed_predicted",
        "completed_prompt",
        "count",
        "e2e",
        "error",
        "failed",
        "predicted",
        "prompt",
        "rejected",
        "rejections",
        "requests",
        "slo_met",
        "slo_requests",
        "ttft",
    )

    def __init__(self) -> None:
        self.count = 0  # Space-Saving count: error + requests
        self.error = 0
        self.requests = 0
        self.prompt = 0
        self.predicted = 0
        self.completed = 0
        self.failed = 0
        self.completed_prompt = 0
        self.cached = 0
        self.completed_predicted = 0
        self.abs_error = 0
        self.rejected = 0
        self.rejections: dict[str, int] = {}
        self.slo_requests = 0
        self.slo_met = 0
        self.ttft = LogHistogram()
        self.e2e = LogHistogram()

    def merge(self, other: _Account) -> None:
        """Add `other`'s figures to this aggregate row (its requests count exactly)."""
        self.count += other.requests
        self.requests += other.requests
        self.prompt += other.prompt
        self.predicted += other.predicted
        self.completed += other.completed
        self.failed += other.failed
        self.completed_prompt += other.completed_prompt
        self.cached += other.cached
        self.completed_predicted += other.completed_predicted
        self.abs_error += other.abs_error
        self.rejected += other.rejected
        self.slo_requests += other.slo_requests
        self.slo_met += other.slo_met
        for kind, n in other.rejections.items():
            _count_rejection(self.rejections, kind, n)
        self.ttft.merge(other.ttft)
        self.e2e.merge(other.e2e)

    def reset(self, count: int, error: int) -> None:
        """Start afresh as a newcomer with Space-Saving `count` and `error`."""
        self.count = count
        self.error = error
        self.requests = self.prompt = self.predicted = 0
        self.completed = self.failed = self.completed_prompt = self.cached = 0
        self.completed_predicted = self.abs_error = self.rejected = 0
        self.slo_requests = self.slo_met = 0
        self.rejections.clear()
        self.ttft.clear()
        self.e2e.clear()

    def snapshot(self, tenant: str, in_flight: int) -> TenantSnapshot:
        return TenantSnapshot(
            tenant=tenant,
            requests=self.count,
            count_error=self.error,
            prompt_tokens=self.prompt,
            predicted_cached_tokens=self.predicted,
            completed=self.completed,
            failed=self.failed,
            completed_prompt_tokens=self.completed_prompt,
            cached_tokens=self.cached,
            completed_predicted_cached_tokens=self.completed_predicted,
            prediction_abs_error_tokens=self.abs_error,
            in_flight=in_flight,
            rejected=self.rejected,
            rejections=self.rejections,
            slo_requests=self.slo_requests,
            slo_met=self.slo_met,
            ttft=self.ttft.summary(),
            e2e=self.e2e.summary(),
        )


def _seconds(value: float | None) -> float | None:
    """A measured duration, or None when unknown (None, negative or not finite)."""
    return value if value is not None and math.isfinite(value) and value >= 0 else None


def _count_rejection(kinds: dict[str, int], kind: str, n: int) -> None:
    if kind not in kinds and len(kinds) - (OTHER in kinds) >= MAX_REJECTION_KINDS:
        kind = OTHER
    kinds[kind] = kinds.get(kind, 0) + n


def _combined(parts: Iterable[_Account]) -> _Account:
    """A new row holding the sum of `parts`, which stay unchanged. O(parts x occupied buckets).

    Its count is its requests and its error 0 (an aggregate's; the caller
    sets a tracked tenant's). Unlike `_Account.merge`, the result does not
    depend on the order of `parts`: rejection kinds are summed first, and
    when more than `MAX_REJECTION_KINDS` named kinds result, the least
    frequent (ties: the later name) fold into ``"other"``.
    """
    row = _Account()
    kinds: dict[str, int] = {}
    for part in parts:
        row.requests += part.requests
        row.prompt += part.prompt
        row.predicted += part.predicted
        row.completed += part.completed
        row.failed += part.failed
        row.completed_prompt += part.completed_prompt
        row.cached += part.cached
        row.completed_predicted += part.completed_predicted
        row.abs_error += part.abs_error
        row.rejected += part.rejected
        row.slo_requests += part.slo_requests
        row.slo_met += part.slo_met
        for kind, n in part.rejections.items():
            kinds[kind] = kinds.get(kind, 0) + n
        row.ttft.merge(part.ttft)
        row.e2e.merge(part.e2e)
    row.count = row.requests
    named = sorted((k for k in kinds if k != OTHER), key=lambda k: (-kinds[k], k))
    for kind in named[MAX_REJECTION_KINDS:]:
        kinds[OTHER] = kinds.get(OTHER, 0) + kinds.pop(kind)
    row.rejections = kinds
    return row


class TenantLedger:
    """Per-tenant accounting for a router, in memory bounded by `top_k` (see the module doc).

    - `on_decision` / `on_complete` / `on_rejection`: O(1), plus O(log k)
      amortised when a newcomer evicts a tenant from a full table (and
      O(occupied buckets) to merge the evicted row into ``other``).
    - `in_flight(tenant)`: exact for every tenant, O(1).
    - `snapshot()`: O(k log k + k * buckets).

    `pinned` tenants are always tracked and never evicted, outside `top_k`.
    Events for a tenant outside the table count in ``other``: a completion
    or a rejection never brings a tenant in, only a routed request does.
    `tail_quantile` sets where the tail ends (see `Fairness`).
    """

    __slots__ = (
        "_evictions",
        "_heap",
        "_in_flight",
        "_in_flight_total",
        "_other",
        "_pinned",
        "_seq",
        "_stream",
        "_table",
        "_tail_quantile",
        "_top_k",
        "_total",
    )

    def __init__(
        self,
        *,
        top_k: int = DEFAULT_TOP_K,
        pinned: Iterable[str] = (),
        tail_quantile: float = 0.5,
    ) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
        if not 0.0 <= tail_quantile <= 1.0:
            raise ValueError(f"tail_quantile must be within [0, 1], got {tail_quantile!r}")
        pinned_list = list(pinned)
        for tenant in pinned_list:
            if not isinstance(tenant, str) or not tenant:
                raise ValueError(f"pinned tenants must be non-empty strings, got {tenant!r}")
        pinned_set = frozenset(pinned_list)
        for tenant in pinned_set:
            if not isinstance(tenant, str) or not tenant:
                raise ValueError(f"pinned tenants must be non-empty strings, got {tenant!r}")
        self._top_k = top_k
        self._tail_quantile = float(tail_quantile)
        self._pinned = pinned_set
        self._table: dict[str, _Account] = {t: _Account() for t in sorted(pinned_set)}
        # (count when pushed, tie-break, tenant): one entry per unpinned tracked tenant.
        self._heap: list[tuple[int, int, str]] = []
        self._seq = 0
        # Sum of the unpinned Space-Saving counts: the stream length (unpinned tenants'
        # requests), or at most it after a merge (the rows a merge drops take theirs away).
        self._stream = 0
        self._evictions = 0
        self._other = _Account()
        self._total = _Account()  # its histograms are scratch, rebuilt by `snapshot`
        self._in_flight: dict[str, int] = {}
        self._in_flight_total = 0

    @property
    def top_k(self) -> int:
        """Unpinned tenants tracked at most."""
        return self._top_k

    @property
    def pinned(self) -> frozenset[str]:
        """Tenants always tracked."""
        return self._pinned

    def __contains__(self, tenant: object) -> bool:
        """Whether `tenant` is in the table (tracked exactly since its entry)."""
        return tenant in self._table

    def __len__(self) -> int:
        """Tenants in the table (pinned included)."""
        return len(self._table)

    def on_decision(
        self, tenant: str, *, prompt_tokens: int, predicted_cached_tokens: int, now: float
    ) -> None:
        """A request of `tenant` was routed: it counts, and is in flight until `on_complete`."""
        if prompt_tokens < 0 or predicted_cached_tokens < 0:
            raise ValueError(
                "prompt_tokens and predicted_cached_tokens must be >= 0, got "
                f"{prompt_tokens!r} and {predicted_cached_tokens!r}"
            )
        row = self._table.get(tenant)
        if row is None:
            row = self._enter(tenant)
        elif tenant not in self._pinned:
            self._stream += 1
        row.count += 1
        row.requests += 1
        row.prompt += prompt_tokens
        row.predicted += predicted_cached_tokens
        total = self._total
        total.count += 1
        total.requests += 1
        total.prompt += prompt_tokens
        total.predicted += predicted_cached_tokens
        flights = self._in_flight
        flights[tenant] = flights.get(tenant, 0) + 1
        self._in_flight_total += 1

    def _enter(self, tenant: str) -> _Account:
        """Give `tenant` a row (count and error set for the caller's increment)."""
        self._stream += 1
        table, heap = self._table, self._heap
        self._seq += 1
        if len(heap) < self._top_k:
            row = _Account()
            table[tenant] = row
            heapq.heappush(heap, (1, self._seq, tenant))
            return row
        while True:  # lazy heap: refresh stale tops until the top is current
            pushed, _, victim = heap[0]
            current = table[victim].count
            if pushed == current:
                break
            self._seq += 1
            heapq.heapreplace(heap, (current, self._seq, victim))
        row = table.pop(victim)
        self._other.merge(row)
        self._evictions += 1
        row.reset(count=current, error=current)
        table[tenant] = row
        self._seq += 1
        heapq.heapreplace(heap, (current + 1, self._seq, tenant))
        return row

    def on_rejection(self, tenant: str, *, kind: str, now: float, slo: bool = False) -> None:
        """A request of `tenant` was rejected (`kind`: a short stable label such as ``rate-limit``).

        At most `MAX_REJECTION_KINDS` kinds are kept per row; later kinds count as ``other``.
        `slo`: the request was held to a latency objective, which it missed.
        """
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"kind must be a non-empty string, got {kind!r}")
        row = self._table.get(tenant, self._other)
        if slo:
            row.slo_requests += 1
            self._total.slo_requests += 1
        row.rejected += 1
        _count_rejection(row.rejections, kind, 1)
        total = self._total
        total.rejected += 1
        _count_rejection(total.rejections, kind, 1)

    def on_complete(
        self,
        tenant: str,
        *,
        prompt_tokens: int,
        cached_tokens: int,
        predicted_cached_tokens: int,
        ttft_s: float | None,
        e2e_s: float | None,
        ok: bool,
        now: float,
        objectives: Objectives | None = None,
        tpot_s: float | None = None,
    ) -> None:
        """A routed request of `tenant` ended (`ok` False: it failed).

        Its in-flight count drops (never below 0). An ok request adds its
        prompt, actual and predicted cached tokens, and its TTFT and
        end-to-end latency (seconds; None, negative or non-finite: unknown,
        left out of the summaries); a failed one only counts as failed.
        With `objectives` set, the request counts toward `slo_requests`, and
        toward `slo_met` when it completed ok with `ttft_s` and `tpot_s`
        within them (`Objectives.met`); an answer that was not streamed (no
        `ttft_s`) reached its client whole, and is judged on `e2e_s`.
        """
        if prompt_tokens < 0 or cached_tokens < 0 or predicted_cached_tokens < 0:
            raise ValueError(
                "token counts must be >= 0, got prompt_tokens="
                f"{prompt_tokens!r}, cached_tokens={cached_tokens!r}, "
                f"predicted_cached_tokens={predicted_cached_tokens!r}"
            )
        flights = self._in_flight
        left = flights.get(tenant, 0) - 1
        if left > 0:
            flights[tenant] = left
            self._in_flight_total -= 1
        elif left == 0:
            del flights[tenant]
            self._in_flight_total -= 1
        row = self._table.get(tenant, self._other)
        total = self._total
        if objectives is not None and objectives.any:
            row.slo_requests += 1
            total.slo_requests += 1
            first = _seconds(ttft_s if ttft_s is not None else e2e_s)  # not streamed: all at once
            if ok and objectives.met(first, _seconds(tpot_s)):
                row.slo_met += 1
                total.slo_met += 1
        if not ok:
            row.failed += 1
            total.failed += 1
            return
        abs_error = abs(predicted_cached_tokens - cached_tokens)
        row.completed += 1
        row.completed_prompt += prompt_tokens
        row.cached += cached_tokens
        row.completed_predicted += predicted_cached_tokens
        row.abs_error += abs_error
        total.completed += 1
        total.completed_prompt += prompt_tokens
        total.cached += cached_tokens
        total.completed_predicted += predicted_cached_tokens
        total.abs_error += abs_error
        # The total's latency histograms are merged at snapshot time, off the hot path.
        row.ttft.offer(ttft_s)
        row.e2e.offer(e2e_s)

    def in_flight(self, tenant: str) -> int:
        """Requests of `tenant` routed and not yet completed: exact for every tenant. O(1)."""
        return self._in_flight.get(tenant, 0)

    def total_in_flight(self) -> int:
        """Requests routed and not yet completed, over all tenants. O(1)."""
        return self._in_flight_total

    def in_flight_by_tenant(self) -> dict[str, int]:
        """Every tenant with requests in flight, and how many (a copy). O(such tenants).

        What a replica shares so that concurrency caps hold across replicas.
        """
        return dict(self._in_flight)

    def snapshot(self) -> LedgerSnapshot:
        """Every figure as frozen values, with fairness. O(k log k + k * buckets)."""
        flights = self._in_flight
        tenants = sorted(
            (row.snapshot(t, flights.get(t, 0)) for t, row in self._table.items()),
            key=lambda s: (-s.requests, s.tenant),
        )
        tracked_in_flight = sum(s.in_flight for s in tenants)
        other = self._other.snapshot(OTHER, self._in_flight_total - tracked_in_flight)
        total_row = self._total
        total_row.ttft.clear()
        total_row.e2e.clear()
        for row in (*self._table.values(), self._other):
            total_row.ttft.merge(row.ttft)
            total_row.e2e.merge(row.e2e)
        total = total_row.snapshot(TOTAL, self._in_flight_total)
        return LedgerSnapshot(
            tenants=tuple(tenants),
            other=other,
            total=total,
            fairness=self._fairness(tenants, other, total),
            evictions=self._evictions,
        )

    def _fairness(
        self, tenants: list[TenantSnapshot], other: TenantSnapshot, total: TenantSnapshot
    ) -> Fairness:
        rates = [s.hit_rate for s in tenants if s.hit_rate is not None]
        overall_ttft = total.ttft.mean
        jain_ttft = None
        if overall_ttft is not None:
            means = [s.ttft.mean for s in tenants if s.ttft.mean is not None]
            if overall_ttft == 0.0:
                jain_ttft = 1.0 if means else None
            else:
                jain_ttft = jain_index(m / overall_ttft for m in means)
        active = sorted(s.requests for s in tenants if s.requests > 0)
        threshold = _linear_quantile(active, self._tail_quantile) if active else None
        head: list[TenantSnapshot] = []
        tail: list[TenantSnapshot] = []
        if threshold is not None:
            for s in tenants:
                if s.requests > 0:
                    (tail if s.requests < threshold else head).append(s)
        tail_prompt = other.completed_prompt_tokens + sum(s.completed_prompt_tokens for s in tail)
        tail_cached = other.cached_tokens + sum(s.cached_tokens for s in tail)
        head_prompt = sum(s.completed_prompt_tokens for s in head)
        head_cached = sum(s.cached_tokens for s in head)
        den = total.completed_prompt_tokens
        return Fairness(
            jain_hit_rate=jain_index(rates),
            jain_ttft=jain_ttft,
            head_hit_rate=_ratio(head_cached, head_prompt),
            tail_hit_rate=_ratio(tail_cached, tail_prompt),
            head_tenants=len(head),
            tail_tenants=len(tail),
            tail_threshold=threshold,
            prediction_bias=_ratio(
                total.completed_predicted_cached_tokens - total.cached_tokens, den
            ),
            prediction_mae=_ratio(total.prediction_abs_error_tokens, den),
        )

    def merge(self, other: TenantLedger) -> TenantLedger:
        """A new ledger as if one ledger had seen both `self`'s and `other`'s events.

        Why: every gateway or picker replica keeps its own ledger (issue 15).
        Prometheus sums the counters it scrapes, but the top-k table, the
        latency quantiles and the fairness figures need one view of all
        replicas: an operator's, a test's, the simulator's. Neither ledger
        changes. How:

        - Pinned rows, ``other``, the totals, in-flight counts, rejections
          and latency histograms add up exactly (histograms bucket by
          bucket, so quantiles keep their 3.85% bound).
        - The unpinned tables combine as in Parallel Space Saving (module
          docstring). A ledger's *floor* is its smallest unpinned count when
          its table is full, else 0: the most requests an untracked tenant
          can have had there. A tenant tracked by both ledgers sums counts
          and errors; one tracked by one ledger only also gets the other's
          floor added to its count and its error. The `top_k` largest counts
          stay (ties: the smaller error, then the name); the other rows fold
          into ``other`` as evicted rows do, and count as evictions. For the
          union of the two streams, a tracked tenant's true count still lies
          in ``[requests - count_error, requests]``, and every tenant with
          more than ``N / top_k`` requests is tracked (the top_k kept counts
          sum to at most the two ledgers' stream lengths).
        - A row with more than `MAX_REJECTION_KINDS` named rejection kinds
          folds the least frequent into ``"other"``.

        The merge is commutative. It is associative, with an empty ledger as
        its identity, while no merge drops a row or folds a rejection kind
        (beyond that it loses precision as Space-Saving does; totals and
        in-flight counts stay exact). Fed the union of the events of two
        ledgers (a completion or rejection after its tenant's first request
        in its own ledger), one ledger that evicted nobody equals their merge.

        Cost: O((k + p) log k + occupied histogram buckets + tenants in
        flight) for k = `top_k` and p pinned tenants. Raises ValueError when
        the ledgers' `top_k`, `pinned` or `tail_quantile` differ (no single
        bounded-memory rule would describe the result), TypeError when
        `other` is not a `TenantLedger`.
        """
        if not isinstance(other, TenantLedger):
            raise TypeError(f"can only merge a TenantLedger, got {type(other).__name__}")
        for name, mine, theirs in (
            ("top_k", self._top_k, other._top_k),
            ("pinned", sorted(self._pinned), sorted(other._pinned)),
            ("tail_quantile", self._tail_quantile, other._tail_quantile),
        ):
            if mine != theirs:
                raise ValueError(
                    f"cannot merge ledgers with different {name}: {mine!r} and {theirs!r}"
                )
        out = TenantLedger(
            top_k=self._top_k, pinned=self._pinned, tail_quantile=self._tail_quantile
        )
        mine_rows, their_rows, pinned = self._table, other._table, self._pinned
        for tenant in out._table:
            out._table[tenant] = _combined((mine_rows[tenant], their_rows[tenant]))
        floor_a, floor_b = self._floor(), other._floor()
        rows: list[tuple[str, _Account]] = []
        for tenant in sorted((mine_rows.keys() | their_rows.keys()) - pinned):
            a, b = mine_rows.get(tenant), their_rows.get(tenant)
            row = _combined(r for r in (a, b) if r is not None)
            row.count = (floor_a if a is None else a.count) + (floor_b if b is None else b.count)
            row.error = (floor_a if a is None else a.error) + (floor_b if b is None else b.error)
            rows.append((tenant, row))
        rows.sort(key=lambda tr: (-tr[1].count, tr[1].error, tr[0]))
        kept, dropped = rows[: self._top_k], rows[self._top_k :]
        # Heap entries pushed in (count, name) order: a sorted list is a heap.
        for tenant, row in sorted(kept, key=lambda tr: (tr[1].count, tr[0])):
            out._table[tenant] = row
            out._seq += 1
            out._heap.append((row.count, out._seq, tenant))
        out._stream = sum(row.count for _, row in kept)
        out._other = _combined((self._other, other._other, *(row for _, row in dropped)))
        out._total = _combined((self._total, other._total))
        out._total.ttft.clear()  # scratch, rebuilt by `snapshot`
        out._total.e2e.clear()
        out._evictions = self._evictions + other._evictions + len(dropped)
        flights = dict(self._in_flight)
        for tenant, n in other._in_flight.items():
            flights[tenant] = flights.get(tenant, 0) + n
        out._in_flight = flights
        out._in_flight_total = self._in_flight_total + other._in_flight_total
        return out

    def _floor(self) -> int:
        """The smallest unpinned count if the table is full, else 0. O(k)."""
        if len(self._heap) < self._top_k:
            return 0
        table = self._table
        return min(table[t].count for _, _, t in self._heap)

    def check_invariants(self) -> None:
        """Raise AssertionError if the table, heap, in-flight counts or sums are inconsistent."""
        table, heap = self._table, self._heap
        unpinned = {t for t in table if t not in self._pinned}
        if not self._pinned <= table.keys():
            raise AssertionError("a pinned tenant left the table")
        if len(unpinned) > self._top_k:
            raise AssertionError(f"{len(unpinned)} unpinned tenants tracked, top_k {self._top_k}")
        if sorted(t for _, _, t in heap) != sorted(unpinned):
            raise AssertionError("the heap does not hold exactly the unpinned tenants")
        for pushed, _, t in heap:
            if pushed > table[t].count:
                raise AssertionError(f"heap entry for {t!r} above its count")
        if sum(table[t].count for t in unpinned) != self._stream:
            raise AssertionError("unpinned Space-Saving counts do not sum to the stream length")
        full = unpinned and len(unpinned) == self._top_k
        if full and min(table[t].count for t in unpinned) * self._top_k > self._stream:
            raise AssertionError("the minimum count exceeds stream length / top_k")
        for t, row in table.items():
            if row.count != row.error + row.requests or row.error < 0:
                raise AssertionError(f"{t!r}: count {row.count} != error + requests")
            if t in self._pinned and row.error:
                raise AssertionError(f"pinned {t!r} has a count error")
        if any(n <= 0 for n in self._in_flight.values()):
            raise AssertionError("a non-positive in-flight count is stored")
        if sum(self._in_flight.values()) != self._in_flight_total:
            raise AssertionError("in-flight counts do not sum to the total")
        rows = [*table.values(), self._other, self._total]
        for row in rows:
            row.ttft.check_invariants()
            row.e2e.check_invariants()
            named = len(row.rejections) - (OTHER in row.rejections)
            if named > MAX_REJECTION_KINDS or sum(row.rejections.values()) != row.rejected:
                raise AssertionError(f"bad rejection counts: {row.rejections}")
        parts = [*table.values(), self._other]
        for row in (*parts, self._total):
            if not 0 <= row.slo_met <= row.slo_requests:
                raise AssertionError(f"slo_met {row.slo_met} outside [0, {row.slo_requests}]")
        for name in _SUMMED:
            got = sum(getattr(row, name) for row in parts)
            if got != getattr(self._total, name):
                raise AssertionError(
                    f"{name}: rows sum to {got}, total {getattr(self._total, name)}"
                )


_SUMMED = (
    "requests",
    "prompt",
    "predicted",
    "completed",
    "failed",
    "completed_prompt",
    "cached",
    "completed_predicted",
    "abs_error",
    "rejected",
    "slo_requests",
    "slo_met",
)
