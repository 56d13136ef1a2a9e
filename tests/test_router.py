from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

import attrs
import pytest

from prefixroute import (
    AllBlocksCleared,
    Blocker,
    BlockRemoved,
    BlockStored,
    Decision,
    EndpointRemoved,
    EndpointState,
    ModeChanged,
    Profile,
    Rejection,
    Request,
    RouteContext,
    Router,
    SettlementError,
    Usage,
    WeightedScorer,
)
from prefixroute.compiled_index import make_index
from prefixroute.endpoint import EndpointId
from prefixroute.filters import HealthyFilter
from prefixroute.plugins import AdmissionContext
from prefixroute.router import PRECISE_CAPACITY_FACTOR
from prefixroute.scorers import PrefixAffinityScorer
from tests.helpers import endpoint

SYSTEM = "You are a DevOps engineer assistant specializing in Kubernetes and CI/CD. " * 5


def fleet(n: int = 4, **fields: object) -> list[EndpointState]:
    return [endpoint(i, **fields) for i in range(n)]


def chat(question: str, *, tenant: str = "t", session: str | None = None) -> Request:
    return Request(
        model="m", prompt=SYSTEM + question, tenant=tenant, session=session, max_tokens=80
    )


def decide(
    router: Router, request: Request, endpoints: Sequence[EndpointState], now: float
) -> Decision:
    result = router.route(request, endpoints, now)
    assert isinstance(result, Decision), result
    return result


def test_requests_sharing_a_prefix_land_together() -> None:
    router = Router.default(seed=1)
    eps = fleet()
    first = decide(router, chat("Summarize the key points."), eps, 0.0)
    assert first.matched_blocks == 0
    second = decide(router, chat("What should I focus on?"), eps, 0.1)
    assert second.endpoint == first.endpoint
    assert second.matched_blocks > 0
    assert second.predicted_cached_tokens == pytest.approx(
        second.matched_blocks * router.blocker.tokens_per_block(second.request), abs=1
    )
    assert second.matches[first.endpoint] == second.matched_blocks


def test_cold_requests_spread_across_the_fleet() -> None:
    router = Router.default(seed=2)
    eps = fleet(4)
    chosen = Counter(
        decide(router, Request(model="m", prompt=f"Question {n} " * 40), eps, n * 0.01).endpoint
        for n in range(40)
    )
    assert set(chosen) == {"e0", "e1", "e2", "e3"}
    assert max(chosen.values()) <= 13


def test_decision_carries_scores_fallbacks_and_explains_itself() -> None:
    router = Router.default(seed=0)
    eps = fleet(4)
    d = decide(router, chat("Hi", session="s-1"), eps, 0.0)
    assert len(d.fallbacks) == 2 and d.endpoint not in d.fallbacks
    assert set(d.scores) == {"e0", "e1", "e2", "e3"}
    assert set(d.scores["e0"]) == set(d.scorer_names)
    assert d.totals_by_endpoint[d.endpoint] == max(d.totals)
    for eid, per in d.scores.items():
        total = sum(w * per[n] for n, w in zip(d.scorer_names, d.weights, strict=True))
        assert d.totals_by_endpoint[eid] == pytest.approx(total)
    text = d.explain()
    assert d.endpoint in text and "prefix" in text and "fallbacks" in text


def test_filters_that_leave_nothing_reject_with_503() -> None:
    router = Router.default()
    result = router.route(chat("x"), fleet(2, healthy=False), 0.0)
    assert isinstance(result, Rejection)
    assert result.status == 503 and "healthy-filter" in result.reason
    wrong_model = router.route(Request(model="nope", prompt="x"), fleet(2, models={"m"}), 0.0)
    assert isinstance(wrong_model, Rejection) and "nope" in wrong_model.reason
    empty = router.route(chat("x"), [], 0.0)
    assert isinstance(empty, Rejection) and empty.status == 503


def test_admission_rejection_is_returned_untouched() -> None:
    @attrs.frozen
    class Refuse:
        def admit(self, ctx: AdmissionContext) -> Rejection:
            return Rejection(429, "over the tenant's rate", retry_after_s=2.0)

    router = Router(admission=Refuse())
    result = router.route(chat("x"), fleet(), 0.0)
    assert result == Rejection(429, "over the tenant's rate", retry_after_s=2.0)
    assert len(router.index) == 0 and router.load.in_flight() == 0


def test_in_flight_accounting_and_confirmation_on_complete() -> None:
    router = Router.default()
    eps = fleet(2)
    d = decide(router, chat("x"), eps, 0.0)
    assert router.load.requests(d.endpoint) == 1
    assert router.load.tokens(d.endpoint) == d.prompt_tokens + 80
    assert all(router.index.is_speculative(d.endpoint, k) for k in d.block_keys)
    router.on_complete(d, Usage(prompt_tokens=d.prompt_tokens, completion_tokens=80), 1.0)
    assert router.load.requests(d.endpoint) == 0 and router.load.tokens(d.endpoint) == 0
    assert not any(router.index.is_speculative(d.endpoint, k) for k in d.block_keys)
    router.load.check_invariants()
    router.index.check_invariants()


def test_on_complete_credits_the_endpoint_that_really_served() -> None:
    router = Router.default()
    d = decide(router, chat("x"), fleet(2), 0.0)
    other = EndpointId("e1" if d.endpoint == "e0" else "e0")
    router.on_complete(d, Usage(), 1.0, served_by=other)
    assert router.index.match(list(d.block_keys))[other].blocks == d.total_blocks


def test_unconfirmed_predictions_expire_after_the_ttl() -> None:
    router = Router(speculative_ttl_s=5.0)
    eps = fleet(2)
    d = decide(router, chat("x"), eps, 0.0)
    assert router.index.size(d.endpoint) == d.total_blocks  # still in flight: never settled
    later = decide(router, Request(model="m", prompt="unrelated " * 30), eps, 6.0)
    assert later.total_blocks > 0
    assert all(not router.index.holders(k) for k in d.block_keys)


def test_events_drive_the_index() -> None:
    router = Router.default()
    req = chat("x")
    keys = router.blocker.keys(req).tolist()
    router.observe(BlockStored(endpoint=EndpointId("e3"), keys=keys))
    d = decide(router, req, fleet(4), 0.0)
    assert d.endpoint == "e3" and d.matched_blocks == len(keys)
    router.observe(BlockRemoved(endpoint=EndpointId("e3"), keys=keys[len(keys) // 2 :]))
    router.observe(AllBlocksCleared(endpoint=EndpointId("e3")))
    assert router.index.size(EndpointId("e3")) == 0
    router.observe(EndpointRemoved(endpoint=EndpointId("e3")))
    assert EndpointId("e3") not in router.index.endpoints()
    with pytest.raises(TypeError):
        router.observe("nonsense")  # type: ignore[arg-type]


def test_same_seed_same_decisions() -> None:
    def run(seed: int) -> list[str]:
        router = Router.default(seed=seed)
        rng = random.Random(99)
        out = []
        for i in range(60):
            q = rng.choice(["a", "b", "c", "d"]) * rng.randint(1, 400)
            result = router.route(Request(model="m", prompt=q), fleet(5), i * 0.05)
            assert isinstance(result, Decision)
            out.append(result.endpoint)
        return out

    assert run(3) == run(3)


def test_capacity_comes_from_the_endpoint_state() -> None:
    router = Router.default()
    eps = [endpoint(0, kv_capacity_blocks=100)]
    d = decide(router, chat("x"), eps, 0.0)
    tpb = router.blocker.tokens_per_block(d.request)
    assert router.index.capacity(EndpointId("e0")) == int(100 * 16 / tpb)


def test_profile_clamps_scores_and_checks_their_count() -> None:
    @attrs.frozen
    class Wild:
        values: tuple[float, ...]

        def score(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[float]:
            return list(self.values[: len(candidates)])

    profile = Profile(
        name="p",
        filters=(("healthy", HealthyFilter()),),
        scorers=(WeightedScorer("wild", Wild((5.0, math.nan, -1.0)), 2.0),),
    )
    d = decide(Router(profile), chat("x"), fleet(3), 0.0)
    assert d.raw.tolist() == [[1.0, 0.0, 0.0]]
    assert d.totals == (2.0, 0.0, 0.0) and d.endpoint == "e0"
    short = Profile(name="p", scorers=(WeightedScorer("wild", Wild((1.0,)), 1.0),))
    with pytest.raises(ValueError, match="wild"):
        Router(short).route(chat("x"), fleet(3), 0.0)


def test_profile_validation() -> None:
    with pytest.raises(ValueError, match="weight"):
        WeightedScorer("p", PrefixAffinityScorer(), -1.0)
    with pytest.raises(ValueError, match="duplicate"):
        Profile(
            name="p",
            scorers=(
                WeightedScorer("a", PrefixAffinityScorer()),
                WeightedScorer("a", PrefixAffinityScorer()),
            ),
        )
    with pytest.raises(ValueError, match="speculative_ttl_s"):
        Router(speculative_ttl_s=0)


def test_capacities_are_synced_for_every_endpoint_passed() -> None:
    router = Router.default()
    keys = list(range(1, 201))
    router.observe(BlockStored(endpoint=EndpointId("e1"), keys=keys))
    eps = [endpoint(0), endpoint(1, kv_capacity_blocks=10, waiting=100)]
    decide(router, chat("x"), eps, 0.0)
    assert router.index.capacity(EndpointId("e1")) == 10
    assert router.index.size(EndpointId("e1")) == 10
    assert router.index.match(keys)[EndpointId("e1")].blocks == 10  # the head survives


def test_a_removed_endpoint_is_not_resurrected_by_a_late_completion() -> None:
    router = Router.default()
    d = decide(router, Request(model="m", prompt="a" * 300), fleet(1), 0.0)
    router.observe(EndpointRemoved(endpoint=d.endpoint))
    # the same id comes back as a new pod
    decide(router, Request(model="m", prompt="b" * 300), fleet(1), 1.0)
    assert router.load.requests(d.endpoint) == 1
    # outlived the TTL: a live endpoint would get the whole chain inserted as confirmed
    router.on_complete(d, Usage(prompt_tokens=d.prompt_tokens), 100.0)
    assert router.load.requests(d.endpoint) == 1  # the new pod's request is still in flight
    assert not any(router.index.holders(k) for k in d.block_keys)


def test_duplicate_endpoint_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="distinct"):
        Router.default().route(chat("x"), [endpoint(0), endpoint(0), endpoint(1)], 0.0)


def test_sessions_are_scoped_by_tenant() -> None:
    router = Router.default()
    eps = fleet(4)
    first = decide(router, Request(model="m", prompt="a" * 200, tenant="t1", session="s"), eps, 0.0)
    other = Request(model="m", prompt="b" * 200, tenant="t2", session="s")
    d = decide(router, other, eps, 0.1)
    assert d.scores[first.endpoint]["session"] == 0.0
    same = Request(model="m", prompt="c" * 200, tenant="t1", session="s")
    assert decide(router, same, eps, 0.2).scores[first.endpoint]["session"] == 1.0


def test_counters_track_predictions_and_reality() -> None:
    router = Router.default()
    eps = fleet(2)
    d1 = decide(router, chat("one"), eps, 0.0)
    router.on_complete(d1, Usage(prompt_tokens=d1.prompt_tokens, cached_tokens=0), 0.5)
    d2 = decide(router, chat("two"), eps, 1.0)
    router.on_complete(d2, Usage(prompt_tokens=d2.prompt_tokens, cached_tokens=40, ok=False), 1.5)
    router.route(chat("three"), fleet(2, healthy=False), 2.0)
    c = router.counters
    assert (c.decisions, c.rejections, c.completions, c.failures) == (2, 1, 2, 1)
    assert c.predicted_cached_tokens == d2.predicted_cached_tokens > 0
    assert c.actual_cached_tokens == 40
    assert c.prompt_tokens == d1.prompt_tokens + d2.prompt_tokens


def test_late_events_and_credits_do_not_bring_back_a_removed_endpoint() -> None:
    router = Router.default()
    d = decide(router, Request(model="m", prompt="a" * 300), fleet(2), 0.0)
    gone = d.endpoint
    router.observe(EndpointRemoved(endpoint=gone))
    router.observe(BlockStored(endpoint=gone, keys=[1, 2, 3]))
    other = decide(router, Request(model="m", prompt="b" * 300), [endpoint(5)], 1.0)
    router.on_complete(other, Usage(), 2.0, served_by=gone)
    assert gone not in router.index.endpoints()
    # the id passed to route() again is a live endpoint again
    router.route(Request(model="m", prompt="c" * 300), [endpoint(5), endpoint(int(gone[1:]))], 3.0)
    router.observe(BlockStored(endpoint=gone, keys=[1, 2, 3]))
    assert router.index.match([1, 2, 3])[gone].blocks == 3


def test_duplicate_ids_are_refused_before_anything_changes() -> None:
    router = Router.default()
    router.observe(BlockStored(endpoint=EndpointId("e0"), keys=list(range(50))))
    with pytest.raises(ValueError, match="distinct"):
        router.route(
            chat("x"), [endpoint(0, kv_capacity_blocks=100), endpoint(0, kv_capacity_blocks=1)], 0.0
        )
    assert router.index.size(EndpointId("e0")) == 50


def test_ledger_accounts_decisions_rejections_and_completions() -> None:
    router = Router.default()
    d = decide(router, chat("hello", tenant="acme"), fleet(), 0.0)
    assert router.ledger.in_flight("acme") == 1
    router.on_complete(d, Usage(prompt_tokens=d.prompt_tokens, cached_tokens=16, ttft_s=0.02), 1.0)
    assert router.ledger.in_flight("acme") == 0
    bad = router.route(chat("x", tenant="acme"), [], 2.0)
    assert isinstance(bad, Rejection) and bad.kind == "no-endpoint"
    row = next(t for t in router.ledger.snapshot().tenants if t.tenant == "acme")
    assert (row.requests, row.completed, row.cached_tokens) == (1, 1, 16)
    assert row.rejections == {"no-endpoint": 1}


def test_deferred_requests_come_back_through_release() -> None:
    from prefixroute import Deferral, FairQueueAdmission

    router = Router(admission=FairQueueAdmission(max_in_flight_per_endpoint=1))
    eps = fleet(1)
    first = router.route(chat("one"), eps, 0.0)
    assert isinstance(first, Decision)
    waiting = chat("two", tenant="other")
    assert isinstance(router.route(waiting, eps, 0.1), Deferral)
    assert router.counters.deferrals == 1
    assert router.release(eps, 0.2) == []  # still full
    router.on_complete(first, Usage(prompt_tokens=first.prompt_tokens), 0.3)
    ((request, outcome),) = router.release(eps, 0.3)
    assert request is waiting and isinstance(outcome, Decision)
    # A router whose admission never defers releases nothing.
    assert Router.default().release(eps, 0.0) == []


def test_a_released_request_that_fails_to_route_is_answered_not_lost() -> None:
    from prefixroute import Deferral, FairQueueAdmission
    from prefixroute.profile import Profile, WeightedScorer

    @attrs.frozen
    class Fragile:
        def score(self, ctx: object, candidates: Sequence[EndpointState]) -> list[float]:
            if ctx.request.tenant == "bad":  # type: ignore[attr-defined]
                raise RuntimeError("scorer bug")
            return [0.5] * len(candidates)

    profile = Profile(name="fragile", scorers=(WeightedScorer("f", Fragile(), 1.0),))
    router = Router(profile, admission=FairQueueAdmission(max_in_flight_per_endpoint=1))
    eps = fleet(1)
    first = router.route(chat("x", tenant="a"), eps, 0.0)
    assert isinstance(first, Decision)
    waiting = [chat("y", tenant=t) for t in ("bad", "c")]
    assert all(isinstance(router.route(r, eps, 0.1), Deferral) for r in waiting)
    router.on_complete(first, Usage(prompt_tokens=first.prompt_tokens), 0.2)
    released = router.release(eps, 0.2)  # room for one: "bad" is first in line
    assert [r.tenant for r, _ in released] == ["bad"]
    outcome = released[0][1]
    assert isinstance(outcome, Rejection) and (outcome.status, outcome.kind) == (503, "internal")
    ((request, decision),) = router.release(eps, 0.3)  # the slot is still free: "c" goes
    assert request.tenant == "c" and isinstance(decision, Decision)


# -- misuse (issue 12, item 8): settling is exactly once per decision of this router ----


def test_a_second_on_complete_raises_and_changes_nothing() -> None:
    """Regression: a second settle drove in-flight 2 -> 0 with one request still open."""
    router = Router.default()
    eps = fleet(1)
    d1 = decide(router, chat("x"), eps, 0.0)
    d2 = decide(router, chat("y"), eps, 0.0)
    assert router.load.requests(d1.endpoint) == 2 and router.open_decisions == 2
    router.on_complete(d1, Usage(prompt_tokens=d1.prompt_tokens), 1.0)
    with pytest.raises(SettlementError, match="already settled") as info:
        router.on_complete(d1, Usage(prompt_tokens=d1.prompt_tokens), 1.0)
    assert info.value.kind == "settled"
    assert router.load.requests(d1.endpoint) == 1
    assert router.ledger.in_flight("t") == 1
    assert router.counters.completions == 1 and router.open_decisions == 1
    router.on_complete(d2, Usage(), 2.0)
    assert router.load.in_flight() == 0 and router.open_decisions == 0


def test_a_decision_of_another_router_is_refused() -> None:
    """Regression: a foreign decision was settled into this router's ledger."""
    ours, theirs = Router.default(), Router.default()
    eps = fleet(2)
    mine = decide(ours, chat("x"), eps, 0.0)
    foreign = decide(theirs, chat("x"), eps, 0.0)
    assert foreign.serial == mine.serial  # serials alone cannot tell them apart
    with pytest.raises(SettlementError, match="did not make") as info:
        ours.on_complete(foreign, Usage(cached_tokens=5), 1.0)
    assert info.value.kind == "foreign" and isinstance(info.value, ValueError)
    assert ours.counters.completions == 0 and ours.ledger.in_flight("t") == 1
    assert ours.ledger.snapshot().total.completed == 0
    hand_made = attrs.evolve(mine, issuer=None)
    with pytest.raises(SettlementError):
        ours.on_complete(hand_made, Usage(), 1.0)
    ours.on_complete(mine, Usage(), 1.0)  # its own decision still settles
    assert ours.load.in_flight() == 0


def test_reported_cached_tokens_are_clamped_to_the_prompt() -> None:
    """Regression: `Usage(cached_tokens=10**12)` gave a tenant hit rate of 1.2e10."""
    router = Router.default()
    eps = fleet(1)
    d = decide(router, chat("x"), eps, 0.0)
    router.on_complete(d, Usage(cached_tokens=10**12), 1.0)  # the engine gave no prompt count
    d2 = decide(router, chat("y"), eps, 1.0)
    router.on_complete(d2, Usage(prompt_tokens=50, cached_tokens=10**12), 2.0)
    tenant = router.ledger.snapshot().tenants[0]
    assert tenant.cached_tokens == d.prompt_tokens + 50
    assert tenant.hit_rate == 1.0
    assert router.counters.actual_cached_tokens == d.prompt_tokens + 50
    router.ledger.check_invariants()


@pytest.mark.parametrize("now", [math.nan, math.inf, -math.inf])
def test_a_non_finite_now_is_refused(now: float) -> None:
    router = Router.default()
    eps = fleet(1)
    with pytest.raises(ValueError, match="now must be a finite"):
        router.route(chat("x"), eps, now)
    d = decide(router, chat("x"), eps, 0.0)
    with pytest.raises(ValueError, match="now must be a finite"):
        router.on_complete(d, Usage(), now)
    router.on_complete(d, Usage(), 1.0)  # the refused call settled nothing
    assert router.counters.completions == 1


def test_the_largest_expected_output_cannot_overflow_the_load_scorers() -> None:
    """Regression: `max_tokens=10**400` was accepted and the next `route` raised OverflowError."""
    router = Router.default()
    eps = fleet(2)
    for i in range(4):
        decide(router, Request(model="m", prompt=f"{i}" * 100, max_tokens=2**63 - 1), eps, 0.0)
    decide(router, chat("y"), eps, 0.0)


def test_keys_hashed_ahead_give_the_same_decisions_as_keys_hashed_in_route() -> None:
    here, ahead = Router.default(seed=3), Router.default(seed=3)
    endpoints = fleet()
    for i in range(12):
        request = chat(f"question {i % 5}", tenant=f"t{i % 3}")
        a = here.route(request, endpoints, now=float(i))
        b = ahead.route(request, endpoints, now=float(i), keys=ahead.blocker.keys(request))
        assert isinstance(a, Decision) and isinstance(b, Decision)
        assert a.matched_blocks > 0 or i < 3
        assert (a.endpoint, a.fallbacks, a.matched_blocks) == (
            b.endpoint,
            b.fallbacks,
            b.matched_blocks,
        )
        here.on_complete(a, Usage(prompt_tokens=a.prompt_tokens), now=i + 0.5)
        ahead.on_complete(b, Usage(prompt_tokens=b.prompt_tokens), now=i + 0.5)


def test_a_failed_request_takes_its_prediction_back() -> None:
    router = Router(speculative_ttl_s=5.0)
    eps = fleet(2)
    d = decide(router, chat("x"), eps, 0.0)
    router.on_complete(d, Usage(ok=False), 1.0)
    assert router.index.size(d.endpoint) == 0
    assert router.index.stats().entries == 0


def test_a_failed_request_leaves_what_a_later_decision_refreshed_or_events_confirmed() -> None:
    router = Router(speculative_ttl_s=5.0)
    eps = [e for e in fleet(2) if e.id == "e0"]
    first = decide(router, chat("x"), eps, 0.0)
    second = decide(router, chat("x"), eps, 1.0)  # refreshes every key's deadline
    router.on_complete(first, Usage(ok=False), 2.0)
    assert router.index.size(EndpointId("e0")) == first.total_blocks
    router.observe(BlockStored(EndpointId("e0"), second.block_keys[:2]))
    router.on_complete(second, Usage(ok=False), 3.0)
    assert router.index.size(EndpointId("e0")) == 2  # the confirmed ones stay
    assert not router.index.is_speculative(EndpointId("e0"), second.block_keys[0])


def test_precise_endpoints_confirm_on_events_only() -> None:
    router = Router(speculative_ttl_s=30.0, precise_speculative_ttl_s=2.0)
    eps = [e for e in fleet(2) if e.id == "e0"]
    e0 = EndpointId("e0")
    router.observe(ModeChanged(e0, precise=True))
    assert router.is_precise(e0) and router.precise_endpoints == {e0}
    d = decide(router, chat("x"), eps, 0.0)
    router.index.expire(20.0)  # a request queued for long: its prediction stands while it runs
    assert router.index.size(e0) == d.total_blocks
    router.on_complete(d, Usage(prompt_tokens=d.prompt_tokens), 21.0)
    assert router.index.is_speculative(e0, d.block_keys[0])  # a completion confirms nothing
    router.observe(BlockStored(e0, d.block_keys[:3]))
    router.index.expire(23.5)  # the grace after completion passed: only what the engine reported
    assert router.index.size(e0) == 3
    router.observe(ModeChanged(e0, precise=False))
    d2 = decide(router, chat("x"), eps, 23.0)
    router.on_complete(d2, Usage(prompt_tokens=d2.prompt_tokens), 24.0)
    router.index.expire(60.0)
    assert router.index.size(e0) == d2.total_blocks  # approximate again: completions confirm


def test_a_precise_endpoint_gets_room_for_speculation() -> None:
    ep = EndpointState(id="e0", address="10.0.0.1:8000", kv_capacity_blocks=128, block_size=16)
    router = Router(blocker=Blocker(block_size=16))
    decide(router, Request(model="m", token_ids=list(range(40))), [ep], 0.0)
    assert router.index.capacity(EndpointId("e0")) == 128
    router.observe(ModeChanged(EndpointId("e0"), precise=True))
    decide(router, Request(model="m", token_ids=list(range(40))), [ep], 1.0)
    assert router.index.capacity(EndpointId("e0")) == 128 * PRECISE_CAPACITY_FACTOR
    queued = attrs.evolve(ep, waiting=3)  # requests queue: the engine's own capacity
    decide(router, Request(model="m", token_ids=list(range(40))), [queued], 1.5)
    assert router.index.capacity(EndpointId("e0")) == 128
    decide(router, Request(model="m", token_ids=list(range(40))), [ep], 1.8)
    assert router.index.capacity(EndpointId("e0")) == 128 * PRECISE_CAPACITY_FACTOR
    router.observe(ModeChanged(EndpointId("e0"), precise=False))
    decide(router, Request(model="m", token_ids=list(range(40))), [ep], 2.0)
    assert router.index.capacity(EndpointId("e0")) == 128


def test_a_removed_endpoint_forgets_its_mode() -> None:
    router = Router.default()
    e0 = EndpointId("e0")
    router.observe(ModeChanged(e0, precise=True))
    router.observe(EndpointRemoved(e0))
    assert not router.is_precise(e0)


def test_predictions_follow_the_engines_reuse_rule() -> None:
    # whole engine blocks only, and never the prompt's last token (vLLM recomputes it)
    router = Router(blocker=Blocker(block_size=16))
    ep = EndpointState(id="e0", address="10.0.0.1:8000", block_size=32)
    tokens = list(range(64))
    first = decide(router, Request(model="m", token_ids=tokens), [ep], 0.0)
    router.on_complete(first, Usage(prompt_tokens=64), 1.0)
    again = decide(router, Request(model="m", token_ids=tokens), [ep], 2.0)
    assert again.matched_blocks == 4
    assert again.predicted_cached_tokens == 32  # 63 reusable tokens: one whole 32-token block
    longer = decide(router, Request(model="m", token_ids=[*tokens, 1, 2]), [ep], 3.0)
    assert longer.predicted_cached_tokens == 64


def test_an_endpoints_block_size_converts_its_capacity_unless_configured() -> None:
    ep = EndpointState(id="e0", address="10.0.0.1:8000", kv_capacity_blocks=128, block_size=32)
    router = Router(blocker=Blocker(block_size=16))
    decide(router, Request(model="m", token_ids=list(range(40))), [ep], 0.0)
    assert router.index.capacity(EndpointId("e0")) == 256
    fixed = Router(blocker=Blocker(block_size=16), engine_block_size=16)
    decide(fixed, Request(model="m", token_ids=list(range(40))), [ep], 0.0)
    assert fixed.index.capacity(EndpointId("e0")) == 128


@pytest.mark.parametrize("bad", [-1, 2**64, 2**70])
def test_events_refuse_block_keys_outside_uint64_when_built(bad: int) -> None:
    for event in (BlockStored, BlockRemoved):
        with pytest.raises(ValueError, match=r"block keys must be integers in \[0, 2\*\*64\)"):
            event(EndpointId("e0"), [1, bad])
    assert BlockStored(EndpointId("e0"), [0, 2**64 - 1]).keys == (0, 2**64 - 1)


@pytest.mark.parametrize("compiled", [False, True])
def test_a_peer_decision_teaches_another_replica_where_a_prefix_went(compiled: bool) -> None:
    """Replica B applies replica A's decision: B's next request with that prefix goes there."""
    a, b = (Router(index=make_index(compiled=compiled)) for _ in range(2))
    eps = fleet(4)
    first = decide(a, chat("Where did this go?"), eps, 0.0)
    decide(b, chat("Warm up B's table with another prompt entirely.", tenant="u"), eps, 0.0)
    assert b.apply_peer_decision(first.endpoint, first.keys, 0.1)
    again = decide(b, chat("Where did this go?"), eps, 0.2)
    assert again.endpoint == first.endpoint and again.matched_blocks == first.total_blocks
    # entries are speculative: gone after the TTL unless confirmed
    b.index.expire(0.1 + b.speculative_ttl_s + 1.0)
    assert not b.index.match(first.keys)
    # precise endpoints learn from their engine's events only; removed ones not at all
    b.observe(ModeChanged(endpoint=EndpointId("e1"), precise=True))
    assert not b.apply_peer_decision(EndpointId("e1"), first.keys, 0.3)
    b.observe(EndpointRemoved(endpoint=EndpointId("e2")))
    assert not b.apply_peer_decision(EndpointId("e2"), first.keys, 0.3)
    b.index.check_invariants()
    b.load.check_invariants()
