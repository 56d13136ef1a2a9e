"""Each driver runs with its own extra alone: no driver's optional dependency leaks.

The fast tests import a driver in a subprocess where the other driver's
packages cannot be imported (a `sys.meta_path` finder refuses them), then
run its command and start it. The slow test builds a throwaway virtualenv,
installs the project with only the `extproc` extra from PyPI, and runs the
real `prefixroute extproc` command until it answers a gRPC health check and
drains on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.servers import free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent
GATEWAY_ONLY = ("starlette", "uvicorn", "httptools")
"""Packages of the `gateway` extra the picker must not need (uvloop is in both extras)."""
EXTPROC_ONLY = ("grpc", "grpc_health", "envoy", "xds", "udpa", "validate", "google.protobuf")
"""Packages of the `extproc` extra (gRPC and Envoy's generated protos) the gateway must not need."""

BLOCKER = """
import sys

BLOCKED = {blocked!r}


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{{name}} is not installed in this test")
        return None


sys.meta_path.insert(0, Blocker())


def leaked():
    return sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
"""


def run_without(blocked: tuple[str, ...], script: str) -> str:
    """Run `script` in a fresh interpreter where `blocked` packages cannot be imported."""
    code = BLOCKER.format(blocked=blocked) + textwrap.dedent(script)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_picker_runs_without_the_gateway_packages() -> None:
    metrics_port = free_port()
    out = run_without(
        GATEWAY_ONLY,
        f"""
        import asyncio
        import json
        import urllib.request

        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from prefixroute.cli import main
        from prefixroute.drivers.extproc import ExtProcConfig, ExtProcServer

        try:
            main(["extproc", "--help"])
        except SystemExit as exc:
            assert exc.code == 0, exc.code

        async def check():
            doc = {{"extproc": {{"port": 0, "metrics_port": {metrics_port}}}}}
            server = ExtProcServer(ExtProcConfig.from_document(doc))
            await server.start()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{{server.port}}") as channel:
                    stub = health_pb2_grpc.HealthStub(channel)
                    answer = await stub.Check(health_pb2.HealthCheckRequest(service=""))
                url = "http://127.0.0.1:{metrics_port}/metrics"
                metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read())
                return answer.status, b"prefixroute_" in metrics
            finally:
                await server.stop(grace=0.1)

        status, exported = asyncio.run(check())
        print(json.dumps({{"serving": status == health_pb2.HealthCheckResponse.SERVING,
                          "exported": exported, "leaked": leaked()}}))
        """,
    )
    assert "--config" in out and "--metrics-port" in out  # the help of `prefixroute extproc`
    report = json.loads(out.strip().splitlines()[-1])
    assert report == {"serving": True, "exported": True, "leaked": []}


def test_the_gateway_runs_without_grpc_or_envoy_protos() -> None:
    out = run_without(
        EXTPROC_ONLY,
        """
        import json

        from prefixroute.cli import main
        from prefixroute.drivers.gateway import GatewayConfig, create_app

        try:
            main(["serve", "--help"])
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        app = create_app(GatewayConfig.from_document({"endpoints": []}))
        print(json.dumps({"app": type(app).__name__, "leaked": leaked()}))
        """,
    )
    assert "--config" in out and "--port" in out  # the help of `prefixroute serve`
    assert json.loads(out.strip().splitlines()[-1]) == {"app": "Starlette", "leaked": []}


def test_what_both_drivers_share_needs_neither_extra() -> None:
    out = run_without(
        GATEWAY_ONLY + EXTPROC_ONLY,
        """
        import prefixroute.drivers.errors
        import prefixroute.drivers.service
        import prefixroute.drivers.settings

        config = prefixroute.drivers.settings.DriverConfig.from_document({"server": {"port": 81}})
        print(config.server.port, leaked())
        """,
    )
    assert out.split() == ["81", "[]"]


def test_the_cli_names_the_one_extra_a_driver_needs() -> None:
    out = run_without(
        ("grpc",),
        """
        import contextlib
        import io

        from prefixroute.cli import main

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = main(["extproc", "--config", "x.yaml"])
        print(status, err.getvalue())
        """,
    )
    status, message = out.split(" ", 1)
    assert status == "2"
    assert "extproc needs the extproc extra: pip install 'prefixroute[extproc]'" in message


# -- a real install ----------------------------------------------------------------------------


def project_copy(dest: Path) -> Path:
    """The files a wheel is built from, copied (a build leaves `build/` behind in the tree)."""
    shutil.copytree(
        ROOT / "src",
        dest / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    return dest


@pytest.mark.slow  # builds a virtualenv and installs grpcio, xds-protos, numpy, aiohttp from PyPI
def test_an_install_with_only_the_extproc_extra_runs_the_picker(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, command = venv / "bin" / "python", venv / "bin" / "prefixroute"
    project = project_copy(tmp_path / "project")
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, f"{project}[extproc]"],
        check=True,
        timeout=900,
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for package in GATEWAY_ONLY:
        missing = subprocess.run([python, "-c", f"import {package}"], capture_output=True, env=env)
        assert missing.returncode != 0, f"{package} came with the extproc extra"
    where = [python, "-c", "import prefixroute; print(prefixroute.__file__)"]
    installed = subprocess.run(where, capture_output=True, text=True, env=env, check=True)
    assert installed.stdout.startswith(str(venv))  # the installed copy, not the source tree

    grpc_port, metrics_port = free_port(), free_port()
    config = tmp_path / "extproc.yaml"
    doc = {
        "endpoints": [{"address": f"127.0.0.1:{free_port()}"}],  # nothing needs to listen
        "extproc": {"drain_timeout_s": 2},
    }
    config.write_text(json.dumps(doc))
    args = [command, "extproc", "--config", config, "--port", str(grpc_port)]
    args += ["--metrics-port", str(metrics_port), "--log-level", "warning"]
    log = tmp_path / "extproc.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    try:
        wait_http(f"http://127.0.0.1:{metrics_port}/health", timeout_s=60, proc=proc)

        async def check() -> int:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                return int(answer.status)

        assert asyncio.run(check()) == health_pb2.HealthCheckResponse.SERVING
        health = httpx.get(f"http://127.0.0.1:{metrics_port}/health", timeout=5)
        assert health.json()["endpoints"] == 1  # the pool read the config
        assert "prefixroute_" in httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
