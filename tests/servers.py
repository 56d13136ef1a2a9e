"""Real servers on loopback for the adapter tests: in-process threads and subprocesses.

Everything binds 127.0.0.1 on a free port and is torn down by the
context manager, so no test leaves a server behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from prefixroute.devtools.live import free_port, free_port_block

__all__ = [
    "ScriptedStream",
    "free_port",
    "free_port_block",
    "run_process",
    "serve_in_thread",
    "wait_http",
    "wait_until",
    "wait_until_async",
]


@contextlib.contextmanager
def serve_in_thread(app: Any, *, port: int | None = None) -> Iterator[str]:
    """Run an ASGI `app` with uvicorn in a thread; yields its base URL `http://127.0.0.1:P`."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"server on port {port} did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_http(
    url: str, *, timeout_s: float = 15.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll `url` until it answers (any status); RuntimeError on timeout or if `proc` died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            httpx.get(url, timeout=0.5)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


def wait_until(
    predicate: Callable[[], bool], *, timeout_s: float = 10.0, message: str = "condition"
) -> None:
    """Poll `predicate` until it is true; AssertionError naming `message` after `timeout_s`.

    For what a server does after the client has its answer (a completion
    reaching the router, a health check marking an endpoint): waiting for
    the condition instead of sleeping a fixed time does not race on a busy
    machine.
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{message}: not within {timeout_s} s"
        time.sleep(0.02)


async def wait_until_async(
    predicate: Callable[[], bool], *, timeout_s: float = 10.0, message: str = "condition"
) -> None:
    """`wait_until` inside an event loop: polls without blocking the loop."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{message}: not within {timeout_s} s"
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def run_process(
    args: Sequence[str], *, ready_url: str | None = None, timeout_s: float = 15.0
) -> Iterator[subprocess.Popen[bytes]]:
    """Start `python -m ...`-style `args` (sys.executable is prepended), wait for `ready_url`.

    The process is terminated (then killed) on exit. Its stdout is discarded;
    its stderr goes to the test's own (pytest shows it when a test fails).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL)
    try:
        if ready_url is not None:
            wait_http(ready_url, timeout_s=timeout_s, proc=proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class ScriptedStream:
    """An engine whose SSE answer is scripted: cut short, or carrying an in-stream error."""

    CONTENT = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    ERROR = b'data: {"object":"error","message":"engine failed","code":500}\n\n'

    def __init__(self, events: list[bytes]) -> None:
        self.events = events
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.complete, methods=["POST"]),
                Route("/health", lambda r: Response()),
                Route("/metrics", lambda r: PlainTextResponse("vllm:num_requests_waiting 0\n")),
            ]
        )

    async def complete(self, request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            for event in self.events:
                yield event

        return StreamingResponse(body(), media_type="text/event-stream")
