"""Prompts longer than the engines' `max_model_len`: refused with vLLM's 400, never forwarded.

Through the real gateway in front of fake engines whose `/v1/models` reports a
small `max_model_len` (their KV capacity); the pool's reading of `/v1/models`
and the check itself (`prefixroute.drivers.context`) have unit tests below.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from prefixroute.blocks import Blocker
from prefixroute.devtools.fake_engine import FakeEngineConfig
from prefixroute.devtools.fake_engine import create_app as engine_app
from prefixroute.drivers.context import TEXT_SLACK, check_context, context_limit
from prefixroute.drivers.gateway import Gateway, GatewayConfig, create_app
from prefixroute.drivers.pool import EndpointPool, EndpointSpec, parse_max_model_len
from prefixroute.endpoint import EndpointId, EndpointState
from prefixroute.request import Request as RouterRequest
from tests.helpers import MODEL, pool
from tests.servers import serve_in_thread, wait_until

LIMIT = 1024
"""The fake engines' KV capacity in tokens, which their `/v1/models` reports as max_model_len."""


def counting(app: Any, seen: list[str]) -> Any:
    """`app`, noting the path of every POST it receives in `seen`."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            seen.append(scope["path"])
        await app(scope, receive, send)

    return wrapped


@pytest.fixture(scope="module")
def small_engines() -> Iterator[tuple[list[str], list[str]]]:
    """Two fake engines of LIMIT tokens (addresses) and the paths of the POSTs they got."""
    seen: list[str] = []
    configs = [
        FakeEngineConfig(engine_id=f"small-{i}", time_scale=0.0, kv_capacity_tokens=LIMIT)
        for i in range(2)
    ]
    with (
        serve_in_thread(counting(engine_app(configs[0]), seen)) as a,
        serve_in_thread(counting(engine_app(configs[1]), seen)) as b,
    ):
        yield [a.removeprefix("http://"), b.removeprefix("http://")], seen


@contextlib.contextmanager
def gateway(addresses: list[str]) -> Iterator[tuple[str, Gateway]]:
    app = create_app(GatewayConfig.from_document({"endpoints": pool(*addresses)}))
    with serve_in_thread(app) as url:
        gw: Gateway = app.state.gateway
        wait_until(
            lambda: all(s.max_model_len == LIMIT for s in gw.pool.states()),
            message="max_model_len read from /v1/models",
        )
        yield url, gw


def test_a_prompt_of_too_many_token_ids_gets_vllms_400(
    small_engines: tuple[list[str], list[str]],
) -> None:
    addresses, seen = small_engines
    with gateway(addresses) as (url, _):
        before = len(seen)
        body = {"model": MODEL, "prompt": list(range(LIMIT + 1)), "max_tokens": 1}
        answer = httpx.post(f"{url}/v1/completions", json=body)
        assert len(seen) == before  # no engine saw it
        fits = {"model": MODEL, "prompt": list(range(LIMIT - 24)), "max_tokens": 4}
        ok = httpx.post(f"{url}/v1/completions", json=fits)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert error["type"] == "invalid_request_error"
    assert error["message"] == (
        f"This model's maximum context length is {LIMIT} tokens. However, your request has "
        f"{LIMIT + 1} input tokens. Please reduce the length of the input messages."
    )
    assert ok.status_code == 200, ok.text
    assert len(seen) == before + 1


def test_a_chat_far_over_the_limit_is_refused_and_a_fitting_one_served(
    small_engines: tuple[list[str], list[str]],
) -> None:
    addresses, seen = small_engines
    # the estimate is chars / 4; refused only when even chars / 8 is over the limit
    huge = "word " * (LIMIT * 2)  # 10,240 characters: at least 1,280 tokens
    with gateway(addresses) as (url, _):
        before = len(seen)
        answer = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": huge}]},
        )
        assert len(seen) == before
        small = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 100}]}
        ok = httpx.post(f"{url}/v1/chat/completions", json=small)
        streamed = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": MODEL, "stream": True, "messages": [{"role": "user", "content": huge}]},
        )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert f"maximum context length is {LIMIT} tokens" in error["message"]
    assert "However, your request has at least " in error["message"]
    assert ok.status_code == 200, ok.text
    assert streamed.status_code == 400 and len(seen) == before + 1


def test_an_unknown_limit_refuses_nothing(small_engines: tuple[list[str], list[str]]) -> None:
    """One endpoint of the model that does not say its limit: the engines decide."""
    addresses, _ = small_engines

    async def no_models(request: Request) -> Response:
        return PlainTextResponse("not here", status_code=404)

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    silent = Starlette(routes=[Route("/health", health), Route("/v1/models", no_models)])
    with serve_in_thread(silent) as other:
        doc = {"endpoints": pool(*addresses, other.removeprefix("http://"))}
        app = create_app(GatewayConfig.from_document(doc))
        with serve_in_thread(app) as url:
            gw: Gateway = app.state.gateway
            wait_until(lambda: sum(s.max_model_len == LIMIT for s in gw.pool.states()) == 2)
            assert [s.max_model_len for s in gw.pool.states()][2] is None
            body = {"model": MODEL, "prompt": list(range(LIMIT + 1)), "max_tokens": 1}
            answer = httpx.post(f"{url}/v1/completions", json=body)
    # forwarded: an engine (or the silent stub) answers, not the gateway's check
    assert answer.json().get("error", {}).get("code") != "context_length_exceeded"


def test_the_picker_refuses_them_too(small_engines: tuple[list[str], list[str]]) -> None:
    """The ext_proc picker shares the check (`RoutingService.prepare`): an ImmediateResponse."""
    pytest.importorskip("grpc")
    from tests.test_extproc import config, picker, run

    addresses, seen = small_engines

    async def scenario() -> None:
        async with picker(config({"endpoints": pool(*addresses)})) as (server, proxy):
            before = len(seen)
            huge = [{"role": "user", "content": "word " * (LIMIT * 2)}]
            body = {"model": MODEL, "messages": huge, "max_tokens": 1}
            refused = await proxy.send(json.dumps(body).encode())
            small = [{"role": "user", "content": "word " * 100}]
            fits = {"model": MODEL, "messages": small, "max_tokens": 1}
            served = await proxy.send(json.dumps(fits).encode())
            decisions = server.processor.router.counters.decisions
        assert refused.immediate.status.code == 400
        assert refused.error["code"] == "context_length_exceeded"
        assert refused.error["param"] == "messages"
        assert (
            f"length is {LIMIT} tokens. However, your request has at least "
            in (refused.error["message"])
        )
        assert served.status == 200 and decisions == 1
        assert len(seen) == before + 1

    run(scenario())


# -- the pool reads /v1/models -------------------------------------------------------


def test_the_pool_reads_and_clears_max_model_len() -> None:
    cards: dict[str, Any] = {"object": "list", "data": [{"id": MODEL, "max_model_len": 4096}]}

    async def models(request: Request) -> Response:
        return JSONResponse(cards)

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def rounds(address: str) -> list[int | None]:
        endpoints = EndpointPool([EndpointSpec(address=address, id=EndpointId("e0"))])
        seen = [endpoints.states()[0].max_model_len]
        try:
            for data in (
                cards["data"],
                [{"id": MODEL, "max_model_len": 2048}, {"id": "lora-a"}],
                [{"id": MODEL}],  # an engine that stopped saying
            ):
                cards["data"] = data
                await endpoints.check_health_once()
                seen.append(endpoints.states()[0].max_model_len)
        finally:
            await endpoints.stop()
        return seen

    app = Starlette(routes=[Route("/health", health), Route("/v1/models", models)])
    with serve_in_thread(app) as url:
        assert asyncio.run(rounds(url.removeprefix("http://"))) == [None, 4096, 2048, None]


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"object": "list", "data": [{"id": "m", "max_model_len": 40960}]}, 40960),
        ({"data": [{"max_model_len": 10}, {"max_model_len": 30}, {"id": "x"}]}, 30),
        ({"data": [{"id": "m", "max_model_len": None}]}, None),
        ({"data": [{"max_model_len": True}, {"max_model_len": 0}, {"max_model_len": -5}]}, None),
        ({"data": [{"max_model_len": 2**63}, {"max_model_len": 1.5e3}, "card"]}, None),
        ({"data": {"max_model_len": 10}}, None),
        ([], None),
        (None, None),
    ],
)
def test_parse_max_model_len(doc: object, expected: int | None) -> None:
    assert parse_max_model_len(doc) == expected


# -- the check ---------------------------------------------------------------------------


def _state(i: int, limit: int | None, models: frozenset[str] = frozenset()) -> EndpointState:
    return EndpointState(
        id=EndpointId(f"e{i}"), address=f"10.0.0.{i}:8000", models=models, max_model_len=limit
    )


def test_the_limit_is_the_largest_among_the_models_endpoints() -> None:
    states = [_state(1, 100), _state(2, 300), _state(3, 50, frozenset({"other"}))]
    assert context_limit(MODEL, states) == 300
    assert context_limit("other", states) == 300  # endpoints with no models serve any
    assert context_limit(MODEL, [*states, _state(4, None)]) is None
    assert context_limit(MODEL, [_state(3, 50, frozenset({"other"}))]) is None
    assert context_limit(MODEL, []) is None


def test_exact_for_token_ids_generous_for_text() -> None:
    blocker = Blocker()  # 4 characters a token
    states = [_state(1, 100)]
    assert (
        check_context(RouterRequest(model=MODEL, token_ids=list(range(100))), blocker, states)
        is None
    )
    over = check_context(RouterRequest(model=MODEL, token_ids=list(range(101))), blocker, states)
    assert over is not None and over.exact and (over.limit, over.tokens) == (100, 101)
    chars = int(100 * blocker.chars_per_token * TEXT_SLACK)
    assert check_context(RouterRequest(model=MODEL, prompt="x" * chars), blocker, states) is None
    text = RouterRequest(model=MODEL, prompt="x" * (chars + 8))
    refused = check_context(text, blocker, states)
    assert refused is not None and not refused.exact and refused.tokens == 101
    assert "at least 101 input tokens" in refused.message
    assert check_context(text, blocker, [_state(1, None)]) is None
