"""The extension points: one-method protocols and the per-decision context.

A profile runs `Filter`s, then `Scorer`s, then one `Picker`; the router asks
an `AdmissionPolicy` first. Each protocol has exactly one method; optional
capabilities would be protocols of their own (STYLE.md 4, after GIE's
`plugins.go`). Plugins read everything they need from the `RouteContext`,
which the router builds once per decision.

Array capabilities, each optional and its own protocol: `RowFilter`,
`RowScorer` and `TopPicker` work on rows of the router's columnar
`EndpointTable` (numpy index arrays) instead of lists of `EndpointState`s.
Every built-in plugin has them; a profile whose plugins all have them runs
vectorised, any other runs the one-method protocols exactly as before, so
third-party plugins stay as simple to write as ever. Each array method
must give exactly what its list method gives (tests/test_profile_rows.py).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from prefixroute.decision import Decision, Deferral, Rejection
from prefixroute.endpoint import EndpointId, EndpointState, EndpointTable, Rows
from prefixroute.index import PrefixMatch
from prefixroute.latency import NO_OBJECTIVES, LatencyModel, Objectives
from prefixroute.load import LoadTracker
from prefixroute.request import Request, Usage

__all__ = [
    "AdmissionContext",
    "AdmissionPolicy",
    "CompletionListener",
    "Deferring",
    "Filter",
    "Picker",
    "RouteContext",
    "RowFilter",
    "RowScorer",
    "Scorer",
    "TenantView",
    "TopPicker",
]


class TenantView(Protocol):
    """What plugins may ask about tenants (the router's `TenantLedger` implements it)."""

    def in_flight(self, tenant: str) -> int:
        """Requests of `tenant` routed and not yet completed."""
        ...


class RouteContext:
    """Everything a plugin may read while one request is being routed.

    Built by the router for each `route` call; plugins must not mutate it.
    `matches` holds the prefix match of every endpoint that matched at least
    one block (absent = 0). `load` is the router's own, exact, in-flight
    accounting (fresher than scraped metrics); `tenants` its per-tenant view
    (None when a plugin is driven without a router). `endpoints` holds every
    endpoint passed to `route`, before any filter. `candidates` holds the
    endpoints left after the filters, in the order scorers and pickers see
    them (the router sets it once filtering is done; on the array path it
    is built from `table` and the candidate rows only if a plugin reads it).
    `block_keys` is the request's chain of block keys (a list of ints, built
    on first read when the router passed its uint64 array). `table` is the
    router's `EndpointTable` of `endpoints` (None when a plugin is driven
    without a router); the array capabilities read it. `latency` is the
    router's `LatencyModel` (None without a router) and `objectives` the
    latency objectives the request is held to (its own, else its tenant's).
    """

    __slots__ = (
        "_best_match",
        "_block_keys",
        "_candidates",
        "_rows",
        "endpoints",
        "latency",
        "load",
        "matches",
        "now",
        "objectives",
        "prompt_tokens",
        "request",
        "rng",
        "table",
        "tenants",
        "tokens_per_block",
        "total_blocks",
    )

    def __init__(
        self,
        *,
        request: Request,
        now: float,
        rng: random.Random,
        block_keys: Sequence[int] | npt.NDArray[np.uint64],
        prompt_tokens: int,
        tokens_per_block: float,
        matches: Mapping[EndpointId, PrefixMatch],
        load: LoadTracker,
        tenants: TenantView | None = None,
        table: EndpointTable | None = None,
        latency: LatencyModel | None = None,
        objectives: Objectives = NO_OBJECTIVES,
    ) -> None:
        self.request = request
        self.latency = latency
        self.objectives = objectives
        self.tenants = tenants
        self.now = now
        self.rng = rng
        self._block_keys = block_keys
        self.total_blocks = len(block_keys)
        self.prompt_tokens = prompt_tokens
        self.tokens_per_block = tokens_per_block
        self.matches = matches
        self.load = load
        self.table = table
        self._candidates: Sequence[EndpointState] | None = ()
        self._rows: Rows | None = None
        self._best_match: int | None = None
        self.endpoints: Sequence[EndpointState] = ()

    @property
    def block_keys(self) -> Sequence[int]:
        """The request's block keys (Python ints). O(1), or O(blocks) on the first read."""
        keys = self._block_keys
        if isinstance(keys, np.ndarray):
            keys = self._block_keys = keys.tolist()
        return keys

    @property
    def candidates(self) -> Sequence[EndpointState]:
        """The endpoints left after the filters (see the class docstring)."""
        found = self._candidates
        if found is None:
            assert self.table is not None and self._rows is not None
            found = self._candidates = self.table.select(self._rows)
        return found

    @candidates.setter
    def candidates(self, value: Sequence[EndpointState]) -> None:
        self._candidates = value
        self._rows = None

    def set_rows(self, rows: Rows) -> None:
        """Set the candidates as rows of `table` (the array path); `candidates` follows."""
        self._rows = rows
        self._candidates = None

    @property
    def best_match(self) -> int:
        """The longest prefix match, in blocks, over all endpoints (0 = a cold request).

        O(matches) on the first read, O(1) after (`matches` never changes).
        """
        best = self._best_match
        if best is None:
            best = self._best_match = max((m.blocks for m in self.matches.values()), default=0)
        return best


@runtime_checkable
class Filter(Protocol):
    """Narrows the candidate endpoints. Returning an empty list rejects with 503."""

    def filter(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[EndpointState]:
        """The candidates that may serve `ctx.request`, in their given order."""
        ...


@runtime_checkable
class Scorer(Protocol):
    """Rates each candidate in [0, 1] (higher is better); the profile weights the result."""

    def score(self, ctx: RouteContext, candidates: Sequence[EndpointState]) -> list[float]:
        """One score per candidate, in the candidates' order."""
        ...


@runtime_checkable
class Picker(Protocol):
    """Chooses among scored candidates."""

    def pick(self, ctx: RouteContext, totals: Sequence[float]) -> list[int]:
        """Candidate indexes in preference order: the first is chosen, the rest are fallbacks.

        `totals[i]` is candidate i's weighted score. The result holds every
        index exactly once.
        """
        ...


@runtime_checkable
class RowFilter(Protocol):
    """An optional capability: a `Filter` that also narrows rows of `ctx.table`."""

    def filter_rows(self, ctx: RouteContext, rows: Rows) -> Rows:
        """The rows `filter` would keep, ascending; `rows` itself when it keeps all.

        Must equal `filter(ctx, table.select(rows))` (same endpoints, same order).
        """
        ...


@runtime_checkable
class RowScorer(Protocol):
    """An optional capability: a `Scorer` that also scores rows of `ctx.table`."""

    def score_rows(self, ctx: RouteContext, rows: Rows) -> npt.NDArray[np.float64]:
        """One float64 score per row, equal bit for bit to `score` on those endpoints.

        The result may be read-only and shared (a column memoised in the
        table): callers copy it before changing it.
        """
        ...


@runtime_checkable
class TopPicker(Protocol):
    """An optional capability: a `Picker` that ranks only what the router keeps."""

    def pick_top(self, ctx: RouteContext, totals: npt.NDArray[np.float64], count: int) -> list[int]:
        """The first `count + 1` indexes (fewer when there are fewer) that `pick`
        would return for `totals.tolist()`, drawing the same random numbers."""
        ...


class AdmissionContext:
    """Everything an admission policy may read for one request (built by the router).

    `prompt_tokens` is the request's prompt length in tokens (estimated from
    characters in text mode); `load` the router's exact in-flight accounting
    per endpoint; `tenants` its per-tenant view. Policies must not mutate it.
    """

    __slots__ = ("endpoints", "load", "now", "prompt_tokens", "request", "tenants")

    def __init__(
        self,
        *,
        request: Request,
        endpoints: Sequence[EndpointState],
        now: float,
        prompt_tokens: int,
        load: LoadTracker,
        tenants: TenantView,
    ) -> None:
        self.request = request
        self.endpoints = endpoints
        self.now = now
        self.prompt_tokens = prompt_tokens
        self.load = load
        self.tenants = tenants


@runtime_checkable
class AdmissionPolicy(Protocol):
    """Decides whether a request may be routed now, must wait, or is refused."""

    def admit(self, ctx: AdmissionContext) -> Rejection | Deferral | None:
        """None admits; a `Rejection` answers the client (429/503 with retry-after);
        a `Deferral` means the policy has queued the request (see `Deferring`)."""
        ...


@runtime_checkable
class CompletionListener(Protocol):
    """An optional capability: a plugin that learns from completed requests."""

    def on_complete(self, decision: Decision, usage: Usage, now: float) -> None:
        """`decision` finished with `usage` at `now` (called once per decision)."""
        ...


@runtime_checkable
class Deferring(Protocol):
    """An optional capability: an admission policy that queues requests it deferred."""

    def release(
        self,
        endpoints: Sequence[EndpointState],
        load: LoadTracker,
        tenants: TenantView,
        now: float,
    ) -> list[tuple[Request, Rejection | None]]:
        """Queued requests to settle now, in order: None routes it, a `Rejection` refuses
        it (its deadline passed). Requests not returned stay queued."""
        ...
