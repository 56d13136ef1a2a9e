"""Built-in filters: which endpoints may serve a request at all.

Filters that guard against degraded metrics (stale, saturated) fail open:
when every candidate would be dropped they keep them all, because routing to
a busy endpoint beats rejecting a request the fleet could still serve (the
same choice GIE makes for its saturation detector).

Every built-in filter also has `filter_rows` (`plugins.RowFilter`): the same
verdict on rows of the router's `EndpointTable`. Verdicts that depend on the
endpoints alone (healthy, model, role, saturation) are masks computed once
per table; the others (stale metrics: `now`; hot spot: the router's
in-flight counts) are a few vectorised operations per request.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

import attrs
import numpy as np

from prefixroute.endpoint import EndpointState, EndpointTable, Role, Rows
from prefixroute.plugins import RouteContext

__all__ = [
    "HealthyFilter",
    "HotSpotFilter",
    "ModelFilter",
    "RoleFilter",
    "SaturationFilter",
    "StaleMetricsFilter",
    "TailPoolFilter",
]


def _table(ctx: RouteContext) -> EndpointTable:
    table = ctx.table
    if table is None:
        raise ValueError("filter_rows needs ctx.table (the router's EndpointTable)")
    return table


def _fresh(observed_at: float | None, oldest: float) -> bool:
    return observed_at is not None and observed_at >= oldest


def _mask(table: EndpointTable, keep: Iterable[bool]) -> np.ndarray:
    out: np.ndarray = np.fromiter(keep, dtype=np.bool_, count=len(table))
    return out


@attrs.frozen
class HealthyFilter:
    """Keeps endpoints whose `healthy` flag is set. Type `healthy-filter`."""

    def filter(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[EndpointState]:
        return [e for e in candidates if e.healthy]

    def filter_rows(self, ctx: RouteContext, rows: Rows) -> Rows:
        table = _table(ctx)
        return table.narrow(("healthy",), rows, lambda: table.healthy, False)


@attrs.frozen
class ModelFilter:
    """Keeps endpoints that serve the request's model. Type `model-filter`.

    With `require_adapter`, a request naming a LoRA adapter also needs an
    endpoint that has it loaded; by default adapters are assumed loadable on
    demand (vLLM's runtime LoRA loading) and only scored by affinity.
    """

    require_adapter: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    def filter(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[EndpointState]:
        model = ctx.request.model
        lora = ctx.request.lora if self.require_adapter else None
        return [e for e in candidates if e.serves(model) and (lora is None or lora in e.adapters)]

    def filter_rows(self, ctx: RouteContext, rows: Rows) -> Rows:
        table = _table(ctx)
        model = ctx.request.model
        lora = ctx.request.lora if self.require_adapter else None

        def mask() -> np.ndarray:
            return _mask(
                table,
                (e.serves(model) and (lora is None or lora in e.adapters) for e in table.endpoints),
            )

        return table.narrow(("model", model, lora), rows, mask, False)


def _roles(value: object) -> frozenset[Role]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple | set | frozenset) or not value:
        raise ValueError(f"roles must be a non-empty list of both/prefill/decode, got {value!r}")
    return frozenset(Role(v) for v in value)


@attrs.frozen
class RoleFilter:
    """Keeps endpoints whose role is in `roles`. Type `role-filter`.

    The default admits endpoints that can run a request's prefill:
    `both` and `prefill` (decode-only pods are reached through a P/D flow).
    """

    roles: frozenset[Role] = attrs.field(
        default=frozenset({Role.BOTH, Role.PREFILL}), converter=_roles
    )

    def filter(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[EndpointState]:
        roles = self.roles
        return [e for e in candidates if e.role in roles]

    def filter_rows(self, ctx: RouteContext, rows: Rows) -> Rows:
        table = _table(ctx)
        roles = self.roles
        mask = lambda: _mask(table, (e.role in roles for e in table.endpoints))  # noqa: E731
        return table.narrow(("role", roles), rows, mask, False)


@attrs.frozen
class StaleMetricsFilter:
    """Drops endpoints whose metrics are older than `max_age_s`. Type `stale-metrics-filter`.

    An endpoint never observed (`observed_at` None) counts as stale. Fails
    open: if every candidate is stale, all are kept (no driver scraping at
    all is a valid deployment; then load scorers see zeros).
    """

    max_age_s: float = attrs.field(default=5.0, validator=attrs.validators.gt(0.0))

    def filter(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[EndpointState]:
        oldest = ctx.now - self.max_age_s
        fresh = [e for e in candidates if e.observed_at is not None and e.observed_at >= oldest]
        return fresh or list(candidates)

    def filter_rows(self, ctx: RouteContext, rows: Rows) -> Rows:
        """O(1) when every endpoint of the table is fresh, or every one stale."""
        table = _table(ctx)
        oldest = ctx.now - self.max_age_s
        low, high = table.observed_min, table.observed_max
        if (low is not None and low >= oldest) or high is None or high < oldest:
            return rows  # all fresh, or all stale (fail open)
        if table.exact:
            out = rows[table.observed_at[rows] >= oldest]  # NaN (never observed) is stale
        else:  # an integer time beyond float64's exact range: compare as Python does
            eps = table.endpoints
            keep = [i for i in rows.tolist() if _fresh(eps[i].observed_at, oldest)]
            out = np.array(keep, dtype=np.intp)
        return rows if len(out) in (0, len(rows)) else out


@attrs.frozen
class SaturationFilter:
    """Drops endpoints over a queue or KV threshold. Type `saturation-filter`.

    An endpoint is saturated when `waiting > max_waiting` or
    `kv_usage > max_kv_usage`. Fails open when all are saturated; shedding is
    the admission policy's job, not a filter's.
    """

    max_waiting: int = attrs.field(default=128, validator=attrs.validators.ge(0))
    max_kv_usage: float = attrs.field(
        default=0.95, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)]
    )

    def filter(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[EndpointState]:
        q, kv = self.max_waiting, self.max_kv_usage
        ok = [e for e in candidates if e.waiting <= q and e.kv_usage <= kv]
        return ok or list(candidates)

    def filter_rows(self, ctx: RouteContext, rows: Rows) -> Rows:
        table = _table(ctx)
        q, kv = self.max_waiting, self.max_kv_usage
        mask = lambda: _mask(  # noqa: E731
            table, (e.waiting <= q and e.kv_usage <= kv for e in table.endpoints)
        )
        return table.narrow(("saturation", q, kv), rows, mask, True)


@attrs.frozen
class HotSpotFilter:
    """Drops endpoints far busier than their peers. Type `hot-spot-filter`.

    An endpoint is hot when the router's in-flight requests on it exceed
    `ratio` x the candidates' mean plus `slack`. Prefix affinity alone keeps
    a popular tenant on the one endpoint that holds its prefix however busy
    that endpoint gets; dropping hot endpoints makes the tenant spill to the
    next best one, which then warms up too, so hot prefixes end up
    replicated and cold ones stay unique (the same two-regime idea as
    SGLang's cache-aware balance thresholds, `sgl-router` `cache_aware.rs`,
    expressed as a filter in front of the scorers). Never drops every
    candidate. O(candidates), exact (the router's own counts, not scraped).
    """

    ratio: float = attrs.field(default=1.5, validator=attrs.validators.ge(1.0))
    slack: float = attrs.field(default=4.0, validator=attrs.validators.ge(0.0))

    def filter(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[EndpointState]:
        if len(candidates) < 2:
            return list(candidates)
        load = ctx.load.requests_view()
        counts = [load.get(e.id, 0) for e in candidates]
        limit = self.ratio * sum(counts) / len(counts) + self.slack
        ok = [e for e, n in zip(candidates, counts, strict=True) if n <= limit]
        return ok or list(candidates)

    def filter_rows(self, ctx: RouteContext, rows: Rows) -> Rows:
        n = len(rows)
        if n < 2:
            return rows
        table = _table(ctx)
        counts = table.requests_at(ctx.load, rows)
        if rows is table.all_rows and ctx.load is table.load_owner:
            limit = self.ratio * table.inflight_total / n + self.slack
            if counts.max() <= limit:
                return rows
        else:
            limit = self.ratio * int(counts.sum()) / n + self.slack
        ok = counts <= limit
        if ok.all():
            return rows
        out = rows[ok]
        return out if len(out) else rows


_REFRESH = 256  # requests between re-rankings of the tenants
_LN2 = math.log(2.0)


def _pool_rank(endpoint: str) -> int:
    """A fixed pseudo-random rank of an endpoint id (rendezvous hashing)."""
    digest = hashlib.blake2b(endpoint.encode(), digest_size=8, person=b"tail-pool").digest()
    return int.from_bytes(digest, "big")


class _RateState:
    """TailPoolFilter's mutable state: its `_state` field (`init=False`).

    `rates`: tenant -> [decayed request count, time of last update, 1.0 if tail].
    """

    __slots__ = ("ranks", "rates", "seen")

    def __init__(self) -> None:
        self.rates: dict[str, list[float]] = {}
        self.seen = 0
        self.ranks: dict[str, int] = {}  # endpoint id -> its pool rank (memoised hash)


@attrs.define
class TailPoolFilter:
    """Reserves a share of the endpoints for the long tail of tenants. Type `tail-pool-filter`.

    The filter counts every request per tenant, decayed with `half_life_s`,
    and calls *tail* the least active `tail_tenants` share of the tenants it
    has seen. Tail tenants are kept on the reserved `pool_fraction` of all
    the endpoints passed to the router (those ranking highest by a fixed
    hash of their id, so the pool stays put while endpoints come and go or
    earlier filters drop some); everyone else on the rest. When that leaves
    no candidate, all candidates are kept.

    Why: behind LRU engines a rarely returning tenant's prefix is evicted by
    the churn of busier tenants' misses before it comes back. In a pool
    where only the tail inserts, tail prefixes live longer; the busier
    tenants lose little, because the tail's misses no longer churn their
    caches. Measured on the `longtail` scenario (docs/tenants.md). The
    classification must be stable, or a tenant's prefix keeps moving
    between pools: every 256 requests the tenants are ranked by rate, and a
    tenant changes class only when its rank is more than `band` away from
    the `tail_tenants` cut; unknown tenants start in the tail (new and rare
    tenants look alike). During the first 256 requests nobody is sent to the
    pool (there is no ranking yet). Memory: at most `max_tenants`
    counters (the least active half is dropped when full: they are tail
    anyway). O(candidates) per request, plus O(T log T) every 256 requests
    for T tracked tenants. Keeps all candidates below `min_endpoints`.
    """

    pool_fraction: float = attrs.field(
        default=0.25, validator=[attrs.validators.gt(0.0), attrs.validators.lt(1.0)]
    )
    tail_tenants: float = attrs.field(
        default=0.5, validator=[attrs.validators.gt(0.0), attrs.validators.lt(1.0)]
    )
    half_life_s: float = attrs.field(default=600.0, validator=attrs.validators.gt(0.0))
    band: float = attrs.field(
        default=0.05, validator=[attrs.validators.ge(0.0), attrs.validators.lt(0.5)]
    )
    min_endpoints: int = attrs.field(default=4, validator=attrs.validators.ge(2))
    max_tenants: int = attrs.field(default=65_536, validator=attrs.validators.ge(16))
    # State, not a parameter: the tenants' decayed rates and the endpoints' pool ranks.
    _state: _RateState = attrs.field(init=False, factory=_RateState, eq=False, repr=False)

    def tracked_tenants(self) -> int:
        """Tenants whose rates are kept now (at most `max_tenants`)."""
        return len(self._state.rates)

    def is_tail(self, tenant: str) -> bool:
        """Whether `tenant` is currently in the tail (unknown tenants are)."""
        entry = self._state.rates.get(tenant)
        return entry is None or entry[2] > 0

    def filter(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[EndpointState]:
        tail = self._observe(ctx.request.tenant, ctx.now)
        fleet = ctx.endpoints or candidates  # the pool is drawn from every endpoint
        if len(fleet) < self.min_endpoints:
            return list(candidates)
        pool = self._pool(fleet)
        kept = [e for e in candidates if (e.id in pool) == tail]
        return kept or list(candidates)

    def filter_rows(self, ctx: RouteContext, rows: Rows) -> Rows:
        """As `filter`; the pool is memoised per table when drawn from all its endpoints."""
        table = _table(ctx)
        tail = self._observe(ctx.request.tenant, ctx.now)
        if ctx.endpoints and len(ctx.endpoints) == len(table):
            if len(table) < self.min_endpoints:
                return rows

            def mask() -> np.ndarray:
                pool = self._pool(ctx.endpoints)
                return _mask(table, (eid in pool for eid in table.ids))

            in_pool = table.memo(("tail-pool", self.pool_fraction), mask)
        else:
            fleet = ctx.endpoints or table.select(rows)
            if len(fleet) < self.min_endpoints:
                return rows
            pool = self._pool(fleet)
            in_pool = _mask(table, (eid in pool for eid in table.ids))
        out = rows[in_pool[rows] == tail]
        return rows if len(out) in (0, len(rows)) else out

    def _pool(self, fleet: Sequence[EndpointState]) -> set[str]:
        """The ids of the reserved pool among `fleet` (at least `min_endpoints` of them)."""
        n = len(fleet)
        k = min(n - 1, max(1, math.floor(self.pool_fraction * n + 0.5)))
        ranks = self._state.ranks
        if len(ranks) > 4 * n + 1024:
            ranks.clear()
        for e in fleet:
            if e.id not in ranks:
                ranks[e.id] = _pool_rank(e.id)
        return set(sorted((e.id for e in fleet), key=ranks.__getitem__, reverse=True)[:k])

    def _decayed(self, entry: list[float], now: float) -> float:
        return entry[0] * math.exp(-_LN2 * max(0.0, now - entry[1]) / self.half_life_s)

    def _observe(self, tenant: str, now: float) -> bool:
        """Count one request of `tenant` at `now`; whether it is a tail tenant."""
        rates = self._state.rates
        entry = rates.get(tenant)
        if entry is None:
            if len(rates) >= self.max_tenants:
                self._shrink(now)
            entry = rates[tenant] = [0.0, now, 1.0]
        entry[0] = self._decayed(entry, now) + 1.0
        entry[1] = now
        self._state.seen += 1
        if self._state.seen % _REFRESH == 0:
            self._reclassify(now)
        if self._state.seen < _REFRESH:
            return False  # not enough traffic seen to tell the tail apart
        return entry[2] > 0

    def _reclassify(self, now: float) -> None:
        """Rank the tenants by rate; the bottom `tail_tenants` share is the tail (with a band)."""
        ranked = sorted(self._state.rates.values(), key=lambda e: self._decayed(e, now))
        n = len(ranked)
        low, high = self.tail_tenants - self.band, self.tail_tenants + self.band
        for i, entry in enumerate(ranked):
            position = i / n
            if position < low:
                entry[2] = 1.0
            elif position >= high:
                entry[2] = 0.0

    def _shrink(self, now: float) -> None:
        """Drop the least active half of the counters (tail tenants: the default for unknowns)."""
        ranked = sorted(self._state.rates, key=lambda t: self._decayed(self._state.rates[t], now))
        for tenant in ranked[: len(ranked) // 2]:
            del self._state.rates[tenant]
