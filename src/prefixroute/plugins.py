"""The extension points: one-method protocols and the per-decision context.

A profile runs `Filter`s, then `Scorer`s, then one `Picker`; the router asks
an `AdmissionPolicy` first. Each protocol has exactly one method; optional
capabilities would be protocols of their own (STYLE.md 4, after GIE's
`plugins.go`). Plugins read everything they need from the `RouteContext`,
which the router builds once per decision.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from prefixroute.decision import Decision, Deferral, Rejection
from prefixroute.endpoint import EndpointId, EndpointState
from prefixroute.index import PrefixMatch
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
    "Scorer",
    "TenantView",
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
    them (the router sets it once filtering is done).
    """

    __slots__ = (
        "block_keys",
        "candidates",
        "endpoints",
        "load",
        "matches",
        "now",
        "prompt_tokens",
        "request",
        "rng",
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
        block_keys: Sequence[int],
        prompt_tokens: int,
        tokens_per_block: float,
        matches: Mapping[EndpointId, PrefixMatch],
        load: LoadTracker,
        tenants: TenantView | None = None,
    ) -> None:
        self.request = request
        self.tenants = tenants
        self.now = now
        self.rng = rng
        self.block_keys = block_keys
        self.total_blocks = len(block_keys)
        self.prompt_tokens = prompt_tokens
        self.tokens_per_block = tokens_per_block
        self.matches = matches
        self.load = load
        self.candidates: Sequence[EndpointState] = ()
        self.endpoints: Sequence[EndpointState] = ()

    @property
    def best_match(self) -> int:
        """The longest prefix match, in blocks, over all endpoints (0 = a cold request)."""
        return max((m.blocks for m in self.matches.values()), default=0)


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
