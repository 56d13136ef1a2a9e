"""`EndpointState`: every field is checked at construction, with the field's name."""

from __future__ import annotations

import math
from typing import Any

import pytest

from prefixroute import Decision, EndpointState, Request, Role, Router
from prefixroute.endpoint import MAX_COUNT


def state(**fields: Any) -> EndpointState:
    base: dict[str, Any] = {"id": "e0", "address": "127.0.0.1:9000"}
    base.update(fields)
    return EndpointState(**base)


def test_defaults_and_valid_values() -> None:
    e = state(
        role="prefill",
        models=["m"],
        adapters=("a",),
        waiting=3,
        running=MAX_COUNT,
        kv_usage=1,
        kv_capacity_blocks=4096,
        healthy=False,
        observed_at=-2.5,
        max_model_len=32768,
    )
    assert e.role is Role.PREFILL and e.models == frozenset({"m"})
    assert e.max_model_len == 32768 and e.running == MAX_COUNT
    assert state().max_model_len is None and state().observed_at is None


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"waiting": math.nan}, "waiting"),
        ({"waiting": -1}, "waiting"),
        ({"waiting": 1.5}, "waiting"),
        ({"waiting": 2.0}, "waiting"),
        ({"waiting": True}, "waiting"),
        ({"running": MAX_COUNT + 1}, "running"),
        ({"running": "3"}, "running"),
        ({"kv_usage": math.nan}, "kv_usage"),
        ({"kv_usage": 1.01}, "kv_usage"),
        ({"kv_usage": "0.5"}, "kv_usage"),
        ({"kv_capacity_blocks": math.inf}, "kv_capacity_blocks"),
        ({"kv_capacity_blocks": math.nan}, "kv_capacity_blocks"),
        ({"kv_capacity_blocks": 0}, "kv_capacity_blocks"),
        ({"kv_capacity_blocks": 10**30}, "kv_capacity_blocks"),
        ({"kv_capacity_blocks": 64.0}, "kv_capacity_blocks"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"max_model_len": -4096}, "max_model_len"),
        ({"max_model_len": 4096.0}, "max_model_len"),
        ({"max_model_len": math.inf}, "max_model_len"),
        ({"observed_at": math.nan}, "observed_at"),
        ({"observed_at": math.inf}, "observed_at"),
        ({"observed_at": "now"}, "observed_at"),
        ({"healthy": "yes"}, "healthy"),
        ({"models": "llama"}, "models"),
        ({"models": ["m", ""]}, "models"),
        ({"adapters": [3]}, "adapters"),
        ({"adapters": None}, "adapters"),
        ({"address": "localhost"}, "address"),
        ({"address": "h:٣"}, "address"),
        ({"address": 9000}, "address"),
        ({"address": "\ud800:80"}, "address"),
        ({"id": "\ud800"}, "endpoint id"),
        ({"id": ""}, "endpoint id"),
    ],
)
def test_invalid_values_are_refused_naming_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        state(**fields)


def test_a_huge_capacity_cannot_overflow_routing() -> None:
    """Regression (issue 12, item 8): inf was accepted and `route` raised OverflowError."""
    router = Router.default()
    e = state(kv_capacity_blocks=MAX_COUNT, observed_at=0.0)
    decision = router.route(Request(model="m", prompt="hello " * 40), [e], 0.0)
    assert isinstance(decision, Decision) and decision.endpoint == "e0"
