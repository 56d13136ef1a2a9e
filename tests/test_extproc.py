"""The ext_proc endpoint picker over a real gRPC channel, with real fake engines behind its pool.

There is no Envoy here (tests/test_envoy_e2e.py runs one): `Proxy` plays
Envoy's ext_proc filter. It sends `ProcessingRequest`s the way Envoy does
(the first carrying `protocol_config`), forwards the echoed body to the
destination the picker chose with a real HTTP request, and feeds the
engine's answer back through the response phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import grpc
import httpx
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prefixroute.config import ConfigError
from prefixroute.drivers.extproc import (
    BODY_CHUNK_BYTES,
    DESTINATION_HEADER,
    HEALTH_SERVICES,
    ExtProcConfig,
    ExtProcServer,
    _Stream,
    _streamed,
    cli_arguments,
    cli_main,
)
from prefixroute.openai import parse_openai
from tests.helpers import chat_body, pool
from tests.servers import (
    ScriptedStream,
    free_port,
    run_process,
    serve_in_thread,
    wait_until_async,
)

SYSTEM = "You are a meticulous assistant for the ext_proc tests; answer briefly. " * 12
USAGE = {"include_usage": True}
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
MODE = processing_mode_pb2.ProcessingMode
DUPLEX = MODE.FULL_DUPLEX_STREAMED
BUFFERED = MODE.BUFFERED
TOKEN_BUCKET = {
    "plugins": [
        {"type": "token-bucket-admission", "parameters": {"requests_per_s": 0.5}},
        {"type": "prefix-affinity-scorer"},
    ],
    "profiles": [
        {
            "name": "limited",
            "plugins": [
                {"pluginRef": "token-bucket-admission"},
                {"pluginRef": "prefix-affinity-scorer"},
            ],
        }
    ],
}


def chat(question: str, *, system: str = SYSTEM, **extra: Any) -> dict[str, Any]:
    return chat_body(question, system=system, **extra)


def config(doc: dict[str, Any], **extproc: Any) -> ExtProcConfig:
    return ExtProcConfig.from_document(
        {**doc, "extproc": {"port": 0, "metrics_port": 0, **extproc}}
    )


@contextlib.asynccontextmanager
async def picker(cfg: ExtProcConfig) -> AsyncIterator[tuple[ExtProcServer, Proxy]]:
    server = ExtProcServer(cfg)
    await server.start()
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{server.port}",
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
    try:
        yield server, Proxy(channel)
    finally:
        await channel.close()
        await server.stop(grace=1.0)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


# -- the stand-in for Envoy ---------------------------------------------------------------


def header_map(headers: dict[str, str]) -> Any:
    return base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]
    )


def subset_metadata(addresses: Sequence[str]) -> Any:
    hint = struct_pb2.Struct()
    hint.update({"x-gateway-destination-endpoint-subset": list(addresses)})
    return base_pb2.Metadata(filter_metadata={"envoy.lb.subset_hint": hint})


def set_headers(common: Any) -> dict[str, str]:
    """The headers a `CommonResponse` or an `ImmediateResponse` sets."""
    mutation = common.headers if hasattr(common, "details") else common.header_mutation
    return {o.header.key: o.header.raw_value.decode() for o in mutation.set_headers}


@attrs.define
class Exchange:
    """What the picker answered for one request (and, if forwarded, what the client got)."""

    immediate: Any = None
    headers: dict[str, str] = attrs.field(factory=dict)
    clear_route_cache: bool = False
    metadata: dict[str, Any] = attrs.field(factory=dict)
    body_chunks: list[tuple[bytes, bool]] = attrs.field(factory=list)
    forwarded: bytes = b""
    status: int = 0
    client_body: bytes = b""
    responses: list[Any] = attrs.field(factory=list)

    @property
    def destination(self) -> str:
        return self.headers[DESTINATION_HEADER]

    @property
    def error(self) -> dict[str, Any]:
        assert self.immediate is not None
        return dict(json.loads(self.immediate.body)["error"])


class Proxy:
    """Envoy's ext_proc filter, as far as these tests need it (see the module docstring)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = pb_grpc.ExternalProcessorStub(channel)

    async def send(
        self,
        body: bytes | None,
        *,
        headers: dict[str, str] | None = None,
        request_mode: int | None = DUPLEX,
        response_mode: int = DUPLEX,
        chunk: int = 16 * 1024,
        metadata: Any = None,
        trailers: bool = False,
        forward: bool = True,
        served: str | None = None,
        cancel_after_headers: bool = False,
    ) -> Exchange:
        """One HTTP request through the picker (and to the engine, if `forward`)."""
        call = self.stub.Process()
        out: asyncio.Queue[Any] = asyncio.Queue()

        async def reader() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                async for response in call:
                    await out.put(response)
            await out.put(None)

        task = asyncio.create_task(reader())
        ex = Exchange()
        first = pb.ProcessingRequest(
            request_headers=pb.HttpHeaders(
                headers=header_map(
                    {
                        ":method": "POST",
                        ":path": "/v1/chat/completions",
                        "content-type": "application/json",
                        **(headers or {}),
                    }
                ),
                end_of_stream=body is None,
            )
        )
        if request_mode is not None:
            first.protocol_config.CopyFrom(
                pb.ProtocolConfiguration(
                    request_body_mode=request_mode, response_body_mode=response_mode
                )
            )
        if metadata is not None:
            first.metadata_context.CopyFrom(metadata)
        await call.write(first)
        if body is not None:
            if request_mode == BUFFERED:
                response = await out.get()
                if response.HasField("immediate_response"):
                    ex.immediate = response.immediate_response
                    return await self._end(call, task, ex)
                assert response.HasField("request_headers")
                assert not response.request_headers.response.HasField("header_mutation")
                await call.write(
                    pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))
                )
            else:
                pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
                for i, piece in enumerate(pieces):
                    eos = i == len(pieces) - 1 and not trailers
                    message = pb.ProcessingRequest(
                        request_body=pb.HttpBody(body=piece, end_of_stream=eos)
                    )
                    try:
                        await call.write(message)
                    except grpc.aio.AioRpcError:  # the picker answered early and closed
                        break
                if trailers:
                    trailer = pb.HttpTrailers(trailers=header_map({"x-trailer": "1"}))
                    await call.write(pb.ProcessingRequest(request_trailers=trailer))
        forwarded = await self._request_phase(out, ex, body, request_mode, trailers)
        if ex.immediate is not None or forwarded is None:
            return await self._end(call, task, ex)
        ex.forwarded = forwarded
        if not forward:
            call.cancel()
            return await self._end(call, task, ex)
        await self._response_phase(
            call, out, ex, headers or {}, response_mode, served, cancel_after_headers
        )
        return await self._end(call, task, ex)

    async def _request_phase(
        self,
        out: asyncio.Queue[Any],
        ex: Exchange,
        body: bytes | None,
        request_mode: int | None,
        trailers: bool,
    ) -> bytes | None:
        """Read the request-phase answers; the body Envoy would forward (None: no answer)."""
        while True:
            response = await out.get()
            if response is None:
                return None
            ex.responses.append(response)
            if response.HasField("immediate_response"):
                ex.immediate = response.immediate_response
                return None
            if response.HasField("dynamic_metadata"):
                ex.metadata = json_format.MessageToDict(response.dynamic_metadata)
            if response.HasField("request_headers"):
                common = response.request_headers.response
                ex.headers, ex.clear_route_cache = set_headers(common), common.clear_route_cache
            elif response.HasField("request_body"):
                common = response.request_body.response
                mutation = common.body_mutation
                if request_mode == BUFFERED:
                    ex.headers, ex.clear_route_cache = set_headers(common), common.clear_route_cache
                    return mutation.body if mutation.HasField("body") or mutation.body else body
                streamed = mutation.streamed_response
                ex.body_chunks.append((streamed.body, streamed.end_of_stream))
                if streamed.end_of_stream:
                    return b"".join(c for c, _ in ex.body_chunks)
            elif response.HasField("request_trailers"):
                assert trailers
                return b"".join(c for c, _ in ex.body_chunks)

    async def _response_phase(
        self,
        call: Any,
        out: asyncio.Queue[Any],
        ex: Exchange,
        headers: dict[str, str],
        response_mode: int,
        served: str | None,
        cancel_after_headers: bool,
    ) -> None:
        """Forward to the destination, then pass the engine's answer through the picker."""
        url = f"http://{ex.destination.split(',')[0]}/v1/chat/completions"
        async with (
            httpx.AsyncClient(timeout=10) as client,
            client.stream("POST", url, content=ex.forwarded, headers=headers) as answer,
        ):
            ex.status = answer.status_code
            message = pb.ProcessingRequest(
                response_headers=pb.HttpHeaders(
                    headers=header_map(
                        {
                            ":status": str(answer.status_code),
                            "content-type": answer.headers.get("content-type", ""),
                        }
                    )
                )
            )
            if served is not None:
                lb = struct_pb2.Struct()
                lb.update({"x-gateway-destination-endpoint-served": served})
                message.metadata_context.CopyFrom(
                    base_pb2.Metadata(filter_metadata={"envoy.lb": lb})
                )
            await call.write(message)
            assert (await out.get()).HasField("response_headers")
            if cancel_after_headers:
                call.cancel()
                return
            if response_mode == BUFFERED:
                whole = await answer.aread()
                await call.write(
                    pb.ProcessingRequest(response_body=pb.HttpBody(body=whole, end_of_stream=True))
                )
            else:
                async for piece in answer.aiter_raw():
                    await call.write(pb.ProcessingRequest(response_body=pb.HttpBody(body=piece)))
                await call.write(
                    pb.ProcessingRequest(response_body=pb.HttpBody(end_of_stream=True))
                )
        await call.done_writing()
        received = bytearray()
        while (response := await out.get()) is not None:
            ex.responses.append(response)
            common = response.response_body.response
            if response_mode == BUFFERED:
                mutation = common.body_mutation
                received += mutation.body if mutation.body else whole
            else:
                streamed = common.body_mutation.streamed_response
                assert len(streamed.body) <= BODY_CHUNK_BYTES
                received += streamed.body
        ex.client_body = bytes(received)

    async def _end(self, call: Any, task: asyncio.Task[None], ex: Exchange) -> Exchange:
        with contextlib.suppress(Exception):
            await call.done_writing()
        await asyncio.wait_for(task, timeout=5)
        return ex


async def settled(server: ExtProcServer, timeout: float = 2.0) -> None:
    """Wait until every decision is settled (a cancelled stream settles asynchronously)."""
    router = server.processor.router
    deadline = asyncio.get_running_loop().time() + timeout
    while router.counters.completions < router.counters.decisions:
        assert asyncio.get_running_loop().time() < deadline, router.counters
        await asyncio.sleep(0.01)


def sse_payloads(body: bytes) -> list[Any]:
    out: list[Any] = []
    for line in body.decode().splitlines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# -- routing -----------------------------------------------------------------------------------


def test_requests_sharing_a_prefix_get_one_destination(engines: list[str]) -> None:
    async def scenario() -> None:
        async with picker(config({"endpoints": pool(*engines)})) as (server, proxy):
            results = [
                await proxy.send(json.dumps(chat(f"question {i}")).encode()) for i in range(5)
            ]
            await settled(server)
            counters = server.processor.router.counters
        assert {r.status for r in results} == {200}
        assert len({r.destination for r in results}) == 1
        assert results[0].destination in engines
        options = results[0].responses[0].request_headers.response.header_mutation.set_headers
        assert {o.append_action for o in options} == {OVERWRITE}  # a client cannot add its own
        for r in results:
            assert r.clear_route_cache
            assert r.metadata == {"envoy.lb": {DESTINATION_HEADER: r.destination}}
            assert int(r.headers["content-length"]) == len(r.forwarded)
            assert json.loads(r.client_body)["usage"]["prompt_tokens"] > 0
        # the engine's usage reached on_complete: the later requests hit its cache
        assert counters.completions == counters.decisions == 5
        assert counters.failures == 0
        assert counters.actual_cached_tokens > 0
        assert server.processor.router.load.in_flight() == 0

    run(scenario())


def test_a_3mb_body_is_echoed_in_order_in_small_chunks(engines: list[str]) -> None:
    async def scenario() -> None:
        async with picker(config({"endpoints": pool(*engines)})) as (_, proxy):
            body = json.dumps(chat("x" * 3_000_000)).encode()
            result = await proxy.send(body, chunk=65_536, forward=False)
        assert len(body) > 3_000_000
        assert result.responses[0].HasField("request_headers")  # headers first, then the body
        assert result.forwarded == body
        sizes = [len(c) for c, _ in result.body_chunks]
        assert max(sizes) <= BODY_CHUNK_BYTES and len(sizes) == -(-len(body) // BODY_CHUNK_BYTES)
        assert [eos for _, eos in result.body_chunks] == [False] * (len(sizes) - 1) + [True]
        assert int(result.headers["content-length"]) == len(body)

    run(scenario())


@pytest.mark.parametrize(
    "size",
    [0, 1, BODY_CHUNK_BYTES - 1, BODY_CHUNK_BYTES, BODY_CHUNK_BYTES + 1, 3 * BODY_CHUNK_BYTES],
)
@pytest.mark.parametrize("end_of_stream", [True, False])
def test_streamed_chunks_cover_the_body_exactly(size: int, end_of_stream: bool) -> None:
    body = bytes(i % 251 for i in range(size))
    for phase in ("request_body", "response_body"):
        out = _streamed(phase, body, end_of_stream)
        chunks = []
        for response in out:
            assert response.WhichOneof("response") == phase
            mutation = getattr(response, phase).response.body_mutation
            assert mutation.WhichOneof("mutation") == "streamed_response"  # even when empty
            chunks.append(mutation.streamed_response)
        assert len(out) == max(1, -(-size // BODY_CHUNK_BYTES))  # an empty body: one message
        assert b"".join(c.body for c in chunks) == body
        assert all(len(c.body) <= BODY_CHUNK_BYTES for c in chunks)
        assert [c.end_of_stream for c in chunks] == [False] * (len(out) - 1) + [end_of_stream]


def test_a_body_ended_by_trailers_gets_a_trailers_response(engines: list[str]) -> None:
    async def scenario() -> None:
        async with picker(config({"endpoints": pool(*engines)})) as (_, proxy):
            body = json.dumps(chat("trailers")).encode()
            result = await proxy.send(body, trailers=True, forward=False)
        assert result.forwarded == body
        assert not any(eos for _, eos in result.body_chunks)
        assert result.responses[-1].HasField("request_trailers")

    run(scenario())


def test_buffered_mode_answers_on_the_body(engines: list[str]) -> None:
    async def scenario() -> None:
        async with picker(config({"endpoints": pool(*engines)})) as (server, proxy):
            body = json.dumps(chat("buffered")).encode()
            plain = await proxy.send(body, request_mode=BUFFERED, response_mode=BUFFERED)
            await settled(server)
        assert plain.destination in engines and plain.clear_route_cache
        assert plain.metadata == {"envoy.lb": {DESTINATION_HEADER: plain.destination}}
        assert "content-length" not in plain.headers  # the body is unchanged: no mutation
        assert not plain.responses[-1].response_body.response.HasField("body_mutation")
        assert plain.forwarded == body and plain.status == 200
        assert json.loads(plain.client_body)["usage"]["prompt_tokens"] > 0

    run(scenario())


def test_tenant_isolation_salts_the_echoed_body(engines: list[str]) -> None:
    async def scenario() -> None:
        doc = {"endpoints": pool(engines[0]), "hashing": {"isolate_tenants": True}}
        async with picker(config(doc)) as (_, proxy):
            body = json.dumps(chat("salted")).encode()
            duplex = await proxy.send(body, headers={"x-tenant-id": "a"}, forward=False)
            buffered = await proxy.send(
                body, headers={"x-tenant-id": "a"}, request_mode=BUFFERED, forward=False
            )
            other = await proxy.send(body, headers={"x-tenant-id": "b"}, forward=False)
        salt = json.loads(duplex.forwarded)["cache_salt"]
        assert salt.startswith("pr-") and json.loads(buffered.forwarded)["cache_salt"] == salt
        assert json.loads(other.forwarded)["cache_salt"] != salt
        for r in (duplex, buffered):
            assert int(r.headers["content-length"]) == len(r.forwarded)

    run(scenario())


def test_the_subset_hint_limits_the_choice(engines: list[str]) -> None:
    async def scenario() -> None:
        async with picker(config({"endpoints": pool(*engines)})) as (_, proxy):
            body = json.dumps(chat("subset")).encode()
            only_b = [
                await proxy.send(body, metadata=subset_metadata([engines[1]]), forward=False)
                for _ in range(3)
            ]
            outside = await proxy.send(body, metadata=subset_metadata(["10.9.9.9:8000"]))
            empty = await proxy.send(body, metadata=subset_metadata([]))
        assert {r.destination for r in only_b} == {engines[1]}
        for r in (outside, empty):
            assert r.immediate.status.code == 503 and r.error["code"] == "no-endpoint"

    run(scenario())


def test_fallbacks_are_listed_only_when_configured(engines: list[str]) -> None:
    async def scenario() -> None:
        body = json.dumps(chat("fallbacks")).encode()
        async with picker(config({"endpoints": pool(*engines)}, fallback_list=True)) as (_, p):
            listed = await p.send(body, forward=False)
        async with picker(config({"endpoints": pool(*engines)})) as (_, p):
            single = await p.send(body, forward=False)
        assert sorted(listed.destination.split(",")) == sorted(engines)
        assert listed.metadata["envoy.lb"][DESTINATION_HEADER] == listed.destination
        assert single.destination in engines

    run(scenario())


# -- errors ------------------------------------------------------------------------------------


def test_bad_requests_are_immediate_openai_errors(engines: list[str]) -> None:
    async def scenario() -> None:
        cfg = config({"endpoints": pool(*engines)}, max_body_bytes=4096)
        async with picker(cfg) as (server, proxy):
            malformed = await proxy.send(b"{not json")
            no_model = await proxy.send(json.dumps({"messages": []}).encode())
            no_body = await proxy.send(None)
            too_big = await proxy.send(json.dumps(chat("y" * 10_000)).encode(), chunk=1000)
            buffered = await proxy.send(b"[]", request_mode=BUFFERED)
            counters = server.processor.router.counters
        for result, status in (
            (malformed, 400),
            (no_model, 400),
            (no_body, 400),
            (too_big, 413),
            (buffered, 400),
        ):
            assert result.immediate.status.code == status
            assert set(result.error) == {"message", "type", "param", "code"}
            headers = set_headers(result.immediate)
            assert headers["content-type"] == "application/json"
        assert malformed.error["code"] == "invalid-json"
        assert no_model.error["param"] == "model"
        assert no_body.error["param"] == "model"
        assert too_big.error["code"] == "body-too-large"
        assert counters.decisions == 0

    run(scenario())


def test_a_rate_limit_is_a_429_with_retry_after(engines: list[str]) -> None:
    async def scenario() -> None:
        async with picker(config({"endpoints": pool(engines[0]), **TOKEN_BUCKET})) as (_, p):
            tenant = {"x-llm-d-inference-fairness-id": "bursty"}
            first = await p.send(json.dumps(chat("r1")).encode(), headers=tenant)
            limited = await p.send(json.dumps(chat("r2")).encode(), headers=tenant)
            other = await p.send(
                json.dumps(chat("r3")).encode(), headers={"x-gateway-inference-fairness-id": "z"}
            )
        assert first.status == 200 and other.status == 200
        assert limited.immediate.status.code == 429
        assert limited.error["code"] == "rate-limit"
        assert int(set_headers(limited.immediate)["retry-after"]) >= 1

    run(scenario())


def test_no_healthy_endpoint_is_a_503() -> None:
    async def scenario() -> None:
        doc = {"endpoints": pool(f"127.0.0.1:{free_port()}"), "scrape": {"unhealthy_after": 1}}
        async with picker(config(doc)) as (_, proxy):
            result = await proxy.send(json.dumps(chat("nobody home")).encode())
        assert result.immediate.status.code == 503
        assert int(set_headers(result.immediate)["retry-after"]) >= 1

    run(scenario())


# -- the response path -------------------------------------------------------------------------


def test_streamed_usage_reaches_the_router_and_stays_hidden(engines: list[str]) -> None:
    async def scenario() -> None:
        async with picker(config({"endpoints": pool(engines[0])})) as (server, proxy):
            asked = chat("stream", stream=True, stream_options={"include_usage": True})
            plain = [
                await proxy.send(json.dumps(chat(f"stream {i}", stream=True)).encode())
                for i in range(2)
            ]
            client = await proxy.send(json.dumps(asked).encode())
            await settled(server)
            counters = server.processor.router.counters
        # the picker asked the engine for usage and hid the usage-only chunk again
        assert json.loads(plain[0].forwarded)["stream_options"] == {"include_usage": True}
        for r in plain:
            events = sse_payloads(r.client_body)
            assert events[-1] == "[DONE]" and len(events) > 2
            assert all("usage" not in e or e["usage"] is None for e in events[:-1])
        events = sse_payloads(client.client_body)
        assert any(isinstance(e, dict) and e.get("usage") for e in events)
        assert counters.completions == counters.decisions == 3 and counters.failures == 0
        assert counters.actual_cached_tokens > 0  # real cached tokens from the SSE usage

    run(scenario())


def test_buffered_response_mode_does_not_inject_usage(engines: list[str]) -> None:
    async def scenario() -> None:
        async with picker(config({"endpoints": pool(engines[0])})) as (server, proxy):
            body = json.dumps(chat("buffered stream", stream=True)).encode()
            result = await proxy.send(body, response_mode=BUFFERED)
            await settled(server)
            counters = server.processor.router.counters
        assert result.forwarded == body  # nothing injected: the usage chunk could not be hidden
        assert sse_payloads(result.client_body)[-1] == "[DONE]"
        assert counters.completions == 1 and counters.failures == 0

    run(scenario())


def test_the_served_endpoint_is_credited(engines: list[str]) -> None:
    async def scenario() -> None:
        async with picker(config({"endpoints": pool(*engines)})) as (server, proxy):
            body = chat("credit", system="Credit test, a prefix of its own. " * 40)
            raw = json.dumps(body).encode()
            first = await proxy.send(raw)  # served where decided: its blocks are confirmed there
            other = engines[1 - engines.index(first.destination)]
            credited = await proxy.send(raw, served=other)
            await settled(server)
            router = server.processor.router
            keys = router.blocker.keys(parse_openai(body)).tolist()
            holders = router.index.match(keys)
        assert credited.status == 200 and credited.destination == first.destination
        # the engine Envoy reports as the one that served holds the prefix now
        assert f"e{engines.index(other)}" in holders

    run(scenario())


def test_deferred_requests_wait_for_a_release(engines: list[str]) -> None:
    fair = {
        "plugins": [
            {"type": "fair-queue-admission", "parameters": {"max_in_flight_per_endpoint": 1}},
            {"type": "prefix-affinity-scorer"},
        ],
        "profiles": [
            {
                "name": "fair",
                "plugins": [
                    {"pluginRef": "fair-queue-admission"},
                    {"pluginRef": "prefix-affinity-scorer"},
                ],
            }
        ],
    }

    async def scenario() -> None:
        async with picker(config({**fair, "endpoints": pool(engines[0])})) as (server, proxy):
            results = await asyncio.gather(
                *(
                    proxy.send(
                        json.dumps(chat(f"fair {i}")).encode(), headers={"x-tenant-id": f"t{i}"}
                    )
                    for i in range(4)
                )
            )
            await settled(server)
            counters = server.processor.router.counters
        assert [r.status for r in results] == [200] * 4
        assert counters.deferrals >= 1 and counters.completions == counters.decisions == 4

    run(scenario())


def test_an_early_close_settles_the_decision_once(engines: list[str]) -> None:
    async def scenario() -> None:
        async with picker(config({"endpoints": pool(*engines)})) as (server, proxy):
            body = json.dumps(chat("gone", stream=True)).encode()
            await proxy.send(body, forward=False)  # closed after the request phase
            await proxy.send(body, cancel_after_headers=True)  # closed mid-response
            half = await proxy.send(body, chunk=len(body) // 2 + 1, forward=False)
            await settled(server)
            router = server.processor.router
            counters = router.counters
            assert counters.decisions == counters.completions == 3
            assert counters.failures == 3
            assert router.load.in_flight() == 0
        assert json.loads(half.forwarded) == {**json.loads(body), "stream_options": USAGE}

    run(scenario())


def test_a_stream_closed_before_the_body_ends_decides_nothing(
    engines: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    finished: list[_Stream] = []
    finish = _Stream.finish

    def counted(stream: _Stream) -> None:
        finish(stream)
        finished.append(stream)

    monkeypatch.setattr(_Stream, "finish", counted)

    async def scenario() -> None:
        async with picker(config({"endpoints": pool(*engines)})) as (server, proxy):
            call = proxy.stub.Process()
            headers = pb.HttpHeaders(headers=header_map({":path": "/v1/completions"}))
            await call.write(pb.ProcessingRequest(request_headers=headers))
            await call.write(pb.ProcessingRequest(request_body=pb.HttpBody(body=b'{"model"')))
            call.cancel()
            # the server has seen the stream end (its `finally` ran): nothing more can happen
            await wait_until_async(lambda: bool(finished), message="the stream finished")
            assert server.processor.router.counters.decisions == 0
            assert finished[0].decision is None and finished[0].closed is False

    run(scenario())


# -- health, metrics, config, command line -----------------------------------------------------


def test_health_service_and_metrics(engines: list[str]) -> None:
    async def scenario() -> None:
        port = free_port()
        cfg = config({"endpoints": pool(*engines)}, metrics_port=port)
        async with picker(cfg) as (server, proxy):
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
            health = health_pb2_grpc.HealthStub(channel)
            statuses = {
                s: (await health.Check(health_pb2.HealthCheckRequest(service=s))).status
                for s in HEALTH_SERVICES
            }
            await proxy.send(json.dumps(chat("metrics")).encode())
            async with httpx.AsyncClient() as client:
                metrics = await client.get(f"http://127.0.0.1:{port}/metrics")
                ok = await client.get(f"http://127.0.0.1:{port}/health")
            server.processor.draining = True
            await server.health.enter_graceful_shutdown()
            draining = await health.Check(health_pb2.HealthCheckRequest(service="readiness"))
            refused = await proxy.send(json.dumps(chat("late")).encode())
            await channel.close()
        assert set(statuses.values()) == {health_pb2.HealthCheckResponse.SERVING}
        assert draining.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert refused.immediate.status.code == 503
        assert metrics.status_code == 200 and "inference_objective_request_total" in metrics.text
        assert ok.status_code == 200 and ok.json()["healthy_endpoints"] == 2

    run(scenario())


def test_config_sections_and_errors(tmp_path: Path) -> None:
    cfg = ExtProcConfig.from_document({"endpoints": [{"address": "127.0.0.1:8000"}]})
    assert (cfg.extproc.port, cfg.extproc.metrics_port, cfg.extproc.host) == (
        9002,
        9090,
        "127.0.0.1",
    )
    assert cfg.extproc.max_body_bytes == 16 * 1024 * 1024 and not cfg.extproc.fallback_list
    shared = ExtProcConfig.from_document({"server": {"port": 8081}, "extproc": {"port": 9100}})
    assert shared.driver.server.port == 8081 and shared.extproc.port == 9100
    with pytest.raises(ConfigError) as bad:
        ExtProcConfig.from_document({"extproc": {"bogus": 1}})
    assert "extproc" in str(bad.value) and "bogus" in str(bad.value)
    with pytest.raises(ConfigError) as bad_type:
        ExtProcConfig.from_document({"extproc": {"port": "x"}})
    assert bad_type.value.path == "extproc.port"
    with pytest.raises(ConfigError) as bad_value:
        ExtProcConfig.from_document({"extproc": {"max_body_bytes": 0}})
    assert bad_value.value.path == "extproc.max_body_bytes"
    with pytest.raises(ConfigError):
        ExtProcConfig.from_document({"scrape": {"nope": 1}})


def test_cli_rejects_a_bad_config_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    path = tmp_path / "bad.yaml"
    path.write_text("extproc:\n  port: nine\n")
    parser = argparse.ArgumentParser()
    cli_arguments(parser)
    assert cli_main(parser.parse_args(["--config", str(path)])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prefixroute extproc: extproc.port") and "\n" not in err
    good = tmp_path / "good.yaml"
    good.write_text("extproc: {}\n")
    assert cli_main(parser.parse_args(["--config", str(good), "--port", "70000"])) == 2
    assert "\n" not in capsys.readouterr().err.strip()


def test_python_m_runs_and_drains_on_sigterm(engines: list[str], tmp_path: Path) -> None:
    grpc_port, metrics_port = free_port(), free_port()
    path = tmp_path / "extproc.yaml"
    doc = {"endpoints": pool(*engines), "extproc": {"drain_timeout_s": 2}}
    path.write_text(json.dumps(doc))
    args = [
        "-m",
        "prefixroute.drivers.extproc",
        "--config",
        str(path),
        "--port",
        str(grpc_port),
        "--metrics-port",
        str(metrics_port),
        "--log-level",
        "warning",
    ]
    with run_process(args, ready_url=f"http://127.0.0.1:{metrics_port}/health") as proc:

        async def check() -> int:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
                result = await Proxy(channel).send(json.dumps(chat("cli")).encode())
                assert result.status == 200
                return int(answer.status)

        assert run(check()) == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


@pytest.mark.parametrize(
    "events",
    [
        [ScriptedStream.CONTENT],  # closed without [DONE]
        [ScriptedStream.CONTENT, ScriptedStream.ERROR, b"data: [DONE]\n\n"],  # vLLM's error
    ],
    ids=["no-done", "error-event"],
)
def test_a_stream_that_fails_inside_is_settled_as_failed(events: list[bytes]) -> None:
    """As the gateway judges it: a 200 stream without `[DONE]` or with an error event failed."""
    upstream = ScriptedStream(events)

    async def scenario() -> None:
        with serve_in_thread(upstream.app) as url:
            async with picker(config({"endpoints": pool(url[7:])})) as (server, proxy):
                await proxy.send(json.dumps(chat("scripted", stream=True)).encode())
                await settled(server)
                counters = server.processor.router.counters
        assert (counters.decisions, counters.completions, counters.failures) == (1, 1, 1)

    run(scenario())


def test_a_streamed_response_mode_gets_plain_body_answers(engines: list[str]) -> None:
    """STREAMED (not duplex) response bodies: each chunk answered unchanged, never a
    StreamedBodyResponse (Envoy accepts those only in FULL_DUPLEX_STREAMED)."""

    async def scenario() -> None:
        async with picker(config({"endpoints": pool(engines[0])})) as (server, proxy):
            body = json.dumps(chat("streamed mode", stream=True)).encode()
            result = await proxy.send(body, response_mode=MODE.STREAMED)
            await settled(server)
            counters = server.processor.router.counters
        bodies = [r.response_body for r in result.responses if r.HasField("response_body")]
        assert bodies and not any(b.response.HasField("body_mutation") for b in bodies)
        assert result.forwarded == body  # no usage injected: its chunk could not be hidden
        assert counters.completions == 1 and counters.failures == 0

    run(scenario())


def test_buffered_partial_request_bodies_are_refused_as_misconfigured(engines: list[str]) -> None:
    async def scenario() -> None:
        async with picker(config({"endpoints": pool(engines[0])})) as (_server, proxy):
            body = json.dumps(chat("partial")).encode()
            result = await proxy.send(body, request_mode=MODE.BUFFERED_PARTIAL)
        assert result.immediate is not None
        assert result.immediate.status.code == 500
        assert json.loads(result.immediate.body)["error"]["code"] == "misconfigured"

    run(scenario())


# -- only the gateway's routes: 404/405 from the picker itself ------------------------------------


def test_the_picker_refuses_paths_and_methods_the_gateway_does_not_serve(
    engines: list[str],
) -> None:
    """Whatever the data plane's routes, only the completion routes are routed (issue 12)."""
    refused = [
        ("POST", "/v1/anything", 404),
        ("POST", "/metrics", 404),
        ("POST", "/v1/chat/completions/", 404),
        ("POST", "", 404),  # no :path at all
        ("GET", "/v1/chat/completions", 405),
        ("PUT", "/v1/completions", 405),
        ("POST", "/v1/models", 405),
    ]

    async def scenario() -> None:
        async with picker(config({"endpoints": pool(*engines)})) as (server, proxy):
            body = json.dumps(chat("where to?")).encode()
            for method, path, status in refused:
                headers = {":method": method, ":path": path}
                result = await proxy.send(body, headers=headers)
                assert result.immediate is not None, (method, path)
                assert result.immediate.status.code == status, (method, path)
                assert not result.forwarded
                if status == 405:
                    assert (
                        set_headers(result.immediate)["allow"]
                        == dict([("GET", "POST"), ("PUT", "POST"), ("POST", "GET, HEAD")])[method]
                    )
                    assert result.error["code"] == "method-not-allowed"
                else:
                    assert result.error["code"] == "not-found"
            assert server.processor.router.counters.decisions == 0
            with_query = {":path": "/v1/chat/completions?api-version=1"}
            routed = await proxy.send(body, headers=with_query, forward=False)
            assert routed.immediate is None and routed.destination in engines

    run(scenario())


def test_get_models_lists_the_configured_models(engines: list[str]) -> None:
    endpoints = [{"address": engines[0], "models": ["qwen3-0.6b", "alias"]}]

    async def scenario() -> None:
        async with picker(config({"endpoints": endpoints})) as (server, proxy):
            result = await proxy.send(None, headers={":method": "GET", ":path": "/v1/models"})
            with_body = await proxy.send(b"{}", headers={":method": "GET", ":path": "/v1/models"})
            assert server.processor.router.counters.decisions == 0
        assert result.immediate is not None and result.immediate.status.code == 200
        listing = json.loads(result.immediate.body)
        assert [m["id"] for m in listing["data"]] == ["alias", "qwen3-0.6b"]
        assert with_body.immediate is not None and with_body.immediate.status.code == 400

    run(scenario())


def test_a_local_reply_without_a_request_passes_through_unchanged(
    engines: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    # Envoy sends its own reply to a request it could not parse (400, 431) through ext_proc
    # unless the config skips the filter (examples/envoy/*.yaml do): the picker then sees
    # response messages on a stream whose request it never saw. It must pass them through.
    body = b'{"error": {"message": "bad", "type": "invalid_request_error"}}'

    async def scenario() -> None:
        async with picker(config({"endpoints": pool(*engines)})) as (server, proxy):
            call = proxy.stub.Process()
            headers = pb.HttpHeaders(
                headers=header_map({":status": "400", "content-type": "application/json"})
            )
            first = pb.ProcessingRequest(response_headers=headers)
            first.protocol_config.CopyFrom(
                pb.ProtocolConfiguration(request_body_mode=DUPLEX, response_body_mode=DUPLEX)
            )
            await call.write(first)
            await call.write(
                pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=True))
            )
            await call.done_writing()
            answers = [answer async for answer in call]
            assert [a.WhichOneof("response") for a in answers] == [
                "response_headers",
                "response_body",
            ]
            assert answers[0].response_headers == pb.HeadersResponse()
            streamed = answers[1].response_body.response.body_mutation.streamed_response
            assert (streamed.body, streamed.end_of_stream) == (body, True)
            assert server.processor.router.counters.decisions == 0

    with caplog.at_level("ERROR"):
        run(scenario())
    assert not caplog.records
