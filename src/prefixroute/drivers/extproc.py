"""`prefixroute extproc`: an Envoy ext_proc server that picks endpoints with the core `Router`.

Envoy (or any data plane speaking the Gateway API Inference Extension's
endpoint-picker protocol) carries the bytes; this server only decides. One
`ExternalProcessor.Process` gRPC stream is one HTTP request:

1. ``request_headers``: remember the headers, the path (``:path``, else
   ``x-original-path``), the subset hint and, from the first message's
   ``protocol_config``, the body modes Envoy runs with. Only the gateway's
   routes are served (`ROUTES`: 404 for another path, 405 for another
   method, whatever the data plane's routes let through); ``GET /v1/models``
   is answered with the configured models or sent to a healthy endpoint. A
   completion request without a body is a 400 (no model to route). In
   ``FULL_DUPLEX_STREAMED`` mode (or
   when Envoy does not say) the headers response is held until the body is
   complete; in ``BUFFERED`` mode it is answered at once, empty.
2. ``request_body`` chunks are collected (``max_body_bytes``: 413). When the
   body is complete (``end_of_stream``, or the ``request_trailers`` message
   that ends a body with trailers) it is decoded (400), the identity resolved
   (400/401), parsed with `prefixroute.openai.parse_openai` (400/413; a large
   body in a worker thread), refused 404 when no endpoint serves its model,
   salted when ``hashing.isolate_tenants`` (as the gateway does), and routed among the
   pool's endpoints, or only those of the subset hint.
3. A `Rejection` is an ``ImmediateResponse`` with its status, an OpenAI-style
   JSON body and ``retry-after``; a `Deferral` waits for `Router.release`; a
   `Decision` sets ``x-gateway-destination-endpoint: ip:port`` (plus the
   fallbacks, comma-separated, with ``extproc.fallback_list``) with
   ``clear_route_cache`` and the same value in dynamic metadata
   ``envoy.lb`` / ``x-gateway-destination-endpoint``. Duplex: the headers
   response, then the body echoed back in ``StreamedBodyResponse`` chunks of
   at most 62,000 bytes, ``end_of_stream`` on the last (or, for a body ended
   by trailers, a trailers response after it). Buffered: one ``BodyResponse``
   carrying the header mutation, and a body mutation only when the body changed.
4. The response: status and served endpoint from ``response_headers`` (the
   ``envoy.lb`` / ``x-gateway-destination-endpoint-served`` metadata, else
   that header, else the ``upstream.address`` attribute; a
   ``response.code_details`` attribute naming a connection failure marks the
   picked endpoint unhealthy, as the gateway's failed connections do), then the body
   echoed chunk by chunk while usage is read from the JSON body or the SSE
   stream; `Router.on_complete` exactly once per `Decision`, also when the
   stream ends early (ok=False).

Sources of the protocol: kubernetes-sigs/gateway-api-inference-extension
`docs/proposals/004-endpoint-picker-protocol/README.md` (header, metadata,
subset hint, served endpoint, 429/503 ImmediateResponses) and
`pkg/epp/handlers/server.go` / `request.go` / `response.go` (holding the
headers response until the body is complete, the 62,000-byte chunks,
``clear_route_cache``, ``Content-Length`` for the re-sent body); llm-d's
`llm-d-router` `pkg/epp/handlers/server.go` and `request.go` (the same, with
dynamic metadata on the ``ProcessingResponse``); Envoy's
`api/envoy/service/ext_proc/v3/external_processor.proto` and
`api/envoy/extensions/filters/http/ext_proc/v3/processing_mode.proto`
(``protocol_config``, the ``FULL_DUPLEX_STREAMED`` contract). Deployment,
failure modes and the choices made where the sources are silent are in
docs/extproc.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import grpc
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from prefixroute.config import ConfigError
from prefixroute.decision import Decision, Deferral, Rejection
from prefixroute.drivers.documents import read_document
from prefixroute.drivers.errors import clip, error_body, retry_after_header
from prefixroute.drivers.metrics import CLIENT_CLOSED, RequestRecord
from prefixroute.drivers.sections import build_section, positive_number
from prefixroute.drivers.service import Refusal, RoutingService
from prefixroute.drivers.settings import DriverConfig, log_level_argument
from prefixroute.drivers.sse import SseRelay, openai_usage
from prefixroute.endpoint import EndpointId, EndpointState
from prefixroute.request import Request, Usage
from prefixroute.router import Router
from prefixroute.schema import evolve

__all__ = [
    "BODY_CHUNK_BYTES",
    "DESTINATION_HEADER",
    "EXT_PROC_SERVICE",
    "HEALTH_SERVICES",
    "LB_NAMESPACE",
    "ROUTES",
    "SERVED_KEY",
    "SUBSET_KEY",
    "SUBSET_NAMESPACE",
    "ExtProcConfig",
    "ExtProcServer",
    "ExtProcSettings",
    "ExtProcessor",
    "cli_arguments",
    "cli_main",
    "serve",
]

log = logging.getLogger(__name__)

DESTINATION_HEADER = "x-gateway-destination-endpoint"
"""The request header (and `envoy.lb` metadata key) naming the picked endpoint(s)."""
SERVED_KEY = "x-gateway-destination-endpoint-served"
"""The `envoy.lb` metadata key (or response header) naming the endpoint that served."""
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
BODY_CHUNK_BYTES = 62_000
"""Largest body chunk sent back: GIE's `bodyByteLimit` (Envoy caps streamed chunks near 64 KiB)."""
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
HEALTH_SERVICES = ("", "liveness", "readiness", EXT_PROC_SERVICE)
UPSTREAM_ADDRESS = "upstream.address"
CODE_DETAILS = "response.code_details"
ROUTES: Mapping[str, tuple[str, ...]] = {
    "/v1/chat/completions": ("POST",),
    "/v1/completions": ("POST",),
    "/v1/models": ("GET", "HEAD"),
}
"""The paths the picker serves and their methods: the gateway's (404/405 for anything else)."""

_MODE = processing_mode_pb2.ProcessingMode
_DUPLEX = _MODE.FULL_DUPLEX_STREAMED
_BUFFERED_MODES = frozenset({_MODE.BUFFERED, _MODE.BUFFERED_PARTIAL})
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

_EXTPROC_KEYS = {
    "host": "str",
    "port": "int",
    "metrics_port": "int",
    "max_body_bytes": "int",
    "drain_timeout_s": "float",
    "release_interval_s": "float",
    "fallback_list": "bool",
}


# -- configuration -------------------------------------------------------------------


@attrs.frozen
class ExtProcSettings:
    """The `extproc` section: where to listen and how much to hold.

    `port` is the gRPC port (9002, the GIE endpoint picker's), `metrics_port`
    the HTTP port of `/metrics` and `/health` (0: none). `max_body_bytes`
    bounds the request body collected before routing (413 beyond); the
    response body is echoed as it arrives and only a non-streaming answer is
    kept (up to the same bound) to read its usage. `fallback_list` appends
    the decision's fallbacks to the destination, comma-separated: only for
    data planes that try such a list in order (GIE protocol v0.4.0); Envoy's
    `ORIGINAL_DST` cluster takes a single `ip:port`.
    """

    host: str = "127.0.0.1"
    port: int = attrs.field(
        default=9002, validator=[attrs.validators.ge(0), attrs.validators.le(65535)]
    )
    metrics_port: int = attrs.field(
        default=9090, validator=[attrs.validators.ge(0), attrs.validators.le(65535)]
    )
    max_body_bytes: int = attrs.field(default=16 * 1024 * 1024, validator=attrs.validators.ge(1))
    drain_timeout_s: float = attrs.field(default=30.0, validator=positive_number)
    release_interval_s: float = attrs.field(default=0.05, validator=positive_number)
    fallback_list: bool = False


@attrs.frozen
class ExtProcConfig:
    """An ext_proc config: the drivers' shared document plus the `extproc` section.

    The same file can configure `prefixroute serve` and `prefixroute
    extproc`: `driver` holds the router document and the endpoints, scrape,
    identity and metrics sections (read by
    `prefixroute.drivers.settings.DriverConfig`, whose `server` section this
    server validates but ignores); `extproc` is this server's own. Every
    error is a `ConfigError` naming the field.
    """

    driver: DriverConfig = attrs.field(factory=DriverConfig)
    extproc: ExtProcSettings = attrs.field(factory=ExtProcSettings)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ExtProcConfig:
        """Read a YAML/JSON config file; relative paths in it are relative to its directory."""
        return cls.from_document(read_document(path), base_dir=Path(path).parent)

    @classmethod
    def from_document(
        cls, doc: Mapping[str, Any], *, base_dir: str | os.PathLike[str] = "."
    ) -> ExtProcConfig:
        """Validate a whole document: the `extproc` section here, the rest by `DriverConfig`."""
        if not isinstance(doc, Mapping):
            raise ConfigError("", "a config document must be a mapping")
        rest = {k: v for k, v in doc.items() if k != "extproc"}
        settings = build_section(doc, "extproc", _EXTPROC_KEYS, ExtProcSettings)
        return cls(DriverConfig.from_document(rest, base_dir=base_dir), settings)


# -- protobuf helpers ------------------------------------------------------------------


def _header_option(key: str, value: str | bytes) -> Any:
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=raw), append_action=_OVERWRITE
    )


def _headers(header_map: Any) -> dict[str, str]:
    """Lowercase name -> value from an Envoy `HeaderMap` (repeated names joined with ", ")."""
    out: dict[str, str] = {}
    for h in header_map.headers:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        key = h.key.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def _metadata(message: Any) -> dict[str, Any]:
    """`metadata_context.filter_metadata` as plain dicts (namespace -> fields)."""
    if not message.HasField("metadata_context"):
        return {}
    return {
        ns: json_format.MessageToDict(value)
        for ns, value in message.metadata_context.filter_metadata.items()
    }


def _attribute(message: Any, name: str) -> str | None:
    """The string attribute `name` from any namespace of the request's `attributes`."""
    for struct in message.attributes.values():
        value = struct.fields.get(name)
        if value is not None and value.WhichOneof("kind") == "string_value":
            return str(value.string_value)
    return None


def _immediate(
    status: int,
    message: str,
    *,
    code: str,
    param: str | None = None,
    retry_after_s: float | None = None,
) -> Any:
    """An `ImmediateResponse` with an OpenAI-style JSON error body (and `retry-after`)."""
    headers = [_header_option("content-type", "application/json")]
    if retry_after_s is not None:
        headers.append(_header_option("retry-after", retry_after_header(retry_after_s)))
    body = json.dumps(error_body(status, message, code=code, param=param)).encode()
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=pb.HeaderMutation(set_headers=headers),
            body=body,
            details=f"prefixroute_{code}".replace("-", "_"),
        )
    )


def _streamed(phase: str, body: bytes, end_of_stream: bool) -> list[Any]:
    """`body` as `StreamedBodyResponse`s of at most `BODY_CHUNK_BYTES` for `phase`.

    O(len(body)) copying; an empty body is one empty message (it may carry
    `end_of_stream`). Fields are set in place (no intermediate messages to
    build and copy: this runs for every chunk of every answer).
    """
    out = []
    last = max(len(body) - 1, 0) // BODY_CHUNK_BYTES * BODY_CHUNK_BYTES
    for start in range(0, last + 1, BODY_CHUNK_BYTES):
        response = pb.ProcessingResponse()
        chunk = getattr(response, phase).response.body_mutation.streamed_response
        chunk.body = body[start : start + BODY_CHUNK_BYTES]  # the whole body: no copy
        chunk.end_of_stream = end_of_stream and start == last
        out.append(response)
    return out


@functools.lru_cache(maxsize=4096)
def _pick(destination: str) -> tuple[Any, Any]:
    """The destination header option and the `envoy.lb` metadata naming `destination`.

    Cached: a pool has few destinations, and building the `Struct` from a
    dict is the costly part of an answer. The messages are copied into each
    response, never changed.
    """
    metadata = struct_pb2.Struct()
    metadata.update({LB_NAMESPACE: {DESTINATION_HEADER: destination}})
    return _header_option(DESTINATION_HEADER, destination), metadata


def _status(value: str | None) -> int:
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


def _in_subset(address: str, subset: frozenset[str]) -> bool:
    """`ip:port` entries match the whole address; a bare IP matches every port on it (GIE
    matches by IP, since an InferencePool's pods share one target port)."""
    if address in subset:
        return True
    host = address.rsplit(":", 1)[0]
    return host in subset or host.strip("[]") in subset


# -- the processor ---------------------------------------------------------------------


class ExtProcessor(RoutingService):
    """The ext_proc servicer: the router, the endpoint pool, metrics and deferred requests.

    `Process` is the gRPC method (one stream per HTTP request, see the module
    docstring). `router` defaults to one built from the config; `registry`
    is the Prometheus registry of its metrics (a fresh one by default);
    `clock` is the monotonic clock every `now` passed to the router comes
    from. `start()`/`stop()` run the pool and the release ticker. Single event
    loop: the router is only ever called from it.
    """

    def __init__(
        self,
        config: ExtProcConfig,
        *,
        router: Router | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(config.driver, router=router, registry=registry, clock=clock)
        self.config = config
        self.settings = config.extproc

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the pool (one scrape and health round first) and the release ticker."""
        await self.start_service(self.settings.release_interval_s)

    async def stop(self) -> None:
        """Stop the ticker and the pool; answer any request still deferred with 503."""
        await self.stop_service("the endpoint picker is shutting down")

    # -- deferral -------------------------------------------------------------------------

    async def wait(self, request: Request, deferral: Deferral) -> Decision | Rejection:
        """Wait for the deferred `request` (cancelled if Envoy closes the stream)."""
        return await self.deferrals.wait(request, deferral)

    def settle(self, decision: Decision, usage: Usage, served_by: EndpointId | None) -> None:
        """`Router.on_complete`, then release what the freed capacity lets through."""
        self.deferrals.complete(decision, usage, served_by)

    # -- the gRPC method ------------------------------------------------------------------

    async def Process(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        """`ExternalProcessor.Process`: one HTTP request's messages in, responses out."""
        stream = _Stream(self)
        try:
            async for message in requests:
                try:
                    responses = await stream.handle(message)
                except Exception:  # a bug here must not become a gRPC error (Envoy: 500)
                    log.exception("ext_proc stream failed")
                    if stream.decision is None and not stream.closed:
                        yield stream.fail(500, "internal endpoint picker error", code="internal")[0]
                    return
                for response in responses:
                    yield response
                if stream.closed:
                    return
        finally:
            stream.finish()

    # -- /metrics and /health ---------------------------------------------------------------

    def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) for `/health`: 200 with a healthy endpoint and not draining."""
        return self.health_report()


class _Stream:
    """One `Process` stream: the request/response state machine (module docstring)."""

    def __init__(self, owner: ExtProcessor) -> None:
        self.owner = owner
        self.started = owner.clock()
        self.ex = RequestRecord(owner.metrics, self.started)
        self.closed = False
        self.request_mode: int | None = None  # from protocol_config; None: Envoy did not say
        self.response_mode: int | None = None
        self.headers: dict[str, str] = {}
        self.path = ""
        self.subset: frozenset[str] | None = None
        self.body = bytearray()
        self.headers_answered = False
        self.request_done = False
        self.decision: Decision | None = None
        self.settled = False
        # the response
        self.status = 0
        self.served: EndpointId | None = None
        self.sse: SseRelay | None = None
        self.strip_usage = False  # we asked the engine for usage: hide its usage-only chunk
        self.answer = bytearray()  # a non-streaming answer, kept to read its usage
        self.answer_overflow = False
        self.response_bytes = 0

    # -- dispatch ---------------------------------------------------------------------------

    async def handle(self, message: Any) -> list[Any]:
        if message.HasField("protocol_config"):
            config = message.protocol_config
            self.request_mode = int(config.request_body_mode)
            self.response_mode = int(config.response_body_mode)
        metadata = _metadata(message)
        hint = metadata.get(SUBSET_NAMESPACE)
        if isinstance(hint, dict) and SUBSET_KEY in hint:
            listed = hint[SUBSET_KEY]
            items = listed if isinstance(listed, list) else [listed]
            self.subset = frozenset(str(a) for a in items if isinstance(a, str))
        kind = message.WhichOneof("request")
        if kind == "request_headers":
            return self._request_headers(message.request_headers)
        if kind == "request_body":
            return await self._request_body(message.request_body)
        if kind == "request_trailers":
            return await self._request_trailers()
        if kind == "response_headers":
            return self._response_headers(message, metadata)
        if kind == "response_body":
            return self._response_body(message.response_body)
        if kind == "response_trailers":
            return self._response_trailers()
        return []

    def fail(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> list[Any]:
        """Answer with an ImmediateResponse and end the stream."""
        self.closed = True
        response = _immediate(status, message, code=code, param=param, retry_after_s=retry_after_s)
        self.ex.end(
            status,
            now=self.owner.clock(),
            code=code,
            response_bytes=len(response.immediate_response.body),
        )
        return [response]

    # -- the request ---------------------------------------------------------------------------

    def _request_headers(self, headers: Any) -> list[Any]:
        self.headers = _headers(headers.headers)
        self.path = self.headers.get(":path") or self.headers.get("x-original-path") or ""
        if self.owner.draining:
            return self.fail(
                503, "the endpoint picker is shutting down", code="draining", retry_after_s=1.0
            )
        path = self.path.split("?", 1)[0]
        refused = self._refuse_route(path)
        if refused is not None:
            return refused
        if path == "/v1/models":
            if not headers.end_of_stream:
                return self.fail(400, "GET /v1/models takes no body", code="invalid-request")
            return self._models()
        if headers.end_of_stream:
            return self.fail(
                400,
                f"{clip(self.path) or 'the request'} has no body: a model is required",
                code="invalid-request",
                param="model",
            )
        mode = self.request_mode
        if mode is None or mode == _DUPLEX:
            return []  # hold the headers response until the body is complete
        if mode == _MODE.BUFFERED:  # BUFFERED_PARTIAL could hand us half a body: refused
            self.headers_answered = True
            return [pb.ProcessingResponse(request_headers=pb.HeadersResponse())]
        name = _MODE.BodySendMode.Name(mode)
        return self.fail(
            500,
            f"ext_proc request_body_mode {name} cannot route by body: "
            "use FULL_DUPLEX_STREAMED or BUFFERED",
            code="misconfigured",
        )

    def _refuse_route(self, path: str) -> list[Any] | None:
        """404 for a path the gateway does not serve, 405 for a wrong method, else None.

        Whatever Envoy's routes say, a request reaches an engine only on a
        completion route (and `GET /v1/models`): the picker is the last check.
        A stream without `:method` (no data plane sends one) is judged by path.
        """
        method = self.headers.get(":method")
        shown = clip(f"{method or ''} {path}".strip())
        allowed = ROUTES.get(path)
        if allowed is None:
            return self.fail(404, f"no such endpoint: {shown}", code="not-found")
        if method is not None and method not in allowed:
            response = self.fail(405, f"method not allowed: {shown}", code="method-not-allowed")
            mutation = response[0].immediate_response.headers
            mutation.set_headers.append(_header_option("allow", ", ".join(allowed)))
            return response
        return None

    def _models(self) -> list[Any]:
        """`GET /v1/models`, as the gateway answers it: the configured models (a 200 from
        here), else the request goes to a healthy endpoint, else 503."""
        states = self.owner.pool.states()
        names = sorted({m for s in states for m in s.models})
        if names:
            self.closed = True
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": "prefixroute"} for m in names
            ]
            body = json.dumps({"object": "list", "data": data}).encode()
            headers = [_header_option("content-type", "application/json")]
            answer = pb.ImmediateResponse(
                status=http_status_pb2.HttpStatus(code=200),
                headers=pb.HeaderMutation(set_headers=headers),
                body=body,
            )
            return [pb.ProcessingResponse(immediate_response=answer)]
        healthy = [s for s in states if s.healthy]
        if not healthy:
            return self.fail(
                503, "no healthy endpoint to list models", code="no-endpoint", retry_after_s=1.0
            )
        self.request_done = True
        self.headers_answered = True
        header, metadata = _pick(healthy[0].address)
        common = pb.CommonResponse(
            header_mutation=pb.HeaderMutation(set_headers=[header]), clear_route_cache=True
        )
        return [
            pb.ProcessingResponse(
                request_headers=pb.HeadersResponse(response=common), dynamic_metadata=metadata
            )
        ]

    async def _request_body(self, body: Any) -> list[Any]:
        if self.request_done:
            return []
        limit = self.owner.settings.max_body_bytes
        if len(self.body) + len(body.body) > limit:
            return self.fail(
                413, f"the request body is larger than {limit} bytes", code="body-too-large"
            )
        self.body += body.body
        # BUFFERED: one message holds the whole body (even when trailers follow)
        if not (body.end_of_stream or self.headers_answered):
            return []
        return await self._route(by_trailers=False)

    async def _request_trailers(self) -> list[Any]:
        if self.request_done:  # trailers after a complete body: nothing to change
            return [pb.ProcessingResponse(request_trailers=pb.TrailersResponse())]
        return await self._route(by_trailers=True)

    async def _route(self, *, by_trailers: bool) -> list[Any]:
        """The body is complete: parse, route, and answer the request phase."""
        self.request_done = True
        owner = self.owner
        ex = self.ex
        body = bytes(self.body)
        self.body = bytearray()
        ex.request_bytes = len(body)
        try:
            # ask a streaming engine for usage only where its usage-only chunk can be hidden
            # again: the response body comes back to us in FULL_DUPLEX_STREAMED mode
            prepared = await owner.read_request(
                body, self.headers, ex, may_ask_usage=self.response_mode == _DUPLEX
            )
        except Refusal as refusal:
            return self.fail(
                refusal.status, refusal.message, code=refusal.code, param=refusal.param
            )
        request, payload = prepared.request, prepared.payload
        self.strip_usage = prepared.usage_asked

        states: Sequence[EndpointState] = owner.pool.states()
        if self.subset is not None:
            subset = self.subset
            states = [s for s in states if _in_subset(s.address, subset)]
            if not states:
                return self.fail(
                    503,
                    "no endpoint of the pool is in the data plane's subset hint",
                    code="no-endpoint",
                    retry_after_s=1.0,
                )
        ex.begin()
        outcome = await owner.decide(request, states, prepared.keys)
        if isinstance(outcome, Deferral):
            outcome = await owner.wait(request, outcome)
            if isinstance(outcome, Decision) and self.subset is not None:
                address = owner.pool.address(outcome.endpoint) or ""
                if not _in_subset(address, self.subset):  # released over the whole pool
                    owner.settle(outcome, Usage(ok=False), None)
                    return self.fail(
                        503,
                        "the released request's endpoint is outside the subset hint",
                        code="no-endpoint",
                        retry_after_s=1.0,
                    )
        if isinstance(outcome, Rejection):
            return self.fail(
                outcome.status,
                outcome.reason,
                code=outcome.kind,
                retry_after_s=outcome.retry_after_s,
            )
        self.decision = outcome
        return self._answer_request(
            outcome, payload, changed=prepared.changed, by_trailers=by_trailers
        )

    def _destination(self, decision: Decision) -> str:
        pool = self.owner.pool
        chosen = [decision.endpoint]
        if self.owner.settings.fallback_list:
            chosen += decision.fallbacks
        addresses = [a for a in (pool.address(e) for e in chosen) if a is not None]
        return ",".join(addresses) if addresses else str(decision.endpoint)

    def _answer_request(
        self, decision: Decision, payload: bytes, *, changed: bool, by_trailers: bool
    ) -> list[Any]:
        destination = self._destination(decision)
        header, metadata = _pick(destination)
        set_headers = [header]
        if changed or not self.headers_answered:
            # the body Envoy forwards is the one sent back here: its length, as GIE sets it
            set_headers.append(_header_option("content-length", str(len(payload))))
        common = pb.CommonResponse(
            header_mutation=pb.HeaderMutation(set_headers=set_headers), clear_route_cache=True
        )
        if self.headers_answered:  # BUFFERED: everything rides on the body response
            if changed:
                common.body_mutation.CopyFrom(pb.BodyMutation(body=payload))
            return [
                pb.ProcessingResponse(
                    request_body=pb.BodyResponse(response=common), dynamic_metadata=metadata
                )
            ]
        out = [
            pb.ProcessingResponse(
                request_headers=pb.HeadersResponse(response=common), dynamic_metadata=metadata
            )
        ]
        out += _streamed("request_body", payload, end_of_stream=not by_trailers)
        if by_trailers:
            out.append(pb.ProcessingResponse(request_trailers=pb.TrailersResponse()))
        return out

    # -- the response --------------------------------------------------------------------------

    def _response_headers(self, message: Any, metadata: Mapping[str, Any]) -> list[Any]:
        headers = _headers(message.response_headers.headers)
        self.status = _status(headers.get(":status"))
        lb = metadata.get(LB_NAMESPACE)
        served = lb.get(SERVED_KEY) if isinstance(lb, dict) else None
        if not isinstance(served, str) or not served:
            served = headers.get(SERVED_KEY) or _attribute(message, UPSTREAM_ADDRESS)
        self.served = self._endpoint_at(served)
        details = _attribute(message, CODE_DETAILS) or ""
        if self.decision is not None and "connection_failure" in details:
            # Envoy could not connect to the picked engine (the answer is its local reply):
            # unhealthy until a health check passes, as the gateway's own connection failures
            self.owner.pool.mark_failed(self.served or self.decision.endpoint)
        if headers.get("content-type", "").startswith("text/event-stream"):
            self.sse = SseRelay(keep_usage=not self.strip_usage)
        out = [pb.ProcessingResponse(response_headers=pb.HeadersResponse())]
        if message.response_headers.end_of_stream or self.response_mode == _MODE.NONE:
            self._complete(ok=200 <= self.status < 300)
        return out

    def _endpoint_at(self, served: str | None) -> EndpointId | None:
        """The pool endpoint at address `served` (the first of a list), None if unknown."""
        if not served:
            return None
        address = served.split(",", 1)[0].strip()
        for state in self.owner.pool.states():
            if state.address == address:
                return state.id
        return None

    def _response_body(self, body: Any) -> list[Any]:
        chunk: bytes = body.body
        eos: bool = body.end_of_stream
        out = chunk
        now = self.owner.clock()
        if self.sse is not None:
            fed = self.sse.feed(chunk, now)
            if self.strip_usage:
                out = fed + (self.sse.flush(now) if eos else b"")
        elif not self.answer_overflow:
            if len(self.answer) + len(chunk) <= self.owner.settings.max_body_bytes:
                self.answer += chunk
            else:
                self.answer_overflow = True
                self.answer = bytearray()
        self.response_bytes += len(out)
        if self.response_mode in _BUFFERED_MODES:
            common = pb.CommonResponse()
            if out != chunk:
                common.body_mutation.CopyFrom(pb.BodyMutation(body=out))
            responses = [pb.ProcessingResponse(response_body=pb.BodyResponse(response=common))]
        elif self.response_mode not in (_DUPLEX, None):  # STREAMED: answer each chunk as is
            responses = [pb.ProcessingResponse(response_body=pb.BodyResponse())]
        elif out or eos:
            responses = _streamed("response_body", out, end_of_stream=eos)
        else:
            responses = []  # a partial SSE event, held until it completes
        if eos:
            self._complete(ok=self._answered_ok())
        return responses

    def _response_trailers(self) -> list[Any]:
        out: list[Any] = []
        if self.sse is not None and self.strip_usage:
            tail = self.sse.flush(self.owner.clock())
            if tail:
                out += _streamed("response_body", tail, end_of_stream=False)
        self._complete(ok=self._answered_ok())
        out.append(pb.ProcessingResponse(response_trailers=pb.TrailersResponse()))
        return out

    def _answered_ok(self) -> bool:
        """A 2xx answer that ended as its protocol says: an SSE stream needs its `[DONE]`
        and no error event inside (as the gateway judges a stream)."""
        if not 200 <= self.status < 300:
            return False
        return self.sse is None or (self.sse.done and not self.sse.failed)

    # -- settling ---------------------------------------------------------------------------

    def _complete(self, *, ok: bool) -> None:
        """The response is over: settle the decision and end the metrics (each once)."""
        decision = self.decision
        if decision is None or self.settled:
            return
        self.settled = True
        now = self.owner.clock()
        ttft = None
        raw_usage: object = None
        if self.sse is not None:
            raw_usage = self.sse.usage
            if self.sse.first_token_at is not None:
                ttft = self.sse.first_token_at - self.started
        elif ok and self.answer:
            with contextlib.suppress(ValueError, RecursionError):
                parsed = json.loads(bytes(self.answer))
                raw_usage = parsed.get("usage") if isinstance(parsed, dict) else None
        self.answer = bytearray()
        usage = openai_usage(raw_usage, ok=ok, ttft_s=ttft, e2e_s=now - self.started)
        served = self.served if self.served is not None else decision.endpoint
        self.owner.settle(decision, usage, self.served)
        code = None if ok else ("upstream-status" if self.status else "client-disconnect")
        self.ex.end(
            self.status or CLIENT_CLOSED,
            now=now,
            code=code,
            endpoint=served,
            ttft_s=ttft,
            usage=usage,
            response_bytes=self.response_bytes,
        )

    def finish(self) -> None:
        """The stream is over however it ended: settle (ok=False) and count what is open."""
        if self.decision is not None:
            self._complete(ok=False)
        elif not self.ex.ended and self.ex.begun:
            self.ex.end(CLIENT_CLOSED, now=self.owner.clock(), code="client-disconnect")


# -- the server --------------------------------------------------------------------------------


class ExtProcServer:
    """The gRPC server (ext_proc + health) and the metrics HTTP server around an `ExtProcessor`.

    `start()` binds both (gRPC port 0: an ephemeral port, which `port` then
    holds), `stop()` drains: health says
    NOT_SERVING, no new streams are accepted and open ones get up to
    `drain_timeout_s` to finish.
    """

    def __init__(
        self,
        config: ExtProcConfig,
        *,
        router: Router | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.processor = ExtProcessor(config, router=router, registry=registry)
        self.health = health_aio.HealthServicer()
        self.port = config.extproc.port
        self._grpc: Any = None
        self._http: web.AppRunner | None = None

    async def start(self) -> None:
        settings = self.config.extproc
        await self.processor.start()
        limit = settings.max_body_bytes + 1024 * 1024  # a BUFFERED body arrives in one message
        server = grpc.aio.server(options=_grpc_options(limit))
        pb_grpc.add_ExternalProcessorServicer_to_server(self.processor, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.port = server.add_insecure_port(f"{_host(settings.host)}:{settings.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {settings.host}:{settings.port}")
        for service in HEALTH_SERVICES:
            await self.health.set(service, _SERVING)
        await server.start()
        self._grpc = server
        if settings.metrics_port:
            self._http = web.AppRunner(self._metrics_app(), access_log=None)
            await self._http.setup()
            await web.TCPSite(self._http, settings.host, settings.metrics_port).start()

    async def stop(self, grace: float | None = None) -> None:
        """Drain for up to `grace` seconds (default `drain_timeout_s`), then stop everything."""
        self.processor.draining = True
        await self.health.enter_graceful_shutdown()
        # answer deferred requests now (503 draining), while their streams are still open
        await self.processor.deferrals.stop("the endpoint picker is shutting down")
        if self._grpc is not None:
            await self._grpc.stop(self.config.extproc.drain_timeout_s if grace is None else grace)
            self._grpc = None
        await self.processor.stop()
        if self._http is not None:
            await self._http.cleanup()
            self._http = None

    def _metrics_app(self) -> web.Application:
        processor = self.processor

        async def metrics(_request: web.Request) -> web.Response:
            body, content_type = processor.metrics.render()
            return web.Response(body=body, headers={"content-type": content_type})

        async def health(_request: web.Request) -> web.Response:
            status, body = processor.health()
            return web.json_response(body, status=status)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/health", health)
        return app


def _grpc_options(limit: int) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments: message sizes up to `limit` bytes, no BDP probes.

    gRPC's bandwidth-delay-product estimator answers received data with a
    PING to size its flow-control window; between Envoy and its picker
    (loopback or one cluster hop, many small messages) that is a frame and a
    wake-up of the gRPC thread per burst for nothing (docs/performance.md,
    "ext_proc picker", measures it).
    """
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.http2.bdp_probe", 0),
    ]


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def _run(config: ExtProcConfig) -> None:
    server = ExtProcServer(config)
    await server.start()
    # Everything alive now (modules, config, router, the pool's first scrape) lives as long
    # as the process: out of the collector's generations, so its full collections no longer
    # walk it on the request path (docs/performance.md, "GC pauses").
    gc.collect()
    gc.freeze()
    settings = config.extproc
    log.info(
        "prefixroute extproc: gRPC on %s:%d, metrics on %s",
        settings.host,
        server.port,
        f"{settings.host}:{settings.metrics_port}" if settings.metrics_port else "(off)",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("draining for up to %g s", settings.drain_timeout_s)
    finally:
        await server.stop()


def serve(config: ExtProcConfig) -> None:
    """Run the ext_proc server until SIGTERM/SIGINT, then drain for up to `drain_timeout_s`.

    On a uvloop event loop when uvloop is installed (as uvicorn runs the
    gateway): less CPU per gRPC message for the loop's own work.
    """
    try:
        import uvloop
    except ImportError:
        asyncio.run(_run(config))
    else:
        uvloop.run(_run(config))


# -- command line ------------------------------------------------------------------------------


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    """`prefixroute extproc` arguments."""
    parser.add_argument("--config", required=True, metavar="FILE", help="config file (YAML)")
    parser.add_argument("--host", help="listen address (overrides extproc.host)")
    parser.add_argument("--port", type=int, help="gRPC port (overrides extproc.port)")
    parser.add_argument(
        "--metrics-port", type=int, help="HTTP /metrics port, 0 for none (overrides extproc)"
    )
    log_level_argument(parser)


def cli_main(args: argparse.Namespace) -> int:
    """Run `prefixroute extproc`; 2 with a one-line message for a bad config."""
    try:
        config = ExtProcConfig.from_file(args.config)
        overrides: dict[str, Any] = {}
        for name in ("host", "port", "metrics_port"):
            if getattr(args, name, None) is not None:
                overrides[name] = getattr(args, name)
        if overrides:
            try:
                settings = evolve(config.extproc, overrides, "", error=ConfigError)
            except ConfigError as exc:
                flag = "--" + exc.path.replace("_", "-") if exc.path else "command line"
                raise ConfigError(flag, exc.message) from exc
            config = attrs.evolve(config, extproc=settings)
    except (ConfigError, OSError) as exc:
        print(f"prefixroute extproc: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        serve(config)
    except (OSError, RuntimeError) as exc:  # e.g. the port is taken (grpc: RuntimeError)
        print(f"prefixroute extproc: {exc}", file=sys.stderr)
        return 2
    return 0


def _main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="prefixroute extproc", description=__doc__.splitlines()[0]
    )
    cli_arguments(parser)
    return cli_main(parser.parse_args(None if argv is None else list(argv)))


if __name__ == "__main__":
    sys.exit(_main())
