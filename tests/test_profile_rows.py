"""The array path (plugins.RowFilter / RowScorer / TopPicker, EndpointTable) against the lists.

Every built-in plugin's array method must give exactly what its list method
gives: the same endpoints in the same order, the same float64 scores bit for
bit, the same picks with the same random draws. Then the router itself: a
router whose plugins only have the one-method protocols and the default one
must make the same decisions, field by field, on random traffic.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import attrs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixroute import (
    Decision,
    EndpointState,
    LoadTracker,
    PrefixMatch,
    Profile,
    Request,
    RouteContext,
    Router,
    Usage,
    WeightedScorer,
)
from prefixroute.endpoint import MAX_COUNT, EndpointId, EndpointTable, Role
from prefixroute.events import EndpointRemoved, ModeChanged
from prefixroute.filters import (
    HealthyFilter,
    HotSpotFilter,
    ModelFilter,
    RoleFilter,
    SaturationFilter,
    StaleMetricsFilter,
    TailPoolFilter,
)
from prefixroute.pickers import (
    CacheAwarePicker,
    MaxScorePicker,
    PowerOfTwoPicker,
    RandomPicker,
    RoundRobinPicker,
    SoftmaxPicker,
    WeightedRandomPicker,
)
from prefixroute.predictive import PredictedLatencyScorer, SloFilter
from prefixroute.router import _TrackedLoad, default_profile
from prefixroute.scorers import (
    UNIT_ROW_SCORERS,
    ColdSpreadScorer,
    ConsistentHashScorer,
    InflightScorer,
    KVCostScorer,
    KVUtilisationScorer,
    LoraAffinityScorer,
    PrefixAffinityScorer,
    QueueDepthScorer,
    SessionAffinityScorer,
)

# -- random endpoints, load and requests ---------------------------------------------------

times = st.none() | st.floats(-10.0, 10.0) | st.integers(-(2**60), 2**60)


@st.composite
def endpoint_states(draw: st.DrawFn, i: int) -> EndpointState:
    return EndpointState(
        id=f"e{i}",
        address=f"127.0.0.1:{9000 + i}",
        role=draw(st.sampled_from(Role)),
        models=draw(st.sampled_from([(), ("m",), ("n",), ("m", "n")])),
        adapters=draw(st.sampled_from([(), ("a",), ("a", "b")])),
        waiting=draw(st.integers(0, 20) | st.integers(0, MAX_COUNT)),
        running=draw(st.integers(0, 20)),
        kv_usage=draw(st.floats(0.0, 1.0) | st.sampled_from([0, 1, 0.95])),
        healthy=draw(st.booleans()),
        observed_at=draw(times),
    )


@st.composite
def fleets(draw: st.DrawFn, max_size: int = 12) -> list[EndpointState]:
    n = draw(st.integers(1, max_size))
    return [draw(endpoint_states(i)) for i in range(n)]


@st.composite
def situations(draw: st.DrawFn) -> tuple[RouteContext, RouteContext, np.ndarray]:
    """(list context, array context, candidate rows) over one random fleet and load.

    The array context's load mirrors the same counts in a table (the router's
    way) or not (a bare LoadTracker: the table reads the dictionaries).
    """
    eps = draw(fleets())
    table = EndpointTable(eps)
    mirrored = draw(st.booleans())
    plain = LoadTracker()
    tracked = _TrackedLoad()
    ops = draw(
        st.lists(
            st.tuples(
                st.integers(0, len(eps)),
                st.integers(0, 5000) | st.integers(0, 2**70),
                st.booleans(),
            ),
            max_size=30,
        )
    )
    now = draw(st.floats(-5.0, 20.0))
    for load in (plain, tracked):
        for i, tokens, start in ops:
            eid = EndpointId(f"e{i}")
            if start:
                load.start(eid, tokens)
            else:
                load.finish(eid, tokens)
    if mirrored:
        tracked.bind(table)
    colds = draw(st.lists(st.tuples(st.integers(0, len(eps)), st.floats(-5.0, 20.0)), max_size=4))
    request = Request(
        model=draw(st.sampled_from(["m", "n"])),
        prompt="hello world",
        tenant=draw(st.sampled_from(["t0", "t1"])),
        session=draw(st.sampled_from([None, "s0", "s1"])),
        lora=draw(st.sampled_from([None, "a", "b"])),
    )
    sessions = draw(st.lists(st.tuples(st.sampled_from(["s0", "s1"]), st.integers(0, len(eps)))))
    for load in (plain, tracked):
        for i, at in colds:
            load.note_cold(EndpointId(f"e{i}"), at)
        for s, i in sessions:
            load.bind_session((request.tenant, s), EndpointId(f"e{i}"))
    total = draw(st.integers(0, 40))
    matches = {}
    if total:
        for i in draw(st.lists(st.integers(0, len(eps)), unique=True, max_size=len(eps))):
            blocks = draw(st.integers(1, total))
            weighted = draw(st.sampled_from([float(blocks), blocks * 0.5, blocks * 0.25 + 0.5]))
            matches[EndpointId(f"e{i}")] = PrefixMatch(blocks, weighted)
    rows = np.array(sorted(draw(st.sets(st.integers(0, len(eps) - 1), min_size=1))), dtype=np.intp)
    if draw(st.booleans()):
        rows = table.all_rows
    tokens_per_block = draw(st.sampled_from([16.0, 3.7]))

    def ctx(load: LoadTracker, with_table: bool) -> RouteContext:
        c = RouteContext(
            request=request,
            now=now,
            rng=random.Random(0),
            block_keys=list(range(total)),
            prompt_tokens=total * 16,
            tokens_per_block=tokens_per_block,
            matches=matches,
            load=load,
            table=table if with_table else None,
        )
        c.endpoints = eps
        return c

    return ctx(plain, False), ctx(tracked if mirrored else plain, True), rows


def _ids(endpoints: Sequence[EndpointState]) -> list[str]:
    return [e.id for e in endpoints]


# -- filters -------------------------------------------------------------------------------

FILTERS = [
    HealthyFilter(),
    ModelFilter(),
    ModelFilter(require_adapter=True),
    RoleFilter(),
    RoleFilter(roles=["decode"]),
    StaleMetricsFilter(),
    StaleMetricsFilter(max_age_s=0.5),
    SaturationFilter(),
    SaturationFilter(max_waiting=3, max_kv_usage=0.5),
    HotSpotFilter(),
    HotSpotFilter(ratio=1.0, slack=0.0),
    SloFilter(),  # no objectives here: keeps all (with objectives: tests/test_latency.py)
]


@settings(max_examples=150, deadline=None)
@given(situation=situations(), which=st.sampled_from(range(len(FILTERS))))
def test_every_filters_rows_equal_its_list(
    situation: tuple[RouteContext, RouteContext, np.ndarray], which: int
) -> None:
    listed, arrayed, rows = situation
    flt = FILTERS[which]
    table = arrayed.table
    assert table is not None
    expected = flt.filter(listed, table.select(rows))
    got = flt.filter_rows(arrayed, rows)
    assert _ids(table.select(got)) == _ids(expected)
    assert list(got) == sorted(set(got.tolist()))
    again = flt.filter_rows(arrayed, rows)  # a memoised answer is the same answer
    assert again.tolist() == got.tolist()
    if len(got) == len(rows):
        assert got is rows  # unchanged candidates keep their identity (later memos hit)


@settings(max_examples=60)
@given(
    eps=fleets(max_size=16),
    tenants=st.lists(st.sampled_from([f"t{i}" for i in range(6)]), min_size=1, max_size=300),
    all_rows=st.booleans(),
)
def test_tail_pool_rows_equal_its_list_over_a_run(
    eps: list[EndpointState], tenants: list[str], all_rows: bool
) -> None:
    listed, arrayed = TailPoolFilter(min_endpoints=2), TailPoolFilter(min_endpoints=2)
    table = EndpointTable(eps)
    rows = table.all_rows if all_rows else table.all_rows[::2].copy()
    for k, tenant in enumerate(tenants):
        request = Request(model="m", prompt="x", tenant=tenant)
        ctxs = []
        for t in (None, table):
            c = RouteContext(
                request=request,
                now=float(k),
                rng=random.Random(0),
                block_keys=[],
                prompt_tokens=1,
                tokens_per_block=16.0,
                matches={},
                load=LoadTracker(),
                table=t,
            )
            c.endpoints = eps if k % 7 else ()
            ctxs.append(c)
        expected = listed.filter(ctxs[0], table.select(rows))
        got = arrayed.filter_rows(ctxs[1], rows)
        assert _ids(table.select(got)) == _ids(expected)
    assert listed.tracked_tenants() == arrayed.tracked_tenants()


# -- scorers -------------------------------------------------------------------------------

SCORERS = [
    PrefixAffinityScorer(),
    PrefixAffinityScorer(length_weight=0.0, length_ref_tokens=1.0),
    QueueDepthScorer(),
    QueueDepthScorer(scale=0.3),
    KVUtilisationScorer(),
    InflightScorer(),
    InflightScorer(request_scale=0.7, token_scale=3.0, token_weight=0.3),
    SessionAffinityScorer(),
    LoraAffinityScorer(),
    ColdSpreadScorer(),
    ColdSpreadScorer(tau_s=0.1),
    ConsistentHashScorer(),
    ConsistentHashScorer(key="session"),
    ConsistentHashScorer(key="tenant"),
    KVCostScorer(),
    KVCostScorer(overlap_score_weight=0.3, scale=7.0),
    PredictedLatencyScorer(),
    PredictedLatencyScorer(scale_ms=50.0, tpot_weight=100.0, quantile=0.9),
]


@settings(max_examples=150, deadline=None)
@given(
    situation=situations(),
    which=st.sampled_from(range(len(SCORERS))),
    more=st.lists(st.tuples(st.integers(0, 20), st.integers(1, 3000)), min_size=1, max_size=6),
)
def test_every_scorers_rows_equal_its_list_bit_for_bit(
    situation: tuple[RouteContext, RouteContext, np.ndarray],
    which: int,
    more: list[tuple[int, int]],
) -> None:
    listed, arrayed, rows = situation
    scorer = SCORERS[which]
    assert arrayed.table is not None
    expected = np.array(scorer.score(listed, arrayed.table.select(rows)), dtype=np.float64)
    got = scorer.score_rows(arrayed, rows)
    assert got.dtype == np.float64 and got.shape == (len(rows),)
    assert got.tobytes() == expected.tobytes()  # bit for bit, -0.0 and NaN included
    # the load moves (a memoised column is updated row by row): the same again
    for i, tokens in more:
        eid = EndpointId(f"e{i % len(arrayed.table)}")
        for load in {id(listed.load): listed.load, id(arrayed.load): arrayed.load}.values():
            if tokens % 3:
                load.start(eid, tokens)
            else:
                load.finish(eid, tokens)
        expected = np.array(scorer.score(listed, arrayed.table.select(rows)), dtype=np.float64)
        assert scorer.score_rows(arrayed, rows).tobytes() == expected.tobytes()


@settings(max_examples=150, deadline=None)
@given(situation=situations(), which=st.sampled_from(range(len(SCORERS))))
def test_the_unit_scorers_rows_stay_within_0_and_1(
    situation: tuple[RouteContext, RouteContext, np.ndarray], which: int
) -> None:
    """What lets `Profile.score_rows` skip the clamp's check for these scorers."""
    _, arrayed, rows = situation
    scorer = SCORERS[which]
    if type(scorer) not in UNIT_ROW_SCORERS:
        return
    got = scorer.score_rows(arrayed, rows)
    assert not np.isnan(got).any()
    assert ((got >= 0.0) & (got <= 1.0)).all()


def test_a_full_prefix_match_that_rounds_past_1_scores_1() -> None:
    """(1 - 0.2) / 11 * 11 + 0.2 is 1 + an ulp in float64: both paths cap it at 1."""
    table = EndpointTable([EndpointState(id="e0", address="127.0.0.1:9000", models=("m",))])
    ctx = RouteContext(
        request=Request(model="m", token_ids=list(range(11 * 16))),
        now=0.0,
        rng=random.Random(0),
        block_keys=list(range(11)),
        prompt_tokens=11 * 16,
        tokens_per_block=16.0,
        matches={EndpointId("e0"): PrefixMatch(11, 11.0)},
        load=LoadTracker(),
        table=table,
    )
    assert (1.0 - 0.2) / 11 * 11.0 + 0.2 > 1.0
    scorer = PrefixAffinityScorer(length_weight=0.2, length_ref_tokens=16.0)
    assert scorer.score(ctx, list(table.endpoints)) == [1.0]
    assert scorer.score_rows(ctx, table.all_rows).tolist() == [1.0]


@attrs.frozen
class Wild:
    """A row scorer with out-of-range and NaN scores, to exercise the profile's clamp."""

    values: tuple[float, ...]

    def score(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[float]:
        return [self.values[i % len(self.values)] for i in range(len(candidates))]

    def score_rows(self, ctx: RouteContext, rows: np.ndarray) -> np.ndarray:
        return np.array(self.score(ctx, [None] * len(rows)), dtype=np.float64)  # type: ignore[list-item]


@settings(max_examples=120)
@given(
    situation=situations(),
    picks=st.lists(st.sampled_from(range(len(SCORERS))), min_size=0, max_size=6),
    weights=st.lists(st.floats(0.0, 10.0), min_size=7, max_size=7),
    wild=st.none() | st.lists(st.floats(allow_nan=True), min_size=1, max_size=4),
)
def test_profile_score_rows_equals_score(
    situation: tuple[RouteContext, RouteContext, np.ndarray],
    picks: list[int],
    weights: list[float],
    wild: list[float] | None,
) -> None:
    listed, arrayed, rows = situation
    scorers = [WeightedScorer(f"s{k}", SCORERS[i], weights[k]) for k, i in enumerate(picks)]
    if wild is not None:
        scorers.append(WeightedScorer("wild", Wild(tuple(wild)), weights[-1]))
    profile = Profile(name="p", scorers=tuple(scorers))
    assert profile.row_scorers
    assert arrayed.table is not None
    raw, totals = profile.score(listed, arrayed.table.select(rows))
    raw2, totals2 = profile.score_rows(arrayed, rows)
    assert raw2.shape == raw.shape and raw2.tobytes() == raw.tobytes()
    assert np.array(totals, dtype=np.float64).tobytes() == totals2.tobytes()
    assert not raw2.flags.writeable


# -- pickers -------------------------------------------------------------------------------


def _pickers() -> list[object]:
    return [
        MaxScorePicker(),
        MaxScorePicker(tolerance=0.3),
        MaxScorePicker(tolerance=0.0),  # exact ties only
        MaxScorePicker(tolerance=0.5),  # 1.0 - 0.5 lands exactly on another total
        WeightedRandomPicker(),
        PowerOfTwoPicker(),
        SoftmaxPicker(),
        SoftmaxPicker(temperature=5.0),
        RandomPicker(),
        RoundRobinPicker(),
        CacheAwarePicker(),
        CacheAwarePicker(balance_abs_threshold=0, balance_rel_threshold=0.0),
    ]


TIES = (0.0, -0.0, 0.5, 1.0, 1.0 + 1e-12, 3.0)


def _totals(n: int, seed: int, ties: float) -> list[float]:
    """`n` totals, a share `ties` of them from a few values (ties, near-ties, both zeros)."""
    rng = random.Random(seed)
    return [rng.choice(TIES) if rng.random() < ties else rng.uniform(0.0, 7.0) for _ in range(n)]


@settings(max_examples=200)
@given(
    n=st.integers(1, 20) | st.integers(1, 400),  # small (Python sort), sorted, partitioned
    ties=st.sampled_from([0.0, 0.5, 1.0]),
    which=st.sampled_from(range(12)),
    count=st.integers(0, 5),
    seed=st.integers(0, 2**32),
    rounds=st.integers(1, 3),
)
def test_every_pickers_top_equals_the_head_of_its_pick(
    n: int, ties: float, which: int, count: int, seed: int, rounds: int
) -> None:
    totals = _totals(n, seed, ties)
    listed, arrayed = _pickers()[which], _pickers()[which]
    eps = [EndpointState(id=f"e{i}", address=f"127.0.0.1:{1000 + i}") for i in range(len(totals))]
    load = LoadTracker()
    for i in range(0, len(totals), 3):
        load.start(EndpointId(f"e{i}"), 10)
    array = np.array(totals, dtype=np.float64)
    rng_a, rng_b = random.Random(seed), random.Random(seed)
    for r in range(rounds):
        ctxs = []
        for rng in (rng_a, rng_b):
            c = RouteContext(
                request=Request(model="m", prompt=f"p{r}" * 5),
                now=float(r),
                rng=rng,
                block_keys=[],
                prompt_tokens=1,
                tokens_per_block=16.0,
                matches={},
                load=load,
            )
            c.candidates = eps
            ctxs.append(c)
        full = listed.pick(ctxs[0], list(totals))  # type: ignore[attr-defined]
        top = arrayed.pick_top(ctxs[1], array, count)  # type: ignore[attr-defined]
        assert sorted(full) == list(range(len(totals)))
        assert top == full[: count + 1]
        assert rng_a.getstate() == rng_b.getstate()


# -- the router: array path against list path ----------------------------------------------


@attrs.frozen
class ListOnly:
    """A built-in plugin seen through the one-method protocol only (a third-party plugin)."""

    inner: object

    def filter(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> object:
        return self.inner.filter(ctx, candidates)  # type: ignore[attr-defined]

    def score(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> object:
        return self.inner.score(ctx, candidates)  # type: ignore[attr-defined]

    def pick(self, ctx: RouteContext, totals: Sequence[float]) -> object:
        return self.inner.pick(ctx, totals)  # type: ignore[attr-defined]


def _list_only(profile: Profile, *, filters: bool, scorers: bool, picker: bool) -> Profile:
    return Profile(
        name=profile.name,
        filters=tuple((n, ListOnly(f) if filters else f) for n, f in profile.filters),
        scorers=tuple(
            WeightedScorer(ws.name, ListOnly(ws.scorer) if scorers else ws.scorer, ws.weight)
            for ws in profile.scorers
        ),
        picker=(profile.picker[0], ListOnly(profile.picker[1]) if picker else profile.picker[1]),
        max_fallbacks=profile.max_fallbacks,
    )


def _same(a: Decision, b: Decision) -> None:
    assert (a.endpoint, a.fallbacks, a.candidates, a.totals) == (
        b.endpoint,
        b.fallbacks,
        b.candidates,
        b.totals,
    )
    assert a.raw.tobytes() == b.raw.tobytes() and a.raw.shape == b.raw.shape
    assert (a.matched_blocks, a.total_blocks, a.predicted_cached_tokens, a.load_tokens) == (
        b.matched_blocks,
        b.total_blocks,
        b.predicted_cached_tokens,
        b.load_tokens,
    )
    assert a.block_keys == b.block_keys and a.keys.tolist() == list(b.block_keys)
    assert dict(a.matches) == dict(b.matches)
    assert (a.scorer_names, a.weights, a.epoch, a.serial) == (
        b.scorer_names,
        b.weights,
        b.epoch,
        b.serial,
    )


step = st.tuples(
    st.integers(0, 5),  # prompt family
    st.sampled_from(["same", "copy", "new", "mutate", "precise", "remove", "complete"]),
    st.integers(0, 7),  # an endpoint
    st.booleans(),  # ok
)


@settings(max_examples=60, deadline=None)
@given(
    eps=fleets(max_size=9),
    steps=st.lists(step, min_size=1, max_size=25),
    mode=st.sampled_from(["filters", "scorers", "picker", "all"]),
    longtail=st.booleans(),
)
def test_a_router_on_the_array_path_decides_as_on_the_list_path(
    eps: list[EndpointState],
    steps: list[tuple[int, str, int, bool]],
    mode: str,
    longtail: bool,
) -> None:
    base = default_profile()
    if longtail:
        base = attrs.evolve(
            base, filters=(*base.filters, ("tail-pool-filter", TailPoolFilter(min_endpoints=2)))
        )
    listed_profile = _list_only(
        base,
        filters=mode in ("filters", "all"),
        scorers=mode in ("scorers", "all"),
        picker=mode in ("picker", "all"),
    )
    arrayed_profile = attrs.evolve(base)  # fresh plugin state (tail pool) for each router
    if longtail:
        listed_profile = _list_only(
            attrs.evolve(
                base,
                filters=(*base.filters[:-1], ("tail-pool-filter", TailPoolFilter(min_endpoints=2))),
            ),
            filters=mode in ("filters", "all"),
            scorers=mode in ("scorers", "all"),
            picker=mode in ("picker", "all"),
        )
        arrayed_profile = attrs.evolve(
            base,
            filters=(*base.filters[:-1], ("tail-pool-filter", TailPoolFilter(min_endpoints=2))),
        )
    routers = [Router(p, rng=random.Random(7)) for p in (listed_profile, arrayed_profile)]
    assert routers[1].profile.row_filters and routers[1].profile.row_scorers
    fleet = list(eps)
    open_: list[tuple[Decision, Decision]] = []
    for k, (family, action, which, ok) in enumerate(steps):
        now = float(k)
        target = EndpointId(f"e{which % len(fleet)}")
        if action == "copy":
            fleet = list(fleet)
        elif action == "new":
            fleet = [attrs.evolve(e, waiting=(e.waiting + k) % 7, observed_at=now) for e in fleet]
        elif action == "mutate":
            i = which % len(fleet)
            fleet[i] = attrs.evolve(fleet[i], healthy=not fleet[i].healthy, kv_usage=0.99)
        elif action in ("precise", "remove"):
            event = ModeChanged(target, precise=bool(k % 2)) if action == "precise" else None
            for r in routers:
                r.observe(event if event is not None else EndpointRemoved(target))
        elif action == "complete" and open_:
            a, b = open_.pop(which % len(open_))
            for r, d in zip(routers, (a, b), strict=True):
                r.on_complete(d, Usage(prompt_tokens=d.prompt_tokens, ok=ok), now)
        request = Request(
            model="m",
            token_ids=list(range(family * 40 + 1)) + [k] * (k % 30),
            tenant=f"t{family % 3}",
            session="s" if family % 2 else None,
            max_tokens=50,
        )
        outs = [r.route(request, fleet, now) for r in routers]
        assert type(outs[0]) is type(outs[1])
        if isinstance(outs[0], Decision):
            assert isinstance(outs[1], Decision)
            _same(outs[0], outs[1])
            open_.append((outs[0], outs[1]))
        else:
            assert outs[0] == outs[1]
        assert routers[0].rng.getstate() == routers[1].rng.getstate()
        assert routers[0].load.requests_view() == routers[1].load.requests_view()
        assert routers[0].load.tokens_view() == routers[1].load.tokens_view()
    routers[1].index.check_invariants()


def test_the_table_is_reused_while_the_endpoints_stay_the_same() -> None:
    router = Router.default()
    fleet = [
        EndpointState(id=f"e{i}", address=f"127.0.0.1:{9000 + i}", observed_at=0.0)
        for i in range(4)
    ]
    first = router._sync_capacities(fleet)
    assert router._sync_capacities(fleet) is first
    assert router._sync_capacities(list(fleet)) is first  # an equal list: same snapshots
    assert router._sync_capacities(tuple(fleet)) is not first  # another type: rebuilt once
    again = router._sync_capacities(tuple(fleet))
    assert router._sync_capacities(tuple(fleet)) is again
    fleet[1] = attrs.evolve(fleet[1], waiting=3)  # mutated in place: noticed
    changed = router._sync_capacities(fleet)
    assert changed is not again and changed.waiting.tolist() == [0, 3, 0, 0]
    router.observe(ModeChanged(EndpointId("e0"), precise=True))  # an event: rebuilt
    assert router._sync_capacities(fleet) is not changed


def test_the_mirrored_load_follows_every_change() -> None:
    router = Router.default()
    fleet = [
        EndpointState(id=f"e{i}", address=f"127.0.0.1:{9000 + i}", observed_at=0.0)
        for i in range(3)
    ]
    decisions = []
    for k in range(9):
        d = router.route(Request(model="m", token_ids=list(range(k * 17 + 1))), fleet, float(k))
        assert isinstance(d, Decision)
        decisions.append(d)
    table = router._table
    assert table.load_owner is router.load
    for d in decisions[::2]:
        router.on_complete(d, Usage(prompt_tokens=d.prompt_tokens), 10.0)
    router.observe(EndpointRemoved(EndpointId("e1")))
    view, tokens = router.load.requests_view(), router.load.tokens_view()
    assert table.inflight_requests.tolist() == [view.get(e, 0) for e in table.ids]
    assert table.inflight_tokens.tolist() == [tokens.get(e, 0) for e in table.ids]
    assert table.inflight_total == sum(view.get(e, 0) for e in table.ids)
    router.load.check_invariants()
    table.inflight_tokens[0] += 1  # a mirror out of step is caught
    with pytest.raises(AssertionError, match="mirrored tokens"):
        router.load.check_invariants()


def test_the_hot_spot_filter_keeps_an_endpoint_exactly_at_the_limit() -> None:
    eps = [EndpointState(id=f"e{i}", address=f"127.0.0.1:{9000 + i}") for i in range(3)]
    table = EndpointTable(eps)
    load = _TrackedLoad()
    for i, n in enumerate((1, 2, 3)):
        for _ in range(n):
            load.start(EndpointId(f"e{i}"), 1)
    load.bind(table)
    flt = HotSpotFilter(ratio=1.0, slack=0.0)  # the limit is the mean, 2: e1 sits on it
    for mirrored in (load, LoadTracker()):
        if mirrored is not load:
            for i, n in enumerate((1, 2, 3)):
                for _ in range(n):
                    mirrored.start(EndpointId(f"e{i}"), 1)
        ctx = RouteContext(
            request=Request(model="m", prompt="x"),
            now=0.0,
            rng=random.Random(0),
            block_keys=[],
            prompt_tokens=1,
            tokens_per_block=16.0,
            matches={},
            load=mirrored,
            table=table,
        )
        assert _ids(flt.filter(ctx, eps)) == ["e0", "e1"]
        assert _ids(table.select(flt.filter_rows(ctx, table.all_rows))) == ["e0", "e1"]


def test_the_inflight_column_follows_the_load_row_by_row() -> None:
    """The memoised column, updated per changed row, equals the list path after every change."""
    eps = [EndpointState(id=f"e{i}", address=f"127.0.0.1:{9000 + i}") for i in range(5)]
    table = EndpointTable(eps)
    load = _TrackedLoad()
    load.bind(table)
    scorer = InflightScorer(request_scale=0.7, token_scale=3.0, token_weight=0.3)
    rng = random.Random(1)
    for step in range(200):  # enough changes to cut the log (4 x 5 + 64) twice
        ctx = RouteContext(
            request=Request(model="m", prompt="x"),
            now=0.0,
            rng=random.Random(0),
            block_keys=[],
            prompt_tokens=1,
            tokens_per_block=16.0,
            matches={},
            load=load,
            table=table,
        )
        expected = np.array(scorer.score(ctx, eps), dtype=np.float64)
        assert scorer.score_rows(ctx, table.all_rows).tobytes() == expected.tobytes(), step
        for _ in range(rng.choice([1, 2, 30])):
            eid = EndpointId(f"e{rng.randrange(5)}")
            if rng.random() < 0.6:
                load.start(eid, rng.randrange(5000))
            else:
                load.finish(eid, rng.randrange(5000))
