"""`prefixroute fake-engine`'s command line: options, one process serving N engines on N ports.

Every engine is a `create_app` app under its own uvicorn server; all share
one event loop and one signal handler (`cli_main`), so Ctrl-C or SIGTERM stops
them together and a second one skips waiting for open streams.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Iterator

import uvicorn

from prefixroute.devtools.fake_engine.app import create_app
from prefixroute.devtools.fake_engine.config import FakeEngineConfig
from prefixroute.sim.cost import PROFILES

__all__ = ["cli_arguments", "cli_main", "configs_from_args", "listening_socket"]


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `prefixroute fake-engine`'s options to `parser`."""
    d = FakeEngineConfig()
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="first port (8000)")
    parser.add_argument(
        "--engines", type=int, default=1, help="engines on consecutive ports, one process (1)"
    )
    parser.add_argument(
        "--profile", default=d.profile, help=f"cost profile: {', '.join(PROFILES)} ({d.profile})"
    )
    parser.add_argument("--model", default=d.model, help=f"served model name ({d.model})")
    parser.add_argument("--model-path", default=None, help="local directory reported as model_path")
    parser.add_argument(
        "--kv-tokens", type=int, default=None, help="KV pool size in tokens (the profile's)"
    )
    parser.add_argument("--block-size", type=int, default=d.block_size, help="KV block size (16)")
    parser.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="(1024)")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens, help="(8192)"
    )
    parser.add_argument("--seed", type=int, default=0, help="engine i uses seed + i (0)")
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="step-time multiplier; 0 = no waiting (1.0)"
    )
    parser.add_argument(
        "--default-max-tokens",
        type=int,
        default=d.default_max_tokens,
        help="reply length when a body gives no max_tokens (16)",
    )
    parser.add_argument(
        "--log-level", default="warning", help="uvicorn log level (warning; info logs requests)"
    )


def configs_from_args(args: argparse.Namespace) -> list[tuple[int, FakeEngineConfig]]:
    """(port, config) per engine; ValueError naming the bad option."""
    if args.engines < 1:
        raise ValueError(f"--engines must be >= 1, got {args.engines}")
    if args.port < 1 or args.port + args.engines - 1 > 65535:
        raise ValueError(f"--port must leave room for {args.engines} ports below 65536")
    out = []
    for i in range(args.engines):
        port = args.port + i
        out.append(
            (
                port,
                FakeEngineConfig(
                    engine_id=f"fake-{port}",
                    model=args.model,
                    profile=args.profile,
                    kv_capacity_tokens=args.kv_tokens,
                    block_size=args.block_size,
                    max_num_seqs=args.max_num_seqs,
                    max_num_batched_tokens=args.max_num_batched_tokens,
                    default_max_tokens=args.default_max_tokens,
                    seed=args.seed + i,
                    time_scale=args.time_scale,
                    model_path=args.model_path,
                ),
            )
        )
    return out


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to `cli_main` (several share one loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listening_socket(host: str) -> socket.socket:
    """An unbound TCP socket for `host`, ready for uvicorn's `serve(sockets=...)`.

    Its proto is IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted
    connections only when the listener's proto says TCP, and without it Nagle's
    algorithm and the client's delayed ACK stall every response written in two
    pieces on a kept-alive connection (see docs/performance.md).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


def cli_main(args: argparse.Namespace) -> int:
    """Run the engines until SIGINT or SIGTERM; 2 for bad options, 1 if a port is taken."""
    try:
        configs = configs_from_args(args)
    except ValueError as e:
        print(f"prefixroute fake-engine: {e}", file=sys.stderr)
        return 2
    sockets: list[socket.socket] = []
    try:
        for port, _ in configs:
            sock = listening_socket(args.host)
            sockets.append(sock)
            sock.bind((args.host, port))
    except OSError as e:
        for s in sockets:
            s.close()
        print(f"prefixroute fake-engine: cannot bind {args.host}:{port}: {e}", file=sys.stderr)
        return 1
    servers = [
        _Server(
            uvicorn.Config(
                create_app(cfg),
                host=args.host,
                port=port,
                log_level=args.log_level,
                lifespan="on",
                timeout_graceful_shutdown=5,
            )
        )
        for port, cfg in configs
    ]

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def stop() -> None:
            for server in servers:
                if server.should_exit:
                    server.force_exit = True
                server.should_exit = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        urls = ", ".join(f"http://{args.host}:{port}" for port, _ in configs)
        print(f"prefixroute fake-engine: serving {args.model} on {urls}", file=sys.stderr)
        await asyncio.gather(*(s.serve(sockets=[k]) for s, k in zip(servers, sockets, strict=True)))

    try:
        asyncio.run(main())
    finally:
        for s in sockets:
            s.close()
    return 0
