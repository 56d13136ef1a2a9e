"""Latency objectives from headers (issue 16): `x-slo-ttft-ms`, `x-slo-tpot-ms` and
`x-prediction-based-scheduling`, parsed once (`IdentityConfig.resolve`) for both drivers.

The end-to-end tests run the gateway and the ext_proc picker over real sockets in front of
real fake engines, with a router whose one scorer records the `Request` it scores: what the
client sent must arrive there in seconds, or be answered 400 naming the header.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import grpc
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from prefixroute import EndpointState, Router
from prefixroute.config import ConfigError
from prefixroute.drivers.extproc import ExtProcConfig, ExtProcServer
from prefixroute.drivers.gateway import DECISION_HEADER, Gateway, GatewayConfig, create_app
from prefixroute.drivers.identity import Identity, IdentityConfig
from prefixroute.latency import ObjectivePolicy, Objectives
from prefixroute.plugins import RouteContext
from prefixroute.profile import Profile, WeightedScorer
from prefixroute.request import Request, RequestError
from tests.helpers import chat_body, pool
from tests.servers import serve_in_thread, wait_until
from tests.test_envoy_e2e import metric
from tests.test_envoy_e2e import post as envoy_post
from tests.test_envoy_e2e import stack as envoy_stack
from tests.test_extproc import Proxy, run, settled
from tests.test_extproc import config as extproc_config

SYSTEM = "You answer the latency-objective tests in one word. " * 10
TTFT, TPOT, PREDICTIVE = "x-slo-ttft-ms", "x-slo-tpot-ms", "x-prediction-based-scheduling"


# -- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500", 0.5),
        (" 250 ", 0.25),
        ("12.5", 0.0125),
        ("1e3", 1.0),
        ("+7", 0.007),
        (".5", 0.0005),
        ("0", None),  # llm-d: 0 is no objective (the lowest predicted latency)
        ("0.000", None),
        ("", None),
        ("   ", None),
    ],
)
def test_objective_headers_are_milliseconds(value: str, seconds: float | None) -> None:
    cfg = IdentityConfig()
    got = cfg.resolve({TTFT: value, TPOT: value}, {})
    assert got.slo_ttft_s == seconds and got.slo_tpot_s == seconds
    if seconds is not None:
        assert got.slo_ttft_s == pytest.approx(float(value) / 1000)


@pytest.mark.parametrize(
    "value", ["-1", "-0.5", "inf", "Infinity", "nan", "1e400", "5ms", "0x10", "1_000", "1,5", "a"]
)
@pytest.mark.parametrize("header", [TTFT, TPOT])
def test_bad_objectives_are_400_naming_the_header(header: str, value: str) -> None:
    with pytest.raises(RequestError) as info:
        IdentityConfig().resolve({header: value}, {})
    assert info.value.status == 400
    assert info.value.field == header
    assert header in str(info.value)


@pytest.mark.parametrize(
    ("value", "flag"),
    [
        ("true", True),
        ("TRUE", True),
        (" True ", True),
        ("t", True),
        ("1", True),
        ("false", False),
        ("False", False),
        ("F", False),
        ("0", False),
        ("", None),
    ],
)
def test_the_prediction_header_is_a_boolean(value: str, flag: bool | None) -> None:
    assert IdentityConfig().resolve({PREDICTIVE: value}, {}).predictive is flag
    assert IdentityConfig().resolve({}, {}).predictive is None


@pytest.mark.parametrize("value", ["yes", "no", "on", "2", "truth", "-1"])
def test_a_bad_prediction_header_is_400(value: str) -> None:
    with pytest.raises(RequestError) as info:
        IdentityConfig().resolve({PREDICTIVE: value}, {})
    assert (info.value.status, info.value.field) == (400, PREDICTIVE)


@given(st.floats(min_value=0.0, max_value=1e300, allow_nan=False, allow_infinity=False))
def test_any_finite_number_of_milliseconds_round_trips(ms: float) -> None:
    if ms != 0.0 and ms / 1000.0 == 0.0:  # a denormal that underflows in seconds: refused
        with pytest.raises(RequestError, match="out of range"):
            IdentityConfig().resolve({TTFT: repr(ms)}, {})
        return
    got = IdentityConfig().resolve({TTFT: repr(ms), TPOT: f"{ms:f}"}, {})
    if ms == 0.0:
        assert got.slo_ttft_s is None
    else:
        assert got.slo_ttft_s == ms / 1000.0
    if got.slo_ttft_s is not None and got.slo_tpot_s is not None:
        # the objectives are valid Request fields, whatever the client sent
        Request(model="m", prompt="p", slo_ttft_s=got.slo_ttft_s, slo_tpot_s=got.slo_tpot_s)


@given(st.text(max_size=40), st.sampled_from([TTFT, TPOT, PREDICTIVE]))
def test_any_header_value_resolves_or_is_a_400(value: str, header: str) -> None:
    """No value makes anything but a usable `Request` field or a 400 naming the header."""
    try:
        got = IdentityConfig().resolve({header: value}, {})
    except RequestError as exc:
        assert (exc.status, exc.field) == (400, header)
        return
    Request(
        model="m",
        prompt="p",
        slo_ttft_s=got.slo_ttft_s,
        slo_tpot_s=got.slo_tpot_s,
        predictive=got.predictive,
    )


def test_a_long_bad_value_is_not_echoed_whole() -> None:
    with pytest.raises(RequestError) as info:
        IdentityConfig().resolve({TTFT: "9" * 10 + "x" * 10_000}, {})
    assert len(str(info.value)) < 200


def test_header_names_are_configurable_and_can_be_switched_off() -> None:
    doc = {"identity": {"slo_ttft_header": "X-TTFT", "predictive_header": ""}}
    cfg = IdentityConfig.from_document(doc)
    assert (cfg.slo_ttft_header, cfg.slo_tpot_header, cfg.predictive_header) == (
        "x-ttft",
        TPOT,
        None,
    )
    headers = {"x-ttft": "100", TTFT: "nonsense", TPOT: "20", PREDICTIVE: "nonsense"}
    assert cfg.resolve(headers, {}) == Identity(slo_ttft_s=0.1, slo_tpot_s=0.02)
    with pytest.raises(ConfigError) as info:
        IdentityConfig.from_document({"identity": {"slo_tpot_header": 5}})
    assert info.value.path == "identity.slo_tpot_header"


# -- both drivers, end to end -----------------------------------------------------------------


@attrs.define
class Recorder:
    """A scorer that records what each decision's `Request` carried (and scores everyone 0.5)."""

    seen: list[tuple[float | None, float | None, bool | None]] = attrs.field(factory=list)

    def score(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[float]:
        r = ctx.request
        self.seen.append((r.slo_ttft_s, r.slo_tpot_s, r.predictive))
        return [0.5] * len(candidates)


def recording_router(objectives: ObjectivePolicy | None = None) -> tuple[Router, Recorder]:
    recorder = Recorder()
    profile = Profile(name="record", scorers=(WeightedScorer("record", recorder),))
    return Router(profile, objectives=objectives), recorder


def chat(question: str, **extra: Any) -> dict[str, Any]:
    return chat_body(question, system=SYSTEM, **extra)


@contextlib.contextmanager
def gateway(doc: dict[str, Any], router: Router) -> Iterator[tuple[str, Gateway]]:
    app = create_app(GatewayConfig.from_document(doc), router=router)
    with serve_in_thread(app) as url:
        yield url, app.state.gateway


@contextlib.asynccontextmanager
async def picker_around(
    cfg: ExtProcConfig, router: Router
) -> AsyncIterator[tuple[ExtProcServer, Proxy]]:
    """`tests.test_extproc.picker`, with the picker built around `router`."""
    server = ExtProcServer(cfg, router=router)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield server, Proxy(channel)
    finally:
        await channel.close()
        await server.stop(grace=1.0)


def explained(answer: httpx.Response) -> dict[str, str]:
    return dict(p.split("=", 1) for p in answer.headers[DECISION_HEADER].split("; "))


def test_the_gateway_puts_the_headers_on_the_request(engines: list[str]) -> None:
    router, recorder = recording_router(ObjectivePolicy(default=Objectives(ttft_s=2.0)))
    doc = {"endpoints": pool(*engines), "server": {"explain_header": True}}
    sent = [
        {TTFT: "250", TPOT: "40", PREDICTIVE: "TRUE"},
        {PREDICTIVE: "0"},
        {TTFT: "0"},  # no objective from the header: the configured default holds
        {},
    ]
    with gateway(doc, router) as (url, _):
        answers = [
            httpx.post(f"{url}/v1/chat/completions", json=chat(f"q{i}"), headers=h)
            for i, h in enumerate(sent)
        ]
    assert [a.status_code for a in answers] == [200] * 4
    nothing = (None, None, None)
    assert recorder.seen == [(0.25, 0.04, True), (None, None, False), nothing, nothing]
    first, default = explained(answers[0]), explained(answers[3])
    assert (first["slo_ttft_ms"], first["slo_tpot_ms"]) == ("250", "40")
    assert default["slo_ttft_ms"] == "2000" and "slo_tpot_ms" not in default
    for answer in answers:  # the model's prediction for the chosen endpoint, in milliseconds
        assert float(explained(answer)["predicted_ttft_ms"]) > 0
        assert float(explained(answer)["predicted_tpot_ms"]) > 0


@pytest.mark.parametrize(
    ("header", "value"),
    [(TTFT, "-5"), (TPOT, "fast"), (PREDICTIVE, "maybe"), (TTFT, "nan")],
)
def test_the_gateway_answers_a_bad_header_with_a_400_naming_it(
    engines: list[str], header: str, value: str
) -> None:
    router, recorder = recording_router()
    with gateway({"endpoints": pool(*engines)}, router) as (url, _):
        bad = httpx.post(f"{url}/v1/chat/completions", json=chat("bad"), headers={header: value})
        good = httpx.post(f"{url}/v1/chat/completions", json=chat("good"), headers={TTFT: "900"})
        metrics = httpx.get(f"{url}/metrics").text
    assert bad.status_code == 400, bad.text
    error = bad.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == header and header in error["message"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid-request")
    assert good.status_code == 200
    assert recorder.seen == [(0.9, None, None)]  # the bad one never reached the router
    assert router.counters.decisions == 1
    # answered and counted, not lost
    refused = [
        sample.value
        for family in text_string_to_metric_families(metrics)
        if family.name == "prefixroute_requests"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["code"] == "400"
    ]
    assert refused == [1.0]


def test_the_picker_puts_the_headers_on_the_request(engines: list[str]) -> None:
    router, recorder = recording_router()

    async def scenario() -> None:
        cfg = extproc_config({"endpoints": pool(*engines)})
        async with picker_around(cfg, router) as (server, proxy):
            body = json.dumps(chat("picker")).encode()
            ok = await proxy.send(body, headers={TTFT: "1e3", TPOT: "25", PREDICTIVE: "f"})
            plain = await proxy.send(body)
            bad = await proxy.send(body, headers={TPOT: "-1"})
            worse = await proxy.send(body, headers={PREDICTIVE: "sure"})
            await settled(server)
        assert ok.status == 200 and plain.status == 200
        assert recorder.seen == [(1.0, 0.025, False), (None, None, None)]
        for result, header in ((bad, TPOT), (worse, PREDICTIVE)):
            assert result.immediate.status.code == 400
            assert result.error["param"] == header and header in result.error["message"]
            assert result.error["code"] == "invalid-request"
        assert router.counters.decisions == 2

    run(scenario())


def test_through_a_real_envoy_the_headers_count_and_a_bad_one_is_a_400(
    engines: list[str], tmp_path: Path
) -> None:
    """Envoy forwards the client's headers to the picker in `request_headers`: the same path."""
    doc = {"endpoints": pool(*engines), "objectives": {"tenants": {"acme": {"tpot_ms": 60000}}}}
    acme = {"x-tenant-id": "acme"}
    with envoy_stack(doc, tmp_path) as (envoy, metrics):
        answers = [
            envoy_post(envoy, chat("envoy met", stream=True), headers={**acme, TTFT: "60000"}),
            envoy_post(envoy, chat("envoy missed", stream=True), headers={**acme, TTFT: "1e-3"}),
        ]
        bad = envoy_post(envoy, chat("envoy bad"), headers={**acme, PREDICTIVE: "perhaps"})
        wait_until(
            lambda: metric(metrics, "prefixroute_completions_total") >= 2,
            message="two completions settled by the picker",
        )
        requests = metric(metrics, "prefixroute_tenant_slo_requests_total", tenant="acme")
        met = metric(metrics, "prefixroute_tenant_slo_met_total", tenant="acme")
    assert [a.status_code for a in answers] == [200, 200]
    assert bad.status_code == 400 and bad.headers["content-type"].startswith("application/json")
    assert bad.json()["error"]["param"] == PREDICTIVE
    assert (requests, met) == (2, 1)
