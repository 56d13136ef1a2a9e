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

Capacity: the fleet is saturated when the router's in-flight requests (its
own, exact and fresh unlike scraped queues, plus the other replicas' as last
synced when replicas share load) reach `max_in_flight_per_endpoint` x the
number of endpoints. With capacity and an empty queue a request is admitted
at once (still charged), so fair queueing costs nothing until the fleet is
full. Queues are bounded: a tenant with `max_queue_per_tenant` requests
waiting gets 429 `queue-full` (its own excess; without this bound one
burster could fill the shared queue and lock everybody else out), and a full
shared queue (`max_queue`) answers 503 `queue-full`. A request deferred
longer than `max_wait_s` is refused with 503 `deadline` by the next
`release`: never dropped silently.

State is bounded: counters of tenants that are neither queued nor above the
lifting floor are forgotten, since a returning tenant would be lifted to the
floor anyway (exactly what forgetting gives, as long as the floor has not
fallen since: it falls only when the whole queue drains).

Several replicas share one virtual time (issue 15; the queues stay local):
a driver takes each replica's charges (`take_charges`), adds them to a
shared store (Redis ``HINCRBYFLOAT`` on one hash), and hands the store's
per-tenant sums back (`apply_counters`), which raise the local counters to
them. `FairQueueAdmission`'s docstring states the rule.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import ClassVar

import attrs

from prefixroute.decision import Decision, Deferral, Rejection
from prefixroute.endpoint import EndpointState
from prefixroute.load import LoadTracker
from prefixroute.plugins import AdmissionContext, TenantView
from prefixroute.request import Request, Usage

__all__ = ["FairQueueAdmission"]


def _weights(value: object) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"weights must map tenant names to numbers, got {value!r}")
    out: dict[str, float] = {}
    for tenant, w in value.items():
        if not isinstance(tenant, str) or isinstance(w, bool) or not isinstance(w, int | float):
            raise ValueError(f"weights must map tenant names to numbers, got {tenant!r}: {w!r}")
        if not (0 < w < math.inf):
            raise ValueError(f"weights[{tenant!r}] must be finite and > 0, got {w!r}")
        out[tenant] = float(w)
    return out


def _finite(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{attr.name} must be finite, got {value!r}")


class _Item:
    """One queued request."""

    __slots__ = ("deadline", "request", "tenant", "tokens")

    def __init__(self, request: Request, tokens: int, deadline: float) -> None:
        self.request = request
        self.tenant = request.tenant
        self.tokens = tokens
        self.deadline = deadline


class _State:
    """FairQueueAdmission's mutable state: its `_state` field (`init=False`)."""

    __slots__ = (
        "backlog",
        "charges",
        "counters",
        "heap",
        "last",
        "last_tenant",
        "live",
        "queued",
        "seq",
        "unshared",
        "waiting",
    )

    def __init__(self) -> None:
        self.counters: dict[str, float] = {}
        self.backlog: dict[str, deque[_Item]] = {}  # tenant -> its queued requests, oldest first
        # (counter, seq, tenant); an entry is live while live[tenant] == seq
        self.heap: list[tuple[float, int, str]] = []
        self.live: dict[str, int] = {}
        self.seq = itertools.count()
        # every queued request in arrival order: deadlines come due in this order
        self.waiting: deque[_Item] = deque()
        self.queued = 0
        self.last = 0.0  # counter of the last tenant that left the queue
        self.last_tenant: str | None = None  # that tenant
        # charges made since the last take_charges, per tenant; None until its first call
        self.charges: dict[str, float] | None = None
        self.unshared = 0  # charges left out of `charges` because it was full


@attrs.define
class FairQueueAdmission:
    """Defers requests when the fleet is full and releases them in VTC order.

    Type `fair-queue-admission`. See the module docstring for the algorithm.
    `weights` gives tenants shares (default 1: equal). With
    `max_in_flight_per_tenant`, a tenant at that many requests in flight is
    passed over at release (its requests keep waiting): the place for a
    per-tenant concurrency cap, since policies before the queue see a
    request only when it arrives. Costs: `admit` O(log tenants queued);
    `release` O(log) per released request plus O(expired), and O(tenants
    passed over) when a concurrency cap skips some; memory O(queued
    requests + recently served tenants). `check_invariants()` checks the
    bookkeeping.

    Shared virtual time, for N replicas in front of one fleet (issue 15).
    A tenant's virtual time is the service it received from the whole
    fleet, so one served heavily through replica A waits its turn on
    replica B too. A driver, every sync interval:

    1. ``charges = take_charges()``: what this replica charged each tenant
       (weighted tokens, after dividing by the tenant's weight) since the
       previous call; the lifts are not charges and are not in it;
    2. adds them to the store (Redis ``HINCRBYFLOAT <prefix>:vtc tenant
       charge``), so the store holds each tenant's charges from every
       replica, summed;
    3. ``apply_counters(store)`` with that hash as read back.

    The rule of `apply_counters`: for every tenant this replica knows (has
    a counter for), ``counter := max(counter, global)``; a tenant it does
    not know is not created (it gets its global value at the first sync
    after it turns up here; memory stays bounded by local activity). A
    backlogged tenant whose counter rose is re-queued in the release order
    at its new counter, and when the last tenant to leave the queue rises,
    so does the floor it set. Lifting a newly backlogged tenant to the
    floor stays local: a lift is not service received, and two replicas
    lifting the same tenant must not charge it twice. So counters never
    fall, the floor never falls through a sync, and every counter is at
    least the tenant's global service once synced: virtual time is the
    fleet's, to within one sync interval of charges. Replicas must share
    `weights`, `input_weight` and `output_weight` (one config), since the
    store sums charges already divided by the weight.

    Charges are recorded from the first call of `take_charges` on (a
    replica that never shares keeps none), for at most `MAX_PENDING_TENANTS`
    tenants between two calls; a further tenant's charges stay local only
    (`unshared_charges` counts them).
    """

    MAX_PENDING_TENANTS: ClassVar[int] = 65_536
    """Tenants whose charges `take_charges` holds at most between two calls."""

    max_in_flight_per_endpoint: int = attrs.field(default=32, validator=attrs.validators.ge(1))
    max_in_flight_per_tenant: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(1))
    )
    max_queue: int = attrs.field(default=1024, validator=attrs.validators.ge(1))
    max_queue_per_tenant: int = attrs.field(default=128, validator=attrs.validators.ge(1))
    max_wait_s: float = attrs.field(default=10.0, validator=[attrs.validators.gt(0.0), _finite])
    input_weight: float = attrs.field(default=1.0, validator=[attrs.validators.ge(0.0), _finite])
    output_weight: float = attrs.field(default=2.0, validator=[attrs.validators.ge(0.0), _finite])
    weights: dict[str, float] = attrs.field(factory=dict, converter=_weights)
    # State, not a parameter: the counters and the queues.
    _state: _State = attrs.field(init=False, factory=_State, eq=False, repr=False)

    # -- reading ------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Requests waiting in all queues."""
        return self._state.queued

    def counter(self, tenant: str) -> float:
        """The tenant's virtual token counter (the lifting floor if it was forgotten)."""
        return self._state.counters.get(tenant, self._floor())

    @property
    def unshared_charges(self) -> int:
        """Charges kept out of `take_charges` because `MAX_PENDING_TENANTS` were pending."""
        return self._state.unshared

    # -- shared virtual time (see the class docstring) ----------------------------

    def take_charges(self) -> dict[str, float]:
        """The charges made since the previous call, per tenant (> 0 each), and start afresh.

        The first call returns ``{}`` and starts the recording. The caller
        owns the dict. O(1).
        """
        st = self._state
        taken = st.charges if st.charges is not None else {}
        st.charges = {}
        return taken

    def apply_counters(self, counters: Mapping[str, float]) -> None:
        """Raise known tenants' counters to the store's global `counters` (never lower them).

        `counters` maps tenant to the sum of every replica's charges (the
        store's hash). Tenants this replica has no counter for are left
        out. A value this replica would read that is not a finite number
        raises ValueError, and nothing is applied. O(min(len(counters),
        known tenants) + raised backlogged tenants x log queued tenants).
        """
        st = self._state
        known = st.counters
        if len(counters) <= len(known):
            pairs = [(t, v) for t, v in counters.items() if t in known]
        else:
            pairs = [(t, counters[t]) for t in known if t in counters]
        raised: list[tuple[str, float]] = []
        for tenant, value in pairs:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"counter of {tenant!r} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"counter of {tenant!r} must be finite, got {value!r}")
            if value > known[tenant]:
                raised.append((tenant, float(value)))
        for tenant, value in raised:
            known[tenant] = value
            if tenant in st.backlog:
                self._push(tenant)  # its old heap entry goes stale
            if tenant == st.last_tenant and value > st.last:
                st.last = value

    # -- the protocol -------------------------------------------------------------

    def admit(self, ctx: AdmissionContext) -> Rejection | Deferral | None:
        request = ctx.request
        tenant = request.tenant
        st = self._state
        if not st.backlog and self._has_room(ctx.endpoints, ctx.load, 0):
            # Queued and dispatched at once: it becomes the last tenant to leave the queue.
            self._lift(tenant)
            self._charge(tenant, self.input_weight * ctx.prompt_tokens)
            st.last = st.counters[tenant]
            st.last_tenant = tenant
            return None
        if st.queued >= self.max_queue:
            return Rejection(
                503,
                f"the fair queue is full ({self.max_queue} requests waiting)",
                retry_after_s=1.0,
                kind="queue-full",
            )
        queue = st.backlog.get(tenant)
        if queue is not None and len(queue) >= self.max_queue_per_tenant:
            return Rejection(
                429,
                f"tenant {tenant!r} already has {len(queue)} requests waiting for a fair turn",
                retry_after_s=1.0,
                kind="queue-full",
            )
        if queue is None:
            self._lift(tenant)
            queue = st.backlog[tenant] = deque()
            self._push(tenant)
        item = _Item(request, ctx.prompt_tokens, ctx.now + self.max_wait_s)
        queue.append(item)
        st.waiting.append(item)
        st.queued += 1
        return Deferral(
            reason="the fleet is saturated: waiting for a fair turn", deadline=item.deadline
        )

    def release(
        self,
        endpoints: Sequence[EndpointState],
        load: LoadTracker,
        tenants: TenantView,
        now: float,
    ) -> list[tuple[Request, Rejection | None]]:
        """Expired requests (503 `deadline`), then requests in VTC order while there is room."""
        out: list[tuple[Request, Rejection | None]] = []
        st = self._state
        waiting = st.waiting
        while waiting and waiting[0].deadline <= now:
            item = waiting.popleft()
            queue = st.backlog.get(item.tenant)
            if not queue or queue[0] is not item:
                continue  # released already
            queue.popleft()
            st.queued -= 1
            if not queue:
                self._leave(item.tenant)
            rejection = Rejection(
                503,
                f"deferred for {self.max_wait_s:g} s without a free slot",
                retry_after_s=1.0,
                kind="deadline",
            )
            out.append((item.request, rejection))
        released = 0
        cap = self.max_in_flight_per_tenant
        batch: dict[str, int] = {}
        skipped: list[str] = []
        while st.backlog and self._has_room(endpoints, load, released):
            tenant = self._next_tenant()
            if tenant is None:
                break
            if cap is not None and tenants.in_flight(tenant) + batch.get(tenant, 0) >= cap:
                skipped.append(tenant)  # at its cap: it waits, others go
                continue
            queue = st.backlog[tenant]
            item = queue.popleft()
            st.queued -= 1
            released += 1
            batch[tenant] = batch.get(tenant, 0) + 1
            self._charge(tenant, self.input_weight * item.tokens)
            if queue:
                self._push(tenant)
            else:
                self._leave(tenant)
            out.append((item.request, None))
        for tenant in skipped:
            self._push(tenant)
        if not st.queued:
            waiting.clear()
        return out

    def on_complete(self, decision: Decision, usage: Usage, now: float) -> None:
        """Charge the tenant for the tokens it generated."""
        tenant = decision.request.tenant
        if usage.completion_tokens and self.output_weight:
            self._charge(tenant, self.output_weight * usage.completion_tokens)
            if tenant in self._state.backlog:  # its heap entry is stale now: push the new counter
                self._push(tenant)
        self._prune()

    def check_invariants(self) -> None:
        """Queue counts agree, every backlogged tenant has one live heap entry. O(queued)."""
        st = self._state
        assert st.queued == sum(len(q) for q in st.backlog.values())
        assert all(q for q in st.backlog.values()), "an empty queue is kept"
        live = {t for c, seq, t in st.heap if st.live.get(t) == seq}
        assert live == set(st.backlog), "backlogged tenants and live heap entries differ"
        for c, seq, t in st.heap:
            if st.live.get(t) == seq:
                assert c == st.counters[t], f"live entry of {t!r} has a stale counter"
        queued = {id(i) for q in st.backlog.values() for i in q}
        assert queued <= {id(i) for i in st.waiting}, "a queued request has no deadline entry"

    # -- internals ----------------------------------------------------------------

    def _has_room(self, endpoints: Sequence[EndpointState], load: LoadTracker, extra: int) -> bool:
        if not endpoints:
            return True  # the router answers 503 itself
        return load.in_flight() + extra < self.max_in_flight_per_endpoint * len(endpoints)

    def _push(self, tenant: str) -> None:
        """Make `tenant`'s heap entry the one with its current counter (older ones go stale)."""
        seq = next(self._state.seq)
        self._state.live[tenant] = seq
        heapq.heappush(self._state.heap, (self._state.counters[tenant], seq, tenant))

    def _top(self) -> tuple[float, int, str] | None:
        """The live heap entry with the smallest counter, stale ones dropped on the way."""
        st = self._state
        heap = st.heap
        while heap and st.live.get(heap[0][2]) != heap[0][1]:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def _floor(self) -> float:
        """What a tenant becoming backlogged is lifted to (VTC's lifting rule)."""
        top = self._top()
        return top[0] if top is not None else self._state.last

    def _lift(self, tenant: str) -> None:
        floor = self._floor()
        counters = self._state.counters
        if counters.get(tenant, floor) < floor:
            counters[tenant] = floor
        else:
            counters.setdefault(tenant, floor)

    def _charge(self, tenant: str, cost: float) -> None:
        counters = self._state.counters
        base = counters.get(tenant)
        if base is None:  # forgotten while idle: it was at or below the floor
            base = self._floor()
        charge = cost / self.weights.get(tenant, 1.0)
        counters[tenant] = base + charge
        pending = self._state.charges
        if pending is not None and charge > 0:
            if tenant in pending:
                pending[tenant] += charge
            elif len(pending) < self.MAX_PENDING_TENANTS:
                pending[tenant] = charge
            else:
                self._state.unshared += 1

    def _next_tenant(self) -> str | None:
        """Pop the backlogged tenant with the smallest counter (oldest entry on ties)."""
        top = self._top()
        if top is None:
            return None
        heapq.heappop(self._state.heap)
        del self._state.live[top[2]]
        return top[2]

    def _leave(self, tenant: str) -> None:
        st = self._state
        del st.backlog[tenant]
        st.live.pop(tenant, None)
        st.last = st.counters[tenant]
        st.last_tenant = tenant

    def _prune(self) -> None:
        """Forget idle tenants at or below the floor (they would be lifted to it anyway)."""
        st = self._state
        if len(st.counters) <= 2 * len(st.backlog) + 1024:
            return
        floor = self._floor()
        for tenant in [t for t, c in st.counters.items() if c <= floor]:
            if tenant not in st.backlog:
                del st.counters[tenant]
