"""What every driver runs around the core `Router`: endpoints, metrics, identity, deferrals.

The gateway (`prefixroute serve`) and the ext_proc server (`prefixroute
extproc`) differ in their wire protocol only. Both read the same config
(`GatewayConfig`), and both build from it, on one event loop and one
monotonic clock: the `Router`, the `EndpointPool` that scrapes and health
checks the engines (telling the router when an endpoint leaves), the
`GatewayMetrics` exporter, the tenant `IdentityConfig`, and the `Deferrals`
where deferred requests wait. `RoutingService` is that shared part; each
driver subclasses it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from prefixroute.adapters.deferral import Deferrals
from prefixroute.adapters.metrics import GatewayMetrics
from prefixroute.adapters.pool import EndpointPool
from prefixroute.endpoint import EndpointId
from prefixroute.events import EndpointRemoved
from prefixroute.router import Router

if TYPE_CHECKING:  # gateway.py imports this module
    from prefixroute.adapters.gateway import GatewayConfig

__all__ = ["RoutingService"]


class RoutingService:
    """The router and what surrounds it in a driver (see the module docstring).

    `router` defaults to one built from the config; `registry` is the
    Prometheus `CollectorRegistry` of the metrics (a fresh one by default, so
    several drivers in one process do not collide); `clock` is the monotonic
    clock every `now` passed to the router comes from. `draining` is set by
    the driver when a graceful shutdown starts.
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        router: Router | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router = router if router is not None else config.build_router()
        self.clock = clock
        self.pool = EndpointPool(
            config.endpoints,
            files=config.endpoint_files,
            scrape=config.scrape,
            clock=clock,
            on_removed=self._endpoint_removed,
        )
        self.metrics = GatewayMetrics(
            registry if registry is not None else CollectorRegistry(),
            self.router,
            self.pool.states,
            max_tenants=config.metrics.max_tenants,
            pool_name=config.metrics.pool_name,
            stale_after_s=config.scrape.stale_after_s,
            clock=clock,
        )
        self.identity = config.identity
        self.deferrals = Deferrals(self.router, self.pool.states, clock)
        self.draining = False

    async def start_service(self, release_interval_s: float) -> None:
        """Start the pool (one scrape and health round first) and the release ticker."""
        await self.pool.start()
        self.deferrals.start(release_interval_s)

    async def stop_service(self, reason: str) -> None:
        """Answer requests still deferred with 503 (`reason`), stop the ticker and the pool."""
        await self.deferrals.stop(reason)
        await self.pool.stop()

    def _endpoint_removed(self, endpoint: EndpointId) -> None:
        self.router.observe(EndpointRemoved(endpoint=endpoint))

    def release_deferred(self) -> None:
        """Hand released requests to their waiting handlers (`Deferrals.release`)."""
        self.deferrals.release()

    def health_report(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) for `/health`: 200 with a healthy endpoint and not draining."""
        states = self.pool.states()
        healthy = sum(1 for s in states if s.healthy)
        status = "draining" if self.draining else ("ok" if healthy else "unavailable")
        body = {"status": status, "healthy_endpoints": healthy, "endpoints": len(states)}
        return (200 if status == "ok" else 503), body
