"""The gateway's ASGI app: the `Gateway`'s request handlers, routing with the core `Router`.

One asyncio event loop (uvicorn) owns everything: the `Router` (called
synchronously, never from another thread), the `EndpointPool` (scraping and
health checks), one shared `aiohttp.ClientSession` for forwarding, and the
`GatewayMetrics` exporter. Per completion request:

1. read the body (at most `body_limit_bytes`: 413), decode JSON (400), resolve
   identity (400/401, `prefixroute.drivers.identity`), parse it with
   `prefixroute.openai.parse_openai` (400/413 naming the field), all in a
   worker thread for a large body (`RoutingService.read_request`); 404
   `model_not_found` for a model no endpoint serves;
2. with `hashing.isolate_tenants`, replace `cache_salt` with a salt keyed by
   the hashing seed over the tenant (or its group) and the client's salt, in
   both the routed `Request` and the forwarded body, so tenants never share
   the engines' prefix caches either;
3. `Router.route`: a `Rejection` is answered at once (429 with
   `Retry-After`, 503), a `Deferral` waits for `Router.release` (called after
   every completion and every `release_interval_s`), a `Decision` is forwarded;
4. forward to the chosen endpoint, falling back through `Decision.fallbacks`
   on connection failures and on 5xx answers that arrive before any body
   byte; stream SSE through event by event (asking the engine for
   `stream_options.include_usage` and hiding the usage-only chunk from a
   client that did not ask for it);
5. `Router.on_complete` exactly once per `Decision`, with the engine's usage
   (real cached tokens), also for failures and client disconnects (ok=False).

The configuration is the drivers' shared `DriverConfig`
(`prefixroute.drivers.settings`); the process around the app (uvicorn, signals,
the drain, the command line) is `prefixroute.drivers.gateway.server`. The
failure table, the config sections and the choices made where the issue was
silent are in docs/gateway.md. The upstream hop uses aiohttp's client,
not httpx: on this path it costs a third of httpx's CPU per request
(docs/performance.md), which is most of what a Python gateway adds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from prefixroute.decision import Decision, Deferral, Rejection
from prefixroute.drivers.errors import clip, error_body
from prefixroute.drivers.gateway.responses import error_response
from prefixroute.drivers.metrics import CLIENT_CLOSED, RequestRecord
from prefixroute.drivers.service import Refusal, RoutingService
from prefixroute.drivers.settings import DriverConfig
from prefixroute.drivers.sse import SseRelay, openai_usage
from prefixroute.endpoint import EndpointId
from prefixroute.request import Request, Usage
from prefixroute.router import Router

__all__ = [
    "DECISION_HEADER",
    "Gateway",
    "GatewayConfig",
    "create_app",
    "explain_header",
    "request_streams",
]

log = logging.getLogger(__name__)

DECISION_HEADER = "x-prefixroute-decision"

GatewayConfig = DriverConfig
"""The gateway reads the drivers' shared configuration as it is: the same class."""

# Hop-by-hop headers (RFC 9110 7.6.1) and those the gateway sets itself.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Not forwarded upstream: the engine's own credentials are not the client's, and
# the gateway parses SSE, so it asks for an uncompressed body.
_NOT_UPSTREAM = _HOP_BY_HOP | {"host", "content-length", "authorization", "accept-encoding"}
_NOT_DOWNSTREAM = _HOP_BY_HOP | {"content-length", "content-encoding", "date", "server"}

# -- one request ------------------------------------------------------------------------


class _Flight:
    """One `Decision` in flight: settled with the router exactly once."""

    __slots__ = ("decision", "gateway", "settled")

    def __init__(self, gateway: Gateway, decision: Decision) -> None:
        self.gateway = gateway
        self.decision = decision
        self.settled = False

    def settle(self, usage: Usage, served_by: EndpointId | None) -> None:
        if self.settled:
            return
        self.settled = True
        self.gateway.deferrals.complete(self.decision, usage, served_by)


class _Outcome:
    """How a relayed stream ended (for metrics): disconnected until told otherwise."""

    __slots__ = ("code", "ok", "sent", "status")

    def __init__(self) -> None:
        self.sent = 0
        self.ok = False
        self.status = CLIENT_CLOSED
        self.code: str | None = "client-disconnect"

    def ended(self, status: int, code: str | None) -> None:
        self.status = status
        self.code = code
        self.ok = code is None


class _RelayResponse(StreamingResponse):
    """A streaming response that stops when the client disconnects and runs `on_close`
    however it ends, even if the body never started (a client gone before the first
    byte), so the decision is always settled.

    Starlette's own `StreamingResponse` watches for the disconnect with an anyio task
    group, which costs about as much CPU per response as the rest of the relay; two
    plain asyncio tasks do the same job.
    """

    def __init__(
        self,
        content: AsyncIterator[bytes],
        on_close: Callable[[], Awaitable[None]],
        **kwargs: Any,
    ) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        watch.add_done_callback(_retrieve)
        try:
            await asyncio.wait((stream, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not stream.done():  # the client left (or we are cancelled): stop relaying
                stream.cancel()
            try:
                await asyncio.wait((stream,))
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
            await self._on_close()
        exc = None if stream.cancelled() else stream.exception()
        if exc is not None and not isinstance(exc, OSError):  # OSError: the client went away
            raise exc


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a background task's outcome as seen (no "exception never retrieved" noise)."""
    if not task.cancelled():
        task.exception()


async def _wait_disconnect(receive: Receive) -> None:
    """Returns when the ASGI server reports the client gone."""
    while (await receive())["type"] != "http.disconnect":
        pass


# -- the gateway ----------------------------------------------------------------------------


class Gateway(RoutingService):
    """The gateway's state and request handlers (see the module docstring).

    `router` defaults to one built from the config; `registry` is the
    Prometheus `CollectorRegistry` the metrics live in (a fresh one by
    default, so several gateways in one process do not collide). `clock` is
    the monotonic clock every `now` passed to the router comes from.
    `start()`/`stop()` run the pool, the HTTP client and the release ticker.
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        router: Router | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(config, router=router, registry=registry, clock=clock)
        self.config = config
        self._client: aiohttp.ClientSession | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the forwarding client, start the pool and the release ticker."""
        server = self.config.server
        # no connection cap (admission is the router's job); never ask for compression:
        # the gateway parses the SSE it relays
        self._client = aiohttp.ClientSession(
            # idle upstream connections closed before uvicorn's (vLLM's) 5 s keep-alive
            # would close them under a request in flight
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0),
            skip_auto_headers=("Accept-Encoding",),
            auto_decompress=False,
        )
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=server.upstream_connect_timeout_s,
            sock_read=server.upstream_timeout_s,
        )
        await self.start_service(server.release_interval_s)

    async def stop(self) -> None:
        """Stop the ticker and the pool; answer any request still deferred with 503."""
        await self.stop_service("the gateway is shutting down")
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- deferral -------------------------------------------------------------------------

    async def _wait(
        self, http: HttpRequest, request: Request, deferral: Deferral
    ) -> Decision | Rejection | None:
        """Wait for the deferred `request` to be released; None if the client went away."""
        released = asyncio.ensure_future(self.deferrals.wait(request, deferral))
        disconnect = asyncio.ensure_future(_disconnected(http))
        try:
            await asyncio.wait((released, disconnect), return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
        if released.done():
            return released.result()
        released.cancel()  # if it is released later, Deferrals.release settles it as failed
        return None

    # -- handlers -------------------------------------------------------------------------

    async def completions(self, http: HttpRequest) -> Response:
        """POST /v1/chat/completions and /v1/completions."""
        ex = RequestRecord(self.metrics, self.clock())
        try:
            return await self._complete(http, ex)
        except ClientDisconnect:
            ex.end(CLIENT_CLOSED, now=self.clock(), code="client-disconnect")
            return Response(status_code=CLIENT_CLOSED)
        except Exception:
            log.exception("request failed inside the gateway")
            return self._fail(ex, 500, "internal gateway error", code="internal")

    def _fail(
        self,
        ex: RequestRecord,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        retry_after_s: float | None = None,
        endpoint: str | None = None,
    ) -> Response:
        response = error_response(
            status, message, code=code, param=param, retry_after_s=retry_after_s
        )
        ex.end(
            status,
            now=self.clock(),
            code=code,
            endpoint=endpoint,
            response_bytes=len(response.body),
        )
        return response

    async def _complete(self, http: HttpRequest, ex: RequestRecord) -> Response:
        server = self.config.server
        if self.draining:
            return self._fail(
                ex, 503, "the gateway is shutting down", code="draining", retry_after_s=1.0
            )
        body = await _read_body(http, server.body_limit_bytes)
        if body is None:
            refused = self._fail(
                ex,
                413,
                f"the request body is larger than {server.body_limit_bytes} bytes",
                code="body-too-large",
            )
            # the rest of the body is unread: close rather than read it to keep the connection
            refused.headers["connection"] = "close"
            return refused
        ex.request_bytes = len(body)
        try:
            prepared = await self.read_request(body, http.headers, ex, may_ask_usage=True)
        except Refusal as refusal:
            return self._fail(
                ex, refusal.status, refusal.message, code=refusal.code, param=refusal.param
            )
        request, payload = prepared.request, prepared.payload
        client_usage = not prepared.usage_asked

        ex.begin()
        outcome = await self.decide(request, self.pool.states(), prepared.keys)
        if isinstance(outcome, Deferral):
            released = await self._wait(http, request, outcome)
            if released is None:
                ex.end(CLIENT_CLOSED, now=self.clock(), code="client-disconnect")
                return Response(status_code=CLIENT_CLOSED)
            outcome = released
        if isinstance(outcome, Rejection):
            return self._fail(
                ex,
                outcome.status,
                outcome.reason,
                code=outcome.kind,
                retry_after_s=outcome.retry_after_s,
            )
        return await self._forward(http, ex, outcome, payload, client_usage)

    async def _forward(
        self,
        http: HttpRequest,
        ex: RequestRecord,
        decision: Decision,
        payload: bytes,
        client_usage: bool,
    ) -> Response:
        """Send to the decision's endpoint, then its fallbacks; settle the decision once.

        Until the answer is handed to the client (its first byte, or the whole
        non-streamed answer), a client that disconnects cancels the wait: the
        upstream request is closed (the engine aborts it) and the handler ends
        with `ClientDisconnect`. One watcher task per request.
        """
        assert self._client is not None, "the gateway is not started"
        client = self._client
        flight = _Flight(self, decision)
        handed_off = False
        response: aiohttp.ClientResponse | None = None
        handler = asyncio.current_task()
        armed = True

        def client_gone(task: asyncio.Future[None]) -> None:
            if armed and handler is not None and not task.cancelled() and not task.exception():
                handler.cancel("client disconnected")

        gone = asyncio.ensure_future(_disconnected(http))
        gone.add_done_callback(client_gone)
        try:
            # hop-by-hop: the fixed set, and whatever the client's Connection header names
            named = {t.strip().lower() for t in http.headers.get("connection", "").split(",")}
            headers = {
                k: v
                for k, v in http.headers.items()
                if k.lower() not in _NOT_UPSTREAM and k.lower() not in named
            }
            headers["content-type"] = "application/json"  # validated above, whatever was sent
            reached = False  # some endpoint answered, then failed (5xx or a dropped body)
            for endpoint in (decision.endpoint, *decision.fallbacks):
                address = self.pool.address(endpoint)
                if address is None:
                    continue  # removed from the pool since the decision
                url = f"http://{address}{http.url.path}"
                try:
                    response = await client.post(
                        url, data=payload, headers=headers, timeout=self._timeout
                    )
                except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                    self.pool.mark_failed(endpoint)
                    self._retry(endpoint, "connect", exc)
                    continue
                except TimeoutError:  # silent past upstream_timeout_s before the headers
                    return self._timed_out(ex, flight, endpoint)
                except aiohttp.ClientError as exc:  # dropped before the headers
                    self._retry(endpoint, "disconnect", exc)
                    continue
                if response.status >= 500:
                    response.close()
                    reached = True
                    self._retry(endpoint, "status-5xx", response.status)
                    continue
                streaming = request_streams(decision, response)
                chunks = response.content.iter_any()
                try:
                    first = await anext(chunks, b"") if streaming else await response.read()
                except TimeoutError:
                    response.close()
                    return self._timed_out(ex, flight, endpoint)
                except aiohttp.ClientError as exc:
                    response.close()
                    reached = True
                    self._retry(endpoint, "disconnect", exc)
                    continue
                if not streaming:
                    response.release()
                    return self._answer(ex, flight, endpoint, response, first)
                handed_off = True
                return self._relay(ex, flight, endpoint, response, chunks, first, client_usage)
            if reached:
                return self._fail(
                    ex,
                    502,
                    "every endpoint tried failed: a server error or a dropped response",
                    code="upstream-error",
                )
            return self._fail(
                ex,
                503,
                "no endpoint could be reached",
                code="upstream-unavailable",
                retry_after_s=1.0,
            )
        except asyncio.CancelledError:
            if handler is not None and gone.done() and not gone.cancelled():
                handler.uncancel()  # our own cancel: the client left, not a shutdown
                raise ClientDisconnect() from None
            raise
        finally:
            armed = False
            gone.cancel()
            if not handed_off:
                if response is not None:
                    response.close()  # a no-op after release()
                flight.settle(Usage(ok=False), None)

    def _retry(self, endpoint: EndpointId, reason: str, detail: object) -> None:
        log.info("endpoint %s failed (%s: %r): trying the next", endpoint, reason, detail)
        self.metrics.observe_retry(endpoint, reason)

    def _timed_out(self, ex: RequestRecord, flight: _Flight, endpoint: EndpointId) -> Response:
        flight.settle(Usage(ok=False, e2e_s=self.clock() - ex.started), endpoint)
        return self._fail(
            ex,
            504,
            f"the endpoint sent nothing for {self.config.server.upstream_timeout_s:g} s",
            code="upstream-timeout",
            endpoint=endpoint,
        )

    def _headers(
        self, upstream: CIMultiDictProxy[str], decision: Decision, served_by: EndpointId
    ) -> dict[str, str]:
        out = {k: v for k, v in upstream.items() if k.lower() not in _NOT_DOWNSTREAM}
        if self.config.server.explain_header:
            out[DECISION_HEADER] = explain_header(decision, served_by)
        return out

    def _answer(
        self,
        ex: RequestRecord,
        flight: _Flight,
        endpoint: EndpointId,
        response: aiohttp.ClientResponse,
        content: bytes,
    ) -> Response:
        """A whole (non-streaming) upstream answer, passed through unchanged."""
        now = self.clock()
        ok = 200 <= response.status < 300
        raw_usage = None
        if ok:
            with contextlib.suppress(ValueError):
                parsed = json.loads(content)
                raw_usage = parsed.get("usage") if isinstance(parsed, dict) else None
        usage = openai_usage(raw_usage, ok=ok, ttft_s=None, e2e_s=now - ex.started)
        flight.settle(usage, endpoint)
        ex.end(
            response.status,
            now=now,
            code=None if ok else "upstream-status",
            endpoint=endpoint,
            usage=usage if ok else None,
            response_bytes=len(content),
        )
        return Response(
            content,
            status_code=response.status,
            headers=self._headers(response.headers, flight.decision, endpoint),
        )

    def _relay(
        self,
        ex: RequestRecord,
        flight: _Flight,
        endpoint: EndpointId,
        response: aiohttp.ClientResponse,
        chunks: AsyncIterator[bytes],
        first: bytes,
        client_usage: bool,
    ) -> Response:
        """Stream the SSE answer through; settle when it ends, however it ends."""
        sse = SseRelay(keep_usage=client_usage)
        # how it ended, for metrics; stays "client-disconnect" if the body is cut short
        outcome = _Outcome()

        def finish() -> None:
            now = self.clock()
            ttft = None if sse.first_token_at is None else sse.first_token_at - ex.started
            usage = openai_usage(sse.usage, ok=outcome.ok, ttft_s=ttft, e2e_s=now - ex.started)
            flight.settle(usage, endpoint)
            ex.end(
                outcome.status,
                now=now,
                code=outcome.code,
                endpoint=endpoint,
                ttft_s=ttft,
                usage=usage,
                response_bytes=outcome.sent,
            )

        async def body() -> AsyncIterator[bytes]:
            try:
                data = first
                while True:
                    out = sse.feed(data, self.clock()) if data else b""
                    if out:
                        outcome.sent += len(out)
                        yield out
                    try:
                        data = await anext(chunks)
                    except StopAsyncIteration:
                        break
                tail = sse.flush(self.clock())
                if tail:
                    yield tail
                if sse.failed:  # the engine's error event reached the client as it was
                    outcome.ended(response.status, "upstream-error")
                elif not sse.done:  # closed without `[DONE]`: the answer is cut short
                    outcome.ended(response.status, "upstream-error")
                    message = "the upstream stream ended without [DONE]"
                    error = error_body(502, message, code="upstream-error")
                    yield b"data: " + json.dumps(error).encode() + b"\n\n"
                else:
                    outcome.ended(response.status, None)
            except (aiohttp.ClientError, TimeoutError) as exc:
                timeout = isinstance(exc, TimeoutError)
                code = "upstream-timeout" if timeout else "upstream-error"
                outcome.ended(response.status, code)
                message = f"the upstream stream broke off: {type(exc).__name__}"
                error = error_body(504 if timeout else 502, message, code=code)
                yield b"data: " + json.dumps(error).encode() + b"\n\n"
            finally:
                finish()
                response.close()  # synchronous: a cancelled task cannot be stopped half-way

        async def on_close() -> None:
            finish()  # a no-op when the body ran; settles a body that never started
            response.close()

        return _RelayResponse(
            body(),
            on_close,
            status_code=response.status,
            headers=self._headers(response.headers, flight.decision, endpoint),
        )

    async def models(self, http: HttpRequest) -> Response:
        """GET /v1/models: the configured models, else a healthy endpoint's list."""
        states = self.pool.states()
        names = sorted({m for s in states for m in s.models})
        if names:
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": "prefixroute"} for m in names
            ]
            return JSONResponse({"object": "list", "data": data})
        assert self._client is not None
        for state in states:
            if not state.healthy:
                continue
            try:
                async with self._client.get(
                    f"http://{state.address}/v1/models", timeout=self._timeout
                ) as answer:
                    if answer.status != 200:
                        continue
                    content = await answer.read()
            except (aiohttp.ClientError, TimeoutError):
                continue
            return Response(content, headers={"content-type": "application/json"})
        return error_response(
            503, "no healthy endpoint to list models", code="no-endpoint", retry_after_s=1.0
        )

    async def health(self, http: HttpRequest) -> Response:
        """GET /health: 200 with at least one healthy endpoint, 503 otherwise or while draining."""
        status, body = self.health_report()
        return JSONResponse(body, status_code=status)

    async def prometheus(self, http: HttpRequest) -> Response:
        """GET /metrics: the Prometheus exposition."""
        body, content_type = self.metrics.render()
        return Response(body, headers={"content-type": content_type})


def request_streams(decision: Decision, response: aiohttp.ClientResponse) -> bool:
    """Whether to relay `response` as a stream: the client asked and the engine streams SSE."""
    return (
        decision.request.stream
        and 200 <= response.status < 300
        and response.headers.get("content-type", "").startswith("text/event-stream")
    )


def explain_header(decision: Decision, served_by: EndpointId) -> str:
    """The `x-prefixroute-decision` value: the choice, the match, the fallbacks (ASCII).

    Then, when known, the latency model's predicted TTFT and TPOT on the
    chosen endpoint and the objectives the request was held to, in
    milliseconds (issue 16).
    """
    parts = [
        f"endpoint={decision.endpoint}",
        f"served_by={served_by}",
        f"matched_blocks={decision.matched_blocks}",
        f"total_blocks={decision.total_blocks}",
        f"predicted_cached_tokens={decision.predicted_cached_tokens}",
        f"fallbacks={','.join(decision.fallbacks)}",
    ]
    objectives = decision.objectives
    for name, seconds in (
        ("predicted_ttft_ms", decision.predicted_ttft_s),
        ("predicted_tpot_ms", decision.predicted_tpot_s),
        ("slo_ttft_ms", objectives.ttft_s),
        ("slo_tpot_ms", objectives.tpot_s),
    ):
        if seconds is not None:
            parts.append(f"{name}={seconds * 1000:.4g}")
    return "; ".join(parts).encode("ascii", "replace").decode("ascii")


async def _read_body(http: HttpRequest, limit: int) -> bytes | None:
    """The body, or None when it is over `limit` (read no further than needed to know)."""
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    data = bytearray()
    async for chunk in http.stream():
        data += chunk
        if len(data) > limit:
            return None
    return bytes(data)


async def _disconnected(http: HttpRequest) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


# -- the app -------------------------------------------------------------------------------


def create_app(
    config: GatewayConfig,
    *,
    router: Router | None = None,
    registry: CollectorRegistry | None = None,
) -> Starlette:
    """The gateway as a Starlette ASGI app; `app.state.gateway` is its `Gateway`.

    The app's lifespan starts and stops the pool, the client and the
    release ticker. `registry` is the Prometheus registry for its metrics.
    """
    gateway = Gateway(config, router=router, registry=registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    async def http_error(http: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        codes = {404: "not-found", 405: "method-not-allowed"}  # as the picker and Envoy say
        return error_response(
            exc.status_code,
            f"{message}: {http.method} {clip(http.url.path)}",
            code=codes.get(exc.status_code),
            headers=exc.headers,
        )

    async def server_error(http: HttpRequest, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        return error_response(500, "internal gateway error", code="internal")

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", gateway.completions, methods=["POST"]),
            Route("/v1/completions", gateway.completions, methods=["POST"]),
            Route("/v1/models", gateway.models, methods=["GET"]),
            Route("/health", gateway.health, methods=["GET"]),
            Route("/metrics", gateway.prometheus, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    # Starlette answers `/v1/chat/completions/` with a 307 to the slashless URL built
    # from the client's Host header (an open redirect): such a path is a 404 instead.
    app.router.redirect_slashes = False
    app.state.gateway = gateway
    return app
