"""The router's own load accounting: in-flight work, cold placements, sessions.

Scraped engine metrics are as old as the last scrape; what the router itself
sent and has not yet seen complete is exact. `LoadTracker` keeps that per
endpoint (requests and tokens), when each endpoint last received a cold
request (for the cold-request spreader), and a bounded session -> endpoint
table (for session affinity).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping
from types import MappingProxyType

from prefixroute.endpoint import EndpointId

__all__ = ["DEFAULT_SESSION_CAPACITY", "LoadTracker"]

DEFAULT_SESSION_CAPACITY = 100_000


class LoadTracker:
    """Exact in-flight requests and tokens per endpoint, plus cold and session memory.

    Every operation is O(1). The session table is an LRU of at most
    `session_capacity` entries, so a flood of unique session ids cannot grow it.
    """

    __slots__ = (
        "_cold_at",
        "_requests",
        "_requests_view",
        "_session_capacity",
        "_sessions",
        "_tokens",
        "_tokens_view",
    )

    def __init__(self, *, session_capacity: int = DEFAULT_SESSION_CAPACITY) -> None:
        if session_capacity < 1:
            raise ValueError(f"session_capacity must be >= 1, got {session_capacity!r}")
        self._requests: dict[EndpointId, int] = {}
        self._tokens: dict[EndpointId, int] = {}
        self._cold_at: dict[EndpointId, float] = {}
        self._sessions: OrderedDict[Hashable, EndpointId] = OrderedDict()
        self._session_capacity = session_capacity
        self._requests_view = MappingProxyType(self._requests)
        self._tokens_view = MappingProxyType(self._tokens)

    def start(self, endpoint: EndpointId, tokens: int) -> None:
        """Count one more request carrying `tokens` of work as in flight on `endpoint`."""
        self._requests[endpoint] = self._requests.get(endpoint, 0) + 1
        self._tokens[endpoint] = self._tokens.get(endpoint, 0) + tokens

    def finish(self, endpoint: EndpointId, tokens: int) -> None:
        """Undo one `start` (never going below zero, e.g. after `forget`)."""
        left = self._requests.get(endpoint, 0) - 1
        if left <= 0:
            self._requests.pop(endpoint, None)
            self._tokens.pop(endpoint, None)
            return
        self._requests[endpoint] = left
        self._tokens[endpoint] = max(0, self._tokens.get(endpoint, 0) - tokens)

    def requests(self, endpoint: EndpointId) -> int:
        """Requests the router sent to `endpoint` that have not completed."""
        return self._requests.get(endpoint, 0)

    def tokens(self, endpoint: EndpointId) -> int:
        """Token work (uncached prompt plus expected output) in flight on `endpoint`."""
        return self._tokens.get(endpoint, 0)

    def requests_view(self) -> Mapping[EndpointId, int]:
        """A live read-only view of in-flight requests per endpoint (absent = 0), for scorers."""
        return self._requests_view

    def tokens_view(self) -> Mapping[EndpointId, int]:
        """A live read-only view of in-flight tokens per endpoint (absent = 0), for scorers."""
        return self._tokens_view

    def note_cold(self, endpoint: EndpointId, now: float) -> None:
        """Remember that a request with no prefix hit anywhere went to `endpoint` at `now`."""
        self._cold_at[endpoint] = now

    def last_cold(self, endpoint: EndpointId) -> float | None:
        """When `endpoint` last received a cold request, or None if never."""
        return self._cold_at.get(endpoint)

    def bind_session(self, session: Hashable, endpoint: EndpointId) -> None:
        """Remember that `session` was last served by `endpoint` (LRU-bounded).

        The router keys sessions by (tenant, session id), so tenants that
        happen to use the same session id never share affinity.
        """
        sessions = self._sessions
        sessions[session] = endpoint
        sessions.move_to_end(session)
        if len(sessions) > self._session_capacity:
            sessions.popitem(last=False)

    def session_endpoint(self, session: Hashable) -> EndpointId | None:
        """The endpoint that last served `session`, if remembered."""
        return self._sessions.get(session)

    def forget(self, endpoint: EndpointId) -> None:
        """Drop everything about `endpoint` (it left the pool). O(sessions)."""
        self._requests.pop(endpoint, None)
        self._tokens.pop(endpoint, None)
        self._cold_at.pop(endpoint, None)
        stale = [s for s, e in self._sessions.items() if e == endpoint]
        for s in stale:
            del self._sessions[s]

    def in_flight(self) -> int:
        """Requests in flight across all endpoints."""
        return sum(self._requests.values())

    def check_invariants(self) -> None:
        """Raise AssertionError if the counters are inconsistent."""
        for eid, n in self._requests.items():
            if n <= 0:
                raise AssertionError(f"non-positive in-flight count for {eid}: {n}")
        for eid, t in self._tokens.items():
            if t < 0 or eid not in self._requests:
                raise AssertionError(f"token count for {eid} without requests or negative: {t}")
        if len(self._sessions) > self._session_capacity:
            raise AssertionError("session table over capacity")
