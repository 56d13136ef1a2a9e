"""Sending one request and measuring it: `Sender`, the HTTP client, `discover_model`.

With `stream=True` (default) requests ask for `stream_options.include_usage`
and TTFT is the time to the first chunk carrying content (vLLM's first chunk
only announces the role). Several base URLs are shared as `spread` says:
`round-robin` (default) sends request i to URL i mod n, the "direct"
baseline of `benchmarks/side_by_side.py`; `sticky` sends every request of
one session (else of one tenant) to the same URL, chosen by a keyed hash,
so a conversation's history stays on one engine the way a cache-aware
router would place it; requests with neither go round robin.

The tool shares the CPU with whatever it measures, so it spends as little
CPU as it can per request: aiohttp's client on uvloop when installed
(`run_with_uvloop`, which the command line, the live demo and the
benchmarks use); docs/performance.md has its cost per request. `timeout_s`
limits how long a request may wait for a connection and then how long the
server may stay silent (between any two bytes), not the whole response, so
a long stream that keeps flowing is not cut; redirects are not followed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import aiohttp

from prefixroute.devtools.bench.report import Result
from prefixroute.devtools.bench.wire import WireRequest, request_kind

__all__ = ["SPREADS", "Sender", "discover_model", "error_name", "new_client", "run_with_uvloop"]

SPREADS = ("round-robin", "sticky")
"""How requests are spread over several URLs (module docstring)."""

_T = TypeVar("_T")


def _usage(usage: Any) -> tuple[int | None, int | None, int | None]:
    if not isinstance(usage, dict):
        return None, None, None
    prompt = usage.get("prompt_tokens")
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return prompt, cached, usage.get("completion_tokens")


def _has_content(chunk: Any) -> bool:
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    if not choices:
        return False
    choice = choices[0]
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return bool(delta.get("content") or delta.get("reasoning_content"))
    return bool(choice.get("text"))


def _sticky_slot(key: str, n: int) -> int:
    """Which of `n` URLs `key` (a session or tenant) sticks to: a keyed hash, stable across runs."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, key=b"prefixroute.bench").digest()
    return int.from_bytes(digest, "little") % n


class Sender:
    """Sends one request and measures it; shared by every arrival loop."""

    def __init__(
        self,
        client: aiohttp.ClientSession,
        urls: Sequence[str],
        *,
        stream: bool,
        max_tokens: int | None,
        t0: float,
        on_result: Callable[[Result], None] | None,
        spread: str = "round-robin",
    ) -> None:
        self.client = client
        self.urls = [u.rstrip("/") for u in urls]
        self.stream = stream
        self.max_tokens = max_tokens
        self.t0 = t0
        self.on_result = on_result
        self.spread = spread
        self.results: list[Result] = []
        self.in_flight = 0

    def record(self, result: Result) -> Result:
        self.results.append(result)
        if self.on_result is not None:
            self.on_result(result)
        return result

    def url_for(self, index: int, headers: dict[str, str]) -> str:
        """The URL request `index` goes to (module docstring: `spread`). O(1)."""
        n = len(self.urls)
        if self.spread == "sticky" and n > 1:
            key = headers.get("x-session-id") or headers.get("x-tenant-id")
            if key:
                return self.urls[_sticky_slot(key, n)]
        return self.urls[index % n]

    def refused(self, index: int, wire: WireRequest, due: float, lag: float, kind: str) -> None:
        """Record request `index` as not sent: `max_in_flight` requests were outstanding."""
        self.record(
            Result(
                index=index,
                kind=kind,
                tenant=wire[2].get("x-tenant-id"),
                url="",
                status=0,
                sent_s=due,
                latency_s=0.0,
                lag_s=lag,
                error="in-flight-limit",
            )
        )

    async def send(
        self, index: int, wire: WireRequest, lag_s: float = 0.0, kind: str | None = None
    ) -> Result:
        self.in_flight += 1
        try:
            return await self._send(index, wire, lag_s, kind)
        finally:
            self.in_flight -= 1

    async def _send(self, index: int, wire: WireRequest, lag_s: float, kind: str | None) -> Result:
        path, body, headers = wire
        url = self.url_for(index, headers)
        body = dict(body)
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        start = time.monotonic()
        base: dict[str, Any] = {
            "index": index,
            "kind": kind or request_kind(path, headers),
            "tenant": headers.get("x-tenant-id"),
            "url": url,
            "sent_s": start - self.t0,
            "lag_s": lag_s,
        }
        fields: dict[str, Any] = {"status": 0}
        try:
            async with self.client.post(
                url + path, json=body, headers=headers, allow_redirects=False
            ) as resp:
                fields["status"] = resp.status
                fields["engine"] = resp.headers.get("x-fake-engine-id")
                if resp.status != 200:
                    fields["error"] = _error_code(await resp.read())
                elif self.stream:
                    await self._stream(resp, start, fields)
                else:
                    answer = json.loads(await resp.read())
                    usage = answer.get("usage") if isinstance(answer, dict) else None
                    fields.update(_usage_fields(usage))
        except asyncio.CancelledError:
            fields["error"] = "cancelled"
            self.record(Result(**base, **fields, latency_s=time.monotonic() - start))
            raise
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            fields["error"] = error_name(exc)
        return self.record(Result(**base, **fields, latency_s=time.monotonic() - start))

    @staticmethod
    async def _stream(resp: aiohttp.ClientResponse, start: float, fields: dict[str, Any]) -> None:
        """Read an SSE answer to its end: TTFT at the first content chunk, then the usage.

        Lines are split here from whatever the socket delivers (no line-length
        limit). Reading goes on past `[DONE]` to the end of the response, so
        the connection is kept for the next request.
        """
        done = False
        pending = b""
        async for data in resp.content.iter_any():
            if done:
                continue
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                event = line[5:].strip()
                if event == b"[DONE]":
                    done = True
                    break
                # Parse only what is needed: the first content chunk and the usage chunk.
                if "ttft_s" not in fields:
                    chunk = json.loads(event)
                    if isinstance(chunk, dict) and "error" in chunk:
                        fields["error"] = "stream-error"
                        return
                    if _has_content(chunk):
                        fields["ttft_s"] = time.monotonic() - start
                if b'"prompt_tokens"' in event:
                    fields.update(_usage_fields(json.loads(event).get("usage")))
                elif b'"error"' in event and "error" in json.loads(event):
                    fields["error"] = "stream-error"
                    return
        if not done:
            fields["error"] = "truncated"


def error_name(exc: BaseException) -> str:
    """A transport failure's label in results: stable names for the common ones."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "ConnectError"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "ConnectTimeout"
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return "ReadTimeout"
    return type(exc).__name__


def _usage_fields(usage: Any) -> dict[str, Any]:
    prompt, cached, completion = _usage(usage)
    return {"prompt_tokens": prompt, "cached_tokens": cached, "completion_tokens": completion}


def _error_code(content: bytes) -> str | None:
    """The OpenAI error body's `code` (or `type`), else None: the status says enough."""
    try:
        err = json.loads(content).get("error")
    except (ValueError, AttributeError):
        return None
    if isinstance(err, dict):
        code = err.get("code") or err.get("type")
        return str(code) if code is not None else None
    return None


async def discover_model(client: aiohttp.ClientSession, base_url: str) -> str | None:
    """The first model `base_url/v1/models` lists, or None if it answers nothing usable."""
    try:
        async with client.get(base_url.rstrip("/") + "/v1/models", allow_redirects=False) as resp:
            if resp.status != 200:
                return None
            data = json.loads(await resp.read()).get("data")
        if data and isinstance(data[0], dict) and isinstance(data[0].get("id"), str):
            return str(data[0]["id"])
    except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError, KeyError, TypeError):
        pass
    return None


def new_client(timeout_s: float, max_in_flight: int) -> aiohttp.ClientSession:
    """The HTTP client `run_load` makes when it is not given one (call on the running loop).

    At most `max_in_flight` connections; `timeout_s` for getting a connection
    and for any silence while reading (module docstring). No `Accept-Encoding`:
    a server that compresses would make the generator pay to decompress.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_in_flight),
        timeout=aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_read=timeout_s),
        skip_auto_headers=("Accept-Encoding",),
    )


def run_with_uvloop(main: Coroutine[Any, Any, _T]) -> _T:
    """`asyncio.run(main)` on a uvloop event loop when uvloop is installed (else asyncio's).

    uvloop roughly halves the event loop's own CPU per request, which the
    load generator shares with what it measures.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
