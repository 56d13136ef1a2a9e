from __future__ import annotations

import pytest

from prefixroute import Request
from prefixroute.endpoint import EndpointId
from prefixroute.filters import (
    HealthyFilter,
    HotSpotFilter,
    ModelFilter,
    RoleFilter,
    SaturationFilter,
    StaleMetricsFilter,
)
from prefixroute.load import LoadTracker
from tests.helpers import context, endpoint


def ids(endpoints: list) -> list[str]:
    return [e.id for e in endpoints]


def test_healthy_filter_drops_unhealthy() -> None:
    eps = [endpoint(0), endpoint(1, healthy=False), endpoint(2)]
    assert ids(HealthyFilter().filter(context(), eps)) == ["e0", "e2"]


def test_model_filter_matches_model_and_optionally_adapter() -> None:
    eps = [
        endpoint(0, models={"m"}),
        endpoint(1, models={"other"}),
        endpoint(2),  # serves any model
        endpoint(3, models={"m"}, adapters={"lora-a"}),
    ]
    ctx = context(Request(model="m", prompt="x", lora="lora-a"))
    assert ids(ModelFilter().filter(ctx, eps)) == ["e0", "e2", "e3"]
    assert ids(ModelFilter(require_adapter=True).filter(ctx, eps)) == ["e3"]


def test_role_filter_defaults_to_prefill_capable() -> None:
    eps = [endpoint(0, role="both"), endpoint(1, role="decode"), endpoint(2, role="prefill")]
    assert ids(RoleFilter().filter(context(), eps)) == ["e0", "e2"]
    assert ids(RoleFilter(roles="decode").filter(context(), eps)) == ["e1"]
    with pytest.raises(ValueError):
        RoleFilter(roles=["bogus"])


def test_stale_metrics_filter_drops_old_and_fails_open() -> None:
    eps = [
        endpoint(0, observed_at=9.0),
        endpoint(1, observed_at=2.0),
        endpoint(2, observed_at=None),
    ]
    assert ids(StaleMetricsFilter(max_age_s=5.0).filter(context(now=10.0), eps)) == ["e0"]
    stale = [endpoint(1, observed_at=2.0), endpoint(2, observed_at=None)]
    assert ids(StaleMetricsFilter(max_age_s=5.0).filter(context(now=10.0), stale)) == ["e1", "e2"]
    with pytest.raises(ValueError, match="max_age_s"):
        StaleMetricsFilter(max_age_s=0)


def test_saturation_filter_drops_busy_and_fails_open() -> None:
    eps = [endpoint(0, waiting=200), endpoint(1, kv_usage=0.99), endpoint(2, waiting=3)]
    assert ids(SaturationFilter().filter(context(), eps)) == ["e2"]
    busy = eps[:2]
    assert ids(SaturationFilter().filter(context(), busy)) == ["e0", "e1"]
    with pytest.raises(ValueError):
        SaturationFilter(max_kv_usage=1.5)


def test_hot_spot_filter_drops_endpoints_far_above_the_mean() -> None:
    load = LoadTracker()
    eps = [endpoint(i) for i in range(4)]
    for i, n in enumerate((30, 6, 5, 7)):  # mean 12: the limit is 1.5 * 12 + 4 = 22
        for _ in range(n):
            load.start(EndpointId(f"e{i}"), 100)
    ctx = context(Request(model="m", prompt="x"), load=load)
    assert ids(HotSpotFilter().filter(ctx, eps)) == ["e1", "e2", "e3"]
    assert ids(HotSpotFilter(ratio=3.0).filter(ctx, eps)) == ["e0", "e1", "e2", "e3"]
    # One candidate, or all equally busy: nothing is dropped.
    assert ids(HotSpotFilter().filter(ctx, eps[:1])) == ["e0"]
    idle = context(Request(model="m", prompt="x"))
    assert ids(HotSpotFilter(ratio=1.0, slack=0.0).filter(idle, eps)) == ["e0", "e1", "e2", "e3"]


def test_hot_spot_filter_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="ratio"):
        HotSpotFilter(ratio=0.5)
    with pytest.raises(ValueError, match="slack"):
        HotSpotFilter(slack=-1.0)
