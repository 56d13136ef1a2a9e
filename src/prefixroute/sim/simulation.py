"""The discrete-event loop: workload -> Router -> modelled engines -> Router, in virtual time.

The simulator is a driver like the gateway: it calls `Router.route` when a
request arrives, hands the request to the chosen engine after the frontend
latency, and calls `Router.on_complete` with the engine's real usage when it
finishes. The router sees engine metrics (waiting, running, KV usage) only
as a metrics scraper would: a snapshot refreshed every `metrics_interval_s`,
stale in between, while its own in-flight counts are exact. With
`kv_events`, the engines' block stores and evictions reach `Router.observe`
as vLLM's KV-event publisher sends them: one batch per engine step (stores
and evictions), numbered per engine from 0 (vLLM `ZmqEventPublisher`: a
sequence number per message, `vllm/distributed/kv_events.py`), after
`EventLink.delay_s`, each batch lost with probability `EventLink.loss`.
The receiving side does what the events driver does (issue 13; llm-d's
`kvevents` pool and Dynamo's KV router handle gaps the same way):

- a sequence number past the next one expected is a gap: with
  `EventLink.replay` the missing batches are fetched again (vLLM's replay
  socket; the simulator applies them at once, then the new batch), else
  the endpoint's entries are cleared (`AllBlocksCleared`) and relearned
  from the events that follow, so the index forgets blocks the engine
  still holds until they are stored again (`EventLink.on_gap: clear`, what
  the issue specifies); `on_gap: keep` instead keeps the index and goes
  on, so it misses the lost batch's stores and keeps its evicted blocks
  until the index's own LRU drops them;
- a sequence number below the expected one is a restarted engine: cleared;
- vLLM emits stores and evictions per block and does not deduplicate
  blocks (the same hash can be stored by two blocks and removed once while
  the other still holds it), so the receiver counts stores per hash and
  forwards `BlockRemoved` when the last holder goes.

With `precise`, every endpoint is put in precise mode
(`ModeChanged(endpoint, True)`) before the first request: the router's
decisions stay speculative while their requests run (and
`precise_speculative_ttl_s` after), completions confirm nothing, the
events do (`Router`).

Engine restarts (`Restart`): at `at_s` the engine's process dies. Requests
in flight there are handled as the gateway does (`drivers/gateway/app.py`):
one that already streamed its first token fails (502); one that had not
is retried on the decision's fallbacks that are up (`served_by`), else
fails (503). The router sees the endpoint unhealthy at once (the gateway
marks it failed on the broken connection) until the first scrape after it
is back, `down_s` later, with an empty cache; it observes
`AllBlocksCleared` for it when it comes back (the pool saw it go and come
back; with events, the restarted engine's batch numbers start again at 0,
which clears it too).

Router replicas (`prefixroute.sim.replicas`): with `routers.replicas` N > 1
the simulator runs N `Router`s in front of the same engines; a balancer
sends each arriving request to one, which routes it, releases it when it
deferred it, and gets its completion. Every replica sees the same scraped
snapshots and, restarts being the pool's knowledge, every replica observes
a restarted engine's `AllBlocksCleared`. What else they learn of each
other (KV events, each other's decisions and in-flight counts, `delay_s`
late) is `routers.sharing`, described in that module; shared decisions and
counts travel through the same heap as everything else.

Events are kept in one heap ordered by (time, insertion order), so runs are
deterministic: the same scenario, policy and seed give the same result.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import cast

import attrs
import numpy as np

from prefixroute.blocks import Blocker, HashMode
from prefixroute.decision import Decision, Deferral, Rejection
from prefixroute.endpoint import EndpointId, EndpointState
from prefixroute.events import AllBlocksCleared, BlockRemoved, BlockStored, ModeChanged
from prefixroute.latency import LatencyNote
from prefixroute.request import Usage
from prefixroute.router import Router
from prefixroute.sim.cost import CostModel
from prefixroute.sim.engine import Completion, Engine, EngineConfig, SeqHandle
from prefixroute.sim.replicas import Balancer, Routers
from prefixroute.sim.source import SimRequest, Source

__all__ = ["EventLink", "EventStats", "Outcomes", "PolicyMismatch", "Restart", "Simulation"]


_DecisionRecord = tuple[
    int, EndpointId, Sequence[int], float, float | None, tuple[str, str] | None, int | None
]  # replica, endpoint, block keys, TTL, cold placement time, session, uncached tokens
_LearnRecord = tuple[int, EndpointId, LatencyNote, float | None, float | None]
# replica, endpoint, its latency note, the TTFT and TPOT it learned (Simulation._settle)


class PolicyMismatch(ValueError):
    """A policy that cannot drive this scenario's engines (e.g. KV events it cannot read)."""


_ARRIVE, _DELIVER, _STEP_END, _REFRESH, _EVENTS, _CRASH, _RECOVER = range(7)
_SHARE, _CONFIRM, _PEER, _LEARN = range(7, 11)  # what replicas share, delay_s late
_LOAD_SAMPLES = 600  # per-endpoint load samples kept for plots
REPLAY_BUFFER_STEPS = 10_000  # batches an engine can replay (vLLM's `buffer_steps` default)


@attrs.frozen
class EventLink:
    """How the engines' KV-event batches reach the router.

    `delay_s`: publish to apply (the same for every batch, so order is
    kept, as on one ZMQ connection); `loss`: the probability that a batch
    is lost; `replay`: whether the receiver can fetch lost batches again
    (vLLM's replay socket, the last `REPLAY_BUFFER_STEPS` batches);
    `on_gap`: what the receiver does with a gap it cannot replay, `clear`
    the endpoint or `keep` its entries (the module docstring).
    """

    delay_s: float = attrs.field(default=0.0)
    loss: float = attrs.field(default=0.0)
    replay: bool = False
    on_gap: str = "clear"

    def __attrs_post_init__(self) -> None:
        if not (math.isfinite(self.delay_s) and self.delay_s >= 0):
            raise ValueError(f"delay_s must be finite and >= 0, got {self.delay_s}")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"loss must be in [0, 1), got {self.loss}")
        if self.on_gap not in ("clear", "keep"):
            raise ValueError(f"on_gap must be clear or keep, got {self.on_gap!r}")


@attrs.frozen
class Restart:
    """Engine `endpoint` (an index) dies at `at_s` and is back, empty, `down_s` later."""

    endpoint: int
    at_s: float
    down_s: float

    def __attrs_post_init__(self) -> None:
        if self.endpoint < 0:
            raise ValueError(f"endpoint must be >= 0, got {self.endpoint}")
        if not (math.isfinite(self.at_s) and self.at_s >= 0):
            raise ValueError(f"at_s must be finite and >= 0, got {self.at_s}")
        if not (math.isfinite(self.down_s) and self.down_s > 0):
            raise ValueError(f"down_s must be finite and > 0, got {self.down_s}")


@attrs.define(slots=True)
class EventStats:
    """What happened to the KV events and the restarts of one run."""

    batches: int = 0  # published
    lost: int = 0
    gaps: int = 0  # gaps the receiver saw
    replayed: int = 0  # lost batches fetched again
    cleared: int = 0  # endpoint clears: gaps without replay, restarts
    restarts: int = 0
    retried: int = 0  # requests moved to a fallback endpoint by a restart
    failed: int = 0  # requests a restart failed (502: streaming had begun; 503: nowhere to go)


@attrs.define(slots=True)
class Outcomes:
    """Per-request results as columns (one entry per request that arrived).

    `status` is 200 for a served request, else the HTTP status the client
    got (the router's rejection, 400 for a request no engine could hold,
    504 for one still unfinished when the run's drain limit passed).
    Latencies are NaN for requests that were not served. `slo_ttft_s` and
    `slo_tpot_s` are the request's own latency objectives (NaN: none).
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
    slo_ttft_s: list[float] = attrs.Factory(list)
    slo_tpot_s: list[float] = attrs.Factory(list)

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
        nan = math.nan
        self.retry_after_s.append(nan if retry_after_s is None else retry_after_s)
        self.arrival_s.append(sim.arrival_s)
        request = sim.request
        self.slo_ttft_s.append(nan if request.slo_ttft_s is None else request.slo_ttft_s)
        self.slo_tpot_s.append(nan if request.slo_tpot_s is None else request.slo_tpot_s)
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

    `run()` returns the `Outcomes`; the engines (`engines`, the ones running
    at the end; `all_engines` adds those restarts replaced), per-endpoint
    load samples (`load_t`, `load`), event count and `event_stats` stay
    readable after. Arrivals stop at `duration_s`; requests in flight then
    drain for at most `drain_s` more (those still unfinished count as 504).
    `link` (KV events), `restarts`, `precise` and `seed` (of the event
    losses and the random balancer) are described in the module docstring.

    `router` is one `Router`, or one per replica (`routers.replicas` of
    them, all built from the same policy); `routers` says how requests
    reach them and what they share (`prefixroute.sim.replicas`). `router`
    is the first replica; `replicas` lists them all, and
    `replica_requests` counts the requests the balancer sent each.
    """

    def __init__(
        self,
        router: Router | Sequence[Router],
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
        link: EventLink | None = None,
        restarts: Sequence[Restart] = (),
        precise: bool = False,
        seed: int = 0,
        routers: Routers | None = None,
    ) -> None:
        replicas = [router] if isinstance(router, Router) else list(router)
        routing = routers if routers is not None else Routers(replicas=len(replicas))
        if len(replicas) != routing.replicas:
            raise ValueError(
                f"routers.replicas is {routing.replicas} but {len(replicas)} routers were given"
            )
        router = replicas[0]
        if endpoints < 1:
            raise ValueError(f"endpoints must be >= 1, got {endpoints}")
        if not metrics_interval_s > 0:
            raise ValueError(f"metrics_interval_s must be > 0, got {metrics_interval_s}")
        self.router = router
        self.replicas = replicas
        self.routing = routing
        self.replica_requests = [0] * len(replicas)
        self._balancer = Balancer(routing, seed)
        several = len(replicas) > 1
        # what replicas share (prefixroute.sim.replicas)
        self._share_decisions = several and routing.sharing == "decisions"
        self._share_delay = routing.delay_s
        self._carry_completions = "completions" in routing.carry
        self._carry_cold = "cold" in routing.carry
        self._carry_sessions = "sessions" in routing.carry
        self._carry_latency = "latency" in routing.carry
        self._contrib: list[dict[EndpointId, list[int]]] = [{} for _ in replicas]
        self._peers_stale = [False] * len(replicas)
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
        if precise and not kv_events:
            raise PolicyMismatch("precise mode needs kv_events")
        if several and routing.sharing != "events":  # events reach every replica or none
            kv_events = precise = False
        for r in restarts:
            if r.endpoint >= endpoints:
                raise ValueError(f"a restart names endpoint {r.endpoint} of {endpoints}")
        self._blocker = blocker if self._shared_keys else Blocker(block_size=engine.block_size)
        self.kv_events = kv_events
        self.link = link if link is not None else EventLink()
        self.precise = precise
        self.engine_config = engine
        self.ids = [EndpointId(f"e{i}") for i in range(endpoints)]
        self._index = {eid: i for i, eid in enumerate(self.ids)}
        self.engines = [Engine(engine, cost, record_events=kv_events) for _ in self.ids]
        self.retired: list[Engine] = []  # engines a restart replaced (their counters count)
        self.event_stats = EventStats()
        self._loss_rng = random.Random(seed)
        self._restarts = sorted(restarts, key=lambda r: r.at_s)
        self._down = [False] * endpoints
        self._incarnation = [0] * endpoints  # bumped by a crash: stale step ends are ignored
        self._pub_seq = [0] * endpoints  # the engine's next batch number
        self._expect = [0] * endpoints  # the receiver's next expected batch number
        self._lost: list[dict[int, tuple[list[int], list[int]]]] = [{} for _ in self.ids]
        self._held: list[dict[int, int]] = [{} for _ in self.ids]  # hash -> stores not removed
        self._where: dict[int, tuple[int, SeqHandle | None]] = {}  # id(sim) -> engine, handle
        self.outcomes = Outcomes()
        self.events = 0
        self.load_t: list[float] = []
        self.load: list[list[int]] = [[] for _ in self.ids]
        self._heap: list[tuple[float, int, int, object]] = []
        self._tie = itertools.count()
        self._pending: dict[int, tuple[SimRequest, Decision, int]] = {}  # and its replica
        self._deferred: dict[int, SimRequest] = {}  # id(request) -> waiting in admission
        self._snapshots: list[EndpointState] = []
        self._refresh(0.0)
        if precise:
            for replica in replicas:
                for eid in self.ids:
                    replica.observe(ModeChanged(eid, True))

    @property
    def all_engines(self) -> list[Engine]:
        """Every engine of the run: those running at the end, then those restarts replaced."""
        return [*self.engines, *self.retired]

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
        for r in self._restarts:
            if r.at_s <= self.duration_s:
                self._push(r.at_s, _CRASH, r)
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
            elif kind == _EVENTS:
                i, seq, stored, removed = cast(tuple[int, int, list[int], list[int]], payload)
                self._receive(i, seq, stored, removed, t)
            elif kind == _CRASH:
                busy += self._crash(payload, t)  # type: ignore[arg-type]
            elif kind == _RECOVER:
                self._recover(payload, t)  # type: ignore[arg-type]
            elif kind == _SHARE:
                self._apply_decision(*cast(_DecisionRecord, payload), t)
            elif kind == _CONFIRM:
                self._apply_completion(*cast(tuple[int, EndpointId, Sequence[int], bool], payload))
            elif kind == _PEER:
                self._apply_load(*cast(tuple[int, EndpointId, int, int], payload))
            elif kind == _LEARN:
                self._apply_learning(*cast(_LearnRecord, payload))
            else:
                self._refresh(t)
                self._push(t + self.metrics_interval_s, _REFRESH, None)
                if self._deferred:  # deadlines fire even when nothing completes
                    busy += self._release(t)
                if progress is not None and self.events % 64 == 0:
                    progress(t)
        for sim, decision, k in self._pending.values():  # still unfinished: timed out
            served = self._where[id(sim)][0]
            self._settle(k, decision, Usage(ok=False), t, served_by=self.ids[served])
            self.outcomes.add(sim, endpoint=served, status=504)
        self._where.clear()
        self._pending.clear()
        for router in self.replicas:
            if not self._deferred:
                break
            # still waiting for admission: let every deadline pass
            for request, outcome in router.release(self._snapshots, math.inf):
                sim = self._deferred.pop(id(request))
                if isinstance(outcome, Rejection):
                    self.outcomes.add(
                        sim, endpoint=-1, status=outcome.status, retry_after_s=outcome.retry_after_s
                    )
                else:  # routed at the very end: it can no longer run
                    router.on_complete(outcome, Usage(ok=False), t)
                    self.outcomes.add(sim, endpoint=self._index[outcome.endpoint], status=504)
        for sim in self._deferred.values():  # never answered by the policy
            self.outcomes.add(sim, endpoint=-1, status=504)
        self._deferred.clear()
        return self.outcomes

    def _arrive(self, sim: SimRequest, t: float) -> int:
        k = self._balancer.pick(sim.request)
        self.replica_requests[k] += 1
        if self._peers_stale[k]:
            self._sync_peers(k)
        decision = self.replicas[k].route(sim.request, self._snapshots, t)
        if isinstance(decision, Deferral):
            self._deferred[id(sim.request)] = sim
            return 0
        return self._dispatch(sim, decision, t, k)

    def _release(self, t: float) -> int:
        """Hand deferred requests the routers let go to their engines (or their rejections)."""
        added = 0
        for k, router in enumerate(self.replicas):
            if self._peers_stale[k]:
                self._sync_peers(k)
            for request, outcome in router.release(self._snapshots, t):
                added += self._dispatch(self._deferred.pop(id(request)), outcome, t, k)
        return added

    def _dispatch(self, sim: SimRequest, decision: Decision | Rejection, t: float, k: int) -> int:
        """Send `sim` where replica `k` decided (or answer its rejection); the events added."""
        if isinstance(decision, Rejection):
            self.outcomes.add(
                sim, endpoint=-1, status=decision.status, retry_after_s=decision.retry_after_s
            )
            return self._follow(sim, t, ok=False)
        if self._share_decisions:
            self._decided(k, decision, t)
        i = self._index[decision.endpoint]
        if not self.engines[i].fits(sim):
            self._settle(k, decision, Usage(ok=False), t)
            self.outcomes.add(sim, endpoint=i, status=400)
            return self._follow(sim, t, ok=False)
        self._pending[id(sim)] = (sim, decision, k)
        self._where[id(sim)] = (i, None)
        self._push(t + self.cost.frontend_latency_s, _DELIVER, (i, sim, decision))
        return 1

    def _deliver(self, payload: tuple[int, SimRequest, Decision], t: float) -> int:
        i, sim, decision = payload
        if self._down[i]:  # connection refused: the gateway tries the next endpoint
            return self._fall_back(sim, decision, i, t)
        engine = self.engines[i]
        handle = engine.add(sim, self._engine_keys(sim, decision), t)
        self._where[id(sim)] = (i, handle)
        if engine.busy:
            return 0
        return self._begin(i, t)

    def _begin(self, i: int, t: float) -> int:
        engine = self.engines[i]
        dt = engine.begin_step(t)
        if self.kv_events:
            self._forward_events(i, t)
        if dt is None:
            return 0
        self._push(t + dt, _STEP_END, (i, self._incarnation[i]))
        return 1

    def _step_end(self, payload: tuple[int, int], t: float) -> int:
        i, incarnation = payload
        if incarnation != self._incarnation[i]:
            return 0  # the engine died during the step
        engine = self.engines[i]
        done = engine.end_step(t)
        if self.kv_events:
            self._forward_events(i, t)
        added = 0
        for c in done:
            sim, decision, k = self._pending.pop(id(c.sim))
            del self._where[id(c.sim)]
            usage = Usage(
                prompt_tokens=c.prompt_tokens,
                cached_tokens=c.cached_tokens,
                completion_tokens=c.output_tokens,
                ttft_s=c.first_token_s - sim.arrival_s,
                e2e_s=c.finished_s - sim.arrival_s,
            )
            self._settle(k, decision, usage, t, served_by=self.ids[i])
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

    # -- replicas ----------------------------------------------------------------------

    def _settle(
        self,
        k: int,
        decision: Decision,
        usage: Usage,
        t: float,
        *,
        served_by: EndpointId | None = None,
    ) -> None:
        """Replica `k`'s `on_complete` for its `decision`, and what its peers learn of it.

        They learn that its in-flight count went down and, with `completions`
        carried, what the deciding router's `on_complete` does to its index
        (approximate mode): a successful request's blocks confirmed where it
        was served, or inserted as confirmed when it was served elsewhere or
        outlived the speculative TTL.
        """
        router = self.replicas[k]
        router.on_complete(decision, usage, t, served_by=served_by)
        if not self._share_decisions:
            return
        self._load_delta(k, decision.endpoint, -1, -decision.load_tokens, t)
        sample = router.latency_sample(decision, usage, t, served_by=served_by)
        if self._carry_latency and sample is not None and decision.latency is not None:
            learn: _LearnRecord = (k, decision.endpoint, decision.latency, *sample)
            if self._share_delay:
                self._push(t + self._share_delay, _LEARN, learn)
            else:
                self._apply_learning(*learn)
        served = served_by or decision.endpoint
        if (
            not (usage.ok and self._carry_completions and router.confirm_on_complete)
            or router.is_precise(served)
            or not decision.block_keys
        ):
            return
        late = served != decision.endpoint or t - decision.decided_at >= router.speculative_ttl_s
        record = (k, served, decision.block_keys, late)
        if self._share_delay:
            self._push(t + self._share_delay, _CONFIRM, record)
        else:
            self._apply_completion(*record)

    def _decided(self, k: int, decision: Decision, t: float) -> None:
        """Share replica `k`'s new `decision`: its speculative blocks and its in-flight count.

        With `cold` carried, whether it was a cold placement (no endpoint
        matched any block: the router's `note_cold`); with `sessions`, its
        session binding.
        """
        self._load_delta(k, decision.endpoint, 1, decision.load_tokens, t)
        request = decision.request
        record = (
            k,
            decision.endpoint,
            decision.block_keys,
            self.replicas[k].speculative_ttl_s,
            t if self._carry_cold and not decision.matches else None,
            None
            if request.session is None or not self._carry_sessions
            else (request.tenant, request.session),
            decision.prompt_tokens - decision.predicted_cached_tokens
            if self._carry_latency
            else None,
        )
        if self._share_delay:
            self._push(t + self._share_delay, _SHARE, record)
        else:
            self._apply_decision(*record, t)

    def _apply_decision(
        self,
        k: int,
        endpoint: EndpointId,
        keys: Sequence[int],
        ttl: float,
        cold_at: float | None,
        session: tuple[str, str] | None,
        uncached: int | None,
        t: float,
    ) -> None:
        """A decision record of replica `k` reaches the others at `t`.

        Applied as the deciding router recorded it (`Router._route_admitted`):
        its blocks speculative on `endpoint` until `t + ttl`, so a peer's next
        request with that prefix follows it; the cold placement (`cold_at`,
        kept only when later than the peer's own) and the session binding.
        O(replicas x blocks).
        """
        until = t + ttl
        for j, router in enumerate(self.replicas):
            if j == k:
                continue
            if keys:
                router.index.insert(endpoint, keys, speculative_until=until)
            load = router.load
            if cold_at is not None:
                last = load.last_cold(endpoint)
                if last is None or last < cold_at:
                    load.note_cold(endpoint, cold_at)
            if session is not None:
                load.bind_session(session, endpoint)
            if uncached is not None:  # `latency` carried: its prefill joins the backlog
                router.latency.push_backlog(endpoint, uncached, t)

    def _apply_learning(
        self,
        k: int,
        endpoint: EndpointId,
        note: LatencyNote,
        ttft_s: float | None,
        tpot_s: float | None,
    ) -> None:
        """Replica `k`'s latency sample reaches the others' models (`latency` carried)."""
        for j, router in enumerate(self.replicas):
            if j != k:
                router.latency.on_complete(endpoint, note, ttft_s=ttft_s, tpot_s=tpot_s)

    def _apply_completion(
        self, k: int, served: EndpointId, keys: Sequence[int], late: bool
    ) -> None:
        """Replica `k`'s completion record reaches the others: as its own `on_complete` did."""
        for j, router in enumerate(self.replicas):
            if j == k:
                continue
            if late:
                router.index.insert(served, keys)
            else:
                router.index.confirm(served, keys)

    def _load_delta(
        self, k: int, endpoint: EndpointId, requests: int, tokens: int, t: float
    ) -> None:
        """Replica `k`'s in-flight count on `endpoint` changed; the others see it `delay_s` on."""
        if self._share_delay:
            self._push(t + self._share_delay, _PEER, (k, endpoint, requests, tokens))
        else:
            self._apply_load(k, endpoint, requests, tokens)

    def _apply_load(self, k: int, endpoint: EndpointId, requests: int, tokens: int) -> None:
        """Apply one change of replica `k`'s shared contribution; the others resync lazily. O(R)."""
        contrib = self._contrib[k]
        c = contrib.get(endpoint)
        if c is None:
            c = contrib[endpoint] = [0, 0]
        c[0] += requests
        c[1] += tokens
        if c[0] <= 0:
            del contrib[endpoint]
        stale = self._peers_stale
        for j in range(len(stale)):
            if j != k:
                stale[j] = True

    def _sync_peers(self, j: int) -> None:
        """Give replica `j` the sum of the others' contributions (`LoadTracker.set_peers`)."""
        requests: dict[EndpointId, int] = {}
        tokens: dict[EndpointId, int] = {}
        for k, contrib in enumerate(self._contrib):
            if k == j:
                continue
            for eid, (n, w) in contrib.items():
                requests[eid] = requests.get(eid, 0) + n
                tokens[eid] = tokens.get(eid, 0) + w
        self.replicas[j].load.set_peers(requests, tokens)
        self._peers_stale[j] = False

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
            snaps.append(self._snapshot(i, eid, e, t))
            if sample:
                self.load[i].append(e.running + e.waiting)
        self._snapshots = snaps

    def _snapshot(self, i: int, eid: EndpointId, e: Engine, t: float) -> EndpointState:
        down = self._down[i]
        return EndpointState(
            id=eid,
            address=f"10.0.{i // 250}.{i % 250 + 1}:8000",
            waiting=0 if down else e.waiting,
            running=0 if down else e.running,
            kv_usage=0.0 if down else e.kv_usage,
            kv_capacity_blocks=e.config.num_blocks,
            block_size=e.config.block_size,
            healthy=not down,
            observed_at=t,
        )

    # -- restarts -------------------------------------------------------------------

    def _crash(self, r: Restart, t: float) -> int:
        """Engine `r.endpoint` dies: its requests fail or move on. Returns the events added."""
        i = r.endpoint
        if self._down[i]:  # a restart while down changes nothing
            return 0
        self.event_stats.restarts += 1
        self._down[i] = True
        self._incarnation[i] += 1
        self._snapshots = [
            self._snapshot(k, s.id, self.engines[k], t) if k == i else s
            for k, s in enumerate(self._snapshots)
        ]
        self._push(t + r.down_s, _RECOVER, i)
        added = 0
        for key in [k for k, (where, _) in self._where.items() if where == i]:
            handle = self._where[key][1]
            if handle is None:
                continue  # still on its way: refused on delivery, then falls back
            sim, decision, k = self._pending[key]
            if self.engines[i].first_token_s(handle) is not None:  # streaming had begun
                del self._pending[key]
                del self._where[key]
                self._settle(k, decision, Usage(ok=False), t, served_by=self.ids[i])
                self.outcomes.add(sim, endpoint=i, status=502)
                self.event_stats.failed += 1
                added += self._follow(sim, t, ok=False)
            else:
                added += self._fall_back(sim, decision, i, t)
        return added

    def _recover(self, i: int, t: float) -> None:
        """Engine `i` is back with an empty cache; the next scrape sees it healthy.

        The router is told (`AllBlocksCleared`) now rather than at that scrape:
        nothing reaches the engine before it, and a batch of the new engine's
        events arriving first would otherwise be cleared with the old blocks.
        """
        self.retired.append(self.engines[i])
        self.engines[i] = Engine(self.engine_config, self.cost, record_events=self.kv_events)
        self._down[i] = False
        self._pub_seq[i] = 0  # a new process numbers its batches from 0 again
        self._lost[i].clear()
        self._clear(i)

    def _fall_back(self, sim: SimRequest, decision: Decision, failed: int, t: float) -> int:
        """Send `sim`, refused by engine `failed`, to the decision's next fallback that is up."""
        order = [self._index[e] for e in (decision.endpoint, *decision.fallbacks)]
        after = order[order.index(failed) + 1 :] if failed in order else order
        for j in after:
            if not self._down[j] and self.engines[j].fits(sim):
                self.event_stats.retried += 1
                self._where[id(sim)] = (j, None)
                self._push(t + self.cost.frontend_latency_s, _DELIVER, (j, sim, decision))
                return 1
        k = self._pending.pop(id(sim))[2]
        del self._where[id(sim)]
        self._settle(k, decision, Usage(ok=False), t, served_by=self.ids[failed])
        self.outcomes.add(sim, endpoint=failed, status=503)
        self.event_stats.failed += 1
        return self._follow(sim, t, ok=False)

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

    # -- KV events ------------------------------------------------------------------

    def _forward_events(self, i: int, t: float) -> None:
        """Publish engine `i`'s events since the last step as one numbered batch."""
        stored, removed = self.engines[i].drain_events()
        if not (stored or removed):
            return
        seq = self._pub_seq[i]
        self._pub_seq[i] = seq + 1
        stats = self.event_stats
        stats.batches += 1
        link = self.link
        if link.loss and self._loss_rng.random() < link.loss:
            stats.lost += 1
            if link.replay:
                lost = self._lost[i]
                lost[seq] = (stored, removed)
                if len(lost) > REPLAY_BUFFER_STEPS:  # fell out of the engine's ring buffer
                    del lost[next(iter(lost))]
            return
        if link.delay_s:
            self._push(t + link.delay_s, _EVENTS, (i, seq, stored, removed))
        else:
            self._receive(i, seq, stored, removed, t)

    def _receive(self, i: int, seq: int, stored: list[int], removed: list[int], t: float) -> None:
        """Apply batch `seq` of engine `i` as the events driver would (module docstring)."""
        expect = self._expect[i]
        if seq < expect:  # numbering started again: a restarted engine
            self._clear(i)
        elif seq > expect:
            self.event_stats.gaps += 1
            lost = self._lost[i]
            if self.link.replay and all(k in lost for k in range(expect, seq)):
                for k in range(expect, seq):
                    self._apply(i, *lost.pop(k))
                    self.event_stats.replayed += 1
            elif self.link.on_gap == "clear":
                self._clear(i)
        self._expect[i] = seq + 1
        self._apply(i, stored, removed)

    def _apply(self, i: int, stored: list[int], removed: list[int]) -> None:
        """Hand one batch to the router: removals, then stores, counted per hash."""
        eid = self.ids[i]
        held = self._held[i]
        gone = []
        for k in removed:
            n = held.get(k, 0)
            if n > 1:
                held[k] = n - 1
            else:
                held.pop(k, None)
                gone.append(k)
        if gone:
            event: BlockRemoved | BlockStored = BlockRemoved(eid, gone)
            for router in self.replicas:
                router.observe(event)
        new = []
        for k in stored:
            n = held.get(k, 0)
            held[k] = n + 1
            if not n:
                new.append(k)
        if new:
            event = BlockStored(eid, new)
            for router in self.replicas:
                router.observe(event)

    def _clear(self, i: int) -> None:
        """Forget what engine `i` holds: at the router and in the receiver's counts."""
        self.event_stats.cleared += 1
        self._held[i].clear()
        event = AllBlocksCleared(self.ids[i])
        for router in self.replicas:
            router.observe(event)
