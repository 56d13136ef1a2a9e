"""Hostile label values, unknown models and big bodies, through the real gateway and picker.

Issue 12, items 1, 2, 3 and 5: a lone surrogate in a model name must not break
`/metrics`; names no endpoint serves must not take label slots (nor grow the
series, nor push real traffic into "other"); an unknown model is a 404
`model_not_found`, not a 503; error messages echo a bounded prefix of client
input; a large body is parsed off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from prefixroute import Router
from prefixroute.drivers.errors import MAX_MESSAGE_CHARS, clip
from prefixroute.drivers.extproc import ExtProcConfig
from prefixroute.drivers.gateway import Gateway, GatewayConfig, create_app
from prefixroute.drivers.metrics import (
    MAX_LABEL_CHARS,
    OTHER,
    GatewayMetrics,
    label_value,
)
from prefixroute.drivers.service import OFFLOAD_BYTES
from tests.helpers import MODEL, chat_body, pool
from tests.servers import ScriptedStream, free_port, serve_in_thread, wait_until, wait_until_async
from tests.test_extproc import picker

SYSTEM = "You are a patient assistant for the label tests; answer briefly. " * 4
SURROGATE_BODY = (
    b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
)


def chat(question: str, **extra: Any) -> dict[str, Any]:
    return chat_body(question, system=SYSTEM, **extra)


@contextlib.contextmanager
def gateway(doc: dict[str, Any]) -> Iterator[tuple[str, Gateway]]:
    app = create_app(GatewayConfig.from_document(doc))
    with serve_in_thread(app) as url:
        yield url, app.state.gateway


def parsed(text: str) -> dict[str, Any]:
    """The exposition parsed with prometheus_client's own parser (raises on a bad page)."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def series(text: str) -> int:
    return sum(len(f.samples) for f in text_string_to_metric_families(text))


def model_labels(text: str) -> set[str]:
    return {
        s.labels["model_name"]
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if "model_name" in s.labels
    }


# -- the label boundary ------------------------------------------------------------------


def test_label_values_are_valid_utf8_and_bounded() -> None:
    assert label_value("qwen3-0.6b") == "qwen3-0.6b"
    assert label_value("\ud800") == "\\ud800"
    assert len(label_value("m" * 1_000_000)) == MAX_LABEL_CHARS
    assert label_value("m" * 1_000_000).endswith("...")
    assert len(label_value("\udc00" * 1000)) == MAX_LABEL_CHARS
    assert label_value("t" * MAX_LABEL_CHARS) == "t" * MAX_LABEL_CHARS  # a 256-char id fits
    assert label_value(7) == "7"


def test_surrogates_and_huge_values_never_break_the_exposition() -> None:
    """The metrics boundary alone (no driver validation in front): every request label."""
    metrics = GatewayMetrics(CollectorRegistry(), Router.default(), list)
    for model, tenant, endpoint, code in (
        ("\ud800", "\udfff", "e\ud800", "c\ud800"),
        ("m" * 1_000_000, "t" * 1_000_000, "e" * 100_000, "c" * 100_000),
    ):
        metrics.request_started(model, tenant)
        metrics.observe_request(
            model=model,
            tenant=tenant,
            endpoint=endpoint,
            status=500,
            code=code,
            duration_s=0.01,
            ttft_s=0.01,
            usage=None,
            request_bytes=1,
            response_bytes=1,
        )
        metrics.observe_retry(endpoint, code)
    body, _ = metrics.render()
    text = body.decode("utf-8")
    assert "inference_objective_request" in parsed(text)
    assert len(text) < 200_000  # the million-character values went in cut
    assert (
        max(len(v) for f in parsed(text).values() for s in f.samples for v in s.labels.values())
        <= MAX_LABEL_CHARS
    )


# -- item 1: a lone surrogate ------------------------------------------------------------


def test_a_lone_surrogate_model_leaves_gateway_metrics_readable(engines: list[str]) -> None:
    with gateway({"endpoints": pool(*engines)}) as (url, _):
        headers = {"content-type": "application/json"}
        answer = httpx.post(f"{url}/v1/chat/completions", content=SURROGATE_BODY, headers=headers)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == "model"
        ok = httpx.post(f"{url}/v1/chat/completions", json=chat("after"))
        assert ok.status_code == 200
        scrape = httpx.get(f"{url}/metrics")
    assert scrape.status_code == 200
    families = parsed(scrape.text)
    total = families["inference_objective_request"].samples
    assert sum(s.value for s in total if s.name.endswith("_total")) == 2


def test_a_lone_surrogate_model_leaves_picker_metrics_readable(engines: list[str]) -> None:
    async def scenario() -> None:
        port = free_port()
        doc = {"endpoints": pool(*engines), "extproc": {"port": 0, "metrics_port": port}}
        async with picker(ExtProcConfig.from_document(doc)) as (_, proxy):
            refused = await proxy.send(SURROGATE_BODY, forward=False)
            assert refused.immediate.status.code == 400
            async with httpx.AsyncClient() as client:
                scrape = await client.get(f"http://127.0.0.1:{port}/metrics")
        assert scrape.status_code == 200
        assert "inference_objective_request_total" in scrape.text
        parsed(scrape.text)

    asyncio.run(asyncio.wait_for(scenario(), timeout=20))


# -- item 2: names no endpoint serves take no slot ---------------------------------------


def test_floods_of_unknown_and_huge_model_names_do_not_grow_gateway_metrics(
    engines: list[str],
) -> None:
    with (
        gateway({"endpoints": pool(*engines)}) as (url, _),
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        post = "/v1/chat/completions"
        assert client.post(post, json=chat("warm")).status_code == 200  # admits the tenant
        assert client.post(post, json=chat("warm", model="junk-0")).status_code == 404
        assert client.post(post, json=chat("warm", model="\x00")).status_code == 400
        before = client.get("/metrics").text
        huge = client.post(post, json=chat("huge", model="z" * 1_000_000))
        assert huge.status_code == 400 and len(huge.content) < 2 * MAX_MESSAGE_CHARS
        for i in range(300):  # each a name no endpoint serves
            assert client.post(post, json=chat("junk", model=f"junk-{i}")).status_code == 404
        for i in range(3):
            assert client.post(post, json=chat(f"real {i}")).status_code == 200
        after = client.get("/metrics").text
    assert "zzzz" not in after
    assert series(after) == series(before)  # same series, only their values moved
    assert len(after) < len(before) + 2_000
    assert model_labels(after) == {MODEL, OTHER}  # real traffic keeps its own label


def test_unknown_models_take_no_slot_in_the_picker(engines: list[str]) -> None:
    async def scenario() -> None:
        port = free_port()
        doc = {"endpoints": pool(*engines), "extproc": {"port": 0, "metrics_port": port}}
        async with (
            picker(ExtProcConfig.from_document(doc)) as (_, proxy),
            httpx.AsyncClient() as client,
        ):
            metrics = f"http://127.0.0.1:{port}/metrics"
            for model in (MODEL, "junk-a", "\x00"):  # a decision (admits the tenant), 404, 400
                await proxy.send(json.dumps(chat("warm", model=model)).encode(), forward=False)
            before = (await client.get(metrics)).text
            for i in range(100):
                body = json.dumps(chat("junk", model=f"junk-{i}")).encode()
                result = await proxy.send(body, forward=False)
                assert result.immediate.status.code == 404
            huge = await proxy.send(json.dumps(chat("h", model="z" * 1_000_000)).encode())
            assert huge.immediate.status.code == 400
            after = (await client.get(metrics)).text
        assert series(after) == series(before)
        assert "zzzz" not in after
        assert model_labels(after) == {MODEL, OTHER}

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


def test_in_an_open_pool_names_take_no_slot_either() -> None:
    """An engine that lists no models serves any name: no 404, and no name gets a label."""
    engine = ScriptedStream([ScriptedStream.CONTENT, b"data: [DONE]\n\n"])
    with (
        serve_in_thread(engine.app) as upstream,
        gateway({"endpoints": pool(upstream.removeprefix("http://"))}) as (url, gw),
    ):
        assert gw.pool.serves("anything") is None
        for i in range(70):  # more than the model cap (64)
            body = chat("open", model=f"name-{i}", stream=True)
            assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 200
        text = httpx.get(f"{url}/metrics").text
    assert model_labels(text) == {OTHER}


# -- item 3: 404 for an unknown model ----------------------------------------------------


def test_an_unknown_model_is_a_404_and_a_known_one_without_capacity_a_503(
    engines: list[str],
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    doc = {
        "endpoints": [
            {"address": engines[0], "id": "live"},
            {"address": dead, "id": "dead", "models": ["parked"]},
        ],
        "scrape": {"unhealthy_after": 1},
    }
    with gateway(doc) as (url, gw):
        post = f"{url}/v1/chat/completions"
        wait_until(lambda: gw.pool.serves(MODEL) is True, message="the model listing")
        missing = httpx.post(post, json=chat("who", model="gpt-nonexistent"))
        long_name = "n" * 1000
        long_missing = httpx.post(post, json=chat("who", model=long_name))
        parked = httpx.post(post, json=chat("parked", model="parked"))
        served = httpx.post(post, json=chat("served"))
    assert missing.status_code == 404 and "retry-after" not in missing.headers
    error = missing.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["message"] == "The model `gpt-nonexistent` does not exist."
    assert long_missing.status_code == 404
    assert long_name not in long_missing.text and clip(long_name) in long_missing.text
    assert parked.status_code == 503 and int(parked.headers["retry-after"]) >= 1
    assert served.status_code == 200


def test_the_picker_answers_404_for_an_unknown_model(engines: list[str]) -> None:
    async def scenario() -> None:
        doc = {"endpoints": pool(*engines), "extproc": {"port": 0, "metrics_port": 0}}
        async with picker(ExtProcConfig.from_document(doc)) as (_, proxy):
            result = await proxy.send(json.dumps(chat("x", model="nope")).encode())
        assert result.immediate.status.code == 404
        assert result.error["code"] == "model_not_found"
        headers = {o.header.key for o in result.immediate.headers.set_headers}
        assert "retry-after" not in headers

    asyncio.run(asyncio.wait_for(scenario(), timeout=20))


def test_error_messages_echo_a_bounded_prefix() -> None:
    with gateway({"endpoints": pool(f"127.0.0.1:{free_port()}")}) as (url, _):
        answer = httpx.get(f"{url}/{'p' * 5000}")
    assert answer.status_code == 404
    message = answer.json()["error"]["message"]
    assert len(message) < 300 and message.endswith("...")


# -- item 5: a big body is parsed off the event loop -------------------------------------


class HeldPrepare:
    """Wraps a driver's `prepare`: a large body's parse waits until `/health` has answered.

    If the parse ran on the event loop, `/health` could not answer while it
    waits: the wait times out and `blocked` records it.
    """

    def __init__(self, prepare: Any) -> None:
        self.prepare = prepare
        self.entered = threading.Event()
        self.health_answered = threading.Event()
        self.blocked = False

    def __call__(self, body: bytes, *args: Any, **kwargs: Any) -> Any:
        if len(body) > OFFLOAD_BYTES:
            self.entered.set()
            if not self.health_answered.wait(timeout=3):
                self.blocked = True
        return self.prepare(body, *args, **kwargs)


def big_chat() -> bytes:
    body = chat(
        "big", messages=[{"role": "user", "content": f"{i} " + "w" * 4000} for i in range(100)]
    )
    data = json.dumps(body).encode()
    assert len(data) > OFFLOAD_BYTES
    return data


def test_the_gateway_answers_health_while_a_big_body_is_parsed(engines: list[str]) -> None:
    with gateway({"endpoints": pool(*engines)}) as (url, gw):
        held = HeldPrepare(gw.prepare)
        gw.prepare = held  # type: ignore[method-assign]
        outcome: list[httpx.Response] = []
        big = threading.Thread(
            target=lambda: outcome.append(
                httpx.post(
                    f"{url}/v1/chat/completions",
                    content=big_chat(),
                    headers={"content-type": "application/json"},
                    timeout=20,
                )
            )
        )
        big.start()
        try:
            wait_until(held.entered.is_set, message="the big body reaching prepare")
            health = httpx.get(f"{url}/health", timeout=2)
            held.health_answered.set()
        finally:
            held.health_answered.set()
            big.join(timeout=20)
    assert health.status_code == 200
    assert not held.blocked
    assert outcome and outcome[0].status_code < 500


def test_the_picker_answers_health_while_a_big_body_is_parsed(engines: list[str]) -> None:
    async def scenario() -> None:
        port = free_port()
        doc = {"endpoints": pool(*engines), "extproc": {"port": 0, "metrics_port": port}}
        async with picker(ExtProcConfig.from_document(doc)) as (server, proxy):
            processor = server.processor
            held = HeldPrepare(processor.prepare)
            processor.prepare = held  # type: ignore[method-assign]
            sent = asyncio.ensure_future(proxy.send(big_chat(), forward=False))
            try:
                await wait_until_async(held.entered.is_set, message="the big body in prepare")
                async with httpx.AsyncClient() as client:
                    health = await client.get(f"http://127.0.0.1:{port}/health", timeout=2)
            finally:
                held.health_answered.set()
            result = await sent
        assert health.status_code == 200
        assert not held.blocked
        assert result.immediate is None and result.destination

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


@pytest.mark.parametrize("size", [OFFLOAD_BYTES - 1000, OFFLOAD_BYTES + 1000])
def test_bodies_either_side_of_the_threshold_route_alike(engines: list[str], size: int) -> None:
    text = "q" * (size - 300)
    with gateway({"endpoints": pool(*engines)}) as (url, gw):
        answer = httpx.post(f"{url}/v1/chat/completions", json=chat(text), timeout=20)
        wait_until(lambda: gw.router.counters.completions == 1, message="the completion")
    assert answer.status_code == 200, answer.text


def tenant_labels(text: str) -> set[str]:
    return {
        s.labels["tenant"]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "prefixroute_requests_total"
    }


def test_refused_requests_take_no_tenant_slot(engines: list[str]) -> None:
    with (
        gateway({"endpoints": pool(*engines), "metrics": {"max_tenants": 4}}) as (url, _),
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        post = "/v1/chat/completions"
        for i in range(10):  # junk tenants with requests the gateway refuses
            junk = client.post(
                post, json=chat("junk", model="nope"), headers={"x-tenant-id": f"junk-{i}"}
            )
            assert junk.status_code == 404
        real = client.post(post, json=chat("real"), headers={"x-tenant-id": "acme"})
        assert real.status_code == 200
        labels = tenant_labels(client.get("/metrics").text)
    assert "acme" in labels
    assert not any(label.startswith("junk-") for label in labels)
