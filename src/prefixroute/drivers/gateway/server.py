"""`prefixroute serve`: the gateway's process around its ASGI app.

uvicorn (with uvloop and httptools when installed) runs the app from
`prefixroute.drivers.gateway.app.create_app` on one event loop. SIGTERM or
SIGINT starts a drain: `/health` answers 503 at once, uvicorn stops
accepting connections and open requests get up to `server.drain_timeout_s`
to finish; a completed drain exits with status 0. Connections are uvicorn's
httptools protocol with the gateway's client-side limits (head size and
count, head and body read times, open connections:
`prefixroute.drivers.gateway.protocol`); `uvicorn_config` builds the uvicorn
configuration with them. Once the app has started, the heap is frozen
(`gc.freeze`), so the collector's full passes skip what lives as long as
the process. `cli_arguments` and
`cli_main` are the `prefixroute serve` command (`prefixroute.cli`), also run
by `python -m prefixroute.drivers.gateway`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import resource
import socket
import sys
from collections.abc import Iterable
from typing import Any

import attrs
import uvicorn

from prefixroute.config import ConfigError
from prefixroute.drivers.gateway.app import Gateway, create_app
from prefixroute.drivers.gateway.protocol import protocol_class
from prefixroute.drivers.settings import DriverConfig, ServerConfig, log_level_argument
from prefixroute.schema import evolve

__all__ = ["cli_arguments", "cli_main", "serve", "uvicorn_config"]

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's server, telling the gateway when a drain starts (so /health says 503),
    and exiting with status 0 once the drain is done."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self.gateway = gateway

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # Everything alive once the app has started (modules, config, router, the pool's
        # first scrape) lives as long as the process: out of the collector's generations,
        # so its full collections no longer walk it on the request path
        # (docs/performance.md, "GC pauses").
        gc.collect()
        gc.freeze()

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.gateway.draining = True
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after shutting down, so the process would
        # die by SIGTERM; a completed drain is a clean exit (status 0) instead.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()


def uvicorn_config(app: Any, server: ServerConfig, *, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's configuration for `app` listening as `server` says, with its client limits.

    The connection class is `protocol.GatewayProtocol` (httptools) carrying
    `server`'s head, body and connection limits; idle keep-alive connections
    close after uvicorn's 5 s.
    """
    return uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        http=protocol_class(server),
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=max(1, math.ceil(server.drain_timeout_s)),
        access_log=log_level == "debug",
    )


def serve(config: DriverConfig, *, log_level: str = "info") -> None:
    """Run the gateway until SIGTERM/SIGINT, then drain for up to `drain_timeout_s`."""
    app = create_app(config)
    _fit_file_limit(config.server.max_connections)
    _Server(uvicorn_config(app, config.server, log_level=log_level), app.state.gateway).run()


def _fit_file_limit(max_connections: int) -> None:
    """Raise the soft open-file limit toward what `max_connections` needs; warn if it stays short.

    Each client connection can hold an upstream one too, so the soft limit
    should be about twice the cap; past it, accepting fails (uvicorn logs and
    retries) instead of the cap's clean 503. The soft limit is raised up to
    the hard one (as nginx's `worker_rlimit_nofile` does); a limit still short
    of the need is logged.
    """
    need = 2 * max_connections + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning(
            "the open-file limit (%d) is below twice server.max_connections (%d): "
            "raise it (ulimit -n) or lower the cap",
            soft,
            max_connections,
        )


# -- command line ------------------------------------------------------------------------------


def cli_arguments(parser: argparse.ArgumentParser) -> None:
    """`prefixroute serve` arguments."""
    parser.add_argument("--config", required=True, metavar="FILE", help="gateway config (YAML)")
    parser.add_argument("--host", help="listen address (overrides server.host)")
    parser.add_argument("--port", type=int, help="listen port (overrides server.port)")
    log_level_argument(parser)


def cli_main(args: argparse.Namespace) -> int:
    """Run `prefixroute serve`; 2 with a one-line message for a bad config."""
    try:
        config = DriverConfig.from_file(args.config)
        overrides: dict[str, Any] = {}
        if args.host is not None:
            overrides["host"] = args.host
        if args.port is not None:
            overrides["port"] = args.port
        if overrides:
            try:
                server = evolve(config.server, overrides, "", error=ConfigError)
            except ConfigError as exc:
                raise ConfigError(
                    "--" + exc.path if exc.path else "command line", exc.message
                ) from exc
            config = attrs.evolve(config, server=server)
        logging.basicConfig(
            level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        serve(config, log_level=args.log_level)
    except ConfigError as exc:
        print(f"prefixroute serve: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="prefixroute serve", description="run the OpenAI-compatible gateway"
    )
    cli_arguments(parser)
    return cli_main(parser.parse_args(None if argv is None else list(argv)))
