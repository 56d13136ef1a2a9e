"""The gateway's client-side limits through the real server: slow and huge heads, slow
bodies, the connection cap, and no redirect built from the Host header (issue 12, items 4
and 6).

The gateway runs as `prefixroute serve` runs it (`server.uvicorn_config`, so with the
`GatewayProtocol` connection class) in a thread on 127.0.0.1, in front of a stub engine
that records what reaches it. Partial heads and bodies are written with raw sockets.
"""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from prefixroute.config import ConfigError
from prefixroute.devtools.fake_engine import FakeEngineConfig
from prefixroute.devtools.fake_engine import create_app as engine_app
from prefixroute.drivers.gateway import GatewayConfig, create_app
from prefixroute.drivers.gateway.server import _fit_file_limit, uvicorn_config
from tests.helpers import MODEL, pool
from tests.servers import free_port, serve_in_thread, wait_until

BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()


class Recorder:
    """A stub engine: healthy, scrapeable, answering completions, counting what reaches it."""

    def __init__(self) -> None:
        self.seen: list[int] = []  # per forwarded request: the size of its largest header
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.complete, methods=["POST"]),
                Route("/health", lambda r: Response()),
                Route("/metrics", lambda r: PlainTextResponse("vllm:num_requests_waiting 0\n")),
            ]
        )

    async def complete(self, request: Request) -> Response:
        self.seen.append(max(len(v) for v in request.headers.values()))
        return JSONResponse({"choices": [], "usage": {"prompt_tokens": 1}})


class Running:
    """A gateway served as `prefixroute serve` serves it, on 127.0.0.1."""

    def __init__(self, server: uvicorn.Server, port: int) -> None:
        self.server = server
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def connections(self) -> int:
        return len(self.server.server_state.connections)


@contextlib.contextmanager
def limited_gateway(upstream: str, **server: Any) -> Iterator[Running]:
    port = free_port()
    doc = {"endpoints": pool(upstream), "server": {"port": port, **server}}
    config = GatewayConfig.from_document(doc)
    uv = uvicorn.Server(uvicorn_config(create_app(config), config.server, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    wait_until(lambda: uv.started or not thread.is_alive(), message="gateway start")
    assert uv.started
    try:
        yield Running(uv, port)
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, str]]:
    stub = Recorder()
    with serve_in_thread(stub.app) as url:
        yield stub, url.removeprefix("http://")


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Read until the server closes (5 s socket timeout); status, headers, JSON body."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def request_head(*headers: bytes, length: int = len(BODY)) -> bytes:
    fields = b"".join(h + b"\r\n" for h in headers)
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n%s\r\n" % (length, fields)
    )


# -- slow heads and bodies ------------------------------------------------------------------


def test_a_partial_head_is_answered_408_and_closed(recorder: tuple[Recorder, str]) -> None:
    stub, upstream = recorder
    with limited_gateway(upstream, head_timeout_s=0.5) as gw:
        silent = connect(gw.port)  # connects and sends nothing
        partial = connect(gw.port)
        partial.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\nx-slow: ")
        started = time.monotonic()
        for sock in (silent, partial):
            with sock:
                status, headers, body = read_answer(sock)
                assert status == 408
                assert headers["connection"] == "close"
                assert body["error"]["code"] == "head-timeout"
        assert time.monotonic() - started < 4.0
        wait_until(lambda: gw.connections() == 0, message="partial heads closed")
        # a keep-alive connection's next head is timed too
        with connect(gw.port) as sock:
            sock.sendall(request_head() + BODY)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
            status, _, body = read_answer(sock)
            assert (status, body["error"]["code"]) == (408, "head-timeout")
    assert len(stub.seen) == 1


def test_a_stalled_body_is_answered_408(recorder: tuple[Recorder, str]) -> None:
    stub, upstream = recorder
    with limited_gateway(upstream, body_timeout_s=1.0) as gw, connect(gw.port) as sock:
        sock.sendall(request_head() + BODY[:10])  # the body stops a few bytes in
        started = time.monotonic()
        status, headers, body = read_answer(sock)
        assert (status, body["error"]["code"]) == (408, "body-timeout")
        assert headers["connection"] == "close"
        assert 0.9 < time.monotonic() - started < 5.0
        # a body that keeps coming, slower than the whole timeout but faster than its idle
        # gaps, is not cut
        with connect(gw.port) as slow:
            slow.sendall(request_head())
            for i in range(0, len(BODY), len(BODY) // 4 + 1):
                slow.sendall(BODY[i : i + len(BODY) // 4 + 1])
                time.sleep(0.2)
            assert slow.recv(65536).startswith(b"HTTP/1.1 200")
    assert len(stub.seen) == 1


# -- huge heads ------------------------------------------------------------------------------


def test_a_huge_header_is_refused_431_and_never_forwarded(recorder: tuple[Recorder, str]) -> None:
    stub, upstream = recorder
    with limited_gateway(upstream) as gw:
        # a header well under the limit passes and reaches the engine
        ok = httpx.post(
            f"{gw.url}/v1/chat/completions", content=BODY, headers={"x-pad": "p" * 8000}
        )
        assert ok.status_code == 200, ok.text
        assert stub.seen == [8000]
        refused = [
            (request_head(b"x-big: " + b"b" * (1 << 20)), 431, "head-too-large"),  # 1 MiB
            (request_head(*(b"x-h%d: v" % i for i in range(10_000))), 431, "too-many-headers"),
            (request_head(*(b"x-h%d: v" % i for i in range(101))), 431, "too-many-headers"),
            (b"NOT HTTP AT ALL\r\n\r\n", 400, "invalid-http"),
        ]
        for head, expected, code in refused:
            started = time.monotonic()
            with connect(gw.port) as sock:
                sock.sendall(head + BODY)
                status, headers, body = read_answer(sock)
            assert (status, body["error"]["code"]) == (expected, code)
            assert headers["connection"] == "close"
            assert time.monotonic() - started < 3.0
    assert stub.seen == [8000]  # none of them reached the engine


def test_a_header_that_never_ends_is_refused_before_the_head_timeout(
    recorder: tuple[Recorder, str],
) -> None:
    """httptools buffers an unfinished field itself: the reads are counted, not the fields."""
    stub, upstream = recorder
    with limited_gateway(upstream, head_limit_bytes=4096) as gw, connect(gw.port) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nx-endless: ")
        time.sleep(0.2)  # the request begins in a read of its own (the later reads count whole)
        for _ in range(20):  # 20 KiB in separate reads, never a line end
            sock.sendall(b"e" * 1024)
            time.sleep(0.02)
        started = time.monotonic()
        status, _, body = read_answer(sock)
        assert (status, body["error"]["code"]) == (431, "head-too-large")
        assert time.monotonic() - started < 3.0  # the head timeout is the default 30 s
    assert stub.seen == []


def test_pipelined_requests_are_not_mistaken_for_one_long_head(
    recorder: tuple[Recorder, str],
) -> None:
    """A read holding a body's tail and the next head's start counts toward no head."""
    stub, upstream = recorder
    big = BODY[:-1] + b" " * 100_000 + b"}"  # valid JSON, well over the head limit
    second = request_head()
    with limited_gateway(upstream, head_limit_bytes=4096) as gw, connect(gw.port) as sock:
        sock.sendall(request_head(length=len(big)) + big + second[:20])
        time.sleep(0.1)  # the second head stays unfinished across reads
        sock.sendall(second[20:] + BODY)
        data = b""
        while data.count(b"HTTP/1.1 ") < 2:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        assert data.count(b"HTTP/1.1 200") == 2, data
    assert len(stub.seen) == 2


# -- connections ------------------------------------------------------------------------------


def test_connections_past_the_cap_are_answered_503(recorder: tuple[Recorder, str]) -> None:
    _, upstream = recorder
    with limited_gateway(upstream, max_connections=3) as gw:
        held = [connect(gw.port) for _ in range(3)]
        wait_until(lambda: gw.connections() == 3, message="three connections held")
        with connect(gw.port) as extra:
            extra.sendall(b"GET /metrics HTTP/1.1\r\nhost: gateway\r\n\r\n")
            status, headers, body = read_answer(extra)
        assert (status, body["error"]["code"]) == (503, "too-many-connections")
        assert headers["retry-after"] == "1"
        for sock in held:
            sock.close()
        wait_until(lambda: gw.connections() == 0, message="connections released")
        assert httpx.get(f"{gw.url}/metrics").status_code == 200


def test_the_limits_are_validated_config_fields() -> None:
    config = GatewayConfig.from_document({})
    server = config.server
    assert (server.head_limit_bytes, server.max_headers) == (65536, 100)
    assert (server.head_timeout_s, server.body_timeout_s, server.max_connections) == (
        30.0,
        60.0,
        4096,
    )
    for key, value in [
        ("max_headers", 0),
        ("head_limit_bytes", 100),
        ("head_timeout_s", 0),
        ("body_timeout_s", -1),
        ("max_connections", "many"),
    ]:
        with pytest.raises(ConfigError, match=f"server.{key}"):
            GatewayConfig.from_document({"server": {key: value}})


# -- redirects --------------------------------------------------------------------------------


def test_a_trailing_slash_is_a_404_not_a_redirect_to_the_host_header(
    recorder: tuple[Recorder, str],
) -> None:
    stub, upstream = recorder
    with limited_gateway(upstream) as gw:
        for method, path in [("POST", "/v1/chat/completions/"), ("GET", "/health/")]:
            answer = httpx.request(
                method, f"{gw.url}{path}", content=BODY, headers={"host": "evil.example"}
            )
            assert answer.status_code == 404, answer.text
            assert "location" not in answer.headers
            assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
    assert stub.seen == []
    with serve_in_thread(engine_app(FakeEngineConfig(time_scale=0.0))) as engine:
        answer = httpx.post(
            f"{engine}/v1/chat/completions/", content=BODY, headers={"host": "evil.example"}
        )
        assert answer.status_code == 404
        assert "location" not in answer.headers


def test_the_soft_file_limit_is_raised_toward_what_the_cap_needs() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        _fit_file_limit(200)  # needs 2 * 200 + 64
        raised, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        expected = 464 if hard == resource.RLIM_INFINITY else min(464, hard)
        assert raised == expected
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
