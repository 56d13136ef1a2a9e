"""One replica's link to the others: the router's shared state, synced through Redis (issue 15).

Several gateway or picker replicas behind one Service each run their own
`Router`. Alone, each would see a fraction of the traffic: its approximate
index and its in-flight loads would be wrong, a tenant limited to R req/s
would get N x R, and fair queueing would hold per replica only. The
`Coordinator` makes N replicas behave like one through the shared store of
`prefixroute.drivers.shared` (a real Redis or Valkey):

- **load**: every `sync_interval_s` the replica publishes its own in-flight
  requests and tokens per endpoint, and requests per tenant (a
  contribution that expires, so a dead replica's counts vanish), and reads
  the others' sums into `LoadTracker.set_peers` (the load scorers see the
  fleet's in-flight work) and into `ConcurrencyAdmission` (per-tenant caps
  hold for the fleet, give or take one sync interval).
- **rate_limits**: for a tenant with a token bucket, one round trip just
  before `Router.route` runs the bucket atomically in Redis
  (`SharedState.take`); the verdict reaches `TokenBucketAdmission` through
  the `SharedBuckets` capability this class implements, so the wording,
  status and retry-after are the core's. That is the only round trip on a
  request's path, and only for rate-limited tenants.
- **fair_queue**: the fair queues' virtual-time charges go to Redis with
  each sync and the global counters come back (`FairQueueAdmission`'s
  `take_charges` / `apply_counters`): one virtual time, local queues.
- **decisions**: each decision's endpoint and block keys go to a Redis
  Stream, and so does each served request's completion; the others apply
  them as speculative entries, confirmed by the completion
  (`Router.apply_peer_decision`), so approximate indexes agree within a
  sync interval, and session bindings with them. Endpoints in precise
  mode are skipped: every replica subscribes to every engine's KV events,
  so they agree by construction.

When Redis is down or slow (each call is bounded by `timeout_ms`), nothing
waits: peers' loads are dropped (local counts plus scraped metrics),
rate limits fall back to the replica's share of each rate (1 / the last
known replica count), charges and decisions wait for the next sync that
works (bounded), and `/health` and `prefixroute_shared_state_up` say so.
All of it runs on the driver's event loop; the router is only touched
between two awaits, as everywhere else in the drivers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from prefixroute.admission import AdmissionChain, ConcurrencyAdmission, TokenBucketAdmission
from prefixroute.decision import Decision, Deferral, Rejection
from prefixroute.endpoint import EndpointId
from prefixroute.fairqueue import FairQueueAdmission
from prefixroute.request import Request, Usage
from prefixroute.router import Router

if TYPE_CHECKING:
    from prefixroute.drivers.shared import DecisionRecord, SharedState

__all__ = ["MAX_OUTBOX", "PUBLISH_CHUNK", "Coordinator"]

logger = logging.getLogger(__name__)

MAX_OUTBOX = 10_000
"""Decisions kept to publish while Redis is away; older ones are dropped (they expire anyway)."""
PUBLISH_CHUNK = 500
"""Records published per sync at most: one pipeline well inside `timeout_ms` (a backlog drains
over several syncs instead of timing out whole)."""

Limits = tuple[float | None, float, float | None, float]


def _policies(router: Router) -> list[Any]:
    admission = router.admission
    return list(admission.policies) if isinstance(admission, AdmissionChain) else [admission]


class Coordinator:
    """Syncs one replica's router with the others through `shared` (see the module docstring).

    `clock` is the driver's monotonic clock (the `now` it passes the router).
    Implements `prefixroute.admission.SharedBuckets` for the router's token
    bucket policies. Start with `start()`, stop with `stop()`.
    """

    def __init__(self, router: Router, shared: SharedState, *, clock: Callable[[], float]) -> None:
        self.router = router
        self.shared = shared
        self.clock = clock
        config = shared.config
        self.share_what = frozenset(config.share)
        self.sync_interval_s = config.sync_interval_s
        policies = _policies(router)
        self._buckets = [p for p in policies if isinstance(p, TokenBucketAdmission)]
        self._fair = [p for p in policies if isinstance(p, FairQueueAdmission)]
        if "rate_limits" in self.share_what:
            for policy in self._buckets:
                policy.share_with(self)
        self._peer_tenants: Mapping[str, int] = {}
        if "load" in self.share_what:
            for cap in (p for p in policies if isinstance(p, ConcurrencyAdmission)):
                cap.share_with(self.peer_in_flight)
        # the verdict fetched for the request being routed: (tenant, cost, limits, verdict)
        self._pending: tuple[str, int, Limits, tuple[float, float] | None] | None = None
        self._charges: dict[str, float] = {}
        self._outbox: list[tuple[float, DecisionRecord]] = []  # (queued at, record)
        self._task: asyncio.Task[None] | None = None
        self._refunds: set[asyncio.Task[bool]] = set()
        self.replicas = 1
        self.syncs = 0
        self.peer_decisions = 0
        self.local_verdicts = 0
        """Rate-limit verdicts answered by the local share (no shared verdict at hand)."""

    # -- SharedBuckets -----------------------------------------------------------------

    @property
    def share(self) -> float:
        """This replica's share of each rate when it answers alone: 1 / the replicas last seen."""
        return 1.0 / max(1, self.replicas)

    def take(self, tenant: str, cost: int, now: float) -> tuple[float, float] | None:
        """The verdict `before_route` fetched for this request (its tenant's); else None.

        Matched on the tenant only: `route` runs right after the fetch, and
        the request's cost may have moved meanwhile by a completion's
        update of the characters-per-token ratio (the store charged the
        cost it was given: charging the local bucket too would count the
        request twice).
        """
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == tenant and pending[3] is not None:
            return pending[3]
        self.local_verdicts += 1
        return None

    def peer_in_flight(self, tenant: str) -> int:
        """The other replicas' requests of `tenant` in flight, as last synced (concurrency caps)."""
        return self._peer_tenants.get(tenant, 0)

    # -- a request's path ----------------------------------------------------------------

    async def before_route(self, request: Request) -> None:
        """One round trip for a rate-limited tenant (none otherwise), just before `route`.

        The caller must call `Router.route` next without awaiting in
        between, then `after_route` with its outcome.
        """
        self._pending = None
        if not self._buckets or "rate_limits" not in self.share_what:
            return
        policy = self._buckets[0]
        requests_per_s, request_burst, tokens_per_s, token_burst = policy.limits(request.tenant)
        if requests_per_s is None and tokens_per_s is None:
            return
        cost = policy.cost(request, self.router.prompt_tokens(request))
        limits = (requests_per_s, request_burst, tokens_per_s, token_burst)
        verdict = await self.shared.take(request.tenant, 1, cost, limits)
        self._pending = (request.tenant, cost, limits, verdict)

    def after_route(self, outcome: Decision | Rejection | Deferral) -> None:
        """Refund an unused charge; queue a decision for the others' indexes.

        A charge is unused when a policy before the token bucket refused or
        deferred the request (the chain stopped before the bucket's `take`):
        a local bucket would not have been charged, so the shared one gets
        it back, in the background.
        """
        pending, self._pending = self._pending, None
        if pending is not None and pending[3] == (0.0, 0.0):
            tenant, cost, limits, _ = pending
            task = asyncio.get_running_loop().create_task(
                self.shared.refund(tenant, 1, cost, limits)
            )
            self._refunds.add(task)
            task.add_done_callback(self._refunds.discard)
        self.queue_decision(outcome)

    def queue_decision(self, outcome: Decision | Rejection | Deferral) -> None:
        """Queue a decision (a routed or a released one) for the others' indexes."""
        if "decisions" not in self.share_what or not isinstance(outcome, Decision):
            return
        blocks = outcome.total_blocks and not self.router.is_precise(outcome.endpoint)
        if not blocks and outcome.request.session is None:
            return  # nothing a peer would record
        keys = outcome.keys.astype("<u8", copy=False).tobytes() if blocks else b""
        request = outcome.request
        self._queue(
            self.shared.record(
                outcome.endpoint,
                keys,
                self.router.speculative_ttl_s,
                tenant=request.tenant if request.session is not None else None,
                session=request.session,
            )
        )

    def after_complete(
        self, decision: Decision, usage: Usage, served_by: EndpointId | None
    ) -> None:
        """Queue a served request's completion: the others confirm its blocks where it ran.

        A record with `ttl_s` 0 is a completion (`Router.apply_peer_decision`
        with `completed`). Failed requests send nothing: the others' entries
        of that decision expire on their own.
        """
        if "decisions" not in self.share_what or not usage.ok or not decision.total_blocks:
            return
        served = served_by or decision.endpoint
        if self.router.is_precise(served):
            return
        keys = decision.keys.astype("<u8", copy=False).tobytes()
        self._queue(self.shared.record(served, keys, 0.0))

    def _queue(self, record: DecisionRecord) -> None:
        outbox = self._outbox
        outbox.append((self.clock(), record))
        if len(outbox) > MAX_OUTBOX:
            del outbox[: len(outbox) - MAX_OUTBOX]

    # -- the sync loop -------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (a Redis that is down is no error: the replica starts on local state)."""
        await self.shared.start()
        await self.sync_once()
        self._task = asyncio.create_task(self._run(), name="prefixroute-shared-state")

    async def stop(self) -> None:
        """Stop syncing; the replica's contribution expires on its own."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.shared.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.sync_interval_s)
            try:
                await self.sync_once()
            except Exception:  # a bug here must not stop routing: say it, go on
                logger.exception("shared state sync failed")

    async def sync_once(self) -> None:
        """One sync: own loads and charges out, the others' loads and counters in, decisions."""
        share = self.share_what
        load = self.router.load
        for policy in self._fair if "fair_queue" in share else ():
            for tenant, charge in policy.take_charges().items():
                self._charges[tenant] = self._charges.get(tenant, 0.0) + charge
        own: tuple[Mapping[str, int], Mapping[str, int]] = ({}, {})
        if "load" in share:  # EndpointId is a str
            own = cast(
                tuple[Mapping[str, int], Mapping[str, int]],
                (load.local_requests_view(), load.local_tokens_view()),
            )
        tenants = self.router.ledger.in_flight_by_tenant() if "load" in share else {}
        # the charges are SharedState's from here: it keeps them while Redis is down
        charges, self._charges = self._charges, {}
        result = await self.shared.sync(*own, charges, tenants)
        if result is None:
            load.set_peers({}, {})  # unknown: local counts and scraped metrics only
            self._peer_tenants = {}
        else:
            self.syncs += 1
            self._peer_tenants = result.peer_tenants
            self.replicas = max(1, result.replicas)
            if "load" in share:
                load.set_peers(
                    cast(Mapping[EndpointId, int], result.peer_requests),
                    cast(Mapping[EndpointId, int], result.peer_tokens),
                )
            for policy in self._fair if "fair_queue" in share else ():
                policy.apply_counters(result.vtc_counters)
        if "decisions" in share:
            await self._exchange_decisions()

    async def _exchange_decisions(self) -> None:
        """Publish the oldest queued records (at most `PUBLISH_CHUNK`), read the others'.

        Records queued longer than the speculative TTL are dropped: their
        entries would have expired by now anyway (and a peer would apply
        them as fresh).
        """
        outbox = self._outbox
        stale = self.clock() - self.router.speculative_ttl_s
        if outbox and outbox[0][0] < stale:
            outbox[:] = [(t, r) for t, r in outbox if t >= stale]
        if outbox:
            chunk = [r for _, r in outbox[:PUBLISH_CHUNK]]
            if await self.shared.publish(chunk) is not None:
                del outbox[: len(chunk)]
        records = await self.shared.read_decisions()
        if not records:
            return
        now = self.clock()
        for record in records:
            keys = record.key_array().astype(np.uint64, copy=False)
            endpoint, completed = EndpointId(record.endpoint), record.ttl_s <= 0.0
            session = None
            if record.tenant is not None and record.session is not None:
                session = (record.tenant, record.session)
            if self.router.apply_peer_decision(
                endpoint, keys, now, completed=completed, session=session
            ):
                self.peer_decisions += 1

    # -- reporting -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What `/health` shows: up or down, since when, replicas seen, fallbacks."""
        shared = self.shared
        return {
            "state": "up" if shared.up else "down",
            "down_for_s": None  # `down_since` is wall-clock time
            if shared.down_since is None
            else round(max(0.0, time.time() - shared.down_since), 3),
            "replicas": self.replicas,
            "reason": shared.reason if not shared.up else None,
            "fallbacks": shared.fallbacks,
            "local_verdicts": self.local_verdicts,
            "peer_decisions": self.peer_decisions,
        }
