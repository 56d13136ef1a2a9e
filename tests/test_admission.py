"""Admission policies: token buckets, concurrency caps, saturation shedding, the chain."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import cast

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from prefixroute import EndpointState, LoadTracker, PluginError, Rejection, Request, Usage
from prefixroute.admission import (
    SLACK_S,
    AdmissionChain,
    AlwaysAdmit,
    ConcurrencyAdmission,
    SheddingAdmission,
    TokenBucketAdmission,
)
from prefixroute.decision import Decision, Deferral
from prefixroute.plugins import AdmissionContext, CompletionListener, Deferring, TenantView
from prefixroute.registry import default_registry
from tests.helpers import endpoint


class Tenants:
    """A stub `TenantView`: fixed in-flight counts per tenant."""

    def __init__(self, counts: Mapping[str, int] | None = None) -> None:
        self.counts = dict(counts or {})

    def in_flight(self, tenant: str) -> int:
        return self.counts.get(tenant, 0)


def req(tenant: str = "t", *, max_tokens: int | None = 0, priority: int = 0) -> Request:
    return Request(model="m", prompt="x", tenant=tenant, max_tokens=max_tokens, priority=priority)


def actx(
    request: Request | None = None,
    *,
    now: float = 0.0,
    prompt_tokens: int = 0,
    endpoints: Sequence[EndpointState] = (),
    tenants: Tenants | None = None,
) -> AdmissionContext:
    return AdmissionContext(
        request=request or req(),
        endpoints=endpoints,
        now=now,
        prompt_tokens=prompt_tokens,
        load=LoadTracker(),
        tenants=tenants or Tenants(),
    )


def ask(
    policy: TokenBucketAdmission,
    now: float,
    tenant: str = "t",
    tokens: int = 0,
    *,
    max_tokens: int | None = 0,
) -> Rejection | None:
    verdict = policy.admit(actx(req(tenant, max_tokens=max_tokens), now=now, prompt_tokens=tokens))
    policy.check_invariants()
    assert not isinstance(verdict, Deferral)
    return verdict


# -- token buckets ------------------------------------------------------------------


def test_request_bucket_refills_continuously_and_caps_at_the_burst() -> None:
    p = TokenBucketAdmission(requests_per_s=2.0, request_burst=4.0)
    assert [ask(p, 0.0) for _ in range(4)] == [None] * 4
    r = ask(p, 0.0)
    assert r is not None
    assert (r.status, r.kind, r.retry_after_s) == (429, "rate-limit", 0.5)
    assert "'t'" in r.reason and "2 requests/s" in r.reason and "burst 4" in r.reason
    assert ask(p, 0.5) is None
    r = ask(p, 0.75)  # half a request refilled
    assert r is not None and r.retry_after_s == pytest.approx(0.25)
    assert ask(p, 1.0) is None
    # a long idle time refills to the burst, never beyond it
    verdicts = [ask(p, 100.0) for _ in range(5)]
    assert verdicts[:4] == [None] * 4 and verdicts[4] is not None


def test_token_bucket_charges_prompt_plus_output() -> None:
    p = TokenBucketAdmission(tokens_per_s=100.0, token_burst=1000.0, default_output_tokens=50)
    assert ask(p, 0.0, tokens=300, max_tokens=100) is None  # 400
    assert ask(p, 0.0, tokens=300, max_tokens=100) is None  # 800
    r = ask(p, 0.0, tokens=300, max_tokens=100)  # 200 left, 400 needed
    assert r is not None and r.retry_after_s == pytest.approx(2.0)
    assert "100 tokens/s" in r.reason and "burst 1000" in r.reason
    assert ask(p, 2.0, tokens=300, max_tokens=100) is None  # 0 left
    assert ask(p, 2.5, tokens=0, max_tokens=0) is None  # a 0-token request still fits
    assert ask(p, 2.5, tokens=1, max_tokens=None) is not None  # 51 > 50: the default output
    assert ask(p, 3.01, tokens=1, max_tokens=None) is None


@pytest.mark.parametrize("start", [0.0, 0.1, 12_345.678, 3e6])
@pytest.mark.parametrize("rate", [3.0, 7.0, 1e-3, 123_456.7])
def test_retry_after_is_exact(start: float, rate: float) -> None:
    burst = max(10.0, rate)
    p = TokenBucketAdmission(tokens_per_s=rate, token_burst=burst, default_output_tokens=0)
    cost = int(burst * 0.7)
    assert ask(p, start, tokens=cost) is None
    r = ask(p, start, tokens=cost)
    assert r is not None and r.retry_after_s is not None
    expected = (cost - (burst - cost)) / rate
    assert r.retry_after_s == pytest.approx(expected, rel=1e-12)
    early = ask(p, start + r.retry_after_s * (1 - 1e-4) - 2 * SLACK_S, tokens=cost)
    assert early is not None and early.retry_after_s is not None
    assert early.retry_after_s == pytest.approx(r.retry_after_s * 1e-4 + 2 * SLACK_S, rel=1e-3)
    assert ask(p, start + r.retry_after_s, tokens=cost) is None


def test_both_limits_retry_after_the_later_of_the_two() -> None:
    p = TokenBucketAdmission(
        requests_per_s=1.0, request_burst=1.0, tokens_per_s=10.0, token_burst=100.0
    )
    assert ask(p, 0.0, tokens=90) is None
    r = ask(p, 0.0, tokens=50)  # requests: 1 s; tokens: 40 / 10 = 4 s
    assert r is not None and r.retry_after_s == pytest.approx(4.0)
    assert "requests/s" in r.reason and "tokens/s" in r.reason
    r = ask(p, 3.0, tokens=50)  # only the token bucket is short now
    assert r is not None and r.retry_after_s == pytest.approx(1.0)
    assert "requests/s" not in r.reason
    assert ask(p, 4.0, tokens=50) is None


def test_a_request_larger_than_the_burst_is_refused_for_good() -> None:
    p = TokenBucketAdmission(tokens_per_s=100.0, token_burst=500.0, default_output_tokens=0)
    r = ask(p, 0.0, tokens=501)  # a full bucket, yet too small
    assert r is not None and r.status == 400 and r.kind == "too-large"
    assert r.retry_after_s is None  # retrying cannot help
    assert "501 tokens" in r.reason and "never" in r.reason
    assert ask(p, 0.0, tokens=500) is None  # the refusal charged nothing
    r = ask(p, 1.0, tokens=10_000)
    assert r is not None and r.status == 400


def test_default_bursts_are_one_second_of_the_rate() -> None:
    p = TokenBucketAdmission(requests_per_s=0.5, tokens_per_s=200.0)
    assert p.limits("anyone") == (0.5, 1.0, 200.0, 200.0)  # at least one request
    assert TokenBucketAdmission(requests_per_s=20.0).limits("x")[:2] == (20.0, 20.0)


def test_no_limit_admits_everything_and_keeps_no_state() -> None:
    p = TokenBucketAdmission()
    for i in range(100):
        assert ask(p, 0.0, tenant=f"t{i}", tokens=10**9) is None
    assert p.tracked_tenants() == 0


def test_overrides_replace_only_the_keys_they_name() -> None:
    p = TokenBucketAdmission(
        requests_per_s=1.0,
        tokens_per_s=1000.0,
        token_burst=5000.0,
        overrides={
            "vip": {"requests_per_s": 10.0},
            "internal": {"requests_per_s": None, "tokens_per_s": None},
            "small": {"token_burst": 100.0},
        },
    )
    assert p.limits("other") == (1.0, 1.0, 1000.0, 5000.0)
    assert p.limits("vip") == (10.0, 10.0, 1000.0, 5000.0)  # burst derived from its own rate
    assert p.limits("internal")[0] is None and p.limits("internal")[2] is None
    assert p.limits("small") == (1.0, 1.0, 1000.0, 100.0)
    assert [ask(p, 0.0, "vip") for _ in range(11)].count(None) == 10
    assert [ask(p, 0.0, "other") for _ in range(3)].count(None) == 1
    assert all(ask(p, 0.0, "internal", tokens=10**9) is None for _ in range(50))
    assert ask(p, 0.0, "small", tokens=101) is not None
    assert p.tracked_tenants() == 3  # internal is unlimited: no bucket


def test_time_going_backwards_creates_no_tokens() -> None:
    p = TokenBucketAdmission(requests_per_s=1.0, request_burst=2.0)
    assert ask(p, 10.0) is None and ask(p, 10.0) is None
    for t in (5.0, 0.0, 9.99, 10.0):
        r = ask(p, t)
        assert r is not None and r.retry_after_s == pytest.approx(10.0 - t + 1.0)
    assert ask(p, 10.5) is not None
    assert ask(p, 11.0) is None
    assert ask(p, 3.0) is not None


def test_buckets_are_an_lru_of_at_most_max_tenants() -> None:
    p = TokenBucketAdmission(requests_per_s=1.0, max_tenants=2)
    assert ask(p, 0.0, "a") is None
    assert ask(p, 0.0, "b") is None
    assert ask(p, 0.0, "a") is not None  # touches a: b is now the least recently used
    assert ask(p, 0.0, "c") is None  # evicts b
    assert p.tracked_tenants() == 2
    assert ask(p, 0.0, "a") is not None  # a kept its empty bucket
    assert ask(p, 0.0, "b") is None  # b came back full: the documented leniency


class _TenantOnly:
    """Just what `TokenBucketAdmission.admit` reads of a request (building a million
    real `Request`s would take longer than the million decisions)."""

    __slots__ = ("max_tokens", "tenant")

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.max_tokens = 0


def test_a_million_distinct_tenants_stay_within_max_tenants() -> None:
    p = TokenBucketAdmission(requests_per_s=1.0, tokens_per_s=100.0, max_tenants=1000)
    ctx = actx(prompt_tokens=10)
    for i in range(1_000_000):
        ctx.request = cast(Request, _TenantOnly(f"t{i}"))
        ctx.now = i * 1e-6
        assert p.admit(ctx) is None
    assert p.tracked_tenants() == 1000
    p.check_invariants()


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"requests_per_s": 0}, "requests_per_s"),
        ({"requests_per_s": True}, "requests_per_s"),
        ({"tokens_per_s": "fast"}, "tokens_per_s"),
        ({"token_burst": -1.0}, "token_burst"),
        ({"request_burst": 0.5}, "request_burst"),
        ({"requests_per_s": math.inf}, "requests_per_s"),
        ({"max_tenants": 0}, "max_tenants"),
        ({"default_output_tokens": -1}, "default_output_tokens"),
        ({"overrides": ["vip"]}, "overrides"),
        ({"overrides": {"vip": 5}}, "overrides.vip"),
        ({"overrides": {"vip": {"rps": 5}}}, "overrides.vip.rps"),
        ({"overrides": {"vip": {"requests_per_s": 0}}}, "overrides.vip.requests_per_s"),
        ({"overrides": {7: {"requests_per_s": 1}}}, "overrides"),
    ],
)
def test_invalid_token_bucket_parameters_name_the_field(
    parameters: dict[str, object], field: str
) -> None:
    with pytest.raises(PluginError) as info:
        default_registry().create("token-bucket-admission", parameters)
    assert info.value.field == field


def test_token_bucket_overrides_load_from_yaml() -> None:
    doc = yaml.safe_load(
        """
        requests_per_s: 5
        tokens_per_s: 20000
        overrides:
          vip: {requests_per_s: 50, token_burst: 200000}
          "42": {requests_per_s: null}
        """
    )
    p = default_registry().create("token-bucket-admission", doc)
    assert isinstance(p, TokenBucketAdmission)
    assert p.limits("vip") == (50.0, 50.0, 20000.0, 200000.0)
    assert p.limits("42")[0] is None
    with pytest.raises(PluginError) as info:
        default_registry().create(
            "token-bucket-admission", yaml.safe_load("overrides: {42: {requests_per_s: 1}}")
        )
    assert info.value.field == "overrides" and "quote" in str(info.value)


def _window_violations(
    admitted: list[tuple[float, float]], rate: float, burst: float
) -> list[tuple[float, float, float]]:
    """Windows [t0, t1] (between admitted times) whose admitted total exceeds the bound."""
    bad = []
    times = sorted({t for t, _ in admitted})
    for i, t0 in enumerate(times):
        for t1 in times[i:]:
            total = sum(c for t, c in admitted if t0 <= t <= t1)
            bound = burst + rate * (t1 - t0 + SLACK_S)
            if total > bound + 1e-9 * max(1.0, bound):
                bad.append((t0, t1, total))
    return bad


events = st.lists(
    st.tuples(
        st.sampled_from(["a", "b"]),
        st.floats(0.0, 5.0, allow_nan=False),
        st.integers(0, 400),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(
    steps=events,
    requests_per_s=st.sampled_from([0.3, 1.0, 2.5, 10.0]),
    request_burst=st.sampled_from([1.0, 2.0, 7.5]),
    tokens_per_s=st.sampled_from([10.0, 97.3, 1000.0]),
    token_burst=st.sampled_from([100.0, 333.3, 1000.0]),
)
def test_admitted_work_in_any_window_is_within_burst_plus_rate_times_length(
    steps: list[tuple[str, float, int]],
    requests_per_s: float,
    request_burst: float,
    tokens_per_s: float,
    token_burst: float,
) -> None:
    p = TokenBucketAdmission(
        requests_per_s=requests_per_s,
        request_burst=request_burst,
        tokens_per_s=tokens_per_s,
        token_burst=token_burst,
        default_output_tokens=0,
    )
    now = 0.0
    admitted: dict[str, list[tuple[float, int]]] = {"a": [], "b": []}
    for tenant, dt, size in steps:
        now += dt
        if ask(p, now, tenant, tokens=size) is None:
            admitted[tenant].append((now, size))
    for log in admitted.values():
        assert not _window_violations([(t, 1.0) for t, _ in log], requests_per_s, request_burst)
        assert not _window_violations([(t, float(c)) for t, c in log], tokens_per_s, token_burst)


@settings(max_examples=200, deadline=None)
@given(steps=events, rate=st.sampled_from([1.0, 50.0, 97.3]))
def test_a_clock_that_steps_back_creates_no_tokens(
    steps: list[tuple[str, float, int]], rate: float
) -> None:
    p = TokenBucketAdmission(tokens_per_s=rate, token_burst=400.0, default_output_tokens=0)
    first: dict[str, float] = {}
    latest: dict[str, float] = {}
    total: dict[str, int] = {}
    for tenant, t, size in steps:  # times in any order
        first.setdefault(tenant, t)
        latest[tenant] = max(latest.get(tenant, t), t)
        if ask(p, t, tenant, tokens=size) is None:
            total[tenant] = total.get(tenant, 0) + size
    for tenant, tokens in total.items():
        bound = 400.0 + rate * (latest[tenant] - first[tenant] + SLACK_S)
        assert tokens <= bound * (1 + 1e-9)


class _Reference:
    """A naive token-bucket admission: plain dicts, an explicit LRU list, no cleverness."""

    def __init__(self, rate: float, burst: float, capacity: int) -> None:
        self.rate, self.burst, self.capacity = rate, burst, capacity
        self.level: dict[str, float] = {}
        self.stamp: dict[str, float] = {}
        self.order: list[str] = []

    def admit(self, tenant: str, now: float, cost: int) -> float:
        """0 when admitted, else the retry-after."""
        if tenant in self.order:
            self.order.remove(tenant)
            if now > self.stamp[tenant]:
                self.level[tenant] = min(
                    self.burst, self.level[tenant] + self.rate * (now - self.stamp[tenant])
                )
                self.stamp[tenant] = now
        else:
            self.level[tenant], self.stamp[tenant] = self.burst, now
        self.order.append(tenant)
        if len(self.order) > self.capacity:
            gone = self.order.pop(0)
            del self.level[gone], self.stamp[gone]
        ahead = max(0.0, self.stamp[tenant] - now)
        if cost > self.burst:
            return self.burst / self.rate + ahead
        if self.level[tenant] + self.rate * SLACK_S >= cost:
            self.level[tenant] -= cost
            return 0.0
        return (cost - self.level[tenant]) / self.rate + ahead


class TokenBucketMachine(RuleBasedStateMachine):
    """TokenBucketAdmission against `_Reference`, with a small LRU and a wobbly clock."""

    def __init__(self) -> None:
        super().__init__()
        self.policy = TokenBucketAdmission(
            tokens_per_s=40.0, token_burst=100.0, default_output_tokens=0, max_tenants=3
        )
        self.reference = _Reference(40.0, 100.0, 3)
        self.now = 0.0

    @rule(
        tenant=st.sampled_from("abcde"),
        dt=st.floats(-1.0, 3.0, allow_nan=False),
        cost=st.integers(0, 120),
    )
    def admit(self, tenant: str, dt: float, cost: int) -> None:
        self.now += dt
        verdict = ask(self.policy, self.now, tenant, tokens=cost)
        expected = self.reference.admit(tenant, self.now, cost)
        if expected == 0.0:
            assert verdict is None
        elif cost > 100.0:  # above the burst: refused for good, no retry-after
            assert verdict is not None and verdict.status == 400 and verdict.kind == "too-large"
            assert verdict.retry_after_s is None
        else:
            assert verdict is not None and verdict.retry_after_s is not None
            assert verdict.retry_after_s == pytest.approx(expected, rel=1e-9, abs=1e-9)

    @invariant()
    def same_tenants(self) -> None:
        assert self.policy.tracked_tenants() == len(self.reference.order)
        self.policy.check_invariants()


TestTokenBucketMachine = TokenBucketMachine.TestCase
TestTokenBucketMachine.settings = settings(max_examples=100, deadline=None)


# -- concurrency ----------------------------------------------------------------------


def test_concurrency_caps_in_flight_per_tenant() -> None:
    p = ConcurrencyAdmission(
        max_in_flight=2, overrides={"vip": 5, "blocked": 0, "free": None}, retry_after_s=0.25
    )
    tenants = Tenants({"t": 1, "vip": 4, "free": 10**6})
    assert p.admit(actx(req("t"), tenants=tenants)) is None
    tenants.counts["t"] = 2
    r = p.admit(actx(req("t"), tenants=tenants))
    assert isinstance(r, Rejection)
    assert (r.status, r.kind, r.retry_after_s) == (429, "concurrency", 0.25)
    assert "'t'" in r.reason and "2" in r.reason
    assert p.admit(actx(req("vip"), tenants=tenants)) is None
    tenants.counts["vip"] = 5
    assert p.admit(actx(req("vip"), tenants=tenants)) is not None
    assert p.admit(actx(req("blocked"), tenants=tenants)) is not None
    assert p.admit(actx(req("free"), tenants=tenants)) is None
    assert p.admit(actx(req("new"), tenants=tenants)) is None


def test_concurrency_is_unlimited_by_default() -> None:
    p = ConcurrencyAdmission()
    assert p.admit(actx(tenants=Tenants({"t": 10**9}))) is None
    assert p.retry_after_s == 1.0


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"max_in_flight": -1}, "max_in_flight"),
        ({"max_in_flight": 1.5}, "max_in_flight"),
        ({"max_in_flight": True}, "max_in_flight"),
        ({"overrides": {"vip": -2}}, "overrides.vip"),
        ({"overrides": {3: 1}}, "overrides.3"),
        ({"retry_after_s": -1.0}, "retry_after_s"),
    ],
)
def test_invalid_concurrency_parameters_are_refused(
    parameters: dict[str, object], field: str
) -> None:
    with pytest.raises(PluginError) as info:
        default_registry().create("concurrency-admission", parameters)
    assert info.value.field == field


# -- shedding -------------------------------------------------------------------------


def test_saturated_pool_sheds_only_negative_priority() -> None:
    p = SheddingAdmission()
    full = [endpoint(0, waiting=129), endpoint(1, kv_usage=0.96)]
    r = p.admit(actx(req(priority=-1), endpoints=full))
    assert isinstance(r, Rejection)
    assert (r.status, r.kind, r.retry_after_s) == (429, "saturated", 1.0)
    assert "saturated" in r.reason
    for priority in (0, 1, 100):
        assert p.admit(actx(req(priority=priority), endpoints=full)) is None


def test_one_endpoint_with_room_means_not_saturated() -> None:
    p = SheddingAdmission()
    sheddable = req(priority=-5)
    at_threshold = [endpoint(0, waiting=129), endpoint(1, waiting=128, kv_usage=0.95)]
    assert p.admit(actx(sheddable, endpoints=at_threshold)) is None
    assert p.admit(actx(sheddable, endpoints=[])) is None


def test_only_endpoints_that_could_serve_count() -> None:
    p = SheddingAdmission(max_waiting=5, max_kv_usage=0.8, retry_after_s=3.0)
    busy = endpoint(0, waiting=6)
    idle_but_down = endpoint(1, healthy=False)
    idle_other_model = endpoint(2, models={"other"})
    r = p.admit(actx(req(priority=-1), endpoints=[busy, idle_but_down, idle_other_model]))
    assert isinstance(r, Rejection) and r.retry_after_s == 3.0
    assert p.admit(actx(req(priority=-1), endpoints=[idle_but_down])) is None  # none usable


# -- the chain --------------------------------------------------------------------------


class Recording:
    def __init__(self, answer: Rejection | Deferral | None, log: list[str], name: str) -> None:
        self.answer, self.log, self.name = answer, log, name

    def admit(self, ctx: AdmissionContext) -> Rejection | Deferral | None:
        self.log.append(self.name)
        return self.answer


class Listening(Recording):
    def on_complete(self, decision: Decision, usage: Usage, now: float) -> None:
        self.log.append(f"{self.name}.on_complete@{now:g}")


class Queueing(Recording):
    def release(
        self,
        endpoints: Sequence[EndpointState],
        load: LoadTracker,
        tenants: TenantView,
        now: float,
    ) -> list[tuple[Request, Rejection | None]]:
        return [(req(self.name), None)]


def test_chain_asks_in_order_and_the_first_answer_wins() -> None:
    log: list[str] = []
    no = Rejection(429, "no", retry_after_s=1.0, kind="rate-limit")
    chain = AdmissionChain([Recording(None, log, "a"), Recording(no, log, "b"), AlwaysAdmit()])
    assert chain.admit(actx()) is no
    assert log == ["a", "b"]
    wait = Deferral("queued", deadline=5.0)
    log.clear()
    chain = AdmissionChain([Queueing(wait, log, "a"), Recording(no, log, "b")])
    assert chain.admit(actx()) is wait and log == ["a"]
    # A member that defers but cannot release would lose the request: refused loudly.
    with pytest.raises(TypeError, match="cannot release"):
        AdmissionChain([Recording(wait, [], "c")]).admit(actx())
    assert AdmissionChain([]).admit(actx()) is None
    assert AdmissionChain([AlwaysAdmit(), AlwaysAdmit()]).admit(actx()) is None


def test_chain_forwards_completions_and_releases() -> None:
    log: list[str] = []
    chain = AdmissionChain(
        [Listening(None, log, "l"), Recording(None, log, "r"), Queueing(None, log, "q")]
    )
    assert isinstance(chain, CompletionListener) and isinstance(chain, Deferring)
    chain.on_complete(cast(Decision, object()), Usage(), 2.0)
    assert log == ["l.on_complete@2"]
    released = chain.release([], LoadTracker(), Tenants(), 3.0)
    assert [(r.tenant, verdict) for r, verdict in released] == [("q", None)]
    assert AdmissionChain([AlwaysAdmit()]).release([], LoadTracker(), Tenants(), 0.0) == []


def test_chain_of_two_deferring_members_concatenates_in_member_order() -> None:
    chain = AdmissionChain([Queueing(None, [], "x"), Queueing(None, [], "y")])
    assert [r.tenant for r, _ in chain.release([], LoadTracker(), Tenants(), 0.0)] == ["x", "y"]


def test_chain_refuses_what_is_not_an_admission_policy() -> None:
    with pytest.raises(TypeError, match="policies"):
        AdmissionChain([object()])  # type: ignore[list-item]


def test_chain_runs_the_builtins_together() -> None:
    bucket = TokenBucketAdmission(requests_per_s=1.0)
    chain = AdmissionChain([SheddingAdmission(), ConcurrencyAdmission(max_in_flight=1), bucket])
    busy = Tenants({"t": 1})
    r = chain.admit(actx(tenants=busy))
    assert isinstance(r, Rejection) and r.kind == "concurrency"
    assert bucket.tracked_tenants() == 0  # the bucket was never asked, so charged nothing
    assert chain.admit(actx()) is None
    r = chain.admit(actx())
    assert isinstance(r, Rejection) and r.kind == "rate-limit"


class _Store:
    """The `SharedBuckets` capability as a driver provides it: a verdict fetched ahead, or none."""

    def __init__(self, share: float = 1.0) -> None:
        self.share = share
        self.verdict: tuple[float, float] | None = None
        self.asked: list[tuple[str, int]] = []

    def take(self, tenant: str, cost: int, now: float) -> tuple[float, float] | None:
        self.asked.append((tenant, cost))
        return self.verdict


def test_a_shared_verdict_decides_and_keeps_the_local_refusals_wording() -> None:
    policy = TokenBucketAdmission(requests_per_s=1.0, tokens_per_s=100.0)
    store = _Store()
    policy.share_with(store)
    store.verdict = (0.0, 0.0)
    for _ in range(5):  # far over the local burst: the store admitted and charged each
        assert ask(policy, 0.0, tokens=10, max_tokens=5) is None
    assert store.asked[-1] == ("t", 15) and policy.tracked_tenants() == 0
    store.verdict = (0.25, 0.0)
    refused = ask(policy, 0.0)
    assert refused is not None and refused.status == 429 and refused.retry_after_s == 0.25
    assert refused.reason == "tenant 't' is over its rate limit of 1 requests/s (burst 1)"
    store.verdict = (0.0, 1.0)
    too_large = ask(policy, 0.0, tokens=500)
    assert too_large is not None and (too_large.status, too_large.kind) == (400, "too-large")
    policy.share_with(None)
    assert ask(policy, 0.0) is None and ask(policy, 0.0) is not None  # local buckets again


def test_without_a_verdict_each_replica_refills_at_its_share_of_the_rate() -> None:
    policy = TokenBucketAdmission(requests_per_s=4.0, request_burst=1.0)
    policy.share_with(_Store(share=0.25))  # four replicas: one request/s each
    admitted = sum(ask(policy, t / 10) is None for t in range(41))  # 4 s at 10 requests/s
    assert admitted == 5  # the burst, then 1/s (not 4/s)
    unshared = TokenBucketAdmission(requests_per_s=4.0, request_burst=1.0)
    # 4/s sampled every 0.1 s: the burst, then one admission per 0.25-0.3 s
    assert sum(ask(unshared, t / 10) is None for t in range(41)) == 14
    # the burst is shared too: four replicas falling back at once let one burst through, not 4
    bursty = TokenBucketAdmission(requests_per_s=4.0, request_burst=8.0)
    bursty.share_with(_Store(share=0.25))
    assert sum(ask(bursty, 0.0) is None for _ in range(10)) == 2


def test_a_shared_concurrency_cap_counts_the_other_replicas_requests() -> None:
    policy = ConcurrencyAdmission(max_in_flight=3)
    here = Tenants({"t": 1})
    assert policy.admit(actx(tenants=here)) is None
    peers = {"t": 2}
    policy.share_with(lambda tenant: peers.get(tenant, 0))
    refused = policy.admit(actx(tenants=here))
    assert isinstance(refused, Rejection) and refused.kind == "concurrency"
    assert "has 3 requests in flight, its limit is 3" in refused.reason
    peers["t"] = 1
    assert policy.admit(actx(tenants=here)) is None
    policy.share_with(None)
    peers["t"] = 9
    assert policy.admit(actx(tenants=here)) is None
