"""Envoy and the picker under the wire fuzzer: the shipped envoy.yaml in front of `prefixroute
extproc` and two fake engines, fed the same generated requests as the gateway.

The harness is tests/test_fuzz_gateway.py's (`judge`, `Watch`, `Fuzzed`): the
answers a client of the Envoy sees are judged by the same rules (the picker's
and Envoy's errors are OpenAI error bodies too; docs/envoy.md, docs/extproc.md);
the watched process is the picker (its log, `/health` and `/metrics` on its
metrics port, its RSS), and every batch also checks that Envoy is alive and
ready and reads its RSS. One Envoy and one picker serve the module; a watch
failure restarts the picker (Envoy reconnects to the same port).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
import yaml

from prefixroute.devtools.envoy import free_ports, render, run_envoy
from tests.servers import free_port
from tests.test_fuzz_gateway import (
    IDENTITY,
    RSS_MAX_MB,
    Fuzzed,
    Recording,
    Watch,
    endpoints,
    recording_engines,
    start,
    stop,
    test_damaged_framing_over_a_raw_socket,
    test_fuzzed_bodies,
    test_fuzzed_headers,
    test_fuzzed_paths_and_methods,
    test_one_megabyte_model_name_leaves_metrics_small,
)

# The gateway's tests, collected here again: pytest resolves their `target` fixture in
# this module, so they run against Envoy + the picker instead of the gateway.
__all__ = [
    "test_damaged_framing_over_a_raw_socket",
    "test_fuzzed_bodies",
    "test_fuzzed_headers",
    "test_fuzzed_paths_and_methods",
    "test_one_megabyte_model_name_leaves_metrics_small",
]

_wire_engines = pytest.fixture(scope="module", name="wire_engines")(recording_engines)

ENVOY_RSS_MAX_MB = 300
"""Envoy's resident memory bound (the modest run peaks at about 75 MB, two worker threads)."""


@pytest.fixture(scope="module")
def envoy(
    wire_engines: tuple[list[str], list[Recording]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fuzzed]:
    """Envoy (examples/envoy/envoy.yaml) + one picker process, for the whole module."""
    engines, recorders = wire_engines
    workdir = tmp_path_factory.mktemp("fuzz-envoy")
    ports = free_ports()
    metrics_port = free_port()
    config = workdir / "extproc.yaml"
    doc = {
        "endpoints": endpoints(engines),
        "identity": IDENTITY,
        "extproc": {"host": "127.0.0.1"},
    }
    config.write_text(yaml.safe_dump(doc))
    metrics = f"http://127.0.0.1:{metrics_port}"
    log = workdir / "extproc.log"
    pickers = []
    with run_envoy(render("envoy.yaml", ports)) as proxy:

        def alive() -> None:
            assert proxy.process.poll() is None, f"envoy exited: {proxy.log_tail()}"
            with urllib.request.urlopen(f"{proxy.admin}/ready", timeout=5) as answer:
                assert answer.status == 200, f"envoy /ready {answer.status}"

        def begin() -> Watch:
            args = ["-m", "prefixroute.drivers.extproc", "--config", str(config)]
            args += ["--port", str(ports.extproc), "--metrics-port", str(metrics_port)]
            pickers.append(start([*args, "--log-level", "info"], log, f"{metrics}/health"))
            return Watch(
                health=f"{metrics}/health",
                metrics=f"{metrics}/metrics",
                pids={"picker": pickers[-1].pid, "envoy": proxy.process.pid},
                logs=[log],
                rss_max_mb={"picker": RSS_MAX_MB, "envoy": ENVOY_RSS_MAX_MB},
                extra=alive,
            )

        fuzzed = Fuzzed(begin, lambda: stop(pickers[-1]), proxy.url, recorders)
        try:
            yield fuzzed
        finally:
            print(fuzzed.summary("envoy"))
            fuzzed.close()


@pytest.fixture
def target(envoy: Fuzzed) -> Iterator[Fuzzed]:
    """The module's stack, its picker restarted if broken; deep checks again after the test."""
    envoy.fresh()
    yield envoy
    if envoy.watch.broken is None:
        envoy.watch.deep()
