"""Built-in filters: which endpoints may serve a request at all.

Filters that guard against degraded metrics (stale, saturated) fail open:
when every candidate would be dropped they keep them all, because routing to
a busy endpoint beats rejecting a request the fleet could still serve (the
same choice GIE makes for its saturation detector).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import attrs

from prefixroute.endpoint import EndpointState, Role
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


@attrs.frozen
class HealthyFilter:
    """Keeps endpoints whose `healthy` flag is set. Type `healthy-filter`."""

    def filter(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[EndpointState]:
        return [e for e in candidates if e.healthy]


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


def _pool_rank(endpoint: str) -> int:
    """A stable pseudo-random rank of an endpoint id (rendezvous hashing)."""
    digest = hashlib.blake2b(endpoint.encode(), digest_size=8, person=b"tail-pool").digest()
    return int.from_bytes(digest, "big")


@attrs.frozen
class TailPoolFilter:
    """Reserves a share of the endpoints for the long tail of tenants. Type `tail-pool-filter`.

    Tenants outside the head (the most active tenants, who send all but
    `tail_traffic` of the requests, by the router's tenant ledger) are kept
    on `pool_fraction` of the candidates; head tenants on the rest. The
    reserved endpoints are those ranking highest by a fixed hash of their id,
    so the pool is stable while endpoints come and go (only the ones leaving
    or arriving move). Why: in a shared LRU a rarely returning tenant's
    prefix is evicted by the churn of everybody else's misses before it
    comes back; in a pool that only the tail uses it competes with the tail
    alone, and the head gets caches the tail no longer churns. Needs at least
    `min_endpoints` candidates (else it keeps all), and the router's ledger
    (`ctx.tenants`). O(candidates).
    """

    pool_fraction: float = attrs.field(
        default=0.25, validator=[attrs.validators.gt(0.0), attrs.validators.lt(1.0)]
    )
    tail_traffic: float = attrs.field(
        default=0.2, validator=[attrs.validators.gt(0.0), attrs.validators.lt(1.0)]
    )
    min_endpoints: int = attrs.field(default=4, validator=attrs.validators.ge(2))
    misses_only: bool = False

    def filter(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[EndpointState]:
        n = len(candidates)
        if n < self.min_endpoints or ctx.tenants is None:
            return list(candidates)
        if self.misses_only and ctx.best_match > 0:
            return list(candidates)
        k = min(n - 1, max(1, math.floor(self.pool_fraction * n + 0.5)))
        ranked = sorted(range(n), key=lambda i: _pool_rank(candidates[i].id), reverse=True)
        reserved = set(ranked[:k])
        tail = not ctx.tenants.is_head(ctx.request.tenant, self.tail_traffic)
        return [e for i, e in enumerate(candidates) if (i in reserved) == tail]
