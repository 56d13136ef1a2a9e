"""The gateway's HTTP/1.1 connection: uvicorn's httptools protocol with the limits it lacks.

uvicorn (0.2x-0.5x) with httptools bounds neither the size of a request
head nor its number of header fields, reads a head or a body for as long as
the client cares to dribble it, and holds every connection it accepts; its
`limit_concurrency` answers 503 only once a whole head has arrived, and its
`h11_max_incomplete_event_size` applies to the h11 parser only. A hostile
client could therefore hold thousands of sockets with partial heads, or make
the gateway buffer (and forward to an engine) a 64 MB header.
`GatewayProtocol` adds, per connection, what Envoy and nginx have
(Envoy's `max_request_headers_kb` 60 and `max_headers_count` 100; nginx's
`client_header_timeout` and `client_body_timeout` 60 s), configured by the
`server` section (`prefixroute.drivers.settings.ServerConfig`):

- head size (`head_limit_bytes`) and header count (`max_headers`): 431;
- head read time (`head_timeout_s`, from the connection or the first byte
  of a request to the end of its head): 408;
- body idle time (`body_timeout_s`, between two body reads, as nginx's
  `client_body_timeout`): 408, and the handler sees a client disconnect;
- open connections (`max_connections`): a connection past the cap is
  answered 503 with `Retry-After` at once and closed, as Envoy's listener
  connection limit closes it (the answer tells an HTTP client to back off).

Each refusal is an OpenAI-style JSON error with `connection: close`,
written straight to the socket before the app sees the request, so a refused
head never reaches an engine. The connection is then closed the way nginx's
lingering close does it: the write side is shut, whatever the client still
sends is read and dropped (without parsing) until it closes or for at most
`LINGER_S`, so the client reads the answer instead of a reset.

Head size is counted twice, because httptools buffers a header field
internally until it is complete: the parser's callbacks count the request
target and each field (name, value and 4 bytes of separators), which is
exact for what completes inside one read; and every read that ends still
inside a head is counted whole, which catches a field that never ends. A
head can so overshoot the limit by at most one read of the event loop
(256 KiB) before it is refused. Costs: O(1) per read and per header field,
one timer per connection while a head or a body is being read.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from prefixroute.drivers.errors import error_body
from prefixroute.drivers.settings import ServerConfig

__all__ = ["LINGER_S", "GatewayProtocol", "protocol_class"]

LINGER_S = 2.0
"""How long a refused connection is kept to drain the client's bytes before it is closed."""

_SEPARATORS = 4  # ": " and CRLF around each header field


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing a head that broke a limit."""


class GatewayProtocol(HttpToolsProtocol):
    """uvicorn's httptools connection with head, body and connection limits (module docstring).

    `limits` is the `ServerConfig` the limits come from; `protocol_class`
    makes a subclass carrying one (uvicorn instantiates the class itself).
    """

    limits: ClassVar[ServerConfig] = ServerConfig()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # from the connect or a request's first byte to the end of its head
        self._reading_head = True
        self._head_bytes = 0  # counted by the parser's callbacks
        self._head_reads = 0  # reads that ended inside this head, in bytes
        self._header_count = 0
        self._messages = 0  # requests begun on this connection
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_seen = 0.0  # loop time of the last body read
        self._refusal: tuple[int, str, str] | None = None  # set where a callback refuses
        # answered and lingering: what still comes is dropped (uvicorn's `eof_received`
        # closes the connection when the client closes its side)
        self._refused = False
        self._linger: asyncio.TimerHandle | None = None

    # -- connection --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(
                503,
                f"the gateway holds its maximum of {self.limits.max_connections} connections",
                "too-many-connections",
                retry_after=True,
            )
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: the answer is sent, the rest is dropped unparsed
        in_head, message = self._reading_head, self._messages
        super().data_received(data)
        if self._refused or not (in_head and self._reading_head and message == self._messages):
            return
        self._head_reads += len(data)  # the whole read belongs to one unfinished head
        if self._head_reads > self.limits.head_limit_bytes:
            self._refuse(*self._too_large())

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parse error, also reached by a callback's refusal."""
        refusal = self._refusal or (400, msg, "invalid-http")
        self._refuse(*refusal)

    # -- parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._messages += 1
        self._reading_head = True
        self._head_bytes = 0
        self._head_reads = 0
        self._header_count = 0
        if self._head_timer is None:
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._refusal = (
                431,
                f"the request has more than {self.limits.max_headers} header fields",
                "too-many-headers",
            )
            raise _Refused()
        self._count_head(len(name) + len(value) + _SEPARATORS)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()
        self._body_seen = self.loop.time()
        self._arm_body_timer(self.limits.body_timeout_s)

    def on_body(self, body: bytes) -> None:
        self._body_seen = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    # -- limits -----------------------------------------------------------------------------

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.limits.head_limit_bytes:
            self._refusal = self._too_large()
            raise _Refused()

    def _too_large(self) -> tuple[int, str, str]:
        return (
            431,
            f"the request head is larger than {self.limits.head_limit_bytes} bytes",
            "head-too-large",
        )

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._head_timed_out)

    def _arm_body_timer(self, delay: float) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_timer = self.loop.call_later(delay, self._body_idle)

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._refused or self.transport.is_closing():
            return
        message = f"the request head did not arrive within {self.limits.head_timeout_s:g} s"
        if self.cycle is not None and not self.cycle.response_complete:
            # a pipelined head is late while a response is under way: close after it
            self.cycle.keep_alive = False
            return
        self._refuse(408, message, "head-timeout")

    def _body_idle(self) -> None:
        """Fires `body_timeout_s` after the last body read, unless that read was recent."""
        self._body_timer = None
        cycle = self.cycle
        if self._refused or cycle is None or self.transport.is_closing():
            return
        if cycle.response_complete:  # answered already (a 413, say): stop the dribble
            self.transport.close()
            return
        if cycle.response_started:
            return  # the app is answering; uvicorn closes the connection after it if need be
        idle = self.loop.time() - self._body_seen
        if self.flow.read_paused or idle < self.limits.body_timeout_s:
            # the app has not read what came (not the client's fault), or a read came since
            self._arm_body_timer(max(self.limits.body_timeout_s - idle, 0.01))
            return
        message = f"the request body stalled for {self.limits.body_timeout_s:g} s"
        self._refuse(408, message, "body-timeout")

    def _refuse(self, status: int, message: str, code: str, *, retry_after: bool = False) -> None:
        """Answer `status` with an OpenAI error, end the request, linger, then close."""
        self._refused = True
        self._cancel_timers()
        if self.cycle is not None and not self.cycle.response_complete:
            # the handler (if it runs) sees the client gone and its answer is dropped
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        body = json.dumps(error_body(status, message, code=code)).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n",
        ]
        if retry_after:
            head.append(b"retry-after: 1\r\n")
        head += [b"\r\n", body]
        self.transport.write(b"".join(head))
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._linger = self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


# uvicorn internals the limits hook into; a uvicorn without them would serve with no limits.
_HOOKS = ("data_received", "send_400_response", "on_message_begin", "on_url", "on_header")


def protocol_class(server: ServerConfig) -> type[GatewayProtocol]:
    """A `GatewayProtocol` subclass enforcing `server`'s limits (uvicorn's `http=` class).

    RuntimeError when the installed uvicorn lacks a method the limits override
    (they rely on `HttpToolsProtocol` internals): never serve silently unguarded.
    """
    missing = [name for name in _HOOKS if not callable(getattr(HttpToolsProtocol, name, None))]
    if missing:
        raise RuntimeError(
            f"this uvicorn's HttpToolsProtocol lacks {', '.join(missing)}: the gateway's "
            "connection limits cannot be enforced; install a uvicorn the project supports"
        )
    return type("GatewayProtocol", (GatewayProtocol,), {"limits": server})
