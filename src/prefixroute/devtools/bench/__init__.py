"""`prefixroute bench`: replay a scenario or a trace over HTTP against any OpenAI URL.

    prefixroute bench --url http://127.0.0.1:8080 [--url ...] --scenario seed --duration 10
    prefixroute bench --url URL --scenario conversation.jsonl.gz --time-scale 0.1
    prefixroute bench --url URL --scenario my-scenario.yaml --rate 32 --json out.json

The package is split along the tool's seams; this module re-exports what
other code imports, so callers name `prefixroute.devtools.bench` only:

* `wire`: what to send. A built-in scenario, a scenario file or a Mooncake
  trace as `SimRequest`s (`scenario_source`), each turned into the OpenAI
  request it stands for (`wire_request`; token-only trace requests become
  text, `prefixroute.devtools.prompts`).
* `config`: how a run goes (`LoadConfig`: open loop, closed loop or the
  scenario's own timing, bounds, timeouts), validated in one place.
* `send`: one request sent and measured (`Sender`: streaming TTFT, usage,
  the answering engine; several URLs round robin or sticky), the HTTP
  client, `run_with_uvloop`.
* `runner`: when requests go (`run_load` and its three loops).
* `report`: what came back (`Result`, `LoadReport`, `summarise`).
* `cli`: the command's flags, checks, probe and printed report
  (`cli_arguments`, `cli_main`).

docs/bench.md describes the command; docs/performance.md has the tool's
own cost per request.
"""

from __future__ import annotations

from prefixroute.devtools.bench.cli import cli_arguments, cli_main
from prefixroute.devtools.bench.config import LoadConfig, LoadConfigError
from prefixroute.devtools.bench.report import LoadReport, Result, percentile, summarise
from prefixroute.devtools.bench.runner import run_load
from prefixroute.devtools.bench.send import SPREADS, discover_model, run_with_uvloop
from prefixroute.devtools.bench.wire import (
    MODEL,
    WireRequest,
    Workload,
    messages_of,
    request_kind,
    scenario_source,
    seed_requests,
    source_requests,
    wire_request,
)

__all__ = [
    "MODEL",
    "SPREADS",
    "LoadConfig",
    "LoadConfigError",
    "LoadReport",
    "Result",
    "WireRequest",
    "Workload",
    "cli_arguments",
    "cli_main",
    "discover_model",
    "messages_of",
    "percentile",
    "request_kind",
    "run_load",
    "run_with_uvloop",
    "scenario_source",
    "seed_requests",
    "source_requests",
    "summarise",
    "wire_request",
]
