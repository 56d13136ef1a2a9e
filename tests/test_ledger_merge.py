"""`TenantLedger.merge`: replicas' ledgers combine into one view (issue 15).

Properties on the observable `LedgerSnapshot` (floats within 1e-9 relative:
sums of latencies depend on the order of addition): commutative, associative
while nothing overflows, the empty ledger is the identity, and the merge of
two ledgers equals one ledger fed both event streams when nobody was
evicted. With evictions, the Space-Saving guarantees hold for the union of
the streams, against exact counts kept by the test.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import reduce
from typing import Any, cast

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixroute.ledger import MAX_REJECTION_KINDS, LedgerSnapshot, TenantLedger

# An event: ("decide", tenant, prompt, predicted) | ("reject", tenant, kind) |
# ("complete", tenant, prompt, cached, predicted, ttft, e2e, ok)
Event = tuple[object, ...]

PINNED = ("p",)
FEW_KINDS = ("rate-limit", "concurrency", "saturated")
MANY_KINDS = tuple(f"kind-{i}" for i in range(MAX_REJECTION_KINDS + 4))
LATENCIES = st.none() | st.sampled_from([0.0, 0.00005, 0.002, 0.05, 0.3, 1.7, 42.0, math.nan])


@st.composite
def streams(
    draw: st.DrawFn,
    tenants: Sequence[str] = ("a", "b", "c", "d", "e", "f", "p"),
    kinds: Sequence[str] = FEW_KINDS,
    max_size: int = 40,
) -> list[Event]:
    """One replica's events: a completion or rejection only after its tenant's first request
    in this stream (what a replica sees), a completion only for a request in flight."""
    events: list[Event] = []
    seen: set[str] = set()
    flying: Counter[str] = Counter()
    for _ in range(draw(st.integers(0, max_size))):
        op = draw(st.sampled_from(("decide", "decide", "complete", "reject")))
        if op == "complete" and flying:
            tenant = draw(st.sampled_from(sorted(flying)))
            flying[tenant] -= 1
            flying += Counter()  # drop zeros
            events.append(
                (
                    "complete",
                    tenant,
                    draw(st.integers(0, 50)),
                    draw(st.integers(0, 50)),
                    draw(st.integers(0, 50)),
                    draw(LATENCIES),
                    draw(LATENCIES),
                    draw(st.booleans()),
                )
            )
        elif op == "reject" and seen:
            tenant = draw(st.sampled_from(sorted(seen)))
            events.append(("reject", tenant, draw(st.sampled_from(kinds))))
        else:
            tenant = draw(st.sampled_from(tenants))
            seen.add(tenant)
            flying[tenant] += 1
            events.append(("decide", tenant, draw(st.integers(0, 50)), draw(st.integers(0, 50))))
    return events


def feed(ledger: TenantLedger, events: Sequence[Event]) -> TenantLedger:
    for event in events:
        match event:
            case ("decide", str(tenant), int(prompt), int(predicted)):
                ledger.on_decision(
                    tenant, prompt_tokens=prompt, predicted_cached_tokens=predicted, now=0.0
                )
            case ("reject", str(tenant), str(kind)):
                ledger.on_rejection(tenant, kind=kind, now=0.0)
            case ("complete", str(tenant), int(prompt), int(cached), int(predicted), *rest):
                ttft, e2e, ok = rest
                ledger.on_complete(
                    tenant,
                    prompt_tokens=prompt,
                    cached_tokens=cached,
                    predicted_cached_tokens=predicted,
                    ttft_s=ttft,  # type: ignore[arg-type]
                    e2e_s=e2e,  # type: ignore[arg-type]
                    ok=bool(ok),
                    now=0.0,
                )
            case _:
                raise AssertionError(event)
    return ledger


def fed(events: Sequence[Event], top_k: int = 3) -> TenantLedger:
    ledger = feed(TenantLedger(top_k=top_k, pinned=PINNED), events)
    ledger.check_invariants()
    return ledger


def assert_close(got: object, want: object, path: str = "snapshot") -> None:
    """Equal, except floats within 1e-9 relative (1e-12 absolute)."""
    if attrs.has(type(want)):
        assert type(got) is type(want), path
        for field in attrs.fields(cast(Any, type(want))):
            assert_close(
                getattr(got, field.name), getattr(want, field.name), f"{path}.{field.name}"
            )
    elif isinstance(want, Mapping):
        assert isinstance(got, Mapping) and dict(got).keys() == dict(want).keys(), path
        for key in want:
            assert_close(got[key], want[key], f"{path}[{key!r}]")
    elif isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert isinstance(got, float) and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12), (
            path,
            got,
            want,
        )
    else:
        assert got == want, (path, got, want)


def merged(a: TenantLedger, b: TenantLedger) -> TenantLedger:
    out = a.merge(b)
    out.check_invariants()
    return out


# -- algebra ----------------------------------------------------------------------------

# top_k 3 over 6 unpinned tenants and 20 kinds: tables overflow, evictions happen, kinds fold.
OVERFLOWING = streams(kinds=MANY_KINDS)


@settings(max_examples=150, deadline=None)
@given(OVERFLOWING, OVERFLOWING)
def test_merge_is_commutative(left: list[Event], right: list[Event]) -> None:
    a, b = fed(left), fed(right)
    assert_close(merged(a, b).snapshot(), merged(b, a).snapshot())


@settings(max_examples=150, deadline=None)
@given(OVERFLOWING)
def test_the_empty_ledger_is_the_identity(events: list[Event]) -> None:
    a = fed(events)
    empty = TenantLedger(top_k=3, pinned=PINNED)
    want = a.snapshot()
    assert_close(merged(a, empty).snapshot(), want)
    assert_close(merged(empty, a).snapshot(), want)


@settings(max_examples=150, deadline=None)
@given(streams(), streams(), streams())
def test_merge_is_associative_while_nothing_overflows(
    x: list[Event], y: list[Event], z: list[Event]
) -> None:
    """top_k 6 holds every unpinned tenant and three kinds never fold: no rounding of counts."""
    a, b, c = fed(x, top_k=6), fed(y, top_k=6), fed(z, top_k=6)
    assert_close(merged(merged(a, b), c).snapshot(), merged(a, merged(b, c)).snapshot())


@settings(max_examples=150, deadline=None)
@given(OVERFLOWING, OVERFLOWING, OVERFLOWING)
def test_totals_stay_exact_whatever_the_grouping(
    x: list[Event], y: list[Event], z: list[Event]
) -> None:
    a, b, c = fed(x), fed(y), fed(z)
    left, right = merged(merged(a, b), c), merged(a, merged(b, c))
    for one in (left, right):
        union = fed([*x, *y, *z])
        got, want = one.snapshot().total, union.snapshot().total
        assert attrs.evolve(got, rejections={}, ttft=want.ttft, e2e=want.e2e) == attrs.evolve(
            want, rejections={}
        )
        assert sum(got.rejections.values()) == sum(want.rejections.values())
        assert_close(got.ttft, want.ttft)
        assert_close(got.e2e, want.e2e)
        for tenant in ("a", "b", "c", "d", "e", "f", "p", "zzz"):
            assert one.in_flight(tenant) == union.in_flight(tenant)


@st.composite
def interleavings(draw: st.DrawFn, left: list[Event], right: list[Event]) -> list[Event]:
    """The two streams interleaved, each in its own order."""
    picks = draw(st.permutations([0] * len(left) + [1] * len(right)))
    its = (iter(left), iter(right))
    return [next(its[p]) for p in picks]


@settings(max_examples=150, deadline=None)
@given(streams(), streams(), st.data())
def test_one_ledger_fed_both_streams_equals_the_merge(
    left: list[Event], right: list[Event], data: st.DataObject
) -> None:
    """No tenant is evicted (top_k holds all six unpinned tenants): figures, latency summaries,
    in-flight counts and fairness agree."""
    union = data.draw(interleavings(left, right))
    one = fed(union, top_k=6)
    assert one.snapshot().evictions == 0
    both = merged(fed(left, top_k=6), fed(right, top_k=6))
    assert_close(both.snapshot(), one.snapshot())
    assert both.total_in_flight() == one.total_in_flight()


# -- Space-Saving across merges ---------------------------------------------------------

MANY_TENANTS = tuple(f"t{i}" for i in range(12)) + PINNED


@settings(max_examples=150, deadline=None)
@given(st.lists(streams(tenants=MANY_TENANTS, max_size=60), min_size=1, max_size=5), st.data())
def test_space_saving_guarantees_hold_for_the_union_of_the_streams(
    parts: list[list[Event]], data: st.DataObject
) -> None:
    """Any merge tree of any number of ledgers: true counts within [requests - error, requests],
    every tenant above N / top_k tracked, pinned tenants exact."""
    top_k = 3
    ledgers = [fed(p, top_k=top_k) for p in parts]
    while len(ledgers) > 1:  # merge a random adjacent pair until one is left
        i = data.draw(st.integers(0, len(ledgers) - 2))
        ledgers[i : i + 2] = [merged(ledgers[i], ledgers[i + 1])]
    (ledger,) = ledgers
    true = Counter(e[1] for p in parts for e in p if e[0] == "decide")
    stream = sum(n for t, n in true.items() if t not in PINNED)
    snap = ledger.snapshot()
    tracked = {s.tenant: s for s in snap.tenants}
    assert len(tracked) <= top_k + len(PINNED)
    for tenant in MANY_TENANTS:
        n = true[tenant]
        if tenant in PINNED:
            assert tracked[tenant].requests == n and tracked[tenant].count_error == 0
            continue
        if n * top_k > stream:
            assert tenant in tracked, (tenant, n, stream)
        if tenant in tracked:
            s = tracked[tenant]
            assert s.requests - s.count_error <= n <= s.requests, (tenant, n, s)
    assert snap.total.requests == sum(true.values())
    assert sum(s.requests - s.count_error for s in snap.tenants) + snap.other.requests == (
        snap.total.requests
    )


def test_a_merge_that_overflows_the_table() -> None:
    """Parallel Space Saving's combine, by hand. top_k 2:

    left sees a a a b b c: c evicts b (count 2) and enters with count 3, error 2;
    right sees d d c; both tables are full, floors 3 (left) and 1 (right).
    a: 3 + 1 = 4 (error 1), c: 3 + 1 = 4 (error 2), d: 2 + 3 = 5 (error 3):
    d and a stay (a beats c on error), c's rows fold into other.
    """
    left, right = TenantLedger(top_k=2), TenantLedger(top_k=2)
    for t in "aaabbc":
        left.on_decision(t, prompt_tokens=10, predicted_cached_tokens=0, now=0.0)
    for t in "ddc":
        right.on_decision(t, prompt_tokens=10, predicted_cached_tokens=0, now=0.0)
    before = (left.snapshot(), right.snapshot())
    snap = merged(left, right).snapshot()
    assert [(s.tenant, s.requests, s.count_error, s.prompt_tokens) for s in snap.tenants] == [
        ("d", 5, 3, 20),
        ("a", 4, 1, 30),
    ]
    # other: b's 2 (evicted on the left), c's 1 on the left and 1 on the right
    assert (snap.other.requests, snap.other.prompt_tokens) == (4, 40)
    assert snap.total.requests == 9 and snap.evictions == 1 + 1
    assert snap.total.in_flight == 9 and snap.tenants[0].in_flight == 2
    assert (left.snapshot(), right.snapshot()) == before  # neither input changes


def test_rejection_kinds_fold_the_least_frequent_whatever_the_order() -> None:
    left, right = TenantLedger(), TenantLedger()
    for ledger, sent in ((left, MANY_KINDS[:10]), (right, MANY_KINDS[10:])):
        ledger.on_decision("a", prompt_tokens=1, predicted_cached_tokens=0, now=0.0)
        for i, kind in enumerate(sent):
            for _ in range(i + 1):
                ledger.on_rejection("a", kind=kind, now=0.0)
    rows = [
        next(s for s in m.snapshot().tenants if s.tenant == "a")
        for m in (merged(left, right), merged(right, left))
    ]
    assert rows[0] == rows[1]
    kinds = dict(rows[0].rejections)
    # 20 kinds with 1..10 rejections each side: the four with one or two (ties: later name) fold
    folded = {"kind-0", "kind-10", "kind-11", "kind-1"}
    assert kinds.keys() == (set(MANY_KINDS) - folded) | {"other"}
    assert kinds["other"] == 1 + 1 + 2 + 2
    assert sum(kinds.values()) == rows[0].rejected == 2 * sum(range(1, 11))


# -- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("other", "field"),
    [
        (TenantLedger(top_k=4, pinned=["p"]), "top_k"),
        (TenantLedger(top_k=3, pinned=["q"]), "pinned"),
        (TenantLedger(top_k=3), "pinned"),
        (TenantLedger(top_k=3, pinned=["p"], tail_quantile=0.9), "tail_quantile"),
    ],
)
def test_incompatible_ledgers_are_refused(other: TenantLedger, field: str) -> None:
    ledger = TenantLedger(top_k=3, pinned=["p"])
    ledger.on_decision("a", prompt_tokens=1, predicted_cached_tokens=0, now=0.0)
    with pytest.raises(ValueError, match=f"cannot merge ledgers with different {field}"):
        ledger.merge(other)
    with pytest.raises(ValueError, match=field):
        other.merge(ledger)
    assert ledger.snapshot().total.requests == 1
    ledger.check_invariants()


def test_only_a_ledger_merges() -> None:
    with pytest.raises(TypeError, match="TenantLedger"):
        TenantLedger().merge(LedgerSnapshot)  # type: ignore[arg-type]


def test_a_merged_ledger_goes_on_counting() -> None:
    parts = [TenantLedger(top_k=2) for _ in range(3)]
    for i, ledger in enumerate(parts):
        for t in ("a", "b", f"x{i}", "a"):
            ledger.on_decision(t, prompt_tokens=1, predicted_cached_tokens=0, now=0.0)
    ledger = reduce(merged, parts)
    for t in ("y", "y", "z", "a"):
        ledger.on_decision(t, prompt_tokens=1, predicted_cached_tokens=0, now=0.0)
        ledger.check_invariants()
    snap = ledger.snapshot()
    assert snap.total.requests == 16 and "a" in ledger
