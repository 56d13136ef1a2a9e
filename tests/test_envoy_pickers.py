"""Two `prefixroute extproc` pickers behind one Envoy cluster, and one of them killed mid-run.

The shipped `examples/envoy/envoy-2pickers.yaml` (only its ports and addresses
rewritten, by prefixroute.devtools.envoy) in a real Envoy 1.40; two pickers
started as a user starts them (the `prefixroute extproc` console script, one
process each, the same config file); fake engines in their own process
(`prefixroute fake-engine`). A bounded load (a few hundred requests from a few
client threads) runs through Envoy; one picker gets SIGKILL part-way. What is
measured is what the clients see (status of every request), how fast Envoy
takes the dead picker out (its admin `/clusters` health flags, polled), and
that both pickers decided requests (their `/metrics`). A second test holds six
requests half-sent, so their streams are open on both pickers and none is
answered, kills one picker, and checks that Envoy moved its streams to the other.

`python -m tests.test_envoy_pickers --runs 5` prints the figures docs/envoy.md
quotes. Sources: Envoy's ext_proc filter and `config.core.v3.GrpcService`
(`retry_policy`), cluster outlier detection and gRPC health checking
(envoyproxy/envoy API docs, v1.40); the ext_proc stream's retry buffering is
Envoy's `ExternalProcessorStreamImpl::startStream` (`setBufferBodyForRetry`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal as signal_module
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import yaml

from prefixroute.devtools.envoy import (
    EXAMPLES,
    Envoy,
    ext_proc_config,
    free_ports,
    render,
    run_envoy,
    validate,
)
from prefixroute.devtools.redis import redis_server
from tests.helpers import chat_body
from tests.servers import free_port, free_port_block, run_process, wait_until

CONFIG = "envoy-2pickers.yaml"
PREFIXROUTE = Path(sys.executable).parent / "prefixroute"  # the console script users run
SYSTEMS = [
    f"You are assistant number {i} of the two-picker test; answer briefly. " * 8 for i in range(8)
]


# -- the parts -----------------------------------------------------------------------------------


@contextlib.contextmanager
def fake_engines(count: int, *, time_scale: float) -> Iterator[list[str]]:
    """`prefixroute fake-engine --engines count` in its own process; yields the "host:port"s."""
    base = free_port_block(count)
    args = [str(PREFIXROUTE), "fake-engine", "--port", str(base), "--engines", str(count)]
    args += ["--time-scale", str(time_scale)]
    addresses = [f"127.0.0.1:{base + i}" for i in range(count)]
    with run_process(args, ready_url=f"http://{addresses[-1]}/health", timeout_s=30):
        yield addresses


@attrs.frozen
class Picker:
    """One `prefixroute extproc` process: its gRPC address and its metrics URL."""

    address: str
    metrics: str
    process: subprocess.Popen[bytes]

    def decisions(self) -> float:
        """`prefixroute_decisions_total` summed over its labels."""
        with urllib.request.urlopen(self.metrics, timeout=5) as answer:
            text: str = answer.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("prefixroute_decisions_total")
        )


@contextlib.contextmanager
def picker(config: Path) -> Iterator[Picker]:
    """`prefixroute extproc --config config` on free ports, as a user runs it."""
    port, metrics_port = free_port(), free_port()
    args = [str(PREFIXROUTE), "extproc", "--config", str(config), "--port", str(port)]
    args += ["--metrics-port", str(metrics_port), "--log-level", "warning"]
    url = f"http://127.0.0.1:{metrics_port}"
    with run_process(args, ready_url=f"{url}/health", timeout_s=30) as process:
        yield Picker(f"127.0.0.1:{port}", f"{url}/metrics", process)


def picker_config(engines: list[str], workdir: Path, shared: str | None = None) -> Path:
    """The one config file both pickers run (the default router profile).

    `shared`: a Redis URL the pickers share their state through (`shared_state`).
    """
    path = workdir / "extproc.yaml"
    endpoints = [{"address": a, "id": f"e{i}"} for i, a in enumerate(engines)]
    doc: dict[str, Any] = {"endpoints": endpoints, "extproc": {"host": "127.0.0.1"}}
    if shared is not None:
        doc["shared_state"] = {
            "url": shared,
            "key_prefix": f"pickers-{uuid.uuid4().hex[:8]}",
            "sync_interval_ms": 50,
            "contribution_ttl_ms": 1000,
        }
    path.write_text(yaml.safe_dump(doc))
    return path


def shared_replicas(p: Picker) -> int:
    """The replicas `p` saw alive in the shared store at its last sync (its `/health`)."""
    url = p.metrics.removesuffix("/metrics") + "/health"
    with urllib.request.urlopen(url, timeout=5) as answer:
        return int(json.load(answer)["shared_state"]["replicas"])


def health_flags(envoy: Envoy, address: str) -> str:
    """The `extproc` cluster's health flags for host `address` from the admin `/clusters`."""
    with urllib.request.urlopen(f"{envoy.admin}/clusters", timeout=2) as answer:
        text: str = answer.read().decode()
    prefix = f"extproc::{address}::health_flags::"
    for line in text.splitlines():
        if line.startswith(prefix):
            return line.removeprefix(prefix)
    return ""


def strip(doc: dict[str, Any], without: frozenset[str]) -> dict[str, Any]:
    """`doc` without the parts named in `without`, to measure what each one does.

    "retry": the ext_proc stream's retry policy; "outlier": the `extproc`
    cluster's outlier detection; "failclosed": `failure_mode_allow: false`
    becomes true (the shipped file fails closed).
    """
    manager = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = manager["typed_config"]["http_filters"]
    (ext_proc,) = [f for f in filters if f["name"] == "envoy.filters.http.ext_proc"]
    if "failclosed" in without:
        ext_proc_config(ext_proc)["failure_mode_allow"] = True
    if "outlier" in without:
        (cluster,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == "extproc"]
        del cluster["outlier_detection"]
    if "retry" in without:
        del ext_proc_config(ext_proc)["grpc_service"]["retry_policy"]
    return doc


# -- the load --------------------------------------------------------------------------------------


@attrs.frozen
class Outcome:
    """One request as its client saw it: times are seconds from the start of the load."""

    started: float
    ended: float
    status: int  # 0: no HTTP answer (the connection broke)
    detail: str  # the engine that answered, or the error code


@attrs.frozen
class Run:
    """What one run measured."""

    outcomes: list[Outcome]
    killed_at: float  # seconds from the start of the load
    ejected_after: float | None  # kill -> Envoy's flags show the picker out (None: never seen)
    flags: str  # those flags
    decisions: tuple[float, float]  # each picker's decisions at the kill
    survivor_after: float  # the survivor's decisions at the end
    stats: dict[str, int]
    replicas: tuple[int, int] = (1, 1)  # with shared state: replicas the survivor saw, before/after

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200]

    @property
    def in_flight_at_kill(self) -> int:
        return sum(o.started <= self.killed_at < o.ended for o in self.outcomes)

    def summary(self) -> str:
        failures = Counter(f"{o.status} {o.detail}" for o in self.failed)
        ejected = "never" if self.ejected_after is None else f"{self.ejected_after * 1000:.0f} ms"
        return (
            f"{len(self.outcomes)} requests, {len(self.failed)} failed {dict(failures)}; "
            f"{self.in_flight_at_kill} in flight at the kill; picker ejected after {ejected} "
            f"({self.flags}); decisions at the kill {self.decisions}; stats {self.stats}"
        )


def send(client: httpx.Client, url: str, body: dict[str, Any], t0: float) -> Outcome:
    started = time.monotonic() - t0
    try:
        answer = client.post(url, json=body, timeout=30)
    except httpx.TransportError as exc:
        return Outcome(started, time.monotonic() - t0, 0, type(exc).__name__)
    ended = time.monotonic() - t0
    if answer.status_code == 200:
        return Outcome(started, ended, 200, answer.headers.get("x-fake-engine-id", "?"))
    try:
        code = str(answer.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        code = answer.text[:80]
    return Outcome(started, ended, answer.status_code, code)


STATS = (
    "cluster.extproc.upstream_rq_retry",
    "cluster.extproc.upstream_rq_retry_success",
    "cluster.extproc.upstream_cx_connect_fail",
    "cluster.extproc.upstream_rq_rx_reset",
    "cluster.extproc.upstream_cx_destroy_remote_with_active_rq",
    "cluster.extproc.outlier_detection.ejections_enforced_total",
    "cluster.extproc.health_check.failure",
)


def run_once(
    *,
    workdir: Path,
    total: int = 200,
    clients: int = 4,
    rate: float = 80.0,
    kill_at: int = 80,
    time_scale: float = 0.0,
    max_tokens: int = 4,
    config: str = CONFIG,
    without: frozenset[str] = frozenset(),
    signal: str = "KILL",
    shared: str | None = None,
) -> Run:
    """Two pickers, fake engines, Envoy with `config`; `total` requests, one picker killed.

    `clients` threads share the requests, paced to `rate` requests a second in
    all; the second picker gets `signal` when request number `kill_at` is
    handed out. `without` measures the config without some of its parts
    (`strip`). Bounded: every request has a 30 s timeout; a run takes a few
    seconds. `shared`: the pickers share state through this Redis.
    """
    with (
        fake_engines(2, time_scale=time_scale) as engines,
        picker(config_file := picker_config(engines, workdir, shared)) as first,
        picker(config_file) as second,
    ):
        ports = free_ports()
        doc = strip(render(config, ports, pickers=[first.address, second.address]), without)
        with run_envoy(doc) as envoy:
            envoy.wait_stat("cluster.extproc.membership_healthy", 2)
            url = f"{envoy.url}/v1/chat/completions"
            lock, handed, outcomes = threading.Lock(), [0], []
            reached = threading.Event()
            t0 = time.monotonic()

            def client() -> None:
                with httpx.Client() as session:
                    while True:
                        with lock:
                            i = handed[0]
                            handed[0] += 1
                        if i >= total:
                            return
                        if i == kill_at:
                            reached.set()
                        pause = t0 + i / rate - time.monotonic()
                        if pause > 0:
                            time.sleep(pause)
                        body = chat_body(f"question {i}", system=SYSTEMS[i % len(SYSTEMS)])
                        body["max_tokens"] = max_tokens
                        outcome = send(session, url, body, t0)
                        with lock:
                            outcomes.append(outcome)

            threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
            for thread in threads:
                thread.start()
            assert reached.wait(timeout=30), "the load never reached the kill"
            decisions = (first.decisions(), second.decisions())
            before = shared_replicas(first) if shared else 1
            killed_at = time.monotonic() - t0
            second.process.send_signal(getattr(signal_module, f"SIG{signal}"))
            ejected_after, flags = None, ""
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                flags = health_flags(envoy, second.address)
                if flags != "healthy":
                    ejected_after = time.monotonic() - t0 - killed_at
                    break
                time.sleep(0.005)
            for thread in threads:
                thread.join(timeout=60)
            second.process.wait(timeout=10)
            stats = {name.removeprefix("cluster.extproc."): envoy.stat(name) for name in STATS}
            survivor = first.decisions()
            after = before
            if shared:  # the dead picker's contribution expires (contribution_ttl_ms 1000)
                deadline = time.monotonic() + 5
                while (after := shared_replicas(first)) != 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
    outcomes.sort(key=lambda o: o.started)
    return Run(
        outcomes, killed_at, ejected_after, flags, decisions, survivor, stats, (before, after)
    )


# -- the tests -------------------------------------------------------------------------------------


def test_the_two_picker_config_is_valid() -> None:
    assert "OK" in validate(EXAMPLES / CONFIG)


def test_two_pickers_differ_from_envoy_yaml_only_where_they_say() -> None:
    one = yaml.safe_load((EXAMPLES / "envoy.yaml").read_text())
    two = yaml.safe_load((EXAMPLES / CONFIG).read_text())
    (cluster,) = [c for c in two["static_resources"]["clusters"] if c["name"] == "extproc"]
    outlier = cluster.pop("outlier_detection")
    assert outlier["consecutive_local_origin_failure"] == 1
    assert outlier["split_external_local_origin_errors"] is True
    hosts = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [h["endpoint"]["address"]["socket_address"]["port_value"] for h in hosts] == [9002, 9003]
    del hosts[1]
    (thresholds,) = cluster["circuit_breakers"]["thresholds"]
    assert thresholds.pop("max_retries") == thresholds["max_requests"]
    manager = two["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (ext_proc,) = [
        f
        for f in manager["typed_config"]["http_filters"]
        if f["name"] == "envoy.filters.http.ext_proc"
    ]
    config = ext_proc_config(ext_proc)
    assert config["failure_mode_allow"] is False  # fail-closed, as envoy.yaml
    retry = config["grpc_service"].pop("retry_policy")
    assert set(retry["retry_on"].split(",")) >= {"connect-failure", "reset"}
    (predicate,) = retry["retry_host_predicate"]
    assert predicate["name"] == "envoy.retry_host_predicates.previous_hosts"
    assert one == two


@pytest.mark.slow  # about 10 s: two pickers, fake engines and Envoy started as processes
def test_a_stream_the_killed_picker_had_not_answered_is_retried_on_the_other(
    tmp_path: Path,
) -> None:
    # Six requests whose bodies stop half-way: each has an ext_proc stream open on one picker
    # (round robin on each of Envoy's two worker threads, so both pickers hold some), and no
    # picker can answer before the body ends. One picker is killed; then the bodies end. Envoy
    # starts each broken stream again on the other picker, with the messages it had sent.
    with (
        fake_engines(2, time_scale=0.0) as engines,
        picker(picker_config(engines, tmp_path)) as first,
        picker(picker_config(engines, tmp_path)) as second,
    ):
        doc = render(CONFIG, free_ports(), pickers=[first.address, second.address])
        with run_envoy(doc) as envoy:
            envoy.wait_stat("cluster.extproc.membership_healthy", 2)
            gate = threading.Event()
            answers: list[httpx.Response | Exception] = []

            def halves(i: int) -> Iterator[bytes]:
                body = json.dumps(chat_body(f"slow {i}", system=SYSTEMS[i])).encode()
                yield body[: len(body) // 2]
                gate.wait(timeout=20)
                yield body[len(body) // 2 :]

            def client(i: int) -> None:
                try:
                    answers.append(
                        httpx.post(
                            f"{envoy.url}/v1/chat/completions",
                            content=halves(i),
                            headers={"content-type": "application/json"},
                            timeout=30,
                        )
                    )
                except httpx.HTTPError as exc:
                    answers.append(exc)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
            for thread in threads:
                thread.start()
            wait_until(
                lambda: envoy.stat("cluster.extproc.upstream_rq_active") == 6,
                message="six ext_proc streams open",
            )
            assert envoy.stat("cluster.extproc.upstream_rq_total") == 6
            second.process.kill()
            second.process.wait(timeout=10)
            wait_until(
                lambda: envoy.stat("cluster.extproc.upstream_rq_retry") >= 1,
                message="the broken streams retried",
            )
            gate.set()
            for thread in threads:
                thread.join(timeout=30)
            retried = envoy.stat("cluster.extproc.upstream_rq_retry_success")
            decided = first.decisions()
            with urllib.request.urlopen(f"{envoy.admin}/stats?filter=extproc", timeout=5) as a:
                stats = a.read().decode()
    statuses = [a.status_code if isinstance(a, httpx.Response) else repr(a) for a in answers]
    assert statuses == [200] * 6, stats
    assert retried >= 1  # the streams that were on the killed picker
    assert decided == 6  # the survivor decided every request, the retried ones included


@pytest.mark.slow  # about 10 s
def test_a_killed_picker_fails_only_requests_it_had_already_answered(tmp_path: Path) -> None:
    # 200 requests from 4 clients at 80 a second; one picker is killed at the 80th. Measured
    # (docs/envoy.md): 0 to 2 failures a run, each a request in flight at the kill whose picker
    # had already answered (its stream cannot be moved): a JSON 500, or a cut answer. The two
    # pickers share state through a real Redis (docs/replicas.md): the survivor saw 2 replicas,
    # then 1 once the dead one's contribution expired.
    with redis_server() as redis:
        run = run_once(workdir=tmp_path, shared=redis.url)
    summary = run.summary()
    assert run.replicas == (2, 1), (run.replicas, summary)
    assert len(run.outcomes) == 200, summary  # none left hanging
    assert min(run.decisions) >= 10, summary  # both pickers decided requests before the kill
    after = [o for o in run.outcomes if o.started > run.killed_at]
    assert len(after) >= 100, summary
    assert all(o.status == 200 for o in after), summary  # nothing sent after the kill fails
    assert len(run.failed) <= run.in_flight_at_kill, summary
    for outcome in run.failed:
        assert outcome.started <= run.killed_at < outcome.ended, summary
        assert (outcome.status, outcome.detail) in {
            (500, "endpoint-picker-unavailable"),
            (0, "RemoteProtocolError"),
        }, summary
    # every request sent after the kill was decided by the survivor
    assert run.survivor_after - run.decisions[0] >= len(after), summary
    # Envoy took the dead picker out at its first refused or reset stream, not a second later
    assert run.ejected_after is not None and run.ejected_after < 0.5, summary


def main(argv: list[str] | None = None) -> None:
    """`python -m tests.test_envoy_pickers`: the measurements docs/envoy.md quotes."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--total", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rate", type=float, default=80.0)
    parser.add_argument("--kill-at", type=int, default=80)
    parser.add_argument("--time-scale", type=float, default=0.0)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--signal", default="KILL", choices=["KILL", "TERM"])
    parser.add_argument(
        "--without",
        action="append",
        default=[],
        choices=["retry", "outlier", "failclosed"],
        help="measure the config without its stream retry, its outlier detection, or fail-closed",
    )
    args = parser.parse_args(argv)
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as workdir:
            run = run_once(
                workdir=Path(workdir),
                total=args.total,
                clients=args.clients,
                rate=args.rate,
                kill_at=args.kill_at,
                time_scale=args.time_scale,
                max_tokens=args.max_tokens,
                config=args.config,
                without=frozenset(args.without),
                signal=args.signal,
            )
        print(f"run {i + 1}: {run.summary()}", flush=True)
        for o in run.failed:
            print(f"   failed: {o}")


if __name__ == "__main__":
    main()
