"""The drivers' deferral helper: settling through it never raises a driver bug at a request."""

from __future__ import annotations

import logging

import pytest

from prefixroute import Decision, Router, Usage, parse_openai
from prefixroute.drivers.deferral import Deferrals
from tests.helpers import chat_body, endpoint


def test_a_second_settlement_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    router = Router.default(seed=1)
    fleet = [endpoint(0), endpoint(1)]
    deferrals = Deferrals(router, lambda: fleet, lambda: 1.0)
    decision = router.route(parse_openai(chat_body("hello", system="be brief")), fleet, now=0.0)
    assert isinstance(decision, Decision)
    deferrals.complete(decision, Usage(prompt_tokens=decision.prompt_tokens), decision.endpoint)
    assert router.open_decisions == 0
    with caplog.at_level(logging.ERROR, logger="prefixroute.drivers.deferral"):
        deferrals.complete(decision, Usage(prompt_tokens=decision.prompt_tokens), None)
    assert router.open_decisions == 0
    assert router.load.in_flight() == 0
    assert any("refused" in r.getMessage() for r in caplog.records)
