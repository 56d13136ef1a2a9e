"""The floor of a Python ext_proc picker: the same gRPC messages as `prefixroute extproc`, no work.

    python benchmarks/extproc_floor.py --config FILE [--server aio|aio-uvloop|sync] [--bdp-probe]

A stand-in for `python -m prefixroute.drivers.extproc` (same config file,
same ports: `extproc.port` for gRPC with the health service,
`extproc.metrics_port` for `/health` and an empty `/metrics`) that answers
every message of the shipped `FULL_DUPLEX_STREAMED` protocol the way the
picker does (the held headers response naming the first configured
endpoint, the request body echoed, the response headers answered, each
response chunk echoed), but parses nothing and routes nothing. What it
costs per request is what the gRPC server alone costs in Python:
`benchmarks.extproc_cpu --routers envoy-script --picker-script
"benchmarks/extproc_floor.py --server aio"` measures it behind the real
Envoy. `--server`: `grpc.aio` on asyncio's loop, on uvloop, or grpc's
synchronous server (a thread per stream from a pool of 64). The gRPC
options are the picker's (`bdp_probe` off); `--bdp-probe` turns gRPC's
bandwidth-delay probes back on, as before issue 14.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

EXT_PROC = "envoy.service.ext_proc.v3.ExternalProcessor"
OPTIONS = [
    ("grpc.max_receive_message_length", 17 << 20),
    ("grpc.max_send_message_length", 17 << 20),
]
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _option(key: str, value: str) -> Any:
    header = base_pb2.HeaderValue(key=key, raw_value=value.encode())
    return base_pb2.HeaderValueOption(header=header, append_action=_OVERWRITE)


class Floor:
    """One stream's answers, as the picker gives them (module docstring)."""

    def __init__(self, destination: str) -> None:
        self.destination = destination
        self.metadata = struct_pb2.Struct()
        self.metadata.update({"envoy.lb": {"x-gateway-destination-endpoint": destination}})

    def answer(self, body: list[bytes], message: Any) -> list[Any]:
        kind = message.WhichOneof("request")
        if kind == "request_body":
            body.append(message.request_body.body)
            if not message.request_body.end_of_stream:
                return []
            payload = b"".join(body)
            headers = [
                _option("x-gateway-destination-endpoint", self.destination),
                _option("content-length", str(len(payload))),
            ]
            common = pb.CommonResponse(
                header_mutation=pb.HeaderMutation(set_headers=headers), clear_route_cache=True
            )
            first = pb.ProcessingResponse(
                request_headers=pb.HeadersResponse(response=common),
                dynamic_metadata=self.metadata,
            )
            return [first, _echo("request_body", payload, True)]
        if kind == "response_headers":
            return [pb.ProcessingResponse(response_headers=pb.HeadersResponse())]
        if kind == "response_body":
            chunk = message.response_body
            return [_echo("response_body", chunk.body, chunk.end_of_stream)]
        if kind == "response_trailers":
            return [pb.ProcessingResponse(response_trailers=pb.TrailersResponse())]
        return []  # request_headers: held until the body is complete


def _echo(phase: str, body: bytes, end_of_stream: bool) -> Any:
    response = pb.ProcessingResponse()
    chunk = getattr(response, phase).response.body_mutation.streamed_response
    chunk.body = body
    chunk.end_of_stream = end_of_stream
    return response


class AioServicer(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, floor: Floor) -> None:
        self.floor = floor

    async def Process(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        body: list[bytes] = []
        async for message in requests:
            for response in self.floor.answer(body, message):
                yield response


class SyncServicer(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, floor: Floor) -> None:
        self.floor = floor

    def Process(self, requests: Iterator[Any], context: Any) -> Iterator[Any]:
        body: list[bytes] = []
        for message in requests:
            yield from self.floor.answer(body, message)


async def serve_aio(
    floor: Floor, port: int, metrics_port: int, options: list[tuple[str, int]]
) -> None:
    server = grpc.aio.server(options=options)
    pb_grpc.add_ExternalProcessorServicer_to_server(AioServicer(floor), server)
    checks = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    for name in ("", EXT_PROC):
        await checks.set(name, health_pb2.HealthCheckResponse.SERVING)
    await server.start()

    async def ok(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(text="")

    app = web.Application()
    app.router.add_get("/health", ok)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", metrics_port).start()
    gc.collect()
    gc.freeze()
    await asyncio.Event().wait()


def serve_sync(floor: Floor, port: int, metrics_port: int, options: list[tuple[str, int]]) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=options)
    pb_grpc.add_ExternalProcessorServicer_to_server(SyncServicer(floor), server)
    checks = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    for name in ("", EXT_PROC):
        checks.set(name, health_pb2.HealthCheckResponse.SERVING)
    server.start()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}" if self.path == "/health" else b"")

        def log_message(self, *args: Any) -> None:
            pass

    gc.collect()
    gc.freeze()
    ThreadingHTTPServer(("127.0.0.1", metrics_port), Handler).serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--server", choices=("aio", "aio-uvloop", "sync"), default="aio")
    parser.add_argument("--bdp-probe", action="store_true", help="gRPC's BDP probes on")
    parser.add_argument("--log-level", default="warning", help="accepted, ignored")
    args = parser.parse_args(argv)
    with open(args.config, encoding="utf-8") as f:
        config = json.load(f)
    floor = Floor(config["endpoints"][0]["address"])
    port, metrics_port = config["extproc"]["port"], config["extproc"]["metrics_port"]
    options = [*OPTIONS, ("grpc.http2.bdp_probe", int(args.bdp_probe))]
    if args.server == "sync":
        serve_sync(floor, port, metrics_port, options)
    elif args.server == "aio-uvloop":
        import uvloop

        uvloop.run(serve_aio(floor, port, metrics_port, options))
    else:
        asyncio.run(serve_aio(floor, port, metrics_port, options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
