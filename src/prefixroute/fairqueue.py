"""Fair queueing of tenants with the Virtual Token Counter: defer, then release fairly.

When the fleet is saturated, rejecting requests punishes whoever happens to
arrive; serving them first come first served lets one tenant's burst take
every slot. `FairQueueAdmission` instead defers requests into per-tenant
queues and, when capacity frees, releases the backlogged tenant that has
received the least service so far.

The Virtual Token Counter (Sheng, Cao, Li, Zhu, Zheng, Gonzalez and Stoica,
"Fairness in Serving Large Language Models", OSDI 2024, Algorithm 2):

- each tenant `u` has a counter `c_u` of weighted service received:
  `c_u += input_weight * prompt_tokens / weight_u` when a request of `u` is
  dispatched, and `c_u += output_weight * output_tokens / weight_u` for the
  tokens it generates (here when it completes: drivers report usage at the
  end; the paper's defaults are input_weight 1, output_weight 2);
- a tenant that becomes backlogged (a request arrives and it has none
  queued) is lifted to `max(c_u, min of the backlogged tenants' counters)`,
  or, with nobody backlogged, to `max(c_u, c_last)`, the counter of the last
  tenant that left the queue (a request admitted at once counts as queued
  and leaving), so neither time spent idle nor light use while the fleet had
  room banks credit to spend later in a burst;
- whenever there is capacity, the backlogged tenant with the smallest counter
  sends its oldest request.

Capacity: the fleet is saturated when the router's own in-flight requests
reach `max_in_flight_per_endpoint` x the number of endpoints (exact and
fresh, unlike scraped queues). With capacity and an empty queue a request is
admitted at once (still charged), so fair queueing costs nothing until the
fleet is full. Queues are bounded: a tenant with `max_queue_per_tenant`
requests waiting gets 429 `queue-full` (its own excess; without this bound
one burster could fill the shared queue and lock everybody else out), and a
full shared queue (`max_queue`) answers 503 `queue-full`. A request
deferred longer than `max_wait_s` is refused with 503 `deadline` by the
next `release`: never dropped silently.

State is bounded: counters of tenants that are neither queued nor above the
lifting floor are forgotten, since a returning tenant would be lifted to the
floor anyway (exactly what forgetting gives, as long as the floor has not
fallen since: it falls only when the whole queue drains).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Mapping, Sequence

import attrs

from prefixroute.decision import Decision, Deferral, Rejection
from prefixroute.endpoint import EndpointState
from prefixroute.load import LoadTracker
from prefixroute.plugins import AdmissionContext
from prefixroute.request import Request, Usage

__all__ = ["FairQueueAdmission"]


def _weights(value: Mapping[str, float] | None) -> dict[str, float]:
    out = dict(value or {})
    for tenant, w in out.items():
        if not isinstance(tenant, str) or isinstance(w, bool) or not isinstance(w, int | float):
            raise ValueError(f"weights must map tenant names to numbers, got {tenant!r}: {w!r}")
        if not w > 0:
            raise ValueError(f"weights[{tenant!r}] must be > 0, got {w!r}")
    return out


class _State:
    """FairQueueAdmission's mutable state (its attrs fields are its parameters)."""

    __slots__ = ("backlog", "counters", "heap", "last", "queued", "seq")

    def __init__(self) -> None:
        self.counters: dict[str, float] = {}
        # tenant -> its queued (request, prompt_tokens, deadline), oldest first
        self.backlog: dict[str, deque[tuple[Request, int, float]]] = {}
        # (counter, seq, tenant) for backlogged tenants; stale when the counter moved
        self.heap: list[tuple[float, int, str]] = []
        self.seq = itertools.count()
        self.queued = 0
        self.last = 0.0  # counter of the last tenant that left the queue


class _Queues:
    """Holds the state in a slot of its own, outside the attrs fields."""

    __slots__ = ("_s",)

    def _reset_queues(self) -> None:
        self._s = _State()


@attrs.define
class FairQueueAdmission(_Queues):
    """Defers requests when the fleet is full and releases them in VTC order.

    Type `fair-queue-admission`. See the module docstring for the algorithm.
    `weights` gives tenants shares (default 1: equal). Costs: `admit`
    O(log tenants queued); `release` O(log) per released request plus
    O(expired); memory O(queued requests + recently served tenants).
    """

    max_in_flight_per_endpoint: int = attrs.field(default=32, validator=attrs.validators.ge(1))
    max_queue: int = attrs.field(default=1024, validator=attrs.validators.ge(1))
    max_queue_per_tenant: int = attrs.field(default=128, validator=attrs.validators.ge(1))
    max_wait_s: float = attrs.field(default=10.0, validator=attrs.validators.gt(0.0))
    input_weight: float = attrs.field(default=1.0, validator=attrs.validators.ge(0.0))
    output_weight: float = attrs.field(default=2.0, validator=attrs.validators.ge(0.0))
    weights: dict[str, float] = attrs.field(factory=dict, converter=_weights)

    def __attrs_post_init__(self) -> None:
        self._reset_queues()

    # -- reading ------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Requests waiting in all queues."""
        return self._s.queued

    def counter(self, tenant: str) -> float:
        """The tenant's virtual token counter (the lifting floor if it was forgotten)."""
        return self._s.counters.get(tenant, self._floor())

    # -- the protocol -------------------------------------------------------------

    def admit(self, ctx: AdmissionContext) -> Rejection | Deferral | None:
        request = ctx.request
        tenant = request.tenant
        if not self._s.backlog and self._has_room(ctx.endpoints, ctx.load, 0):
            # Queued and dispatched at once: it becomes the last tenant to leave the queue.
            self._lift(tenant)
            self._charge(tenant, self.input_weight * ctx.prompt_tokens)
            self._s.last = self._s.counters[tenant]
            return None
        if self._s.queued >= self.max_queue:
            return Rejection(
                503,
                f"the fair queue is full ({self.max_queue} requests waiting)",
                retry_after_s=1.0,
                kind="queue-full",
            )
        queue = self._s.backlog.get(tenant)
        if queue is not None and len(queue) >= self.max_queue_per_tenant:
            return Rejection(
                429,
                f"tenant {tenant!r} already has {len(queue)} requests waiting for a fair turn",
                retry_after_s=1.0,
                kind="queue-full",
            )
        if queue is None:
            self._lift(tenant)
            queue = self._s.backlog[tenant] = deque()
            heapq.heappush(self._s.heap, (self._s.counters[tenant], next(self._s.seq), tenant))
        deadline = ctx.now + self.max_wait_s
        queue.append((request, ctx.prompt_tokens, deadline))
        self._s.queued += 1
        return Deferral(reason="the fleet is saturated: waiting for a fair turn", deadline=deadline)

    def release(
        self, endpoints: Sequence[EndpointState], load: LoadTracker, now: float
    ) -> list[tuple[Request, Rejection | None]]:
        """Expired requests (503 `deadline`), then requests in VTC order while there is room."""
        out: list[tuple[Request, Rejection | None]] = []
        if not self._s.queued:
            return out
        for tenant in list(self._s.backlog):
            queue = self._s.backlog[tenant]
            while queue and queue[0][2] <= now:
                request, _, _ = queue.popleft()
                self._s.queued -= 1
                waited = self.max_wait_s
                out.append(
                    (
                        request,
                        Rejection(
                            503,
                            f"deferred for {waited:g} s without a free slot",
                            retry_after_s=1.0,
                            kind="deadline",
                        ),
                    )
                )
            if not queue:
                self._leave(tenant)
        released = 0
        while self._s.backlog and self._has_room(endpoints, load, released):
            tenant = self._next_tenant()
            queue = self._s.backlog[tenant]
            request, prompt_tokens, _ = queue.popleft()
            self._s.queued -= 1
            released += 1
            self._charge(tenant, self.input_weight * prompt_tokens)
            if queue:
                heapq.heappush(self._s.heap, (self._s.counters[tenant], next(self._s.seq), tenant))
            else:
                self._leave(tenant)
            out.append((request, None))
        return out

    def on_complete(self, decision: Decision, usage: Usage, now: float) -> None:
        """Charge the tenant for the tokens it generated."""
        tenant = decision.request.tenant
        if usage.completion_tokens and self.output_weight:
            self._charge(tenant, self.output_weight * usage.completion_tokens)
            if tenant in self._s.backlog:  # its heap entry is stale now: push the new counter
                heapq.heappush(self._s.heap, (self._s.counters[tenant], next(self._s.seq), tenant))
        self._prune()

    # -- internals ----------------------------------------------------------------

    def _has_room(self, endpoints: Sequence[EndpointState], load: LoadTracker, extra: int) -> bool:
        if not endpoints:
            return True  # the router answers 503 itself
        return load.in_flight() + extra < self.max_in_flight_per_endpoint * len(endpoints)

    def _floor(self) -> float:
        """What a tenant becoming backlogged is lifted to (VTC's lifting rule)."""
        heap = self._s.heap
        while heap and (
            heap[0][2] not in self._s.backlog or heap[0][0] != self._s.counters.get(heap[0][2])
        ):
            heapq.heappop(heap)
        return heap[0][0] if heap else self._s.last

    def _lift(self, tenant: str) -> None:
        floor = self._floor()
        if self._s.counters.get(tenant, floor) < floor:
            self._s.counters[tenant] = floor
        else:
            self._s.counters.setdefault(tenant, floor)

    def _charge(self, tenant: str, cost: float) -> None:
        base = self._s.counters.get(tenant)
        if base is None:  # forgotten while idle: it was at or below the floor
            base = self._floor()
        self._s.counters[tenant] = base + cost / self.weights.get(tenant, 1.0)

    def _next_tenant(self) -> str:
        """The backlogged tenant with the smallest counter (oldest entry on ties)."""
        self._floor()  # drops stale heap entries from the top
        _, _, tenant = heapq.heappop(self._s.heap)
        return tenant

    def _leave(self, tenant: str) -> None:
        del self._s.backlog[tenant]
        self._s.last = self._s.counters[tenant]

    def _prune(self) -> None:
        """Forget idle tenants at or below the floor (they would be lifted to it anyway)."""
        if len(self._s.counters) <= 2 * len(self._s.backlog) + 1024:
            return
        floor = self._floor()
        for tenant in [t for t, c in self._s.counters.items() if c <= floor]:
            if tenant not in self._s.backlog:
                del self._s.counters[tenant]
