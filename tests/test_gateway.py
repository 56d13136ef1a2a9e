"""The gateway end to end: real fake engines and small upstreams on loopback, real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from prefixroute import Router
from prefixroute.blocks import Blocker
from prefixroute.config import ConfigError
from prefixroute.devtools.fake_engine import FakeEngineConfig
from prefixroute.devtools.fake_engine import create_app as engine_app
from prefixroute.drivers.gateway import (
    DECISION_HEADER,
    Gateway,
    GatewayConfig,
    create_app,
    isolation_salt,
)
from tests.helpers import MODEL, ROUND_ROBIN, cached_tokens, chat_body, pool
from tests.servers import ScriptedStream, free_port, run_process, serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "You are a meticulous assistant for the gateway tests; answer briefly. " * 12


def chat(question: str, *, system: str = SYSTEM, **extra: Any) -> dict[str, Any]:
    return chat_body(question, system=system, **extra)


def assert_openai_error(answer: httpx.Response, status: int, code: str | None = None) -> None:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code


@contextlib.contextmanager
def gateway(doc: dict[str, Any]) -> Iterator[tuple[str, Gateway]]:
    app = create_app(GatewayConfig.from_document(doc))
    with serve_in_thread(app) as url:
        yield url, app.state.gateway


def sse_events(answer: httpx.Response) -> list[Any]:
    out: list[Any] = []
    for line in answer.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# -- routing ---------------------------------------------------------------------------


def test_requests_sharing_a_prefix_land_on_one_engine(engines: list[str]) -> None:
    doc = {"endpoints": pool(*engines), "server": {"explain_header": True}}
    with gateway(doc) as (url, gw):
        answers = [
            httpx.post(f"{url}/v1/chat/completions", json=chat(f"routing question {i}"))
            for i in range(6)
        ]
    assert all(a.status_code == 200 for a in answers)
    assert len({a.headers["x-fake-engine-id"] for a in answers}) == 1
    assert cached_tokens(answers[0]) == 0
    assert all(cached_tokens(a) > 0 for a in answers[1:])
    explained = answers[-1].headers[DECISION_HEADER]
    assert "matched_blocks=" in explained and "predicted_cached_tokens=0" not in explained
    assert gw.router.counters.actual_cached_tokens > 0
    assert gw.router.load.in_flight() == 0


def test_streaming_hides_the_usage_chunk_unless_asked(engines: list[str]) -> None:
    with gateway({"endpoints": pool(*engines)}) as (url, gw):
        body = chat("stream please", stream=True)
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as answer:
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith("text/event-stream")
            plain = sse_events(answer)
        asked = dict(body, stream_options={"include_usage": True})
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=asked) as answer:
            with_usage = sse_events(answer)
        completions = {
            "model": MODEL,
            "prompt": SYSTEM + " complete me",
            "max_tokens": 3,
            "stream": True,
        }
        with httpx.stream("POST", f"{url}/v1/completions", json=completions) as answer:
            text_events = sse_events(answer)
        counters = gw.router.counters
    assert plain[-1] == "[DONE]" and with_usage[-1] == "[DONE]" and text_events[-1] == "[DONE]"
    assert not [e for e in plain[:-1] if e.get("usage") and not e.get("choices")]
    usage_chunk = with_usage[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["prompt_tokens"] > 0
    # the router learned the engine's cached tokens from the streams' usage
    assert counters.completions == 3 and counters.failures == 0
    assert (
        counters.actual_cached_tokens
        >= usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
        > 0
    )


def test_a_client_leaving_mid_stream_settles_the_decision_as_failed() -> None:
    engine = FakeEngineConfig(engine_id="long", time_scale=1.0)
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(serve_in_thread(engine_app(engine)))
        url, gw = stack.enter_context(gateway({"endpoints": pool(upstream[7:])}))
        body = chat("a long answer", stream=True, max_tokens=400)
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as answer:
            for line in answer.iter_lines():
                if line.startswith("data: "):
                    break  # one chunk, then hang up
        for _ in range(200):
            if gw.router.counters.completions:
                break
            threading.Event().wait(0.01)
        counters = gw.router.counters
        in_flight = gw.router.load.in_flight()
    assert (counters.decisions, counters.completions, counters.failures) == (1, 1, 1)
    assert in_flight == 0


def test_a_client_leaving_before_the_first_byte_aborts_the_upstream_request() -> None:
    """Queued at a busy engine, the request is dropped there as soon as its client leaves."""
    engine = FakeEngineConfig(engine_id="busy", time_scale=1.0, max_num_seqs=1)
    app = engine_app(engine)
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(serve_in_thread(app))
        url, gw = stack.enter_context(gateway({"endpoints": pool(upstream[7:])}))
        hog = chat("hog the engine", max_tokens=300)
        blocker = threading.Thread(
            target=lambda: httpx.post(f"{url}/v1/chat/completions", json=hog, timeout=30)
        )
        blocker.start()  # holds the engine's only sequence slot for ~1.5 s
        threading.Event().wait(0.2)
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while queued
            httpx.post(
                f"{url}/v1/chat/completions",
                json=chat("queued", stream=True, max_tokens=4),
                timeout=httpx.Timeout(10, read=0.3),
            )
        fake = app.state.fake_engine.engine
        for _ in range(100):  # the gateway closed its upstream request: the engine aborts it
            if fake.waiting == 0 and gw.router.load.in_flight() == 1:
                break
            threading.Event().wait(0.01)
        waiting, in_flight = fake.waiting, gw.router.load.in_flight()
        blocker.join()
        counters = gw.router.counters
    assert (waiting, in_flight) == (0, 1), "the queued request was not dropped"
    assert (counters.decisions, counters.completions, counters.failures) == (2, 2, 1)


def test_an_unterminated_final_usage_event_is_still_read_and_hidden() -> None:
    from prefixroute.drivers.sse import SseRelay

    sse = SseRelay(keep_usage=False)
    content = ScriptedStream.CONTENT + b"data: [DONE]\n\n"
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1}}'
    assert sse.feed(content + usage, 1.0) == content  # the last event lacks its blank line
    assert sse.flush(2.0) == b""
    assert sse.usage == {"prompt_tokens": 5, "completion_tokens": 1}


@pytest.mark.parametrize(
    "events",
    [
        [ScriptedStream.CONTENT],  # closed without [DONE]
        [ScriptedStream.CONTENT, ScriptedStream.ERROR, b"data: [DONE]\n\n"],  # vLLM's error
    ],
    ids=["no-done", "error-event"],
)
def test_a_stream_that_fails_inside_is_settled_as_failed(events: list[bytes]) -> None:
    upstream = ScriptedStream(events)
    with contextlib.ExitStack() as stack:
        address = stack.enter_context(serve_in_thread(upstream.app))[7:]
        url, gw = stack.enter_context(gateway({"endpoints": pool(address)}))
        body = chat("x", stream=True)
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as answer:
            seen = sse_events(answer)
        counters = gw.router.counters
    assert answer.status_code == 200
    assert any(isinstance(e, dict) and ("error" in e or e.get("object") == "error") for e in seen)
    assert (counters.decisions, counters.completions, counters.failures) == (1, 1, 1)


# -- failures and retries --------------------------------------------------------------


class Upstream:
    """A tiny stand-in engine: healthy, scrapeable, and answering completions as told."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.complete, methods=["POST"]),
                Route("/health", lambda r: Response()),
                Route("/metrics", lambda r: PlainTextResponse("vllm:num_requests_waiting 0\n")),
            ]
        )

    async def complete(self, request: Request) -> Response:
        if self.mode == "500":
            return JSONResponse({"error": "boom"}, status_code=500)
        for _ in range(300):  # stall, but stop once the gateway gives up
            if await request.is_disconnected():
                break
            await asyncio.sleep(0.01)
        return JSONResponse({})


def retries(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "prefixroute_retries":
            for s in family.samples:
                if s.name.endswith("_total"):
                    out[f"{s.labels['endpoint']}/{s.labels['reason']}"] = s.value
    return out


def test_a_dead_endpoint_is_retried_and_marked(engines: list[str]) -> None:
    dead = f"127.0.0.1:{free_port()}"
    doc = {
        **ROUND_ROBIN,
        "endpoints": [{"address": dead, "id": "dead"}, {"address": engines[0], "id": "live"}],
        "scrape": {"health_interval_s": 30},
    }
    with gateway(doc) as (url, gw):
        answers = [
            httpx.post(f"{url}/v1/chat/completions", json=chat(f"dead {i}")) for i in range(4)
        ]
        health = {s.id: s.healthy for s in gw.pool.states()}
        counted = retries(url)
        counters = gw.router.counters
    assert [a.status_code for a in answers] == [200] * 4
    assert counted.get("dead/connect", 0) >= 1
    assert health == {"dead": False, "live": True}
    assert counters.completions == 4 and counters.failures == 0


def test_a_5xx_before_the_first_byte_is_retried(engines: list[str]) -> None:
    failing = Upstream("500")
    with serve_in_thread(failing.app) as bad:
        doc = {
            **ROUND_ROBIN,
            "endpoints": [
                {"address": bad.removeprefix("http://"), "id": "bad"},
                {"address": engines[1], "id": "good"},
            ],
        }
        with gateway(doc) as (url, gw):
            answers = [
                httpx.post(f"{url}/v1/chat/completions", json=chat(f"five {i}")) for i in range(4)
            ]
            counted = retries(url)
            health = {s.id: s.healthy for s in gw.pool.states()}
    assert [a.status_code for a in answers] == [200] * 4
    assert {a.headers["x-fake-engine-id"] for a in answers} == {"fake-b"}
    assert counted.get("bad/status-5xx", 0) >= 1
    assert health["bad"]  # answered: not a connection failure


def test_every_endpoint_failing_is_an_openai_error(engines: list[str]) -> None:
    failing = Upstream("500")
    with serve_in_thread(failing.app) as bad:
        only_bad = {"endpoints": [{"address": bad.removeprefix("http://")}]}
        with gateway(only_bad) as (url, gw):
            assert_openai_error(
                httpx.post(f"{url}/v1/chat/completions", json=chat("x")), 502, "upstream-error"
            )
            assert gw.router.counters.failures == 1
    dead = {"endpoints": [{"address": f"127.0.0.1:{free_port()}"}]}
    with gateway(dead) as (url, gw):
        first = httpx.post(f"{url}/v1/chat/completions", json=chat("x"))
        assert_openai_error(first, 503, "upstream-unavailable")
        assert first.headers["retry-after"] == "1"
        # marked unhealthy now: the router itself refuses, and /health says so
        assert_openai_error(httpx.post(f"{url}/v1/chat/completions", json=chat("y")), 503)
        assert httpx.get(f"{url}/health").status_code == 503


def test_an_upstream_that_stalls_is_a_504() -> None:
    stalling = Upstream("stall")
    with serve_in_thread(stalling.app) as slow:
        doc = {
            "endpoints": [{"address": slow.removeprefix("http://")}],
            "server": {"upstream_timeout_s": 0.3},
        }
        with gateway(doc) as (url, gw):
            answer = httpx.post(f"{url}/v1/chat/completions", json=chat("stall"), timeout=10)
            assert_openai_error(answer, 504, "upstream-timeout")
            assert gw.router.counters.failures == 1
            assert gw.router.load.in_flight() == 0


# -- client errors -------------------------------------------------------------------------


def test_bad_requests_get_openai_errors(engines: list[str]) -> None:
    doc = {"endpoints": pool(engines[0]), "server": {"body_limit_bytes": 4000}}
    with gateway(doc) as (url, _):
        post = f"{url}/v1/chat/completions"
        assert_openai_error(httpx.post(post, content=b"{not json"), 400, "invalid-json")
        assert_openai_error(httpx.post(post, content=b"[1, 2]"), 400, "invalid-json")
        missing = httpx.post(post, json={"messages": [{"role": "user", "content": "hi"}]})
        assert_openai_error(missing, 400, "invalid-request")
        assert missing.json()["error"]["param"] == "model"
        bad_priority = httpx.post(post, json=chat("p"), headers={"x-priority": "urgent"})
        assert_openai_error(bad_priority, 400)
        assert bad_priority.json()["error"]["param"] == "x-priority"
        too_big = httpx.post(post, json=chat("x" * 5000))
        assert_openai_error(too_big, 413, "body-too-large")
        assert too_big.headers["connection"] == "close"  # the unread rest is not waited for
        chunked = httpx.post(post, content=iter([b"{" + b" " * 3000, b" " * 3000 + b"}"]))
        assert_openai_error(chunked, 413)
        assert_openai_error(httpx.get(f"{url}/v1/nothing"), 404, "not-found")
        wrong = httpx.get(post)
        assert_openai_error(wrong, 405, "method-not-allowed")
        assert wrong.headers["allow"] == "POST"


def test_api_keys_are_required_when_configured(engines: list[str]) -> None:
    doc = {
        "endpoints": pool(engines[0]),
        "identity": {"api_keys": {"sk-test": "acme"}, "require_api_key": True},
    }
    with gateway(doc) as (url, gw):
        post = f"{url}/v1/chat/completions"
        assert_openai_error(httpx.post(post, json=chat("k")), 401, "unauthorized")
        wrong = {"authorization": "Bearer sk-wrong"}
        assert_openai_error(httpx.post(post, json=chat("k"), headers=wrong), 401)
        ok = httpx.post(post, json=chat("k"), headers={"authorization": "Bearer sk-test"})
        assert ok.status_code == 200
        assert "acme" in {row.tenant for row in gw.router.ledger.snapshot().tenants}


def test_a_rate_limit_is_a_429_with_retry_after(engines: list[str]) -> None:
    doc = {
        "endpoints": pool(engines[0]),
        "plugins": [
            {"type": "token-bucket-admission", "parameters": {"requests_per_s": 0.5}},
            {"type": "prefix-affinity-scorer"},
        ],
        "profiles": [
            {
                "name": "limited",
                "plugins": [
                    {"pluginRef": "token-bucket-admission"},
                    {"pluginRef": "prefix-affinity-scorer"},
                ],
            }
        ],
    }
    with gateway(doc) as (url, _):
        post = f"{url}/v1/chat/completions"
        headers = {"x-tenant-id": "bursty"}
        assert httpx.post(post, json=chat("r1"), headers=headers).status_code == 200
        limited = httpx.post(post, json=chat("r2"), headers=headers)
        assert_openai_error(limited, 429, "rate-limit")
        assert int(limited.headers["retry-after"]) >= 1
        other = httpx.post(post, json=chat("r3"), headers={"x-tenant-id": "calm"})
        assert other.status_code == 200


# -- tenancy ---------------------------------------------------------------------------------


def test_tenant_isolation_separates_engine_caches(engines: list[str]) -> None:
    system = "Isolation test system prompt, long enough to fill several blocks. " * 10
    isolated = {"endpoints": pool(engines[0]), "hashing": {"isolate_tenants": True}}
    with gateway(isolated) as (url, _):
        post = f"{url}/v1/chat/completions"
        body = chat("same question", system=system)
        first = httpx.post(post, json=body, headers={"x-tenant-id": "a"})
        again = httpx.post(post, json=body, headers={"x-tenant-id": "a"})
        other = httpx.post(post, json=body, headers={"x-tenant-id": "b"})
    assert cached_tokens(first) == 0 and cached_tokens(again) > 0
    assert cached_tokens(other) == 0
    shared = {"endpoints": pool(engines[0])}
    with gateway(shared) as (url, _):
        post = f"{url}/v1/chat/completions"
        body = chat("same question", system=system + " (shared)")
        first = httpx.post(post, json=body, headers={"x-tenant-id": "c"})
        other = httpx.post(post, json=body, headers={"x-tenant-id": "d"})
    assert cached_tokens(first) == 0 and cached_tokens(other) > 0


def test_isolation_salts_are_keyed_and_grouped() -> None:
    blocker = Blocker(seed=7, isolate_tenants=True, tenant_groups={"a": "g", "b": "g"})
    assert isolation_salt(blocker, "a", None) == isolation_salt(blocker, "b", None)
    assert isolation_salt(blocker, "a", None) != isolation_salt(blocker, "c", None)
    assert isolation_salt(blocker, "c", "x") != isolation_salt(blocker, "c", None)
    other_seed = Blocker(seed=8, isolate_tenants=True)
    assert isolation_salt(blocker, "c", None) != isolation_salt(other_seed, "c", None)


# -- metrics, models, health -------------------------------------------------------------


def test_metrics_endpoint(engines: list[str]) -> None:
    with gateway({"endpoints": pool(*engines)}) as (url, _):
        for i in range(3):
            body = chat(f"metrics {i}", stream=True)
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as answer:
                answer.read()
        httpx.post(f"{url}/v1/chat/completions", content=b"nope")
        answer = httpx.get(f"{url}/metrics")
    assert answer.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}
    total = sum(
        s.value
        for s in families["inference_objective_request"].samples
        if s.name.endswith("_total")
    )
    assert total == 4
    ttft = families["inference_objective_request_ttft_seconds"]
    assert sum(s.value for s in ttft.samples if s.name.endswith("_count")) == 3
    healthy = {s.labels["endpoint"] for s in families["prefixroute_endpoint_healthy"].samples}
    assert healthy == {"e0", "e1"}


def test_models_and_health(engines: list[str]) -> None:
    listed = [{"address": engines[0], "models": ["alpha", "beta"]}, {"address": engines[1]}]
    with gateway({"endpoints": listed}) as (url, _):
        names = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
        health = httpx.get(f"{url}/health")
    assert names == ["alpha", "beta", MODEL]  # configured, and what the other engine lists
    assert health.status_code == 200 and health.json()["healthy_endpoints"] == 2
    with gateway({"endpoints": pool(engines[0])}) as (url, _):
        proxied = httpx.get(f"{url}/v1/models").json()
    assert [m["id"] for m in proxied["data"]] == [MODEL]


# -- deferral ----------------------------------------------------------------------------------


def test_fair_queue_deferral_serves_everyone() -> None:
    fq = {
        "plugins": [
            {"type": "fair-queue-admission", "parameters": {"max_in_flight_per_endpoint": 1}},
            {"type": "prefix-affinity-scorer"},
        ],
        "profiles": [
            {
                "name": "fair",
                "plugins": [
                    {"pluginRef": "fair-queue-admission"},
                    {"pluginRef": "prefix-affinity-scorer"},
                ],
            }
        ],
    }
    engine = FakeEngineConfig(engine_id="slow", time_scale=1.0)
    with contextlib.ExitStack() as stack:
        slow = stack.enter_context(serve_in_thread(engine_app(engine)))
        url, gw = stack.enter_context(
            gateway({**fq, "endpoints": pool(slow.removeprefix("http://"))})
        )
        results: list[int] = []

        def client(i: int) -> None:
            body = chat(f"fair {i}", max_tokens=20)
            answer = httpx.post(
                f"{url}/v1/chat/completions",
                json=body,
                headers={"x-tenant-id": f"t{i % 3}"},
                timeout=30,
            )
            results.append(answer.status_code)

        def impatient() -> None:
            with contextlib.suppress(httpx.TimeoutException):
                httpx.post(f"{url}/v1/chat/completions", json=chat("gone"), timeout=0.05)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        threads.append(threading.Thread(target=impatient))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        for _ in range(100):  # the impatient client's request is settled on release
            if gw.router.counters.completions == gw.router.counters.decisions:
                break
            threading.Event().wait(0.05)
        counters = gw.router.counters
        in_flight = gw.router.load.in_flight()
    assert sorted(results) == [200] * 6
    assert counters.deferrals >= 4
    assert counters.completions == counters.decisions
    assert in_flight == 0


# -- endpoint files ----------------------------------------------------------------------------


def test_an_endpoint_removed_from_the_file_stops_getting_traffic(
    engines: list[str], tmp_path: Path
) -> None:
    pods = tmp_path / "pods.yaml"
    pods.write_text(
        f"- {{address: '{engines[0]}', id: a}}\n- {{address: '{engines[1]}', id: b}}\n",
        encoding="utf-8",
    )
    doc = {**ROUND_ROBIN, "endpoints": [{"file": str(pods)}], "scrape": {"interval_s": 0.02}}
    with gateway(doc) as (url, gw):
        before = {
            httpx.post(f"{url}/v1/chat/completions", json=chat(f"file {i}")).headers[
                "x-fake-engine-id"
            ]
            for i in range(4)
        }
        pods.write_text(f"- {{address: '{engines[1]}', id: b}}\n", encoding="utf-8")
        for _ in range(200):
            if len(gw.pool) == 1:
                break
            threading.Event().wait(0.02)
        after = {
            httpx.post(f"{url}/v1/chat/completions", json=chat(f"after {i}")).headers[
                "x-fake-engine-id"
            ]
            for i in range(4)
        }
    assert before == {"fake-a", "fake-b"}
    assert after == {"fake-b"}


# -- config and CLI ---------------------------------------------------------------------------


def test_the_example_config_loads() -> None:
    config = GatewayConfig.from_file(ROOT / "examples" / "gateway.yaml")
    assert config.endpoints and config.server.port == 8080
    router = config.build_router()
    assert router.profile.scorer_names == Router.default().profile.scorer_names


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({"server": {"prot": 1}}, "server.prot"),
        ({"server": {"port": 0}}, "server.port"),
        ({"server": {"upstream_timeout_s": -1}}, "server.upstream_timeout_s"),
        ({"metrics": {"max_tenants": 0}}, "metrics.max_tenants"),
        ({"endpoints": [{"adress": "h:1"}]}, "endpoints[0].adress"),
        ({"hashing": {"mode": "nope"}}, "hashing.mode"),
        ({"gateway": {}}, "gateway"),
    ],
)
def test_config_errors_name_the_field(doc: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        GatewayConfig.from_document(doc)
    assert info.value.path == path


def test_cli_refuses_a_bad_config_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {port: 'eighty'}\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "prefixroute.drivers.gateway", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "server.port" in done.stderr


@pytest.mark.slow
def test_sigterm_drains_a_stream_then_exits_0(tmp_path: Path) -> None:
    engine = FakeEngineConfig(engine_id="drain", time_scale=1.0)
    with serve_in_thread(engine_app(engine)) as upstream:
        port = free_port()
        config = tmp_path / "gateway.yaml"
        config.write_text(
            json.dumps(
                {
                    "server": {"port": port, "drain_timeout_s": 20},
                    "endpoints": [{"address": upstream.removeprefix("http://")}],
                }
            ),
            encoding="utf-8",
        )
        url = f"http://127.0.0.1:{port}"
        args = ["-m", "prefixroute.drivers.gateway", "--config", str(config)]
        with run_process([*args, "--log-level", "warning"], ready_url=f"{url}/health") as proc:
            body = chat("drain me", stream=True, max_tokens=120)
            events: list[Any] = []
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
                lines = r.iter_lines()
                for line in lines:
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))
                        break
                proc.send_signal(signal.SIGTERM)
                for line in lines:
                    if line.startswith("data: "):
                        data = line[6:]
                        events.append(data if data == "[DONE]" else json.loads(data))
            assert proc.wait(timeout=20) == 0
    assert events[-1] == "[DONE]"
    tokens = [e for e in events[:-1] if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert len(tokens) == 120
