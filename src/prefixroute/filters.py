"""Built-in filters: which endpoints may serve a request at all.

Filters that guard against degraded metrics (stale, saturated) fail open:
when every candidate would be dropped they keep them all, because routing to
a busy endpoint beats rejecting a request the fleet could still serve (the
same choice GIE makes for its saturation detector).
"""

from __future__ import annotations

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
