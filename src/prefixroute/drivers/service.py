"""What every driver runs around the core `Router`: endpoints, metrics, identity, deferrals.

The gateway (`prefixroute serve`) and the ext_proc server (`prefixroute
extproc`) differ in their wire protocol only. Both read the same config
(`prefixroute.drivers.settings.DriverConfig`), and both build from it, on one event loop and one
monotonic clock: the `Router`, the `EndpointPool` that scrapes and health
checks the engines (telling the router when an endpoint leaves), the
`GatewayMetrics` exporter, the tenant `IdentityConfig`, and the `Deferrals`
where deferred requests wait; and they turn a request body into a routed
`Request` the same way (`RoutingService.read_request`: JSON, identity, the
OpenAI parser, tenant isolation salts, asking a streaming engine for usage,
then 404 for a model no endpoint serves) and route it the same way
(`RoutingService.decide`: with a `shared_state` section, one shared-state
round trip first for a rate-limited tenant, `prefixroute.drivers.coordinator`).
`RoutingService` is that shared part; each driver subclasses it.

A body over `OFFLOAD_BYTES` (`TOKENS_OFFLOAD_BYTES` when tokenizers are
configured: parsing then includes tokenizing) is parsed (and re-serialised when it changes) in
a worker thread, so one large request does not hold up every other request
on the event loop; the router itself is only ever called on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry

from prefixroute.blocks import Blocker
from prefixroute.decision import Decision, Deferral, Rejection
from prefixroute.drivers.context import check_context
from prefixroute.drivers.coordinator import Coordinator
from prefixroute.drivers.deferral import Deferrals
from prefixroute.drivers.errors import clip
from prefixroute.drivers.kvevents import KVEventsManager
from prefixroute.drivers.metrics import GatewayMetrics, RequestRecord
from prefixroute.drivers.pool import EndpointPool
from prefixroute.drivers.settings import DriverConfig
from prefixroute.endpoint import EndpointId, EndpointState
from prefixroute.events import EndpointRemoved
from prefixroute.openai import parse_openai
from prefixroute.request import Request, RequestError, Usage, is_text
from prefixroute.router import Router

__all__ = [
    "MAX_MODEL_CHARS",
    "OFFLOAD_BYTES",
    "OFFLOAD_THREADS",
    "TOKENS_OFFLOAD_BYTES",
    "Prepared",
    "Refusal",
    "RoutingService",
    "isolation_salt",
]

MAX_MODEL_CHARS = 1024
"""Longest model name accepted (400 beyond): longer than any served name or path."""
OFFLOAD_BYTES = 256 * 1024
"""Bodies larger than this are parsed in a worker thread, off the event loop."""
OFFLOAD_THREADS = 2
"""Worker threads for large bodies (more wait their turn: bounded CPU, a free loop)."""
TOKENS_OFFLOAD_BYTES = 16 * 1024
"""With tokenizers configured (`models`), bodies over this go to a worker thread instead: a
cold tokenization is O(characters) in the tokenizer, milliseconds for 16 KiB (docs/tokens.md)."""


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
    keys: npt.NDArray[np.uint64] | None = None
    """The request's block keys when hashed ahead (in the worker thread): pass to `route`."""


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
            on_health_change=self._health_changed,
        )

        self.metrics = GatewayMetrics(
            registry if registry is not None else CollectorRegistry(),
            self.router,
            self.pool.states,
            max_tenants=config.metrics.max_tenants,
            pool_name=config.metrics.pool_name,
            stale_after_s=config.scrape.stale_after_s,
            clock=clock,
            served_models=self.pool.served_models,
        )
        self.kv_events = KVEventsManager(self.router, self.pool, config.kv_events, clock=clock)
        self.metrics.add_kv_events(self.kv_events.snapshots)
        self.identity = config.identity
        self.tokenizers = config.models
        self._offload_bytes = TOKENS_OFFLOAD_BYTES if config.models else OFFLOAD_BYTES
        self.deferrals = Deferrals(
            self.router,
            self.pool.states,
            clock,
            on_settled=self._settled,
            on_released=self._released,
        )
        self.coordinator: Coordinator | None = None
        if config.shared_state is not None:
            from prefixroute.drivers.shared import SharedState  # the `shared` extra

            self.coordinator = Coordinator(
                self.router, SharedState(config.shared_state), clock=clock
            )
            self.metrics.add_shared_state(self.coordinator.status)
        self.draining = False
        self._workers: concurrent.futures.ThreadPoolExecutor | None = None

    async def start_service(self, release_interval_s: float) -> None:
        """Start the pool (one scrape and health round first), shared state, the release ticker."""
        await self.pool.start()
        await self.kv_events.start()
        if self.coordinator is not None:
            await self.coordinator.start()
        self.deferrals.start(release_interval_s)

    async def stop_service(self, reason: str) -> None:
        """Answer requests still deferred with 503 (`reason`), stop the ticker and the pool."""
        await self.deferrals.stop(reason)
        if self.coordinator is not None:
            await self.coordinator.stop()
        await self.kv_events.stop()
        await self.pool.stop()
        if self._workers is not None:
            self._workers.shutdown(wait=False, cancel_futures=True)
            self._workers = None

    def _endpoint_removed(self, endpoint: EndpointId) -> None:
        self.router.observe(EndpointRemoved(endpoint=endpoint))

    def _health_changed(self, endpoint: EndpointId, healthy: bool) -> None:
        self.kv_events.on_health(endpoint, healthy)

    def _settled(self, decision: Decision, usage: Usage, served_by: EndpointId | None) -> None:
        if self.coordinator is not None:
            self.coordinator.after_complete(decision, usage, served_by)

    def _released(self, decision: Decision) -> None:
        if self.coordinator is not None:
            self.coordinator.queue_decision(decision)

    def release_deferred(self) -> None:
        """Hand released requests to their waiting handlers (`Deferrals.release`)."""
        self.deferrals.release()

    async def read_request(
        self,
        body: bytes,
        headers: Mapping[str, str],
        record: RequestRecord,
        *,
        may_ask_usage: bool,
    ) -> Prepared:
        """`prepare`, in a worker thread for a body over `OFFLOAD_BYTES`; then the model check.

        The check runs on the loop: `Refusal` 404 `model_not_found` (as vLLM
        and the OpenAI API answer) when no endpoint of the pool serves the
        requested model (`EndpointPool.serves` is False). When an endpoint
        may serve any name (no `models` configured, none listed) the router
        decides, and an engine answers for names it does not serve.
        """
        endpoints = self.pool.states()  # read on the loop: the pool is the loop's
        if len(body) <= self._offload_bytes:
            prepared = self.prepare(
                body, headers, record, may_ask_usage=may_ask_usage, endpoints=endpoints
            )
        else:
            if self._workers is None:
                self._workers = concurrent.futures.ThreadPoolExecutor(
                    OFFLOAD_THREADS, thread_name_prefix="prefixroute-parse"
                )
            # the thread fills a scratch record: `record` is the loop's alone
            scratch = RequestRecord(record.metrics, record.started)
            job = functools.partial(
                self._prepare_and_hash,
                body,
                dict(headers),
                scratch,
                may_ask_usage=may_ask_usage,
                endpoints=endpoints,
            )
            try:
                prepared = await asyncio.get_running_loop().run_in_executor(self._workers, job)
            finally:
                record.model, record.tenant = scratch.model, scratch.tenant
        model = prepared.request.model
        if self.pool.serves(model) is False:
            raise Refusal(
                404,
                f"The model `{clip(model)}` does not exist.",
                code="model_not_found",
                param="model",
            )
        return prepared

    def _prepare_and_hash(
        self,
        body: bytes,
        headers: Mapping[str, str],
        record: RequestRecord,
        *,
        may_ask_usage: bool,
        endpoints: Sequence[EndpointState],
    ) -> Prepared:
        """`prepare`, then the request's block keys (`Blocker.keys`): both off the loop."""
        prepared = self.prepare(
            body, headers, record, may_ask_usage=may_ask_usage, endpoints=endpoints
        )
        return attrs.evolve(prepared, keys=self.router.blocker.keys(prepared.request))

    def prepare(
        self,
        body: bytes,
        headers: Mapping[str, str],
        record: RequestRecord,
        *,
        may_ask_usage: bool,
        endpoints: Sequence[EndpointState] | None = None,
    ) -> Prepared:
        """Parse a completions body and its headers into what the router and the engine get.

        JSON (400 `invalid-json`), identity and latency objectives (400/401,
        `IdentityConfig.resolve`)
        and `parse_openai` (400/413 naming the field) raise `Refusal`, and so
        does a model name that is not printable text (a lone surrogate, a
        control character) or is over `MAX_MODEL_CHARS` (400), and a prompt
        longer than any engine of its model takes (400
        `context_length_exceeded`, `prefixroute.drivers.context`, judged
        over `endpoints`, default the pool's states). With
        `hashing.isolate_tenants` the request and the payload carry the
        tenant's `isolation_salt`; a streaming request whose client did not
        ask for usage gets `stream_options.include_usage` when
        `may_ask_usage` (the driver can hide the usage chunk again). With a
        tokenizer configured for the model (`models`, docs/tokens.md) a text
        request gets the engine's own `token_ids` (chat messages rendered
        with the model's chat template, then tokenized as vLLM does; a prompt
        given as token ids is kept), so the length check is exact; a chat the
        template refuses is a 400 naming the field. Sets
        `record.model` and `record.tenant` as soon as they are known.
        Given `endpoints`, touches nothing but `record`: safe in a worker
        thread. O(body size).
        """
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            raise Refusal(400, "the request body is not valid JSON", code="invalid-json") from None
        if not isinstance(doc, dict):
            raise Refusal(400, "the request body must be a JSON object", code="invalid-json")
        model = doc.get("model")
        if isinstance(model, str) and model:
            if len(model) > MAX_MODEL_CHARS:
                why = f"model must be at most {MAX_MODEL_CHARS} characters"
            elif not (model.isprintable() and is_text(model)):
                why = "model must be printable text (no control characters or lone surrogates)"
            else:
                why = ""
            if why:
                raise Refusal(400, why, code="invalid-request", param="model")
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
            parsed,
            tenant=identity.tenant,
            session=identity.session,
            priority=identity.priority,
            slo_ttft_s=identity.slo_ttft_s,
            slo_tpot_s=identity.slo_tpot_s,
            predictive=identity.predictive,
        )
        forwarded: dict[str, Any] | None = None
        blocker = self.router.blocker
        states = endpoints if endpoints is not None else self.pool.states()
        too_long = check_context(request, blocker, states)
        tokenizer = self.tokenizers.get(request.model)
        if too_long is None and tokenizer is not None and request.token_ids is None:
            try:  # token mode: the engine's own ids (docs/tokens.md), then the exact check
                ids = tokenizer.body_ids(doc)
            except RequestError as exc:
                code = "invalid-request"
                raise Refusal(exc.status, str(exc), code=code, param=exc.field) from None
            if ids is not None:
                request = attrs.evolve(request, token_ids=ids)
                too_long = check_context(request, blocker, states)
        if too_long is not None:  # no engine of the model takes it: 400 as vLLM would
            param = "messages" if "messages" in doc else "prompt"
            raise Refusal(400, too_long.message, code=too_long.code, param=param)
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

    async def decide(
        self,
        request: Request,
        states: Sequence[EndpointState],
        keys: npt.NDArray[np.uint64] | None,
    ) -> Decision | Rejection | Deferral:
        """Route `request` over `states` and record the decision's metrics.

        With shared state, a rate-limited tenant's bucket is taken in the
        shared store first (one round trip, bounded by its `timeout_ms`), and
        the decision is queued for the other replicas' indexes. The
        decision-latency metric times `Router.route` alone.
        """
        coordinator = self.coordinator
        if coordinator is not None:
            await coordinator.before_route(request)
        t0 = time.perf_counter()
        outcome = self.router.route(request, states, self.clock(), keys=keys)
        elapsed = time.perf_counter() - t0
        if coordinator is not None:
            coordinator.after_route(outcome)
        if isinstance(outcome, Decision):
            self.metrics.observe_decision(elapsed, "decision", decision=outcome)
        else:
            kind = "deferral" if isinstance(outcome, Deferral) else "rejection"
            self.metrics.observe_decision(elapsed, kind)
        return outcome

    def health_report(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) for `/health`: 200 with a healthy endpoint and not draining."""
        states = self.pool.states()
        healthy = sum(1 for s in states if s.healthy)
        status = "draining" if self.draining else ("ok" if healthy else "unavailable")
        body: dict[str, Any] = {
            "status": status,
            "healthy_endpoints": healthy,
            "endpoints": len(states),
        }
        if self.kv_events.streams:  # each endpoint with KV events: precise or approximate, why
            body["kv_events"] = self.kv_events.modes()
        if self.coordinator is not None:  # up, or down and serving on local state (still 200)
            body["shared_state"] = self.coordinator.status()
        return (200 if status == "ok" else 503), body
