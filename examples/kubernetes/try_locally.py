"""Run the example's picker config on this machine: 2 replicas, a real Redis, a fake engine.

What the Kubernetes example deploys, without Kubernetes: the ConfigMap's `config.yaml` with its
pod paths made local (the endpoint file written by the ConfigMap's own `sync_endpoints.py`
resolving `localhost`, the test tokenizer, a password file), two `prefixroute extproc`
processes, a redis-server with a password (`prefixroute.devtools.redis`, `make redis` installs
it) and one fake engine. It prints what each replica's `/health` and `/metrics` say while Redis
is paused (SIGSTOP), resumed, stopped, restarted, and when one replica is killed; times are
from the fault to both replicas' `/health` saying so (polled every 20 ms). docs/deploy.md
quotes a run.

    .venv/bin/python examples/kubernetes/try_locally.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from prefixroute.devtools.live import free_port
from prefixroute.devtools.redis import start_redis

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BIN = Path(sys.executable).parent / "prefixroute"


def config_map() -> dict[str, Any]:
    for doc in yaml.safe_load_all((HERE / "30-picker.yaml").read_text(encoding="utf-8")):
        if doc and doc["kind"] == "ConfigMap":
            return dict(doc["data"])
    raise SystemExit("30-picker.yaml has no ConfigMap")


def health(port: int) -> dict[str, Any]:
    """The /health body (200 or 503); {} while the replica does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return dict(json.loads(r.read()), http=r.status)
    except urllib.error.HTTPError as e:
        return dict(json.loads(e.read()), http=e.code)
    except OSError:
        return {}


def metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def until(predicate: Callable[[], bool], what: str, timeout_s: float = 30.0) -> float:
    """Seconds until `predicate` holds (polled every 20 ms); SystemExit after `timeout_s`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.02)
    raise SystemExit(f"not within {timeout_s} s: {what}")


def shared(port: int) -> dict[str, Any]:
    return dict(health(port).get("shared_state") or {})


def main() -> int:
    data = config_map()
    work = Path(tempfile.mkdtemp(prefix="prefixroute-k8s-"))
    (work / "sync_endpoints.py").write_text(data["sync_endpoints.py"], encoding="utf-8")
    procs: list[subprocess.Popen[bytes]] = []
    engine_port = free_port()
    procs.append(
        subprocess.Popen(
            [BIN, "fake-engine", "--port", str(engine_port), "--model", "Qwen/Qwen3-0.6B"],
            stderr=subprocess.DEVNULL,
        )
    )
    endpoints = work / "endpoints.json"
    subprocess.run(
        [
            sys.executable,
            work / "sync_endpoints.py",
            "--service=localhost",
            f"--port={engine_port}",
            "--kv-port=5557",
            "--replay-port=5558",
            "--topic=kv",
            f"--out={endpoints}",
            "--once",
        ],
        check=True,
    )
    password = os.urandom(24).hex()
    redis = start_redis(password=password)
    (work / "password").write_text(password, encoding="utf-8")
    config = yaml.safe_load(data["config.yaml"])
    config["extproc"]["host"] = "127.0.0.1"
    config["endpoints"] = [{"file": str(endpoints)}]
    (model,) = config["models"]
    config["models"][model]["tokenizer"] = str(ROOT / "tests" / "fixtures" / "tiny-model")
    config["shared_state"]["url"] = f"redis://127.0.0.1:{redis.port}/0"
    config["shared_state"]["password_file"] = str(work / "password")
    (work / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    ports = [free_port() for _ in range(2)]
    logs = [work / f"picker{i}.log" for i in range(2)]
    for port, log in zip(ports, logs, strict=True):
        procs.append(
            subprocess.Popen(
                [
                    BIN,
                    "extproc",
                    "--config",
                    work / "config.yaml",
                    "--port",
                    str(free_port()),
                    "--metrics-port",
                    str(port),
                ],
                stderr=log.open("w"),
            )
        )
    both = lambda key, value: lambda: all(shared(p).get(key) == value for p in ports)  # noqa: E731
    try:
        until(both("replicas", 2), "both replicas see 2 replicas")
        print("started:", json.dumps(health(ports[0])))
        print("prefixroute_shared_state_up", metric(ports[0], "prefixroute_shared_state_up"))
        redis.pause()
        dt = until(both("state", "down"), "down after SIGSTOP")
        print(f"Redis paused (SIGSTOP): both replicas down after {dt:.2f} s")
        print("  /health:", json.dumps(health(ports[0])))
        print("  prefixroute_shared_state_up", metric(ports[0], "prefixroute_shared_state_up"))
        time.sleep(1.0)
        redis.resume()
        dt = until(both("state", "up"), "up after SIGCONT")
        print(f"Redis resumed (SIGCONT): both replicas up after {dt:.2f} s")
        redis.stop()
        dt = until(both("state", "down"), "down after stop")
        print(f"Redis stopped: both replicas down after {dt:.2f} s")
        redis.start()
        dt = until(both("state", "up"), "up after restart")
        print(f"Redis restarted (empty): both replicas up after {dt:.2f} s")
        until(both("replicas", 2), "both replicas see 2 replicas again")
        procs[2].send_signal(signal.SIGKILL)
        dt = until(lambda: shared(ports[0]).get("replicas") == 1, "1 replica after a kill")
        print(f"replica 2 killed (SIGKILL): replica 1 counts 1 replica after {dt:.2f} s")
        leaked = any(password in log.read_text() for log in logs)
        print("password in logs or /health:", leaked or password in json.dumps(health(ports[0])))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
        redis.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
