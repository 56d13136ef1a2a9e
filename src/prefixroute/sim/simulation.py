"""The discrete-event loop: workload -> Router -> modelled engines -> Router, in virtual time.

The simulator is a driver like the gateway: it calls `Router.route` when a
request arrives, hands the request to the chosen engine after the frontend
latency, and calls `Router.on_complete` with the engine's real usage when it
finishes. The router sees engine metrics (waiting, running, KV usage) only
as a metrics scraper would: a snapshot refreshed every `metrics_interval_s`,
stale in between, while its own in-flight counts are exact. With
`kv_events`, the engines' block stores and evictions reach `Router.observe`
after each step, as vLLM's KV-event publisher would send them.

Events are kept in one heap ordered by (time, insertion order), so runs are
deterministic: the same scenario, policy and seed give the same result.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import cast

import attrs
import numpy as np

from prefixroute.blocks import Blocker, HashMode
from prefixroute.decision import Decision, Deferral, Rejection
from prefixroute.endpoint import EndpointId, EndpointState
from prefixroute.events import BlockRemoved, BlockStored
from prefixroute.request import Usage
from prefixroute.router import Router
from prefixroute.sim.cost import CostModel
from prefixroute.sim.engine import Completion, Engine, EngineConfig
from prefixroute.sim.source import SimRequest, Source

__all__ = ["Outcomes", "PolicyMismatch", "Simulation"]


class PolicyMismatch(ValueError):
    """A policy that cannot drive this scenario's engines (e.g. KV events it cannot read)."""


_ARRIVE, _DELIVER, _STEP_END, _REFRESH = range(4)
_LOAD_SAMPLES = 600  # per-endpoint load samples kept for plots


@attrs.define(slots=True)
class Outcomes:
    """Per-request results as columns (one entry per request that arrived).

    `status` is 200 for a served request, else the HTTP status the client
    got (the router's rejection, 400 for a request no engine could hold,
    504 for one still unfinished when the run's drain limit passed).
    Latencies are NaN for requests that were not served.
    """

    arrival_s: list[float] = attrs.Factory(list)
    tenant: list[str] = attrs.Factory(list)
    kind: list[str] = attrs.Factory(list)
    endpoint: list[int] = attrs.Factory(list)
    status: list[int] = attrs.Factory(list)
    prompt_tokens: list[int] = attrs.Factory(list)
    cached_tokens: list[int] = attrs.Factory(list)
    predicted_tokens: list[int] = attrs.Factory(list)
    output_tokens: list[int] = attrs.Factory(list)
    ttft_s: list[float] = attrs.Factory(list)
    e2e_s: list[float] = attrs.Factory(list)
    finished_s: list[float] = attrs.Factory(list)
    retry_after_s: list[float] = attrs.Factory(list)

    def add(
        self,
        sim: SimRequest,
        *,
        endpoint: int,
        status: int,
        predicted: int = 0,
        done: Completion | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        """Append one request's outcome (`retry_after_s`: a rejection's hint, else NaN)."""
        self.retry_after_s.append(float("nan") if retry_after_s is None else retry_after_s)
        self.arrival_s.append(sim.arrival_s)
        self.tenant.append(sim.request.tenant)
        self.kind.append(sim.kind)
        self.endpoint.append(endpoint)
        self.status.append(status)
        self.predicted_tokens.append(predicted)
        if done is None:
            n = len(sim.request.token_ids) if sim.request.token_ids is not None else 0
            self.prompt_tokens.append(n)
            self.cached_tokens.append(0)
            self.output_tokens.append(0)
            self.ttft_s.append(float("nan"))
            self.e2e_s.append(float("nan"))
            self.finished_s.append(float("nan"))
        else:
            self.prompt_tokens.append(done.prompt_tokens)
            self.cached_tokens.append(done.cached_tokens)
            self.output_tokens.append(done.output_tokens)
            self.ttft_s.append(done.first_token_s - sim.arrival_s)
            self.e2e_s.append(done.finished_s - sim.arrival_s)
            self.finished_s.append(done.finished_s)


class Simulation:
    """One run of a workload against `endpoints` modelled engines behind `router`.

    `run()` returns the `Outcomes`; the engines (`engines`), per-endpoint
    load samples (`load_t`, `load`) and event count stay readable after.
    Arrivals stop at `duration_s`; requests in flight then drain for at most
    `drain_s` more (those still unfinished count as 504).
    """

    def __init__(
        self,
        router: Router,
        source: Source,
        *,
        endpoints: int,
        engine: EngineConfig,
        cost: CostModel,
        duration_s: float,
        metrics_interval_s: float = 0.05,
        kv_events: bool = False,
        drain_s: float | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> None:
        if endpoints < 1:
            raise ValueError(f"endpoints must be >= 1, got {endpoints}")
        if not metrics_interval_s > 0:
            raise ValueError(f"metrics_interval_s must be > 0, got {metrics_interval_s}")
        self.router = router
        self.source = source
        self.cost = cost
        self.duration_s = duration_s
        self.metrics_interval_s = metrics_interval_s
        self.drain_s = drain_s if drain_s is not None else max(60.0, duration_s)
        self.progress = progress
        blocker = router.blocker
        # The engine hashes like vLLM: token blocks of its size, tenants sharing
        # (no cache_salt). The router's keys are reused only when they are exactly that.
        self._shared_keys = (
            blocker.mode is HashMode.TOKEN
            and blocker.block_size == engine.block_size
            and not blocker.isolate_tenants
        )
        if kv_events and not self._shared_keys:
            raise PolicyMismatch(
                "kv_events need the router to hash tokens in blocks of the engine's "
                f"block size ({engine.block_size}) without tenant isolation; this policy hashes "
                f"{blocker.mode.value} blocks of {blocker.block_size}"
            )
        self._blocker = blocker if self._shared_keys else Blocker(block_size=engine.block_size)
        self.kv_events = kv_events
        self.ids = [EndpointId(f"e{i}") for i in range(endpoints)]
        self._index = {eid: i for i, eid in enumerate(self.ids)}
        self.engines = [Engine(engine, cost, record_events=kv_events) for _ in self.ids]
        self.outcomes = Outcomes()
        self.events = 0
        self.load_t: list[float] = []
        self.load: list[list[int]] = [[] for _ in self.ids]
        self._heap: list[tuple[float, int, int, object]] = []
        self._tie = itertools.count()
        self._pending: dict[int, tuple[SimRequest, Decision]] = {}
        self._deferred: dict[int, SimRequest] = {}  # id(request) -> waiting in admission
        self._snapshots: list[EndpointState] = []
        self._refresh(0.0)

    # -- the loop ---------------------------------------------------------------

    def _push(self, t: float, kind: int, payload: object) -> None:
        heapq.heappush(self._heap, (t, next(self._tie), kind, payload))

    def run(self) -> Outcomes:
        """Simulate to the end; O(events x log events) plus the router's and engines' work."""
        arrivals: Iterator[SimRequest] = iter(self.source.arrivals())
        first = next(arrivals, None)
        if first is not None:
            self._push(first.arrival_s, _ARRIVE, (first, arrivals))
        self._push(self.metrics_interval_s, _REFRESH, None)
        busy = 1 if first is not None else 0  # events other than refreshes
        limit = self.duration_s + self.drain_s
        heap = self._heap
        pop = heapq.heappop
        progress = self.progress
        t = 0.0
        while heap and (busy or self._deferred):
            t, _, kind, payload = pop(heap)
            if t > limit:
                break
            self.events += 1
            if kind == _STEP_END:
                busy -= 1
                busy += self._step_end(payload, t)  # type: ignore[arg-type]
            elif kind == _ARRIVE:
                busy -= 1
                sim, more = cast(tuple[SimRequest, Iterator[SimRequest] | None], payload)
                if more is not None:
                    nxt = next(more, None)
                    if nxt is not None and nxt.arrival_s <= self.duration_s:
                        self._push(nxt.arrival_s, _ARRIVE, (nxt, more))
                        busy += 1
                if sim.arrival_s <= self.duration_s:
                    busy += self._arrive(sim, t)
            elif kind == _DELIVER:
                busy -= 1
                busy += self._deliver(payload, t)  # type: ignore[arg-type]
            else:
                self._refresh(t)
                self._push(t + self.metrics_interval_s, _REFRESH, None)
                if self._deferred:  # deadlines fire even when nothing completes
                    busy += self._release(t)
                if progress is not None and self.events % 64 == 0:
                    progress(t)
        for sim, decision in self._pending.values():  # still unfinished: timed out
            self.router.on_complete(decision, Usage(ok=False), t)
            self.outcomes.add(sim, endpoint=self._index[decision.endpoint], status=504)
        self._pending.clear()
        if self._deferred:  # still waiting for admission: let every deadline pass
            for request, outcome in self.router.release(self._snapshots, math.inf):
                sim = self._deferred.pop(id(request))
                if isinstance(outcome, Rejection):
                    self.outcomes.add(
                        sim, endpoint=-1, status=outcome.status, retry_after_s=outcome.retry_after_s
                    )
                else:  # routed at the very end: it can no longer run
                    self.router.on_complete(outcome, Usage(ok=False), t)
                    self.outcomes.add(sim, endpoint=self._index[outcome.endpoint], status=504)
        for sim in self._deferred.values():  # never answered by the policy
            self.outcomes.add(sim, endpoint=-1, status=504)
        self._deferred.clear()
        return self.outcomes

    def _arrive(self, sim: SimRequest, t: float) -> int:
        decision = self.router.route(sim.request, self._snapshots, t)
        if isinstance(decision, Deferral):
            self._deferred[id(sim.request)] = sim
            return 0
        return self._dispatch(sim, decision, t)

    def _release(self, t: float) -> int:
        """Hand deferred requests the router lets go to their engines (or their rejections)."""
        added = 0
        for request, outcome in self.router.release(self._snapshots, t):
            added += self._dispatch(self._deferred.pop(id(request)), outcome, t)
        return added

    def _dispatch(self, sim: SimRequest, decision: Decision | Rejection, t: float) -> int:
        if isinstance(decision, Rejection):
            self.outcomes.add(
                sim, endpoint=-1, status=decision.status, retry_after_s=decision.retry_after_s
            )
            return self._follow(sim, t, ok=False)
        i = self._index[decision.endpoint]
        if not self.engines[i].fits(sim):
            self.router.on_complete(decision, Usage(ok=False), t)
            self.outcomes.add(sim, endpoint=i, status=400)
            return self._follow(sim, t, ok=False)
        self._pending[id(sim)] = (sim, decision)
        self._push(t + self.cost.frontend_latency_s, _DELIVER, (i, sim, decision))
        return 1

    def _deliver(self, payload: tuple[int, SimRequest, Decision], t: float) -> int:
        i, sim, decision = payload
        engine = self.engines[i]
        engine.add(sim, self._engine_keys(sim, decision), t)
        if engine.busy:
            return 0
        return self._begin(i, t)

    def _begin(self, i: int, t: float) -> int:
        engine = self.engines[i]
        dt = engine.begin_step(t)
        if self.kv_events:
            self._forward_events(i)
        if dt is None:
            return 0
        self._push(t + dt, _STEP_END, i)
        return 1

    def _step_end(self, i: int, t: float) -> int:
        engine = self.engines[i]
        done = engine.end_step(t)
        if self.kv_events:
            self._forward_events(i)
        added = 0
        router = self.router
        for c in done:
            sim, decision = self._pending.pop(id(c.sim))
            usage = Usage(
                prompt_tokens=c.prompt_tokens,
                cached_tokens=c.cached_tokens,
                completion_tokens=c.output_tokens,
                ttft_s=c.first_token_s - sim.arrival_s,
                e2e_s=c.finished_s - sim.arrival_s,
            )
            router.on_complete(decision, usage, t)
            self.outcomes.add(
                sim, endpoint=i, status=200, predicted=decision.predicted_cached_tokens, done=c
            )
            added += self._follow(sim, t, ok=True)
        if done and self._deferred:
            added += self._release(t)
        if engine.has_work() and not engine.busy:
            added += self._begin(i, t)
        return added

    def _follow(self, sim: SimRequest, t: float, *, ok: bool) -> int:
        nxt = self.source.follow_up(sim, t, ok)
        if nxt is None or nxt.arrival_s > self.duration_s:
            return 0
        self._push(max(nxt.arrival_s, t), _ARRIVE, (nxt, None))
        return 1

    # -- what the router sees ------------------------------------------------------

    def _refresh(self, t: float) -> None:
        """New metric snapshots of every engine, as a scraper would take them at `t`."""
        snaps = []
        sample = len(self.load_t) < _LOAD_SAMPLES and (
            t >= len(self.load_t) * self.duration_s / _LOAD_SAMPLES
        )
        if sample:
            self.load_t.append(t)
        for i, (eid, e) in enumerate(zip(self.ids, self.engines, strict=True)):
            snaps.append(
                EndpointState(
                    id=eid,
                    address=f"10.0.{i // 250}.{i % 250 + 1}:8000",
                    waiting=e.waiting,
                    running=e.running,
                    kv_usage=e.kv_usage,
                    kv_capacity_blocks=e.config.num_blocks,
                    observed_at=t,
                )
            )
            if sample:
                self.load[i].append(e.running + e.waiting)
        self._snapshots = snaps

    def _engine_keys(self, sim: SimRequest, decision: Decision) -> Sequence[int]:
        """The engine's block hashes for `sim`: the router's keys when they line up."""
        request = sim.request
        blocker = self._blocker
        if sim.output_token_ids is None:
            if self._shared_keys:
                return decision.block_keys
            return blocker.keys(request).tolist()  # type: ignore[no-any-return]
        assert request.token_ids is not None
        tokens = np.concatenate([request.token_ids, sim.output_token_ids])
        size = self.engines[0].config.block_size
        return blocker.hash_tokens(tokens, blocker.namespace(request), size).tolist()  # type: ignore[no-any-return]

    def _forward_events(self, i: int) -> None:
        stored, removed = self.engines[i].drain_events()
        eid = self.ids[i]
        if removed:
            self.router.observe(BlockRemoved(eid, removed))
        if stored:
            self.router.observe(BlockStored(eid, stored))
