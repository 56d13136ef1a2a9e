"""The router's own load accounting: in-flight work, cold placements, sessions.

Scraped engine metrics are as old as the last scrape; what the router itself
sent and has not yet seen complete is exact. With several router replicas
(issue 15), each also learns the others' in-flight counts per endpoint
(`set_peers`, from a shared store a driver syncs with), so its load
scorers see the whole fleet's in-flight work, not a fraction of it. `LoadTracker` keeps that per
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

    Every operation is O(1) but `set_peers` and the local views. The session
    table is an LRU of at most `session_capacity` entries, so a flood of
    unique session ids cannot grow it.

    Counts include other replicas' in-flight requests given by `set_peers`
    (zero until then): `requests`, `tokens` and the views are this
    replica's own plus its peers', `local_requests_view` and
    `local_tokens_view` this replica's own only (what it shares). `finish`
    only ever takes back this replica's own requests.
    """

    __slots__ = (
        "_cold_at",
        "_peer_requests",
        "_peer_tokens",
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
        self._peer_requests: dict[EndpointId, int] = {}
        self._peer_tokens: dict[EndpointId, int] = {}
        self._sessions: OrderedDict[Hashable, EndpointId] = OrderedDict()
        self._session_capacity = session_capacity
        self._requests_view = MappingProxyType(self._requests)
        self._tokens_view = MappingProxyType(self._tokens)

    def start(self, endpoint: EndpointId, tokens: int) -> None:
        """Count one more request carrying `tokens` of work as in flight on `endpoint`."""
        self._requests[endpoint] = self._requests.get(endpoint, 0) + 1
        self._tokens[endpoint] = self._tokens.get(endpoint, 0) + tokens

    def finish(self, endpoint: EndpointId, tokens: int) -> None:
        """Undo one `start` (never going below the peers' share, e.g. after `forget`)."""
        peer = self._peer_requests.get(endpoint, 0)
        left = self._requests.get(endpoint, 0) - 1
        if left <= peer:  # this replica's last request there (or none: a stray finish)
            self._settle(endpoint, peer, self._peer_tokens.get(endpoint, 0))
            return
        self._requests[endpoint] = left
        self._tokens[endpoint] = max(
            self._peer_tokens.get(endpoint, 0), self._tokens.get(endpoint, 0) - tokens
        )

    def _settle(self, endpoint: EndpointId, requests: int, tokens: int) -> None:
        """Set `endpoint`'s counts, dropping it when no request is in flight there."""
        if requests <= 0:
            self._requests.pop(endpoint, None)
            self._tokens.pop(endpoint, None)
        else:
            self._requests[endpoint] = requests
            self._tokens[endpoint] = max(0, tokens)

    def set_peers(
        self, requests: Mapping[EndpointId, int], tokens: Mapping[EndpointId, int]
    ) -> list[EndpointId]:
        """Replace the other replicas' in-flight counts per endpoint; return the endpoints changed.

        `requests` and `tokens` are the sums over every other replica (a
        driver reads them from the shared store); an endpoint left out has
        none. Negative counts are read as zero, and tokens without requests
        are dropped. O(endpoints in the old and new peer counts).
        """
        old_r, old_t = self._peer_requests, self._peer_tokens
        new_r = {e: int(n) for e, n in requests.items() if n > 0}
        new_t = {e: max(0, int(tokens.get(e, 0))) for e in new_r}
        changed = []
        for endpoint in old_r.keys() | new_r.keys():
            before_r, before_t = old_r.get(endpoint, 0), old_t.get(endpoint, 0)
            after_r, after_t = new_r.get(endpoint, 0), new_t.get(endpoint, 0)
            if before_r == after_r and before_t == after_t:
                continue
            own_r = self._requests.get(endpoint, 0) - before_r
            own_t = self._tokens.get(endpoint, 0) - before_t
            self._settle(endpoint, own_r + after_r, own_t + after_t)
            changed.append(endpoint)
        self._peer_requests, self._peer_tokens = new_r, new_t
        return changed

    def local_requests_view(self) -> dict[EndpointId, int]:
        """This replica's own in-flight requests per endpoint (peers' excluded). O(endpoints)."""
        peers = self._peer_requests
        own = {e: n - peers.get(e, 0) for e, n in self._requests.items()}
        return {e: n for e, n in own.items() if n > 0}

    def local_tokens_view(self) -> dict[EndpointId, int]:
        """This replica's own in-flight tokens per endpoint (peers' excluded). O(endpoints)."""
        peers = self._peer_tokens
        own = self.local_requests_view()
        return {e: max(0, self._tokens.get(e, 0) - peers.get(e, 0)) for e in own}

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
        self._peer_requests.pop(endpoint, None)
        self._peer_tokens.pop(endpoint, None)
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
        for eid, n in self._peer_requests.items():
            if n <= 0 or self._requests.get(eid, 0) < n:
                raise AssertionError(f"peer count {n} for {eid} not within the total")
            if self._tokens.get(eid, 0) < self._peer_tokens.get(eid, 0):
                raise AssertionError(f"peer tokens for {eid} over the total")
        if len(self._sessions) > self._session_capacity:
            raise AssertionError("session table over capacity")
