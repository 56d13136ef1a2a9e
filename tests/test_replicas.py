"""Several gateway replicas sharing state through a real Redis (issue 15).

Every test runs against a real `redis-server` on 127.0.0.1 (Debian's, see
`make redis`) and fake engines on loopback. In-process replicas (two
gateways in threads of this process) let the tests look inside each
router; `prefixroute serve` processes show the same as a user runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_client
import yaml

from prefixroute.devtools.fake_engine import ENGINE_ID_HEADER, FakeEngineConfig
from prefixroute.devtools.fake_engine import create_app as engine_app
from prefixroute.devtools.redis import RedisServer, redis_server
from prefixroute.drivers.gateway import Gateway, GatewayConfig, create_app
from prefixroute.drivers.shared import SharedStateConfig
from prefixroute.endpoint import EndpointId
from tests.helpers import chat_body
from tests.servers import free_port, run_process, serve_in_thread, wait_until

SYSTEM = "You are the replicas' test assistant; answer in one short line, please. " * 10
RATE_LIMITED = [
    {"type": "token-bucket-admission", "name": "rate", "parameters": {"requests_per_s": 4}},
]


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(scope="module")
def slow_engines() -> Iterator[list[str]]:
    """Two fake engines whose answers take a while (requests stay in flight)."""
    with (
        serve_in_thread(engine_app(FakeEngineConfig(engine_id="slow-a", time_scale=1.0))) as a,
        serve_in_thread(engine_app(FakeEngineConfig(engine_id="slow-b", time_scale=1.0))) as b,
    ):
        yield [a.removeprefix("http://"), b.removeprefix("http://")]


def document(
    redis: RedisServer | None,
    engines: list[str],
    *,
    prefix: str,
    port: int | None = None,
    rate_limited: bool = False,
    **shared: Any,
) -> dict[str, Any]:
    """A gateway config over `engines`, sharing state in `redis` under `prefix` (None: alone)."""
    doc: dict[str, Any] = {
        "endpoints": [{"address": a, "id": f"e{i}"} for i, a in enumerate(engines)],
        "scrape": {"interval_s": 0.2},
    }
    if port is not None:
        doc["server"] = {"port": port}
    if redis is not None:
        doc["shared_state"] = {
            "url": redis.url,
            "key_prefix": prefix,
            "timeout_ms": 50,
            "sync_interval_ms": 50,
            "contribution_ttl_ms": 1000,
            "replica_id": f"r-{uuid.uuid4().hex[:8]}",  # in-process replicas share a pid
            **shared,
        }
    if rate_limited:
        doc["plugins"] = [
            {"type": "healthy-filter"},
            {"type": "prefix-affinity-scorer", "name": "prefix"},
            {"type": "inflight-scorer", "name": "inflight"},
            {"type": "max-score-picker"},
            *RATE_LIMITED,
        ]
        doc["profiles"] = [
            {
                "name": "limited",
                "plugins": [
                    {"pluginRef": "healthy-filter"},
                    {"pluginRef": "prefix", "weight": 3},
                    {"pluginRef": "inflight", "weight": 2},
                    {"pluginRef": "max-score-picker"},
                    {"pluginRef": "rate"},
                ],
            }
        ]
    return doc


@contextlib.contextmanager
def replicas(docs: list[dict[str, Any]]) -> Iterator[list[tuple[str, Gateway]]]:
    """In-process gateways (one thread each), as (base URL, Gateway)."""
    with contextlib.ExitStack() as stack:
        out = []
        for doc in docs:
            app = create_app(GatewayConfig.from_document(doc))
            url = stack.enter_context(serve_in_thread(app))
            out.append((url, app.state.gateway))
        yield out


def ask(
    url: str,
    question: str,
    *,
    tenant: str = "acme",
    max_tokens: int = 4,
    session: str | None = None,
) -> httpx.Response:
    body = chat_body(question, system=SYSTEM, max_tokens=max_tokens)
    headers = {"x-tenant-id": tenant}
    if session is not None:
        headers["x-session-id"] = session
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30)


def health(url: str) -> dict[str, Any]:
    answer = httpx.get(f"{url}/health", timeout=5)
    body: dict[str, Any] = answer.json()
    return body


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


# -- load ------------------------------------------------------------------------------------


def test_each_replica_sees_the_in_flight_requests_of_the_others(
    redis: RedisServer, slow_engines: list[str]
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    docs = [document(redis, slow_engines, prefix=prefix) for _ in range(2)]
    with replicas(docs) as ((url_a, a), (_, b)), ThreadPoolExecutor(4) as pool:
        answers = [pool.submit(ask, url_a, f"long question {i}", max_tokens=400) for i in range(4)]
        wait_until(lambda: a.router.load.in_flight() == 4, message="4 requests in flight on A")
        wait_until(
            lambda: b.router.load.in_flight() == 4,
            timeout_s=5,
            message="B counts A's 4 in-flight requests",
        )
        assert b.router.load.local_requests_view() == {}
        assert sum(b.router.load.requests(EndpointId(f"e{i}")) for i in range(2)) == 4
        assert all(f.result().status_code == 200 for f in answers)
        wait_until(lambda: b.router.load.in_flight() == 0, timeout_s=5, message="A's gone on B")
        assert health(url_a)["shared_state"]["replicas"] == 2


def test_without_shared_state_a_replica_sees_only_its_own_requests(
    slow_engines: list[str],
) -> None:
    """The control of the test above: the same two replicas, no `shared_state`."""
    docs = [document(None, slow_engines, prefix="-") for _ in range(2)]
    with replicas(docs) as ((url_a, a), (url_b, b)), ThreadPoolExecutor(4) as pool:
        answers = [pool.submit(ask, url_a, f"long question {i}", max_tokens=400) for i in range(4)]
        wait_until(lambda: a.router.load.in_flight() == 4, message="4 requests in flight on A")
        time.sleep(0.3)  # six sync intervals of the shared test: nothing may arrive
        assert b.router.load.in_flight() == 0 and "shared_state" not in health(url_b)
        assert all(f.result().status_code == 200 for f in answers)


# -- decisions -------------------------------------------------------------------------------


def test_a_decision_on_one_replica_reaches_the_other_replicas_index(
    redis: RedisServer, slow_engines: list[str]
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    docs = [document(redis, slow_engines, prefix=prefix) for _ in range(2)]
    with replicas(docs) as ((url_a, a), (url_b, b)):
        answer = ask(url_a, "which engine holds this prefix?", max_tokens=1, session="s1")
        assert answer.status_code == 200
        (decided,) = [e for e in ("e0", "e1") if a.router.index.size(EndpointId(e))]
        wait_until(
            lambda: b.router.index.size(EndpointId(decided)) > 0,
            timeout_s=5,
            message="A's decision applied to B's index",
        )
        other = "e1" if decided == "e0" else "e0"
        assert b.router.index.size(EndpointId(other)) == 0
        # A's request was served: its completion confirms the entries on B too (they would
        # otherwise expire while A keeps its own)
        wait_until(
            lambda: b.router.index.stats().speculative == 0,
            timeout_s=5,
            message="A's completion confirmed B's entries",
        )
        assert b.router.index.size(EndpointId(decided)) == a.router.index.size(EndpointId(decided))
        assert b.router.load.session_endpoint(("acme", "s1")) == decided  # session affinity too
        assert health(url_b)["shared_state"]["peer_decisions"] >= 1
        assert metric(url_b, "prefixroute_shared_state_peer_decisions_total") >= 1
        # B sends the same conversation where A did, five times: its index predicts the hit
        engine_of = {"e0": "slow-a", "e1": "slow-b"}
        for _ in range(5):
            answer = ask(url_b, "which engine holds this prefix?", max_tokens=1)
            assert answer.headers[ENGINE_ID_HEADER] == engine_of[decided]


# -- rate limits across processes --------------------------------------------------------------


@contextlib.contextmanager
def serve_processes(docs: list[dict[str, Any]], tmp_path: Path) -> Iterator[list[str]]:
    """`python -m prefixroute.drivers.gateway` per document, as a user runs replicas."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        urls = []
        for i, doc in enumerate(docs):
            config = tmp_path / f"replica-{i}.json"
            config.write_text(json.dumps(doc), encoding="utf-8")
            url = f"http://127.0.0.1:{doc['server']['port']}"
            args = ["-m", "prefixroute.drivers.gateway", "--config", str(config)]
            stack.enter_context(
                run_process([*args, "--log-level", "warning"], ready_url=f"{url}/health")
            )
            urls.append(url)
        yield urls


def _hammer(urls: list[str], seconds: float, tenant: str) -> tuple[int, int, float]:
    """Round-robin requests over `urls` from 6 threads for `seconds`: (200s, 429s, elapsed)."""
    ok = limited = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    start = time.monotonic()

    def worker(k: int) -> None:
        nonlocal ok, limited
        n = k
        with httpx.Client(timeout=10) as client:
            while time.monotonic() < stop:
                body = chat_body(f"q {n}", system=SYSTEM, max_tokens=1)
                answer = client.post(
                    f"{urls[n % len(urls)]}/v1/chat/completions",
                    json=body,
                    headers={"x-tenant-id": tenant},
                )
                with lock:
                    if answer.status_code == 200:
                        ok += 1
                    elif answer.status_code == 429:
                        limited += 1
                    else:
                        raise AssertionError(answer.text)
                n += 6

    with ThreadPoolExecutor(6) as pool:
        for f in [pool.submit(worker, k) for k in range(6)]:
            f.result()
    return ok, limited, time.monotonic() - start


@pytest.mark.slow
def test_four_serve_processes_hold_a_tenant_to_its_rate_limit(
    redis: RedisServer, tmp_path: Path
) -> None:
    """4 req/s (burst 4) for the tenant: four replicas together admit at most 1.05 x that."""
    with (
        serve_in_thread(engine_app(FakeEngineConfig(engine_id="rl", time_scale=0.0))) as engine,
    ):
        engines = [engine.removeprefix("http://")]
        prefix = f"t{uuid.uuid4().hex[:8]}"
        shared = [  # a generous timeout: a stall of this busy machine is not an outage here
            document(
                redis, engines, prefix=prefix, port=free_port(), rate_limited=True, timeout_ms=500
            )
            for _ in range(4)
        ]
        alone = [
            document(None, engines, prefix="-", port=free_port(), rate_limited=True)
            for _ in range(2)
        ]
        with serve_processes(shared, tmp_path / "shared") as urls:
            ok, limited, elapsed = _hammer(urls, 3.0, "burster")
        bound = 4 + 4 * elapsed
        assert limited > 0 and ok <= 1.05 * bound + 1, (ok, limited, elapsed)
        with serve_processes(alone, tmp_path / "alone") as urls:
            ok_alone, _, elapsed_alone = _hammer(urls, 3.0, "burster")
        # each replica alone admits its own 4/s: two let twice the limit through
        assert ok_alone > 1.5 * (4 + 4 * elapsed_alone), (ok_alone, elapsed_alone)
    print(
        f"\nshared: {ok} admitted in {elapsed:.2f} s (limit {bound:.1f}), {limited} refused; "
        f"alone: {ok_alone} admitted in {elapsed_alone:.2f} s"
    )


# -- faults ------------------------------------------------------------------------------------


def _serves_within(url: str, n: int, limit_s: float) -> float:
    """Send `n` requests one by one; all must be 200; the slowest one's seconds."""
    worst = 0.0
    for i in range(n):
        t0 = time.monotonic()
        assert ask(url, f"fault {i}", max_tokens=1).status_code == 200
        worst = max(worst, time.monotonic() - t0)
    assert worst < limit_s, worst
    return worst


@pytest.mark.parametrize("fault", ["pause", "stop"])
def test_redis_paused_or_stopped_the_replica_serves_on_local_state_and_resyncs(
    redis: RedisServer, tmp_path: Path, fault: str
) -> None:
    with serve_in_thread(engine_app(FakeEngineConfig(engine_id="f", time_scale=0.0))) as engine:
        engines = [engine.removeprefix("http://")]
        prefix = f"t{uuid.uuid4().hex[:8]}"
        doc = document(redis, engines, prefix=prefix, rate_limited=True)
        doc["plugins"][-1]["parameters"] = {"requests_per_s": 1000}
        with replicas([doc]) as [(url, _)]:
            _serves_within(url, 5, 1.0)
            assert health(url)["shared_state"]["state"] == "up"
            if fault == "pause":
                redis.pause()
            else:
                redis.stop()
            try:
                # no request waits for Redis beyond its 50 ms timeout (plus the machine's noise)
                _serves_within(url, 10, 1.0)
                wait_until(
                    lambda: health(url)["shared_state"]["state"] == "down",
                    timeout_s=5,
                    message="/health says shared state is down",
                )
                answer = httpx.get(f"{url}/health", timeout=5)
                assert answer.status_code == 200  # the replica serves on local state
                assert metric(url, "prefixroute_shared_state_up") == 0.0
                assert metric(url, "prefixroute_shared_state_fallbacks_total") > 0
            finally:
                if fault == "pause":
                    redis.resume()
                else:
                    redis.restart()
            wait_until(
                lambda: health(url)["shared_state"]["state"] == "up",
                timeout_s=10,
                message="resynced after Redis came back",
            )
            assert metric(url, "prefixroute_shared_state_up") == 1.0
            _serves_within(url, 3, 1.0)


def test_a_killed_replica_s_contribution_expires(
    redis: RedisServer, slow_engines: list[str], tmp_path: Path
) -> None:
    """A replica killed with requests in flight: the survivor counts them until the TTL ends."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    doomed = document(redis, slow_engines, prefix=prefix, port=free_port())
    with replicas([document(redis, slow_engines, prefix=prefix)]) as [(_, survivor)]:
        config = tmp_path / "doomed.json"
        config.write_text(json.dumps(doomed), encoding="utf-8")
        url = f"http://127.0.0.1:{doomed['server']['port']}"
        args = ["-m", "prefixroute.drivers.gateway", "--config", str(config)]
        with (
            run_process([*args, "--log-level", "warning"], ready_url=f"{url}/health") as proc,
            ThreadPoolExecutor(3) as pool,
        ):
            for i in range(3):
                pool.submit(ask, url, f"doomed {i}", max_tokens=400)
            wait_until(
                lambda: survivor.router.load.in_flight() == 3,
                timeout_s=10,
                message="the survivor counts the doomed replica's 3 requests",
            )
            os.kill(proc.pid, signal.SIGKILL)
            killed = time.monotonic()
            wait_until(
                lambda: survivor.router.load.in_flight() == 0,
                timeout_s=5,
                message="the dead replica's contribution expired",
            )
            gone_after = time.monotonic() - killed
        assert gone_after < 1.0 + 1.0  # contribution_ttl_ms 1000, plus a sync and slack


def test_a_concurrency_cap_holds_across_replicas(
    redis: RedisServer, slow_engines: list[str]
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    docs = []
    for _ in range(2):
        doc = document(redis, slow_engines, prefix=prefix, rate_limited=True)
        doc["plugins"][-1] = {
            "type": "concurrency-admission",
            "name": "rate",
            "parameters": {"max_in_flight": 2},
        }
        docs.append(doc)
    with replicas(docs) as ((url_a, a), (url_b, b)), ThreadPoolExecutor(2) as pool:
        held = [pool.submit(ask, url_a, f"hold {i}", max_tokens=400) for i in range(2)]
        wait_until(lambda: a.router.ledger.in_flight("acme") == 2, message="2 held on A")
        wait_until(
            lambda: b.coordinator is not None and b.coordinator.peer_in_flight("acme") == 2,
            timeout_s=5,
            message="B knows A's 2 requests of acme",
        )
        refused = ask(url_b, "one more", max_tokens=1)
        assert refused.status_code == 429, refused.text
        assert "has 2 requests in flight, its limit is 2" in refused.json()["error"]["message"]
        assert ask(url_b, "another tenant", tenant="other", max_tokens=1).status_code == 200
        assert all(f.result().status_code == 200 for f in held)
        wait_until(
            lambda: b.coordinator is not None and b.coordinator.peer_in_flight("acme") == 0,
            timeout_s=5,
            message="A's requests ended on B too",
        )
        assert ask(url_b, "one more", max_tokens=1).status_code == 200


def test_the_shared_state_sections_in_the_docs_load() -> None:
    """The `shared_state` examples of docs/replicas.md and the README are valid sections."""
    root = Path(__file__).resolve().parent.parent
    blocks = []
    for doc in (root / "docs" / "replicas.md", root / "README.md"):
        text = doc.read_text(encoding="utf-8")
        blocks += [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "shared_state" in b]
    assert len(blocks) == 2
    for block in blocks:
        config = SharedStateConfig.from_document(yaml.safe_load(block))
        assert config is not None and config.timeout_ms == 50


def test_a_charge_for_a_request_refused_before_the_bucket_is_given_back(
    redis: RedisServer, slow_engines: list[str]
) -> None:
    """A concurrency cap ahead of the shared bucket refuses: Redis gets the charge back."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    doc = document(redis, slow_engines, prefix=prefix, rate_limited=True)
    doc["plugins"][-1]["parameters"] = {"requests_per_s": 0.01, "request_burst": 3}
    doc["plugins"].append(
        {"type": "concurrency-admission", "name": "cap", "parameters": {"max_in_flight": 1}}
    )
    doc["profiles"][0]["plugins"].insert(-1, {"pluginRef": "cap"})  # the cap, then the bucket
    store = redis_client.Redis(port=redis.port)
    level = f"{prefix}:bucket:acme"
    with replicas([doc]) as [(url, gateway)], ThreadPoolExecutor(1) as pool:
        held = pool.submit(ask, url, "hold", max_tokens=400)
        wait_until(lambda: gateway.router.ledger.in_flight("acme") == 1, message="one held")
        assert float(store.hget(level, "r") or 0) == pytest.approx(2, abs=0.01)
        for i in range(3):
            refused = ask(url, f"refused {i}", max_tokens=1)
            assert refused.status_code == 429 and "limit is 1" in refused.text
        wait_until(
            lambda: float(store.hget(level, "r") or 0) == pytest.approx(2, abs=0.01),
            timeout_s=5,
            message="the three charges given back",
        )
        assert held.result().status_code == 200
        wait_until(lambda: gateway.router.ledger.in_flight("acme") == 0, message="released")
        # the two requests the burst still holds are admitted; the third is over the limit
        assert [ask(url, f"after {i}", max_tokens=1).status_code for i in range(3)] == [
            200,
            200,
            429,
        ]
