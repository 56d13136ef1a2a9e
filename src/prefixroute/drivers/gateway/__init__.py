"""`prefixroute serve`: an OpenAI-compatible HTTP gateway that routes with the core `Router`.

The gateway proxies OpenAI chat/completions requests to the engine the
router picks, relays the answer (SSE streams event by event) and feeds the
engine's usage back to the router. Its parts:

- `app`: the `Gateway` (state and request handlers) and `create_app`, the
  Starlette ASGI app;
- `protocol`: the HTTP connection (uvicorn's httptools protocol with limits on
  head size, header count, head and body read times and open connections);
- `responses`: OpenAI-style error responses (Starlette), also used by the fake engine;
- `server`: the process around the app: uvicorn, signals, the drain, and
  the `prefixroute serve` command line (`python -m prefixroute.drivers.gateway`).

The configuration is the one both drivers read,
`prefixroute.drivers.settings.DriverConfig`, named `GatewayConfig` here.
Everything needs the `gateway` extra (starlette, uvicorn, aiohttp,
prometheus-client); nothing here is imported by the ext_proc picker.
"""

from __future__ import annotations

from prefixroute.drivers.gateway.app import (
    DECISION_HEADER,
    Gateway,
    GatewayConfig,
    create_app,
    explain_header,
    request_streams,
)
from prefixroute.drivers.gateway.server import cli_arguments, cli_main, serve
from prefixroute.drivers.service import isolation_salt
from prefixroute.drivers.settings import MetricsConfig, ServerConfig

__all__ = [
    "DECISION_HEADER",
    "Gateway",
    "GatewayConfig",
    "MetricsConfig",
    "ServerConfig",
    "cli_arguments",
    "cli_main",
    "create_app",
    "explain_header",
    "isolation_salt",
    "request_streams",
    "serve",
]
