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
    TailPoolFilter,
)
from prefixroute.load import LoadTracker
from prefixroute.plugins import RouteContext
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


def _tail_ctx(tenant: str, now: float) -> RouteContext:
    return context(Request(model="m", prompt="x", tenant=tenant), now=now)


def test_tail_pool_filter_keeps_rare_tenants_in_a_stable_pool() -> None:
    flt = TailPoolFilter(pool_fraction=0.25, tail_tenants=0.5)
    eps = [endpoint(i) for i in range(8)]
    # 4 busy tenants and 40 rare ones, interleaved
    now = 0.0
    for i in range(2000):
        now += 0.01
        tenant = f"busy{i % 4}" if i % 10 else f"rare{(i // 10) % 40}"
        flt.filter(_tail_ctx(tenant, now), eps)
    assert not any(flt.is_tail(f"busy{i}") for i in range(4))
    # The least active half (less the band) is tail; they are all rare tenants.
    assert sum(flt.is_tail(f"rare{i}") for i in range(40)) >= int(0.45 * 44)
    assert flt.is_tail("never-seen")
    pool = ids(flt.filter(_tail_ctx("rare1", now), eps))
    rest = ids(flt.filter(_tail_ctx("busy1", now), eps))
    assert len(pool) == 2 and len(rest) == 6 and not set(pool) & set(rest)
    # The pool is a property of the endpoint ids: dropping a non-pool endpoint keeps it.
    gone = next(e for e in eps if e.id in rest)
    fewer = [e for e in eps if e is not gone]
    assert set(ids(flt.filter(_tail_ctx("rare1", now), fewer))) == set(pool)
    # Too few candidates: no split.
    assert len(flt.filter(_tail_ctx("rare1", now), eps[:3])) == 3


def test_tail_pool_filter_memory_is_bounded() -> None:
    flt = TailPoolFilter(max_tenants=64)
    eps = [endpoint(i) for i in range(4)]
    for i in range(10_000):
        flt.filter(_tail_ctx(f"t{i}", float(i)), eps)
    assert flt.tracked_tenants() <= 64


def test_tail_pool_filter_rejects_bad_parameters() -> None:
    for bad in ({"pool_fraction": 1.0}, {"tail_tenants": 0.0}, {"band": 0.5}, {"min_endpoints": 1}):
        with pytest.raises(ValueError):
            TailPoolFilter(**bad)  # type: ignore[arg-type]


def test_tail_pool_is_drawn_from_every_endpoint_not_the_survivors() -> None:
    flt = TailPoolFilter(pool_fraction=0.3)
    fleet = [endpoint(i) for i in range(10)]
    for i in range(600):  # past the warm-up: one busy tenant among rare ones
        tenant = "busy" if i % 3 else f"rare{i}"
        flt.filter(_tail_ctx(tenant, float(i) / 10), fleet)
    ctx = _tail_ctx("someone-new", 60.0)
    ctx.endpoints = fleet
    pool = set(ids(flt.filter(ctx, fleet)))
    assert len(pool) == 3
    busy = _tail_ctx("busy", 60.0)
    busy.endpoints = fleet
    for dropped in fleet:  # an earlier filter drops any one endpoint: the pool stays put
        survivors = [e for e in fleet if e is not dropped]
        assert set(ids(flt.filter(ctx, survivors))) == pool - {dropped.id}
        assert not set(ids(flt.filter(busy, survivors))) & pool
