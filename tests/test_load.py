from __future__ import annotations

import pytest

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
