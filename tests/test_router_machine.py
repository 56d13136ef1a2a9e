"""A hypothesis state machine for `Router`: route, release, complete, observe, remove.

The machine keeps the model a driver has: the endpoint pool it passes to the
router, the decisions still open (routed, not yet completed), the requests
deferred and not yet answered, and which endpoints it removed. After every
step it checks that the router agrees:

- in-flight requests and tokens per endpoint are exactly the open decisions
  made on it since it last joined (a decision whose endpoint was removed
  afterwards counts nowhere, and its completion settles nothing);
- the ledger's in-flight count per tenant is every open decision's, removed
  endpoints or not (the tenant is still waiting for its answer);
- a removed endpoint holds nothing in the index and no load until a driver
  passes it to the router again;
- every deferred request is answered by `release` exactly once, by its
  deadline at the latest, and the fair queue holds exactly the unanswered ones;
- the index, ledger, load tracker and fair queue pass `check_invariants()`;
- the counters add up;
- misuse changes nothing: settling a decision a second time, settling a
  decision another router made, or passing a non-finite `now` raises (a
  `SettlementError`, a `ValueError`), and the engine's absurd cached-token
  reports (up to 10**12) are clamped, so no hit rate exceeds 1.

Two configurations, one machine each: the default admission (admits all),
and a chain of a per-tenant concurrency cap before a fair queue with one
slot per endpoint, so requests are rejected (429 `concurrency`, `queue-full`,
503 `deadline`), deferred and released.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from prefixroute import (
    AdmissionChain,
    AllBlocksCleared,
    Blocker,
    BlockRemoved,
    BlockStored,
    ConcurrencyAdmission,
    Decision,
    Deferral,
    EndpointRemoved,
    EndpointState,
    FairQueueAdmission,
    ModeChanged,
    PrefixIndex,
    Rejection,
    Request,
    Router,
    SettlementError,
    Tier,
    Usage,
)
from prefixroute.endpoint import EndpointId
from tests.helpers import endpoint
from tests.strategies import chains, token_prompts

ENDPOINTS = tuple(EndpointId(f"e{i}") for i in range(4))
TENANTS = ("t0", "t1", "t2")
BLOCK = 4  # tokens per block, small so short prompts make chains
TTL = 3.0  # the router's speculative TTL, short so completions outlive it


def note(what: str) -> None:
    """Count `what` in hypothesis' statistics (`--hypothesis-show-statistics`)."""
    with contextlib.suppress(InvalidArgument):  # InvalidArgument: a scripted run
        event(what)


def fair_queue(router: Router) -> FairQueueAdmission | None:
    admission = router.admission
    if isinstance(admission, FairQueueAdmission):
        return admission
    if isinstance(admission, AdmissionChain):
        for policy in admission.policies:
            if isinstance(policy, FairQueueAdmission):
                return policy
    return None


def build(config: str) -> Router:
    admission = None
    if config == "fair-queue":
        admission = AdmissionChain(
            (
                ConcurrencyAdmission(max_in_flight=2),
                FairQueueAdmission(
                    max_in_flight_per_endpoint=1,
                    max_in_flight_per_tenant=2,
                    max_queue=5,
                    max_queue_per_tenant=3,
                    max_wait_s=3.0,
                ),
            )
        )
    return Router(
        blocker=Blocker(block_size=BLOCK, seed=7),
        index=PrefixIndex(default_capacity_blocks=6),
        admission=admission,
        speculative_ttl_s=TTL,
        engine_block_size=BLOCK,
    )


class RouterMachine(RuleBasedStateMachine):
    """The default admission: every request is routed or rejected at once."""

    CONFIG = "plain"

    def __init__(self) -> None:
        super().__init__()
        self.router = build("plain")
        self.now = 0.0
        self.pool: dict[EndpointId, EndpointState] = {}
        self.open: list[tuple[Decision, int]] = []  # (decision, generation of its endpoint)
        self.generation: Counter[EndpointId] = Counter()  # bumped on every removal
        self.removed: set[EndpointId] = set()  # removed and not passed to the router since
        self.deferred: dict[str, tuple[Request, float]] = {}  # request id -> (request, deadline)
        self.sent = 0
        self.decisions = 0
        self.rejections = 0
        self.deferrals = 0
        self.completions = 0
        self.kinds: Counter[str] = Counter()
        self.settled: list[Decision] = []  # a few decisions already settled, to settle again
        self.stranger = build("plain")  # another router, whose decisions are foreign here

    @initialize(n=st.integers(1, 3))
    def start(self, n: int) -> None:
        self.router = build(self.CONFIG)
        for i in range(n):
            self.pool[ENDPOINTS[i]] = endpoint(i, kv_capacity_blocks=8)

    # -- the pool ------------------------------------------------------------------

    @rule(
        i=st.integers(0, len(ENDPOINTS) - 1),
        capacity=st.sampled_from([None, 2, 5, 8]),
        healthy=st.booleans(),
        waiting=st.integers(0, 3),
    )
    def join(self, i: int, capacity: int | None, healthy: bool, waiting: int) -> None:
        """An endpoint joins the pool, or its state changes (capacity, health, queue)."""
        self.pool[ENDPOINTS[i]] = endpoint(
            i,
            kv_capacity_blocks=capacity,
            healthy=healthy,
            waiting=waiting,
            observed_at=self.now,
        )

    @rule(e=st.sampled_from(ENDPOINTS))
    def remove(self, e: EndpointId) -> None:
        """`EndpointRemoved`: the endpoint leaves (whether the pool still listed it or not)."""
        self.pool.pop(e, None)
        self.router.observe(EndpointRemoved(e))
        self.generation[e] += 1
        self.removed.add(e)

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data())
    def remove_busy(self, data: st.DataObject) -> None:
        """`EndpointRemoved` for an endpoint with requests in flight (a pod dies mid-request)."""
        decision, _ = data.draw(st.sampled_from(self.open))
        self.remove(decision.endpoint)

    @precondition(lambda self: bool(self.pool))
    @rule(data=st.data())
    def vanish(self, data: st.DataObject) -> None:
        """The pool drops an endpoint without an event: its open decisions still count."""
        e = data.draw(st.sampled_from(sorted(self.pool)))
        del self.pool[e]

    def endpoints(self) -> list[EndpointState]:
        self.removed -= set(self.pool)  # passing an id to the router makes it live again
        return list(self.pool.values())

    # -- requests ------------------------------------------------------------------

    @rule(
        burst=st.lists(
            st.tuples(
                st.sampled_from(TENANTS),
                token_prompts(),
                st.none() | st.sampled_from(["s0", "s1"]),
                st.none() | st.integers(0, 20),
            ),
            min_size=1,
            max_size=3,
        )
    )
    def route(self, burst: list[tuple[str, tuple[int, ...], str | None, int | None]]) -> None:
        """Requests arrive (up to three at the same instant)."""
        for tenant, tokens, session, max_tokens in burst:
            self.send(tenant, tokens, session, max_tokens)

    def send(
        self, tenant: str, tokens: tuple[int, ...], session: str | None, max_tokens: int | None
    ) -> None:
        self.sent += 1
        request = Request(
            model="m",
            token_ids=tokens,
            tenant=tenant,
            session=session,
            max_tokens=max_tokens,
            request_id=f"r{self.sent}",
        )
        endpoints = self.endpoints()
        outcome = self.router.route(request, endpoints, self.now)
        if isinstance(outcome, Deferral):
            self.deferrals += 1
            note("deferred")
            assert outcome.deadline > self.now
            self.deferred[f"r{self.sent}"] = (request, outcome.deadline)
        else:
            self.settle(request, outcome, endpoints)

    def settle(
        self, request: Request, outcome: Decision | Rejection, endpoints: list[EndpointState]
    ) -> None:
        """Check and record a routed request's answer (from `route` or `release`)."""
        if isinstance(outcome, Rejection):
            self.rejections += 1
            self.kinds[outcome.kind] += 1
            note(f"rejected: {outcome.kind}")
            return
        ids = {e.id for e in endpoints}
        assert outcome.request is request
        assert outcome.endpoint in outcome.candidates
        assert set(outcome.candidates) <= ids
        assert outcome.endpoint not in outcome.fallbacks
        assert set(outcome.fallbacks) <= set(outcome.candidates)
        assert len(set(outcome.fallbacks)) == len(outcome.fallbacks)
        assert (
            0 <= outcome.matched_blocks <= outcome.total_blocks == len(tokens_of(request)) // BLOCK
        )
        assert 0 <= outcome.predicted_cached_tokens <= outcome.prompt_tokens
        assert outcome.load_tokens >= 0
        self.decisions += 1
        self.open.append((outcome, self.generation[outcome.endpoint]))

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.5]))
    def release(self, dt: float) -> None:
        """Time passes, then the driver asks for released requests (capacity freed or a tick)."""
        self.now += dt
        endpoints = self.endpoints()
        released = self.router.release(endpoints, self.now)
        seen: set[str] = set()
        for request, outcome in released:
            rid = request.request_id
            assert rid is not None and rid in self.deferred and rid not in seen, rid
            assert self.deferred[rid][0] is request
            seen.add(rid)
            del self.deferred[rid]
            note(f"released: {type(outcome).__name__}")
            self.settle(request, outcome, endpoints)
        overdue = [rid for rid, (_, deadline) in self.deferred.items() if deadline <= self.now]
        assert not overdue, f"deferred past their deadline and not answered: {overdue}"

    @precondition(lambda self: bool(self.open))
    @rule(
        data=st.data(),
        ok=st.booleans(),
        cached=st.integers(0, 12) | st.sampled_from([13, 10**6, 10**12]),
        completion=st.integers(0, 20),
        dt=st.sampled_from([0.0, 0.5, 3.5]),
        then_release=st.booleans(),
    )
    def complete(
        self,
        data: st.DataObject,
        ok: bool,
        cached: int,
        completion: int,
        dt: float,
        then_release: bool,
    ) -> None:
        """A request ends: the driver reports usage (sometimes served by a fallback),
        and may ask for deferred requests at once, since a slot just freed."""
        k = data.draw(st.integers(0, len(self.open) - 1))
        decision, gen = self.open.pop(k)
        served = data.draw(st.none() | st.sampled_from(ENDPOINTS))
        self.now += dt
        usage = Usage(
            prompt_tokens=data.draw(st.sampled_from([decision.prompt_tokens, 0])),
            cached_tokens=cached,  # the router clamps it to the prompt
            completion_tokens=completion,
            ok=ok,
        )
        self.finish(decision, gen, usage, served)
        if then_release:
            self.release(0.0)

    def finish(self, decision: Decision, gen: int, usage: Usage, served: EndpointId | None) -> None:
        self.router.on_complete(decision, usage, self.now, served_by=served)
        self.completions += 1
        self.settled = [*self.settled[-4:], decision]
        if self.generation[decision.endpoint] != gen:
            note("completed after its endpoint was removed")

    # -- misuse ----------------------------------------------------------------------

    @precondition(lambda self: bool(self.settled))
    @rule(data=st.data(), ok=st.booleans())
    def settle_twice(self, data: st.DataObject, ok: bool) -> None:
        """A driver bug: `on_complete` again for a decision already settled."""
        decision = data.draw(st.sampled_from(self.settled))
        try:
            self.router.on_complete(decision, Usage(cached_tokens=3, ok=ok), self.now)
        except SettlementError as exc:
            assert exc.kind == "settled"
            note("misuse: settled twice")
        else:
            raise AssertionError("a second on_complete was accepted")

    @rule(tokens=token_prompts(), served=st.none() | st.sampled_from(ENDPOINTS))
    def settle_foreign(self, tokens: tuple[int, ...], served: EndpointId | None) -> None:
        """A driver bug: settling a decision another router made (same ids, same serials)."""
        request = Request(model="m", token_ids=tokens, tenant=TENANTS[0])
        foreign = self.stranger.route(request, [endpoint(0), endpoint(1)], self.now)
        assert isinstance(foreign, Decision)
        try:
            self.router.on_complete(
                foreign, Usage(cached_tokens=10**12), self.now, served_by=served
            )
        except SettlementError as exc:
            assert exc.kind == "foreign"
            note("misuse: settled a foreign decision")
        else:
            raise AssertionError("a foreign decision was settled")
        self.stranger.on_complete(foreign, Usage(), self.now)

    @rule(now=st.sampled_from([math.nan, math.inf, -math.inf]), data=st.data())
    def non_finite_now(self, now: float, data: st.DataObject) -> None:
        """A driver bug: a broken clock. `route`, `release` and `on_complete` refuse it."""
        request = Request(model="m", token_ids=(1, 2, 3, 4, 5), tenant=TENANTS[1])
        calls = [lambda: self.router.route(request, self.endpoints(), now)]
        if fair_queue(self.router) is not None:
            calls.append(lambda: self.router.release(self.endpoints(), now))
        if self.open:
            decision, _ = data.draw(st.sampled_from(self.open))
            calls.append(lambda: self.router.on_complete(decision, Usage(), now))
        for call in calls:
            try:
                call()
            except ValueError as exc:
                assert "now must be a finite" in str(exc)
            else:
                raise AssertionError("a non-finite now was accepted")

    # -- engine events -------------------------------------------------------------

    @rule(
        e=st.sampled_from(ENDPOINTS),
        kind=st.sampled_from(["stored", "removed", "cleared"]),
        keys=chains(),
        tier=st.none() | st.sampled_from(Tier),
    )
    def engine_event(self, e: EndpointId, kind: str, keys: list[int], tier: Tier | None) -> None:
        """An engine's KV event: blocks stored or removed, or its cache cleared."""
        if kind == "stored":
            self.router.observe(BlockStored(e, keys, tier or Tier.GPU))
        elif kind == "removed":
            self.router.observe(BlockRemoved(e, keys, tier))
        else:
            self.router.observe(AllBlocksCleared(e))

    @rule(e=st.sampled_from(ENDPOINTS), precise=st.booleans())
    def mode_changed(self, e: EndpointId, precise: bool) -> None:
        """A driver switches an endpoint between precise (events) and approximate mode."""
        self.router.observe(ModeChanged(e, precise))
        assert self.router.is_precise(e) == precise

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data())
    def stored_decided_blocks(self, data: st.DataObject) -> None:
        """An engine confirms the blocks of a decision the router made (as vLLM would)."""
        decision, _ = data.draw(st.sampled_from(self.open))
        e = data.draw(st.sampled_from([decision.endpoint, *decision.fallbacks]))
        self.router.observe(BlockStored(e, decision.block_keys))

    # -- invariants ----------------------------------------------------------------

    @invariant()
    def structures_are_consistent(self) -> None:
        router = self.router
        router.index.check_invariants()
        router.ledger.check_invariants()
        router.load.check_invariants()
        fq = fair_queue(router)
        if fq is not None:
            fq.check_invariants()

    @invariant()
    def in_flight_equals_open_decisions_on_live_endpoints(self) -> None:
        requests: Counter[EndpointId] = Counter()
        tokens: Counter[EndpointId] = Counter()
        for decision, gen in self.open:
            if gen == self.generation[decision.endpoint]:
                requests[decision.endpoint] += 1
                tokens[decision.endpoint] += decision.load_tokens
        load = self.router.load
        for e in ENDPOINTS:
            assert load.requests(e) == requests[e], (e, load.requests(e), requests[e])
            assert load.tokens(e) == tokens[e], (e, load.tokens(e), tokens[e])
        assert load.in_flight() == sum(requests.values())

    @invariant()
    def ledger_counts_every_open_decision(self) -> None:
        per_tenant = Counter(d.request.tenant for d, _ in self.open)
        ledger = self.router.ledger
        for t in TENANTS:
            assert ledger.in_flight(t) == per_tenant[t]
        assert ledger.total_in_flight() == len(self.open)

    @invariant()
    def open_decisions_are_the_drivers(self) -> None:
        assert self.router.open_decisions == len(self.open)

    @invariant()
    def hit_rates_stay_within_one(self) -> None:
        snap = self.router.ledger.snapshot()
        for row in (*snap.tenants, snap.other, snap.total):
            assert row.cached_tokens <= row.completed_prompt_tokens, row
        c = self.router.counters
        assert c.actual_cached_tokens <= c.prompt_tokens  # the driver reports the decided prompt

    @invariant()
    def removed_endpoints_hold_nothing(self) -> None:
        for e in self.removed:
            assert self.router.index.size(e) == 0, e
            assert self.router.load.requests(e) == 0, e

    @invariant()
    def the_queue_holds_exactly_the_unanswered(self) -> None:
        fq = fair_queue(self.router)
        assert (fq.queued if fq is not None else 0) == len(self.deferred)

    @invariant()
    def counters_add_up(self) -> None:
        c = self.router.counters
        assert (c.decisions, c.rejections, c.deferrals, c.completions) == (
            self.decisions,
            self.rejections,
            self.deferrals,
            self.completions,
        )
        answered = self.decisions + self.rejections
        assert answered + len(self.deferred) == self.sent

    def teardown(self) -> None:
        # Every deferred request is answered once its deadline has passed.
        if self.deferred:
            self.release(max(d for _, d in self.deferred.values()) - self.now)
            assert not self.deferred


def tokens_of(request: Request) -> tuple[int, ...]:
    assert request.token_ids is not None
    return tuple(request.token_ids.tolist())


class FairQueueRouterMachine(RouterMachine):
    """A concurrency cap, then a fair queue with one slot per endpoint: defers and rejects."""

    CONFIG = "fair-queue"


TestRouterMachine = RouterMachine.TestCase
TestRouterMachine.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
TestFairQueueRouterMachine = FairQueueRouterMachine.TestCase
TestFairQueueRouterMachine.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None
)


def test_the_fair_queue_configuration_defers_releases_and_rejects() -> None:
    """A scripted run of the machine: deferral, release, and each kind of rejection."""
    m = FairQueueRouterMachine()
    m.start(2)  # two endpoints, one slot each
    for n, tenant in enumerate(["t0", "t0", "t0", "t1", "t1", "t2", "t2", "t1", "t2"]):
        m.send(tenant, (*range(100, 108), n), None, 4)
    assert (m.decisions, m.deferrals) == (2, 5)
    assert m.kinds == {"concurrency": 1, "queue-full": 1}  # t0's cap is 2, the queue holds 5
    m.structures_are_consistent()
    decision, gen = m.open.pop(0)
    m.finish(decision, gen, Usage(prompt_tokens=9, completion_tokens=4), None)
    m.release(0.0)
    assert [d.request.tenant for d, _ in m.open] == ["t0", "t1"]  # one slot freed: t1's turn
    m.release(5.0)
    assert not m.deferred and m.kinds["deadline"] == 4
    m.in_flight_equals_open_decisions_on_live_endpoints()
    m.ledger_counts_every_open_decision()
    m.the_queue_holds_exactly_the_unanswered()
    m.counters_add_up()
