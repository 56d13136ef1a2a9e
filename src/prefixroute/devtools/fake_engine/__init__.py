"""`prefixroute fake-engine`: a stand-in vLLM server driven in real time by the simulator's engine.

Each fake engine runs the simulator's engine model
(`prefixroute.sim.engine.Engine`: paged KV pool, automatic prefix caching,
chunked-prefill scheduler) against the clock, so latency, batching, queueing,
cache hits and evictions are those of a cost profile, while its HTTP surface
is a real server that gateways, routers and load generators can talk to:
OpenAI chat completions and completions (streamed or not), vLLM's `/metrics`,
sglang's `/model_info` and `/server_info`. See `docs/fake-engine.md`.

Modules, one concept each:

- `config`: `FakeEngineConfig`, what one engine serves and its limits;
- `engine`: `FakeEngine`, the real-time step loop, and the `Job`s it runs;
- `metrics`: `EngineMetrics`, the vLLM-named Prometheus registry;
- `streaming`: the SSE streamer shared by chat and completions;
- `app`: `create_app`, the Starlette handlers and request parsing;
- `cli`: `cli_arguments` and `cli_main`, N engines on N ports in one process
  (also `python -m prefixroute.devtools.fake_engine`).
"""

from __future__ import annotations

from prefixroute.devtools.fake_engine.app import ENGINE_ID_HEADER, create_app
from prefixroute.devtools.fake_engine.cli import (
    cli_arguments,
    cli_main,
    configs_from_args,
    listening_socket,
)
from prefixroute.devtools.fake_engine.config import FakeEngineConfig, default_model_path
from prefixroute.devtools.fake_engine.engine import FakeEngine

__all__ = [
    "ENGINE_ID_HEADER",
    "FakeEngine",
    "FakeEngineConfig",
    "cli_arguments",
    "cli_main",
    "configs_from_args",
    "create_app",
    "default_model_path",
    "listening_socket",
]
