"""One contract suite per extension point, run by every built-in implementation."""

from __future__ import annotations

import random

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixroute import (
    AdmissionPolicy,
    EndpointState,
    Filter,
    LoadTracker,
    Picker,
    PluginError,
    PrefixMatch,
    Rejection,
    Request,
    RouteContext,
    Scorer,
    default_registry,
)
from prefixroute.decision import Deferral
from prefixroute.endpoint import EndpointId
from prefixroute.plugins import AdmissionContext

REGISTRY = default_registry()
PLUGINS = {t: REGISTRY.create(t) for t in REGISTRY.types()}
FILTERS = sorted(t for t, p in PLUGINS.items() if isinstance(p, Filter))
SCORERS = sorted(t for t, p in PLUGINS.items() if isinstance(p, Scorer))
PICKERS = sorted(t for t, p in PLUGINS.items() if isinstance(p, Picker))
ADMISSIONS = sorted(t for t, p in PLUGINS.items() if isinstance(p, AdmissionPolicy))


@st.composite
def endpoint_states(draw: st.DrawFn, index: int) -> EndpointState:
    return EndpointState(
        id=f"e{index}",
        address=f"127.0.0.1:{8000 + index}",
        role=draw(st.sampled_from(["both", "prefill", "decode"])),
        models=draw(st.sampled_from([frozenset(), frozenset({"m"}), frozenset({"other"})])),
        adapters=draw(st.sampled_from([frozenset(), frozenset({"lora-a"})])),
        waiting=draw(st.integers(0, 500)),
        running=draw(st.integers(0, 500)),
        kv_usage=draw(st.floats(0.0, 1.0)),
        healthy=draw(st.booleans()),
        observed_at=draw(st.none() | st.floats(0.0, 100.0)),
    )


@st.composite
def contexts(draw: st.DrawFn) -> tuple[RouteContext, list[EndpointState]]:
    n = draw(st.integers(1, 8))
    endpoints = [draw(endpoint_states(i)) for i in range(n)]
    total = draw(st.integers(0, 64))
    matches = {}
    for e in endpoints:
        if total and draw(st.booleans()):
            blocks = draw(st.integers(1, total))
            matches[EndpointId(e.id)] = PrefixMatch(blocks, blocks * draw(st.floats(0.5, 1.0)))
    load = LoadTracker()
    for e in endpoints:
        for _ in range(draw(st.integers(0, 3))):
            load.start(EndpointId(e.id), draw(st.integers(0, 50_000)))
        if draw(st.booleans()):
            load.note_cold(EndpointId(e.id), draw(st.floats(0.0, 100.0)))
    session = draw(st.none() | st.just("s1"))
    if session and draw(st.booleans()):
        load.bind_session(("default", session), EndpointId(endpoints[0].id))
    request = Request(
        model="m",
        prompt="x",
        session=session,
        lora=draw(st.none() | st.just("lora-a")),
    )
    ctx = RouteContext(
        request=request,
        now=draw(st.floats(0.0, 200.0)),
        rng=random.Random(draw(st.integers(0, 2**32))),
        block_keys=list(range(total)),
        prompt_tokens=total * 16,
        tokens_per_block=16.0,
        matches=matches,
        load=load,
    )
    ctx.candidates = endpoints  # as the router sets it after filtering
    return ctx, endpoints


@pytest.mark.parametrize("type_name", FILTERS)
@settings(max_examples=60, deadline=None)
@given(case=contexts())
def test_filter_returns_an_ordered_subset(type_name: str, case: tuple) -> None:
    ctx, endpoints = case
    kept = PLUGINS[type_name].filter(ctx, endpoints)
    ids = [e.id for e in endpoints]
    positions = [ids.index(e.id) for e in kept]
    assert positions == sorted(set(positions))


@pytest.mark.parametrize("type_name", SCORERS)
@settings(max_examples=60, deadline=None)
@given(case=contexts())
def test_scorer_gives_one_unit_score_per_candidate(type_name: str, case: tuple) -> None:
    ctx, endpoints = case
    scores = PLUGINS[type_name].score(ctx, endpoints)
    assert len(scores) == len(endpoints)
    assert all(0.0 <= s <= 1.0 for s in scores)


@pytest.mark.parametrize("type_name", SCORERS)
@settings(max_examples=30, deadline=None)
@given(case=contexts())
def test_scorer_is_absolute_not_relative_to_the_candidate_set(type_name: str, case: tuple) -> None:
    ctx, endpoints = case
    whole = PLUGINS[type_name].score(ctx, endpoints)
    alone = [PLUGINS[type_name].score(ctx, [e])[0] for e in endpoints]
    assert whole == pytest.approx(alone)


@pytest.mark.parametrize("type_name", PICKERS)
@settings(max_examples=60, deadline=None)
@given(case=contexts(), data=st.data())
def test_picker_returns_a_permutation(type_name: str, case: tuple, data: st.DataObject) -> None:
    ctx, endpoints = case
    totals = data.draw(
        st.lists(st.floats(0.0, 20.0), min_size=len(endpoints), max_size=len(endpoints))
    )
    order = PLUGINS[type_name].pick(ctx, totals)
    assert sorted(order) == list(range(len(endpoints)))
    rest = [totals[i] for i in order[1:]]
    assert rest == sorted(rest, reverse=True)


@pytest.mark.parametrize("type_name", PICKERS)
def test_picker_is_deterministic_given_the_rng(type_name: str) -> None:
    totals = [0.5, 0.9, 0.9, 0.1, 0.7]
    runs = []
    for _ in range(2):
        picker = REGISTRY.create(type_name)  # fresh: stateful pickers start over
        assert isinstance(picker, Picker)
        rng = random.Random(7)
        ctx = RouteContext(
            request=Request(model="m", prompt="x"),
            now=0.0,
            rng=rng,
            block_keys=[],
            prompt_tokens=1,
            tokens_per_block=16.0,
            matches={},
            load=LoadTracker(),
        )
        ctx.candidates = [
            EndpointState(id=f"e{i}", address=f"127.0.0.1:{8000 + i}") for i in range(5)
        ]
        runs.append([picker.pick(ctx, totals)[0] for _ in range(20)])
    assert runs[0] == runs[1]


# Parameters that make an admission policy refuse something (its defaults may admit all).
ADMISSION_PARAMETERS: dict[str, dict[str, object]] = {
    "token-bucket-admission": {"requests_per_s": 1.0, "tokens_per_s": 200.0},
    "concurrency-admission": {"max_in_flight": 2},
}


class _Tenants:
    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def in_flight(self, tenant: str) -> int:
        return self.counts.get(tenant, 0)


@st.composite
def admission_contexts(draw: st.DrawFn, now: float) -> AdmissionContext:
    n = draw(st.integers(0, 4))
    return AdmissionContext(
        request=Request(
            model="m",
            prompt="x",
            tenant=draw(st.sampled_from(["a", "b"])),
            priority=draw(st.integers(-2, 2)),
            max_tokens=draw(st.none() | st.integers(0, 100)),
        ),
        endpoints=[draw(endpoint_states(i)) for i in range(n)],
        now=now,
        prompt_tokens=draw(st.integers(0, 300)),
        load=LoadTracker(),
        tenants=_Tenants({"a": draw(st.integers(0, 3)), "b": draw(st.integers(0, 3))}),
    )


@pytest.mark.parametrize("type_name", ADMISSIONS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_admission_answers_none_a_deferral_or_a_complete_rejection(
    type_name: str, data: st.DataObject
) -> None:
    policy = REGISTRY.create(type_name, ADMISSION_PARAMETERS.get(type_name))
    assert isinstance(policy, AdmissionPolicy)
    now = 0.0
    for _ in range(data.draw(st.integers(1, 8))):
        now += data.draw(st.floats(0.0, 2.0))
        verdict = policy.admit(data.draw(admission_contexts(now)))
        assert verdict is None or isinstance(verdict, Rejection | Deferral)
        if isinstance(verdict, Rejection):
            assert verdict.status in (400, 429, 503) and verdict.reason
            assert verdict.kind != "rejected"  # a specific label for metrics
            if verdict.status == 400:  # the request itself can never pass: no point retrying
                assert verdict.retry_after_s is None
            else:
                assert verdict.retry_after_s is not None and verdict.retry_after_s >= 0
        check = getattr(policy, "check_invariants", None)
        if check is not None:
            check()


def test_every_builtin_implements_exactly_one_protocol() -> None:
    assert FILTERS and SCORERS and PICKERS and ADMISSIONS
    assert len(FILTERS) + len(SCORERS) + len(PICKERS) + len(ADMISSIONS) == len(PLUGINS)


@pytest.mark.parametrize("type_name", sorted(PLUGINS))
def test_plugin_state_is_declared_in_its_fields(type_name: str) -> None:
    """Parameters are `init=True` fields; state is `init=False` fields, nothing else.

    No base class holds slots of its own (state hidden from the registry), every
    slot is an attrs field, and state takes no part in `==` or `repr`.
    """
    cls = type(PLUGINS[type_name])
    assert attrs.has(cls)
    for base in cls.__mro__[1:]:
        assert not getattr(base, "__slots__", ()), f"{base.__name__} hides slots"
    fields = attrs.fields(cls)
    names = {f.name for f in fields}
    assert set(getattr(cls, "__slots__", ())) - {"__weakref__"} <= names
    for f in fields:
        if not f.init:
            assert not f.eq and not f.repr, f"state field {f.name} takes part in eq/repr"
            with pytest.raises(PluginError) as err:  # state is no parameter
                REGISTRY.create(type_name, {f.alias: None})
            assert err.value.field == f.alias


def test_used_stateful_plugins_still_equal_fresh_ones_and_share_no_state() -> None:
    ctx, endpoints = _a_context()
    picker = REGISTRY.create("round-robin-picker")
    assert isinstance(picker, Picker)
    first = picker.pick(ctx, [1.0] * len(endpoints))[0]
    assert picker == REGISTRY.create("round-robin-picker")
    fresh = REGISTRY.create("round-robin-picker")
    assert isinstance(fresh, Picker)
    assert fresh.pick(ctx, [1.0] * len(endpoints))[0] == first  # its own counter, at 0
    assert "turn" not in repr(picker)


def _a_context() -> tuple[RouteContext, list[EndpointState]]:
    endpoints = [
        EndpointState(id=EndpointId(f"e{i}"), address=f"127.0.0.1:{8000 + i}") for i in range(3)
    ]
    ctx = RouteContext(
        request=Request(model="m", prompt="hi"),
        now=0.0,
        rng=random.Random(0),
        block_keys=[],
        prompt_tokens=1,
        tokens_per_block=16.0,
        matches={},
        load=LoadTracker(),
    )
    ctx.candidates = endpoints
    return ctx, endpoints
