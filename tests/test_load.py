from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prefixroute import LoadTracker
from prefixroute.endpoint import EndpointId

A, B = EndpointId("a"), EndpointId("b")


def test_start_finish_balance() -> None:
    load = LoadTracker()
    load.start(A, 100)
    load.start(A, 50)
    load.start(B, 7)
    assert (load.requests(A), load.tokens(A), load.in_flight()) == (2, 150, 3)
    load.finish(A, 100)
    assert (load.requests(A), load.tokens(A)) == (1, 50)
    load.finish(A, 50)
    load.finish(A, 50)  # one too many: clamps, never negative
    assert (load.requests(A), load.tokens(A)) == (0, 0)
    load.check_invariants()


def test_sessions_are_lru_bounded_and_forgotten_with_their_endpoint() -> None:
    load = LoadTracker(session_capacity=2)
    load.bind_session("s1", A)
    load.bind_session("s2", B)
    load.bind_session("s1", A)  # refresh s1
    load.bind_session("s3", B)  # evicts s2
    assert load.session_endpoint("s2") is None
    assert load.session_endpoint("s1") == A
    load.note_cold(A, 3.0)
    load.forget(A)
    assert load.session_endpoint("s1") is None and load.last_cold(A) is None
    load.check_invariants()
    with pytest.raises(ValueError):
        LoadTracker(session_capacity=0)


C = EndpointId("c")


def test_peer_counts_add_to_the_totals_and_stay_out_of_the_local_views() -> None:
    load = LoadTracker()
    load.start(A, 100)
    load.set_peers({A: 3, B: 2}, {A: 30, B: 20})
    assert (load.requests(A), load.tokens(A), load.requests(B), load.in_flight()) == (4, 130, 2, 6)
    assert load.local_requests_view() == {A: 1} and load.local_tokens_view() == {A: 100}
    load.finish(A, 100)  # this replica's own request ends: the peers' stay
    load.finish(A, 100)  # a stray finish cannot take the peers' requests back
    assert (load.requests(A), load.tokens(A)) == (3, 30)
    assert load.local_requests_view() == {}
    load.check_invariants()


def test_set_peers_replaces_the_previous_counts_and_reports_what_changed() -> None:
    load = LoadTracker()
    load.start(B, 5)
    assert sorted(load.set_peers({A: 2, B: 1}, {A: 8, B: 1})) == [A, B]
    assert sorted(load.set_peers({A: 2, C: 4}, {A: 8, C: 9, B: 7})) == [B, C]
    assert (load.requests(A), load.requests(B), load.tokens(B), load.requests(C)) == (2, 1, 5, 4)
    # zero and negative counts are none
    assert sorted(load.set_peers({A: 0, C: -1}, {A: 5})) == [A, C]
    assert (load.requests(A), load.requests(C), load.local_requests_view()) == (0, 0, {B: 1})
    load.forget(B)
    load.check_invariants()
    assert load.in_flight() == 0


@st.composite
def _ops(draw: st.DrawFn) -> list[tuple[str, EndpointId, int, int]]:
    eps = st.sampled_from([A, B, C])
    op = st.one_of(
        st.tuples(st.just("start"), eps, st.integers(0, 50), st.just(0)),
        st.tuples(st.just("finish"), eps, st.integers(0, 50), st.just(0)),
        st.tuples(st.just("peers"), eps, st.integers(-1, 4), st.integers(0, 90)),
        st.tuples(st.just("forget"), eps, st.just(0), st.just(0)),
    )
    return draw(st.lists(op, max_size=40))


@given(_ops())
def test_own_counts_follow_a_model_whatever_the_peers_do(
    ops: list[tuple[str, EndpointId, int, int]],
) -> None:
    """Against a model that keeps this replica's requests apart: the local views equal it,
    the totals are model + peers, and the invariants hold after every step."""
    load = LoadTracker()
    own: dict[EndpointId, int] = {}
    peers: dict[EndpointId, tuple[int, int]] = {}
    for kind, eid, a, b in ops:
        if kind == "start":
            load.start(eid, a)
            own[eid] = own.get(eid, 0) + 1
        elif kind == "finish":
            load.finish(eid, a)
            if own.get(eid, 0) > 0:
                own[eid] -= 1
        elif kind == "peers":
            peers = {**peers, eid: (a, b)}
            load.set_peers(
                {e: n for e, (n, _) in peers.items()}, {e: t for e, (_, t) in peers.items()}
            )
        else:
            load.forget(eid)
            own.pop(eid, None)
            peers.pop(eid, None)
        load.check_invariants()
        assert load.local_requests_view() == {e: n for e, n in own.items() if n > 0}
        for e in (A, B, C):
            peer = max(0, peers.get(e, (0, 0))[0])
            assert load.requests(e) == own.get(e, 0) + peer
