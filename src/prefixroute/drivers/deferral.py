"""Deferred requests: where a driver's handlers wait while the admission policy queues them.

When `Router.route` answers a `Deferral`, the handler awaits `Deferrals.wait`
until `Router.release` hands the request back (a `Decision`, or a 503
`Rejection` when its deadline passes). Releases happen after every
completion (`Deferrals.complete`) and on a ticker every `interval_s`, so
deadlines fire even when nothing completes. Everything runs on the driver's
one event loop; the router is never called from another thread.

A handler whose client leaves while deferred simply stops waiting: its
waiter stays registered, so when the policy releases that request later it
is settled at once as failed, and the slot it would have taken is offered to
the next request. Shared by the gateway and the ext_proc server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from prefixroute.decision import Decision, Deferral, Rejection
from prefixroute.endpoint import EndpointId, EndpointState
from prefixroute.plugins import Deferring
from prefixroute.request import Request, Usage
from prefixroute.router import Router, SettlementError

__all__ = ["Deferrals"]

log = logging.getLogger(__name__)

_RELEASE_ROUNDS = 64  # bounds the abandoned-release loop, whatever the policy does


class Deferrals:
    """The waiting handlers of one driver, and the release ticker that wakes them.

    `endpoints` gives the current endpoint states; `clock` is the driver's
    monotonic clock (every `now` the router sees comes from it). A router
    whose admission policy never defers makes every method a no-op but
    `complete`.
    """

    def __init__(
        self,
        router: Router,
        endpoints: Callable[[], Sequence[EndpointState]],
        clock: Callable[[], float],
        *,
        on_settled: Callable[[Decision, Usage, EndpointId | None], None] | None = None,
        on_released: Callable[[Decision], None] | None = None,
    ) -> None:
        self.router = router
        self.endpoints = endpoints
        self.clock = clock
        self.on_settled = on_settled
        """Called after each settlement the router accepted (shared state shares it)."""
        self.on_released = on_released
        """Called with each released decision handed to its waiter (shared state shares it)."""
        self.deferring = isinstance(router.admission, Deferring)
        # id(request) -> (request, future); the request is held so its id stays unique
        self._waiters: dict[int, tuple[Request, asyncio.Future[Decision | Rejection]]] = {}
        self._ticker: asyncio.Task[None] | None = None

    def start(self, interval_s: float) -> None:
        """Start the release ticker (only when the admission policy defers)."""
        if self.deferring and self._ticker is None:
            self._ticker = asyncio.create_task(self._tick(interval_s))

    async def stop(self, reason: str) -> None:
        """Stop the ticker; answer every request still waiting with 503 `draining`."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        for _request, future in self._waiters.values():
            if not future.done():
                future.set_result(Rejection(503, reason, retry_after_s=1.0, kind="draining"))

    async def _tick(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.release()
            except Exception:  # never let the ticker die: deadlines depend on it
                log.exception("releasing deferred requests failed")

    def release(self) -> None:
        """Hand released requests to their waiting handlers.

        A released `Decision` whose handler has stopped waiting is settled at
        once (ok=False), which may free a slot for the next: hence the loop,
        bounded so a pathological policy cannot spin the event loop.
        """
        if not self.deferring:
            return
        for _ in range(_RELEASE_ROUNDS):
            released = self.router.release(self.endpoints(), self.clock())
            abandoned = False
            for request, outcome in released:
                waiter = self._waiters.pop(id(request), None)
                if waiter is not None and waiter[0] is request and not waiter[1].done():
                    waiter[1].set_result(outcome)
                    if self.on_released is not None and isinstance(outcome, Decision):
                        self.on_released(outcome)
                elif isinstance(outcome, Decision):
                    self._settle(outcome, Usage(ok=False), None)
                    abandoned = True
            if not abandoned:
                return

    async def wait(self, request: Request, deferral: Deferral) -> Decision | Rejection:
        """Wait until the deferred `request` is released; cancel it to stop waiting.

        The ticker fires the deadline; the timeout here (the deadline plus
        1 s) is only a safety net. A cancelled or timed-out wait leaves the
        waiter registered, so a later release of this request is settled as
        failed by `release`.
        """
        future: asyncio.Future[Decision | Rejection] = asyncio.get_running_loop().create_future()
        self._waiters[id(request)] = (request, future)
        patience = max(0.0, deferral.deadline - self.clock()) + 1.0
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=patience)
        except TimeoutError:
            return Rejection(503, "deferred past its deadline", retry_after_s=1.0, kind="deadline")
        finally:
            if not future.done():
                future.cancel()

    def complete(self, decision: Decision, usage: Usage, served_by: EndpointId | None) -> None:
        """`Router.on_complete`, then release what the freed capacity lets through."""
        self._settle(decision, usage, served_by)
        self.release()

    def _settle(self, decision: Decision, usage: Usage, served_by: EndpointId | None) -> None:
        """`Router.on_complete`; a refused settlement (a driver bug) is logged, never raised.

        The router refuses a second settlement or a foreign decision before
        changing anything, so its counts stay right; the request in hand must
        still be answered, so the error stops here.
        """
        try:
            self.router.on_complete(decision, usage, self.clock(), served_by=served_by)
        except SettlementError as exc:
            log.error("settling a decision was refused (a driver bug): %s", exc)
            return
        if self.on_settled is not None:
            self.on_settled(decision, usage, served_by)
