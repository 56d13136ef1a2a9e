"""Tests of `prefixroute.calibration.CharsPerToken` and the router learning from usage."""

from __future__ import annotations

import pytest

from prefixroute import EndpointState, Request, Router, Usage
from prefixroute.calibration import CharsPerToken


def test_the_default_holds_until_enough_tokens_were_reported() -> None:
    cpt = CharsPerToken(4.0, min_tokens=100)
    cpt.observe("m", 230, 99)
    assert cpt.get("m") == 4.0 and cpt.learned() == {}
    cpt.observe("m", 23, 10)
    assert cpt.get("m") == pytest.approx(253 / 109)
    assert cpt.get("other") == 4.0


def test_recent_traffic_dominates_and_memory_is_bounded() -> None:
    cpt = CharsPerToken(4.0, min_tokens=10, max_models=2, window_tokens=100)
    for _ in range(50):
        cpt.observe("m", 40, 10)  # 4 chars a token, for a long time
    for _ in range(20):
        cpt.observe("m", 20, 10)  # then 2
    assert 2.0 < cpt.get("m") < 2.2  # from 4: the old reports have all but faded
    cpt.observe("a", 30, 10)
    cpt.observe("b", 30, 10)  # a third model: the least recently updated is forgotten
    assert set(cpt.learned()) == {"a", "b"}


@pytest.mark.parametrize(("chars", "tokens"), [(0, 5), (5, 0), (-1, 5)])
def test_empty_reports_teach_nothing(chars: int, tokens: int) -> None:
    cpt = CharsPerToken(4.0, min_tokens=1)
    cpt.observe("m", chars, tokens)
    assert cpt.learned() == {}


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="default"):
        CharsPerToken(0.0)
    with pytest.raises(ValueError, match="window_tokens"):
        CharsPerToken(4.0, min_tokens=10, window_tokens=5)


def test_the_router_learns_a_models_ratio_from_completions() -> None:
    router = Router.default()
    ep = [EndpointState(id="e0", address="10.0.0.1:8000")]
    prompt = "x" * 2300
    first = router.route(Request(model="m", prompt=prompt), ep, 0.0)
    assert first.prompt_tokens == 575  # 4 characters a token, as configured
    for i in range(5):
        d = router.route(Request(model="m", prompt=prompt + str(i)), ep, 1.0 + i)
        router.on_complete(d, Usage(prompt_tokens=1000), 2.0 + i)
    again = router.route(Request(model="m", prompt=prompt), ep, 10.0)
    assert again.prompt_tokens == pytest.approx(1000, abs=2)  # the engine's 2.3 a token
    other = router.route(Request(model="n", prompt=prompt), ep, 11.0)
    assert other.prompt_tokens == 575
    # failed requests and token-id requests teach nothing
    router2 = Router.default()
    d = router2.route(Request(model="m", prompt=prompt), ep, 0.0)
    router2.on_complete(d, Usage(prompt_tokens=5000, ok=False), 1.0)
    d = router2.route(Request(model="m", token_ids=list(range(5000))), ep, 2.0)
    router2.on_complete(d, Usage(prompt_tokens=5000), 3.0)
    assert router2.chars_per_token.learned() == {}
