"""What every driver runs around the core `Router`: endpoints, metrics, identity, deferrals.

The gateway (`prefixroute serve`) and the ext_proc server (`prefixroute
extproc`) differ in their wire protocol only. Both read the same config
(`prefixroute.drivers.settings.DriverConfig`), and both build from it, on one event loop and one
monotonic clock: the `Router`, the `EndpointPool` that scrapes and health
checks the engines (telling the router when an endpoint leaves), the
`GatewayMetrics` exporter, the tenant `IdentityConfig`, and the `Deferrals`
where deferred requests wait; and they turn a request body into a routed
`Request` the same way (`RoutingService.prepare`: JSON, identity, the
OpenAI parser, tenant isolation salts, asking a streaming engine for usage).
`RoutingService` is that shared part; each driver subclasses it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from prometheus_client import CollectorRegistry

from prefixroute.blocks import Blocker
from prefixroute.drivers.deferral import Deferrals
from prefixroute.drivers.metrics import GatewayMetrics, RequestRecord
from prefixroute.drivers.pool import EndpointPool
from prefixroute.drivers.settings import DriverConfig
from prefixroute.endpoint import EndpointId
from prefixroute.events import EndpointRemoved
from prefixroute.openai import parse_openai
from prefixroute.request import Request, RequestError
from prefixroute.router import Router

__all__ = ["Prepared", "Refusal", "RoutingService", "isolation_salt"]


class Refusal(Exception):
    """A request refused before routing: its HTTP status, message, metrics code, field."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


@attrs.frozen
class Prepared:
    """A request ready to route: the `Request` and the body to forward.

    `payload` is the client's body unless it had to change (`changed`: an
    isolation salt, or `stream_options.include_usage` the driver asked for);
    then it is the re-serialised JSON. `usage_asked`: the driver asked the
    engine for a usage chunk the client did not ask for, so it must hide it.
    """

    request: Request
    payload: bytes
    usage_asked: bool
    changed: bool


def isolation_salt(blocker: Blocker, tenant: str, client_salt: str | None) -> str:
    """The `cache_salt` that keeps `tenant`'s engine cache apart from every other tenant's.

    BLAKE2b keyed by the hashing seed over the tenant (or its group, when
    `tenant_groups` maps it: a group shares one cache) and the client's own
    salt, each field tagged and length-prefixed. Tenants cannot compute each
    other's salts without the seed, and a client salt still partitions
    within the tenant. O(1).
    """
    group = blocker.tenant_groups.get(tenant)
    fields = (b"group", group) if group is not None else (b"tenant", tenant)
    data = bytearray()
    for field in (fields[0].decode(), fields[1], client_salt):
        if field is None:
            data += b"\0"
        else:
            raw = field.encode("utf-8", "surrogatepass")
            data += b"\1" + len(raw).to_bytes(8, "little") + raw
    digest = hashlib.blake2b(
        bytes(data),
        digest_size=16,
        key=blocker.seed.to_bytes(8, "little"),
        person=b"prefixroute-salt",
    )
    return "pr-" + digest.hexdigest()


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
        config: DriverConfig,
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

    def prepare(
        self,
        body: bytes,
        headers: Mapping[str, str],
        record: RequestRecord,
        *,
        may_ask_usage: bool,
    ) -> Prepared:
        """Parse a completions body and its headers into what the router and the engine get.

        JSON (400 `invalid-json`), identity (400/401, `IdentityConfig.resolve`)
        and `parse_openai` (400/413 naming the field) raise `Refusal`. With
        `hashing.isolate_tenants` the request and the payload carry the
        tenant's `isolation_salt`; a streaming request whose client did not
        ask for usage gets `stream_options.include_usage` when
        `may_ask_usage` (the driver can hide the usage chunk again). Sets
        `record.model` and `record.tenant` as soon as they are known.
        O(body size).
        """
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            raise Refusal(400, "the request body is not valid JSON", code="invalid-json") from None
        if not isinstance(doc, dict):
            raise Refusal(400, "the request body must be a JSON object", code="invalid-json")
        model = doc.get("model")
        if isinstance(model, str) and model:
            record.model = model
        try:
            identity = self.identity.resolve(headers, doc)
            record.tenant = identity.tenant
            parsed = parse_openai(
                doc,
                headers,
                tenant_header=None,
                session_header=None,
                priority_header=None,
                request_id_header="x-request-id",
                tenant_from_user=False,
            )
        except RequestError as exc:
            code = "unauthorized" if exc.status == 401 else "invalid-request"
            raise Refusal(exc.status, str(exc), code=code, param=exc.field) from None
        request = attrs.evolve(
            parsed, tenant=identity.tenant, session=identity.session, priority=identity.priority
        )
        forwarded: dict[str, Any] | None = None
        blocker = self.router.blocker
        if blocker.isolate_tenants:
            salt = isolation_salt(blocker, request.tenant, request.cache_salt)
            request = attrs.evolve(request, cache_salt=salt)
            forwarded = dict(doc, cache_salt=salt)
        usage_asked = False
        if request.stream and may_ask_usage:
            options = doc.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                usage_asked = True
                forwarded = dict(forwarded or doc)
                forwarded["stream_options"] = {
                    **(options if isinstance(options, dict) else {}),
                    "include_usage": True,
                }
        payload = body if forwarded is None else json.dumps(forwarded).encode()
        return Prepared(
            request=request, payload=payload, usage_asked=usage_asked, changed=forwarded is not None
        )

    def health_report(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) for `/health`: 200 with a healthy endpoint and not draining."""
        states = self.pool.states()
        healthy = sum(1 for s in states if s.healthy)
        status = "draining" if self.draining else ("ok" if healthy else "unavailable")
        body = {"status": status, "healthy_endpoints": healthy, "endpoints": len(states)}
        return (200 if status == "ok" else 503), body
