"""The router: admission -> filters -> prefix match -> scorers -> picker -> record.

`Router` is the pure core every driver embeds (gateway, ext_proc server,
simulator). It reads no clock, does no I/O and starts no thread: `now` is an
argument and randomness comes from the `random.Random` it was built with, so
the same inputs give the same decisions in every driver.

Per request the router works on an `EndpointTable` (the endpoints in numpy
columns), rebuilt only when the endpoints passed to `route` change (a new
list, or new snapshots in it), so that when every plugin of the profile has
the array capabilities (every built-in does) filtering, scoring and picking
are a few vectorised operations instead of Python loops over the endpoints;
its in-flight columns mirror the router's `LoadTracker` as it changes. The
block keys stay a uint64 array (the pure `PrefixIndex` gets them as one list,
converted once per call). Decisions are the same bit for bit as the
one-method protocols give (tests/test_profile_rows.py, and the simulator's
figures: docs/performance.md).
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import attrs
import numpy as np
import numpy.typing as npt

from prefixroute.admission import AlwaysAdmit
from prefixroute.blocks import Blocker, HashMode
from prefixroute.calibration import CharsPerToken
from prefixroute.compiled_index import Index, make_index
from prefixroute.decision import CandidateIds, Decision, Deferral, Rejection
from prefixroute.endpoint import EndpointId, EndpointState, EndpointTable
from prefixroute.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EndpointRemoved,
    IndexEvent,
    ModeChanged,
)
from prefixroute.filters import (
    HealthyFilter,
    HotSpotFilter,
    ModelFilter,
    RoleFilter,
    StaleMetricsFilter,
)
from prefixroute.index import PrefixIndex
from prefixroute.latency import NO_OBJECTIVES, LatencyModel, ObjectivePolicy, Objectives
from prefixroute.ledger import TenantLedger
from prefixroute.load import LoadTracker
from prefixroute.pickers import MaxScorePicker
from prefixroute.plugins import (
    AdmissionContext,
    AdmissionPolicy,
    CompletionListener,
    Deferring,
    RouteContext,
)
from prefixroute.predictive import PredictedLatencyScorer, SloFilter
from prefixroute.profile import Profile, WeightedScorer
from prefixroute.request import Request, Usage
from prefixroute.scorers import (
    ColdSpreadScorer,
    InflightScorer,
    KVUtilisationScorer,
    LoraAffinityScorer,
    PrefixAffinityScorer,
    QueueDepthScorer,
    SessionAffinityScorer,
)

__all__ = [
    "DEFAULT_ENGINE_BLOCK_SIZE",
    "DEFAULT_PRECISE_SPECULATIVE_TTL_S",
    "DEFAULT_SPECULATIVE_TTL_S",
    "PRECISE_CAPACITY_FACTOR",
    "Router",
    "RouterCounters",
    "SettlementError",
    "default_profile",
]

DEFAULT_SPECULATIVE_TTL_S = 30.0
DEFAULT_PRECISE_SPECULATIVE_TTL_S = 2.0
"""How long a precise endpoint's unconfirmed blocks of a completed request stay speculative."""
PRECISE_CAPACITY_FACTOR = 2
"""A precise endpoint's index capacity, in multiples of its engine's, while nothing queues there."""
REMOVED_MEMORY = 4096  # removed endpoint ids remembered, to ignore their late events
DEFAULT_ENGINE_BLOCK_SIZE = 16


def _check_now(now: float) -> None:
    if not math.isfinite(now):
        raise ValueError(f"now must be a finite number of seconds, got {now!r}")


def default_profile() -> Profile:
    """The default profile: prefix affinity balanced against load, in scores and in seconds.

    Filters: healthy, serves-model, role (both/prefill), stale-metrics guard,
    hot-spot guard (in-flight above 1.5 x the mean + 4), latency objectives
    (`slo-filter`: sheds a sheddable request, priority < 0, that no endpoint
    is predicted to serve within its objectives; otherwise keeps every
    candidate). Scorers (weight): prefix affinity 3, router in-flight 2,
    queue depth 1, KV utilisation 1, session affinity 1, LoRA affinity 1,
    cold spreader 1, predicted latency 2 (0.5 at 200 ms). Picker: max-score
    with random tie-break. Until issue 16 the profile also had a saturation
    filter and no latency scorer: the simulator measured the new one level
    or better on every built-in scenario and on held-out traffic
    (docs/simulator.md "Predicted latency").
    """
    return Profile(
        name="default",
        filters=(
            ("healthy-filter", HealthyFilter()),
            ("model-filter", ModelFilter()),
            ("role-filter", RoleFilter()),
            ("stale-metrics-filter", StaleMetricsFilter()),
            ("hot-spot-filter", HotSpotFilter()),
            ("slo-filter", SloFilter(on_miss="shed", prefer=False)),
        ),
        scorers=(
            WeightedScorer("prefix", PrefixAffinityScorer(), 3.0),
            WeightedScorer("inflight", InflightScorer(), 2.0),
            WeightedScorer("queue", QueueDepthScorer(), 1.0),
            WeightedScorer("kv", KVUtilisationScorer(), 1.0),
            WeightedScorer("session", SessionAffinityScorer(), 1.0),
            WeightedScorer("lora", LoraAffinityScorer(), 1.0),
            WeightedScorer("cold", ColdSpreadScorer(), 1.0),
            WeightedScorer("latency", PredictedLatencyScorer(scale_ms=200.0), 2.0),
        ),
        picker=("max-score-picker", MaxScorePicker()),
    )


_EXACT = 2**53  # counts a float64 holds exactly


class _TrackedLoad(LoadTracker):
    """The router's `LoadTracker`: keeps its current table's in-flight columns in step.

    Every change of a count goes through `start`, `finish` or `forget`, so
    the columns of the table it is bound to equal the dictionaries' values
    at all times (O(1) more per change). Binding a new table fills its
    columns from the dictionaries, O(endpoints).
    """

    __slots__ = ("_table",)

    def __init__(self) -> None:
        super().__init__()
        self._table: EndpointTable | None = None

    def bind(self, table: EndpointTable) -> None:
        """Mirror this tracker's in-flight counts in `table`'s columns from now on."""
        old = self._table
        if old is not None:
            old.load_owner = None
        self._table = None
        requests, tokens = self.requests_view(), self.tokens_view()
        total = 0
        for eid, i in table.row.items():
            n, t = requests.get(eid, 0), tokens.get(eid, 0)
            if n > _EXACT or t > _EXACT:  # plugins fall back to the dictionaries
                return
            table.inflight_requests[i] = n
            table.inflight_tokens[i] = t
            total += n
        table.inflight_total = total
        table.load_owner = self
        self._table = table

    def _sync(self, endpoint: EndpointId) -> None:
        table = self._table
        if table is None:
            return
        i = table.row.get(endpoint)
        if i is not None:
            self._put(table, i, self.requests(endpoint), self.tokens(endpoint))

    def start(self, endpoint: EndpointId, tokens: int) -> None:
        # `LoadTracker.start` and `_sync` in one (a request's hot path: fewer calls)
        requests, counts = self._requests, self._tokens
        n = requests[endpoint] = requests.get(endpoint, 0) + 1
        t = counts[endpoint] = counts.get(endpoint, 0) + tokens
        table = self._table
        if table is not None:
            i = table.row.get(endpoint)
            if i is not None:
                self._put(table, i, n, t)

    def finish(self, endpoint: EndpointId, tokens: int) -> None:
        super().finish(endpoint, tokens)
        self._sync(endpoint)

    def _put(self, table: EndpointTable, i: int, n: int, t: int) -> None:
        """Set row `i`'s mirrored counts to `n` and `t` (unbinds past float64's exact range)."""
        if n > _EXACT or t > _EXACT:
            table.load_owner = None
            self._table = None
            return
        requests = table.inflight_requests
        table.inflight_total += n - int(requests[i])
        requests[i] = n
        table.inflight_tokens[i] = t
        table.note_change(i)

    def forget(self, endpoint: EndpointId) -> None:
        super().forget(endpoint)
        self._sync(endpoint)

    def set_peers(
        self, requests: Mapping[EndpointId, int], tokens: Mapping[EndpointId, int]
    ) -> list[EndpointId]:
        changed = super().set_peers(requests, tokens)
        for endpoint in changed:
            self._sync(endpoint)
        return changed

    def check_invariants(self) -> None:
        """`LoadTracker`'s checks, and that the bound table's columns equal the counts."""
        super().check_invariants()
        table = self._table
        if table is None:
            return
        if table.load_owner is not self:
            raise AssertionError("the bound table names another owner")
        requests, tokens = self.requests_view(), self.tokens_view()
        for eid, i in table.row.items():
            if table.inflight_requests[i] != requests.get(eid, 0):
                raise AssertionError(f"mirrored requests of {eid} differ from the tracker's")
            if table.inflight_tokens[i] != tokens.get(eid, 0):
                raise AssertionError(f"mirrored tokens of {eid} differ from the tracker's")
        if table.inflight_total != sum(requests.get(eid, 0) for eid in table.row):
            raise AssertionError("the mirrored total differs from the tracker's")


@attrs.define(slots=True)
class RouterCounters:
    """Running totals the router keeps for exporters (plain ints, never reset).

    `predicted_cached_tokens` sums the index's predictions at decision time,
    `actual_cached_tokens` the engines' reports at completion: their ratio
    is the prediction's accuracy.
    """

    decisions: int = 0
    rejections: int = 0
    deferrals: int = 0
    completions: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    predicted_cached_tokens: int = 0
    actual_cached_tokens: int = 0


class SettlementError(ValueError):
    """`Router.on_complete` got a decision it must not settle: a driver bug.

    Raised, with the router's state untouched, for a decision already
    settled (a second `on_complete`) or made by another `Router` (or built
    by hand). Settling either would corrupt the in-flight counts the
    admission policies and load scorers rely on, and count a completion
    twice. `kind` is ``"settled"`` or ``"foreign"``.
    """

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class Router:
    """Decides which endpoint serves each request, and learns from what happened.

    - `route(request, endpoints, now)`: a `Decision` (recorded optimistically:
      the request's blocks enter the index as speculative entries on the
      chosen endpoint, and its work counts as in flight there) or a
      `Rejection`.
    - `on_complete(decision, usage, now)`: settles the in-flight accounting
      and, if the request succeeded and `confirm_on_complete`, confirms its
      blocks on the endpoint that served it (the engine has just computed
      them). With KV events from the engines, `observe` confirms instead.
      Exactly once per decision of this router (`SettlementError`
      otherwise); `open_decisions` counts those not yet settled (one int
      each is kept, so memory is O(requests in flight)).
    - `observe(event)`: applies an index event.
    - `release(endpoints, now)`: when the admission policy defers requests
      (`route` answered a `Deferral`), the driver calls this when capacity
      frees and periodically; it answers each released request with a
      `Decision`, or a `Rejection` when its deadline passed.

    `ledger` (a `TenantLedger`) accounts every decision, rejection and
    completion per tenant; admission policies read it through their
    context (per-tenant in-flight counts).

    Speculative entries that are neither confirmed nor refreshed expire
    `speculative_ttl_s` after the last decision that predicted them. A
    failed request's speculative entries (an engine that refused it, a
    connection that broke) are removed at `on_complete`, unless a later
    decision refreshed them.

    Modes, per endpoint. Every endpoint starts *approximate*: the index
    holds what the router predicted and completions confirmed. A driver
    that receives the endpoint's own KV events switches it to *precise*
    with `observe(ModeChanged(endpoint, precise=True))`: from then on the
    engine's `BlockStored` events are the only confirmation and completions
    confirm nothing. A decision's blocks stay speculative while the request
    runs (so that the tenant's next requests follow it even when the engine
    queues it for seconds before its prefill), and `precise_speculative_ttl_s`
    after it completes (a grace for the engine's last events to arrive);
    then whatever the events did not confirm is gone. While nothing waits
    in its engine's queue (`EndpointState.waiting` is 0) its index capacity
    is `PRECISE_CAPACITY_FACTOR` times the engine's: the engine's
    `BlockRemoved` events do the evicting, and the speculative entries of
    requests in flight must not push out blocks the engine still holds.
    While requests queue there it is the engine's own, so that those
    requests' speculative entries push out the least recently used blocks,
    as the engine will before it gets to them (with the extra room, under
    overload, the index showed blocks that were gone by the time a queued
    request was prefilled: docs/simulator.md).
    `ModeChanged(endpoint, precise=False)` goes back, e.g. while the event
    stream is broken.

    Capacities: an endpoint's index capacity is its `kv_capacity_blocks`
    (engine blocks of its `block_size` tokens, else `engine_block_size`)
    converted to index blocks (of `block_size` tokens in token mode,
    `block_size / chars_per_token` in text mode), or the index's default
    when unknown. A configured `engine_block_size` wins over the block size
    an endpoint reports; unset (None) the endpoint's own is used, else
    `DEFAULT_ENGINE_BLOCK_SIZE`. Predicted cached tokens follow the engine's
    reuse rule (vLLM v1 `KVCacheManager.get_computed_blocks`): whole engine
    blocks only, and never the prompt's last token, which the engine
    recomputes for its logits. A text request's length in tokens is
    estimated with its model's learned characters per token
    (`chars_per_token`, a `CharsPerToken` fed by every completed text
    request's `usage.prompt_tokens`), else the configured one. `counters`
    keeps running totals for metrics exporters.
    """

    def __init__(
        self,
        profile: Profile | None = None,
        *,
        blocker: Blocker | None = None,
        index: Index | None = None,
        admission: AdmissionPolicy | None = None,
        ledger: TenantLedger | None = None,
        rng: random.Random | None = None,
        speculative_ttl_s: float = DEFAULT_SPECULATIVE_TTL_S,
        confirm_on_complete: bool = True,
        engine_block_size: int | None = None,
        precise_speculative_ttl_s: float = DEFAULT_PRECISE_SPECULATIVE_TTL_S,
        objectives: ObjectivePolicy | None = None,
        latency: LatencyModel | None = None,
    ) -> None:
        if not (math.isfinite(speculative_ttl_s) and speculative_ttl_s > 0):
            raise ValueError(f"speculative_ttl_s must be > 0, got {speculative_ttl_s!r}")
        if not (math.isfinite(precise_speculative_ttl_s) and precise_speculative_ttl_s > 0):
            raise ValueError(
                f"precise_speculative_ttl_s must be > 0, got {precise_speculative_ttl_s!r}"
            )
        if engine_block_size is not None and engine_block_size < 1:
            raise ValueError(f"engine_block_size must be >= 1, got {engine_block_size!r}")
        self.profile = profile if profile is not None else default_profile()
        self.blocker = blocker if blocker is not None else Blocker()
        self.index: Index = index if index is not None else make_index()
        self.admission: AdmissionPolicy = admission if admission is not None else AlwaysAdmit()
        # a runtime-checkable isinstance inspects every protocol member: decide once
        self._deferring = isinstance(self.admission, Deferring)
        self._listening = isinstance(self.admission, CompletionListener)
        self.load: LoadTracker = _TrackedLoad()
        self.ledger = ledger if ledger is not None else TenantLedger()
        self.rng = rng if rng is not None else random.Random(0)
        self.speculative_ttl_s = speculative_ttl_s
        self.precise_speculative_ttl_s = precise_speculative_ttl_s
        self.confirm_on_complete = confirm_on_complete
        self.engine_block_size = engine_block_size
        self.chars_per_token = CharsPerToken(self.blocker.chars_per_token)
        self.objectives = objectives if objectives is not None else ObjectivePolicy()
        self._has_defaults = self.objectives.default.any or bool(self.objectives.tenants)
        self.latency = latency if latency is not None else LatencyModel()
        self._precise: set[EndpointId] = set()
        self._block_sizes: dict[EndpointId, int] = {}  # engine block size per endpoint, if known
        self.counters = RouterCounters()
        # Decisions made and not yet settled, by serial; `_token` marks this router's.
        self._token = object()
        self._serial = 0
        self._open: set[int] = set()
        self._capacity_seen: dict[EndpointId, tuple[int, int]] = {}  # (blocks, factor)
        # A generation per live endpoint (a new one when a removed id returns), so a
        # late completion settles nothing against a pod that is gone; and the ids
        # removed recently, so late events cannot bring a removed pod back.
        self._generations: dict[EndpointId, int] = {}
        self._next_generation = 0
        self._removed: OrderedDict[EndpointId, None] = OrderedDict()
        # The table of the endpoints last passed to route, and a copy of that sequence
        # to tell in one C-level comparison whether the next call passes the same.
        self._table = EndpointTable(())
        self._table_of: list[EndpointState] | tuple[EndpointState, ...] | None = None
        if self.blocker.mode is HashMode.TOKEN:
            self._index_block_tokens = float(self.blocker.block_size)
        else:
            self._index_block_tokens = self.blocker.block_size / self.blocker.chars_per_token

    @classmethod
    def default(cls, *, seed: int = 0) -> Router:
        """The default profile with a token-mode blocker; `seed` seeds hashing and picking."""
        return cls(default_profile(), blocker=Blocker(seed=seed), rng=random.Random(seed))

    def route(
        self,
        request: Request,
        endpoints: Sequence[EndpointState],
        now: float,
        *,
        keys: npt.NDArray[np.uint64] | None = None,
    ) -> Decision | Rejection | Deferral:
        """Choose an endpoint for `request` among `endpoints` at time `now`.

        Admission first: a `Rejection` answers the client, a `Deferral` means
        the request waits in the admission policy's queue until `release`
        hands it back.

        `keys`: the request's block keys when the driver hashed them ahead,
        which must be `self.blocker.keys(request)` (`Blocker.keys` touches no
        router state, so a driver may call it in a worker thread for a large
        prompt); hashed here when None. A deferred request is hashed again
        when released.

        `endpoints` must have distinct ids (ValueError otherwise: a driver
        bug). Cost: hashing the prompt once (O(tokens), vectorised), one
        index walk (O(matched blocks)), filters, scorers and picker (a few
        vectorised O(endpoints) passes on the array path, Python loops over
        the endpoints for plugins without the array capabilities; O(endpoints)
        more to rebuild the table when `endpoints` changed), and recording
        the chosen endpoint's blocks (O(blocks)). `now` must be finite
        (ValueError).
        """
        _check_now(now)
        self.index.expire(now)
        self._sync_capacities(endpoints)
        prompt_tokens = self._prompt_tokens(request)
        verdict = self.admission.admit(
            AdmissionContext(
                request=request,
                endpoints=endpoints,
                now=now,
                prompt_tokens=prompt_tokens,
                load=self.load,
                tenants=self.ledger,
            )
        )
        if isinstance(verdict, Deferral):
            self.counters.deferrals += 1
            return verdict
        if verdict is not None:
            return self._reject(request, verdict, now)
        return self._route_admitted(request, endpoints, now, prompt_tokens, keys)

    def release(
        self, endpoints: Sequence[EndpointState], now: float
    ) -> list[tuple[Request, Decision | Rejection]]:
        """Settle deferred requests the admission policy lets go at `now`.

        Each is the same `Request` object `route` deferred, paired with its
        `Decision` (routed now, over `endpoints`) or `Rejection` (its deadline
        passed, no endpoint could serve it, or a plugin raised while routing
        it: 503 `internal`, so a released request is always answered).
        Requests not returned stay queued. Empty when the admission policy
        never defers.
        """
        admission = self.admission
        if not self._deferring:
            return []
        assert isinstance(admission, Deferring)
        _check_now(now)
        self.index.expire(now)
        self._sync_capacities(endpoints)
        out: list[tuple[Request, Decision | Rejection]] = []
        for request, rejection in admission.release(endpoints, self.load, self.ledger, now):
            if rejection is not None:
                out.append((request, self._reject(request, rejection, now)))
                continue
            try:
                tokens = self._prompt_tokens(request)
                outcome = self._route_admitted(request, endpoints, now, tokens)
            except Exception as exc:  # the request is out of the queue: answer it anyway
                failed = Rejection(
                    503, f"routing failed: {exc!r}", retry_after_s=1.0, kind="internal"
                )
                outcome = self._reject(request, failed, now)
            out.append((request, outcome))
        return out

    def _reject(self, request: Request, rejection: Rejection, now: float) -> Rejection:
        self.counters.rejections += 1
        slo = self._objectives(request).any
        self.ledger.on_rejection(request.tenant, kind=rejection.kind, now=now, slo=slo)
        return rejection

    def _objectives(self, request: Request) -> Objectives:
        """The latency objectives `request` is held to. O(1)."""
        if self._has_defaults or request.slo_ttft_s is not None or request.slo_tpot_s is not None:
            return self.objectives.resolve(request)
        return NO_OBJECTIVES

    def _route_admitted(
        self,
        request: Request,
        endpoints: Sequence[EndpointState],
        now: float,
        prompt_tokens: int,
        hashed: npt.NDArray[np.uint64] | None = None,
    ) -> Decision | Rejection:
        """Filters, scorers, picker and recording, for a request admission let through."""
        if not endpoints:
            return self._reject(
                request,
                Rejection(
                    503, "no endpoints are configured", retry_after_s=1.0, kind="no-endpoint"
                ),
                now,
            )
        blocker = self.blocker
        keys = blocker.keys(request) if hashed is None else np.asarray(hashed, dtype=np.uint64)
        if keys.flags.writeable:  # the decision keeps it: nobody may change it later
            keys = keys.view()
            keys.flags.writeable = False
        # the pure index takes keys as Python ints: convert the array once per call
        index_keys = keys.tolist() if isinstance(self.index, PrefixIndex) else keys
        tokens_per_block = blocker.tokens_per_block(
            request,
            None if request.token_ids is not None else self.chars_per_token.get(request.model),
        )
        matches = self.index.match(index_keys)
        table = self._table
        objectives = self._objectives(request)
        ctx = RouteContext(
            request=request,
            now=now,
            rng=self.rng,
            block_keys=index_keys,
            prompt_tokens=prompt_tokens,
            tokens_per_block=tokens_per_block,
            matches=matches,
            load=self.load,
            tenants=self.ledger,
            table=table,
            latency=self.latency,
            objectives=objectives,
        )
        ctx.endpoints = endpoints

        profile = self.profile
        rows = None
        candidates: list[EndpointState] = []
        if profile.row_filters:  # the array path (plugins.RowFilter)
            rows = table.all_rows
            for name, flt in profile.filters:
                rows = flt.filter_rows(ctx, rows)  # type: ignore[attr-defined]
                if not len(rows):
                    return self._no_candidate(request, name, now, flt)
            ctx.set_rows(rows)
        else:
            candidates = list(endpoints)
            for name, flt in profile.filters:
                candidates = flt.filter(ctx, candidates)
                if not candidates:
                    return self._no_candidate(request, name, now, flt)
            ctx.candidates = candidates
            if profile.row_scorers:
                rows = table.rows_of(candidates)

        picker_name, picker = profile.picker
        count = profile.max_fallbacks
        if rows is not None and profile.row_scorers:
            raw, totals = profile.score_rows(ctx, rows)
            if profile.top_picker:
                order = picker.pick_top(ctx, totals, count)  # type: ignore[attr-defined]
            else:
                order = picker.pick(ctx, totals.tolist())
            ids = table.ids
            at = rows[order[: 1 + count]].tolist()
            chosen_id = ids[at[0]]
            fallbacks = tuple(ids[i] for i in at[1 : 1 + count])
            candidate_ids: tuple[EndpointId, ...] | CandidateIds = CandidateIds(ids, rows)
            totals_field: tuple[float, ...] | npt.NDArray[np.float64] = totals
        else:
            candidates = list(ctx.candidates)
            raw, totals_list = profile.score(ctx, candidates)
            order = picker.pick(ctx, totals_list)
            chosen_id = candidates[order[0]].id
            fallbacks = tuple(candidates[i].id for i in order[1 : 1 + count])
            candidate_ids = tuple(e.id for e in candidates)
            totals_field = tuple(totals_list)

        match = matches.get(chosen_id)
        matched = match.blocks if match is not None else 0
        predicted = 0
        if matched:  # whole engine blocks, never the last token (the class docstring)
            engine_block = self.engine_block_size or self._block_sizes.get(
                chosen_id, DEFAULT_ENGINE_BLOCK_SIZE
            )
            reusable = min(int(matched * tokens_per_block), prompt_tokens - 1)
            predicted = max(0, reusable - reusable % engine_block)
        load_tokens = prompt_tokens - predicted + (request.max_tokens or 0)
        load = self.load
        note = self.latency.on_route(
            chosen_id,
            prompt_tokens - predicted,
            now,
            requests=load.requests(chosen_id),
            tokens=load.tokens(chosen_id),
            waiting=int(table.waiting[table.row[chosen_id]]),
        )

        if len(keys):
            self.index.insert(chosen_id, index_keys, speculative_until=now + self.speculative_ttl_s)
        self.load.start(chosen_id, load_tokens)
        if not matches:
            self.load.note_cold(chosen_id, now)
        if request.session is not None:
            self.load.bind_session((request.tenant, request.session), chosen_id)
        counters = self.counters
        counters.decisions += 1
        counters.prompt_tokens += prompt_tokens
        self._serial += 1
        self._open.add(self._serial)
        counters.predicted_cached_tokens += predicted
        self.ledger.on_decision(
            request.tenant, prompt_tokens=prompt_tokens, predicted_cached_tokens=predicted, now=now
        )

        return Decision(
            endpoint=chosen_id,
            fallbacks=fallbacks,
            matched_blocks=matched,
            total_blocks=len(keys),
            predicted_cached_tokens=predicted,
            prompt_tokens=prompt_tokens,
            request=request,
            profile=profile.name,
            picker=picker_name,
            candidates=candidate_ids,
            scorer_names=profile.scorer_names,
            weights=profile.weights,
            raw=raw,
            totals=totals_field,
            matches={eid: m.blocks for eid, m in matches.items()},
            decided_at=now,
            load_tokens=load_tokens,
            block_keys=keys,
            epoch=self._generation(chosen_id),
            serial=self._serial,
            issuer=self._token,
            latency=note,
            objectives=objectives,
        )

    def _no_candidate(self, request: Request, name: str, now: float, flt: object) -> Rejection:
        """503 `no-candidate`, or the filter's own `empty_rejection` when it has one (`slo`)."""
        own = getattr(flt, "empty_rejection", None)
        if isinstance(own, Rejection):
            return self._reject(request, own, now)
        reason = f"no endpoint can serve model {request.model!r}: {name} left no candidate"
        return self._reject(
            request, Rejection(503, reason, retry_after_s=1.0, kind="no-candidate"), now
        )

    def prompt_tokens(self, request: Request) -> int:
        """The prompt in tokens as admission sees it (for a driver's shared rate limits)."""
        return self._prompt_tokens(request)

    def _prompt_tokens(self, request: Request) -> int:
        """The prompt in tokens: exact for token ids, else with the model's learned ratio."""
        if request.token_ids is not None:
            return len(request.token_ids)
        return self.blocker.prompt_tokens(request, self.chars_per_token.get(request.model))

    def _sync_capacities(self, endpoints: Sequence[EndpointState]) -> EndpointTable:
        """Refuse duplicate ids, size each endpoint's index capacity, build the table.

        An id passed here is live again even if it was removed before. When the
        endpoints are the same as last time (equal sequences: the same snapshot
        objects, compared in C) and no event changed an endpoint's mode or
        removed one since, nothing can have changed: the last table is reused
        at the cost of that comparison. Otherwise O(endpoints) dict look-ups
        and a new `EndpointTable`; the index is touched only when a capacity
        changes.
        """
        last = self._table_of
        if last is not None:
            if type(endpoints) is type(last):
                if endpoints == last:
                    return self._table
            elif tuple(endpoints) == last:
                return self._table
        ids = {e.id for e in endpoints}
        if len(ids) != len(endpoints):
            raise ValueError("endpoints passed to route() must have distinct ids")
        if self._removed:
            for eid in ids.intersection(self._removed):
                del self._removed[eid]
        seen = self._capacity_seen
        sizes = self._block_sizes
        precise = self._precise
        for e in endpoints:
            if e.block_size is not None and sizes.get(e.id) != e.block_size:
                sizes[e.id] = e.block_size
                seen.pop(e.id, None)  # the same blocks hold another number of tokens
            blocks = e.kv_capacity_blocks
            if blocks is None:
                continue
            # room for speculation only while nothing queues (see the class docstring)
            factor = PRECISE_CAPACITY_FACTOR if e.id in precise and not e.waiting else 1
            if seen.get(e.id) != (blocks, factor):
                engine_block = self.engine_block_size or sizes.get(e.id, DEFAULT_ENGINE_BLOCK_SIZE)
                tokens = blocks * engine_block
                capacity = max(1, int(tokens / self._index_block_tokens)) * factor
                self.index.set_capacity(e.id, capacity)
                seen[e.id] = (blocks, factor)
        table = self._table = EndpointTable(endpoints)
        self._table_of = list(endpoints) if type(endpoints) is list else tuple(endpoints)
        if isinstance(self.load, _TrackedLoad):
            self.load.bind(table)
        return table

    def _generation(self, endpoint: EndpointId) -> int:
        """The live generation of `endpoint`, starting one on first sight."""
        gen = self._generations.get(endpoint)
        if gen is None:
            self._next_generation += 1
            gen = self._generations[endpoint] = self._next_generation
        return gen

    def on_complete(
        self,
        decision: Decision,
        usage: Usage,
        now: float,
        *,
        served_by: EndpointId | None = None,
    ) -> None:
        """Settle `decision` with what really happened (`usage`) at `now`.

        Releases the in-flight accounting and, for a successful request when
        `confirm_on_complete` is set, confirms the request's blocks on the
        endpoint that served it: `served_by` when the driver fell back to
        another endpoint, else the decision's. Blocks the index evicted or
        removed meanwhile stay gone (the index models the engine's LRU); if
        the request outlived `speculative_ttl_s`, or another endpoint served
        it, the whole chain is inserted as confirmed instead. A failed
        request's speculative entries are left to expire. A decision whose
        endpoint was removed (`EndpointRemoved`) after it was made settles
        nothing: the pod it counted against is gone. Nor is a removed pod
        credited as `served_by`, and `BlockStored` events of a removed pod
        are ignored until its id is passed to `route` again.

        Each decision is settled exactly once, by the router that made it:
        a second `on_complete` for it, or a decision of another router,
        raises `SettlementError` and changes nothing (drivers keep their own
        exactly-once flag; this catches the bug loudly in tests). The
        engine's `usage.cached_tokens` is clamped to the prompt
        (`usage.prompt_tokens`, or the decision's count when the engine gave
        none). `now` must be finite (ValueError). O(blocks) to confirm.
        """
        if decision.issuer is not self._token:
            raise SettlementError(
                "on_complete got a decision this router did not make", kind="foreign"
            )
        if decision.serial not in self._open:
            raise SettlementError(
                f"decision {decision.serial} (request {decision.request.request_id!r}) "
                "was already settled",
                kind="settled",
            )
        _check_now(now)
        self._open.remove(decision.serial)
        prompt = usage.prompt_tokens or decision.prompt_tokens
        cached = min(usage.cached_tokens, prompt)
        request = decision.request
        if usage.ok and usage.prompt_tokens and request.token_ids is None and request.prompt:
            self.chars_per_token.observe(request.model, len(request.prompt), usage.prompt_tokens)
        counters = self.counters
        counters.completions += 1
        if not usage.ok:
            counters.failures += 1
        counters.actual_cached_tokens += cached
        judged_tpot = self._tpot(usage)[1]
        self.ledger.on_complete(
            decision.request.tenant,
            prompt_tokens=prompt,
            cached_tokens=cached,
            predicted_cached_tokens=decision.predicted_cached_tokens,
            ttft_s=usage.ttft_s,
            e2e_s=usage.e2e_s,
            ok=usage.ok,
            now=now,
            objectives=decision.objectives,
            tpot_s=judged_tpot,
        )
        if self._listening:
            self.admission.on_complete(decision, usage, now)  # type: ignore[attr-defined]
        self.index.expire(now)
        if self._generations.get(decision.endpoint) != decision.epoch:
            return
        self.load.finish(decision.endpoint, decision.load_tokens)
        sample = self.latency_sample(decision, usage, now, served_by=served_by)
        if sample is not None:
            assert decision.latency is not None
            self.latency.on_complete(
                decision.endpoint, decision.latency, ttft_s=sample[0], tpot_s=sample[1]
            )
        keys = decision._block_keys
        if not len(keys):
            return
        if isinstance(keys, np.ndarray) and isinstance(self.index, PrefixIndex):
            keys = keys.tolist()
        not_after = decision.decided_at + self.speculative_ttl_s  # not refreshed since
        if not usage.ok:  # the engine computed nothing we know of: take the guess back
            self.index.discard_speculative(decision.endpoint, keys, not_after=not_after)
            return
        served = served_by or decision.endpoint
        if decision.endpoint in self._precise:  # its events confirm: a grace for them to arrive
            self.index.discard_speculative(
                decision.endpoint,
                keys,
                not_after=not_after,
                at=now + self.precise_speculative_ttl_s,
            )
        if not self.confirm_on_complete or served in self._removed or served in self._precise:
            return
        if served != decision.endpoint or now - decision.decided_at >= self.speculative_ttl_s:
            self.index.insert(served, keys)
        else:
            self.index.confirm(served, keys)

    def latency_sample(
        self,
        decision: Decision,
        usage: Usage,
        now: float,
        *,
        served_by: EndpointId | None = None,
    ) -> tuple[float | None, float | None] | None:
        """What `on_complete` teaches the latency model: (TTFT, TPOT) at `decision.endpoint`.

        None when it teaches nothing (failed, served by another endpoint, no
        note). The TTFT leaves out the wait before the decision (a deferral
        queue's): the client measured it from arrival, `now - usage.e2e_s`.
        A simulator sharing everything between replicas feeds their models
        the same sample. O(1).
        """
        if not usage.ok or decision.latency is None or served_by not in (None, decision.endpoint):
            return None
        ttft = usage.ttft_s
        if ttft is not None and usage.e2e_s is not None:
            ttft = max(0.0, ttft - max(0.0, decision.decided_at - (now - usage.e2e_s)))
        return ttft, self._tpot(usage)[0]

    @staticmethod
    def _tpot(usage: Usage) -> tuple[float | None, float | None]:
        """The measured TPOT (streamed answers), and the TPOT objectives are judged on.

        A streamed answer's TPOT is (e2e - TTFT) / (tokens - 1); one that was
        not streamed (no TTFT) has no TPOT to learn from, and is judged on
        e2e / tokens (GIE's normalised time per output token). None under 2
        tokens or for a failed request.
        """
        n = usage.completion_tokens
        if not usage.ok or usage.e2e_s is None or n < 2:
            return None, None
        if usage.ttft_s is None:
            return None, usage.e2e_s / n
        tpot = max(0.0, usage.e2e_s - usage.ttft_s) / (n - 1)
        return tpot, tpot

    def is_precise(self, endpoint: EndpointId) -> bool:
        """Whether `endpoint` is in precise mode (its KV events are the truth). O(1)."""
        return endpoint in self._precise

    @property
    def precise_endpoints(self) -> frozenset[EndpointId]:
        """The endpoints in precise mode. O(endpoints)."""
        return frozenset(self._precise)

    @property
    def open_decisions(self) -> int:
        """Decisions made and not yet settled by `on_complete`. O(1)."""
        return len(self._open)

    def apply_peer_decision(
        self,
        endpoint: EndpointId,
        keys: npt.NDArray[np.uint64],
        now: float,
        *,
        completed: bool = False,
        session: tuple[str, str] | None = None,
    ) -> bool:
        """Record another replica's decision: `endpoint` gets `keys` as speculative entries.

        What this router records for a decision of its own (the chain's
        keys, speculative for `speculative_ttl_s` from `now`), so replicas
        sharing their decisions (issue 15) keep one approximate index. With
        `completed`, the peer's request was served by `endpoint`: its
        entries become confirmed, as `on_complete` confirms this router's
        own (without it a peer's entries would expire while the deciding
        replica keeps its own: the simulator measured a third of the hit
        rate lost on `mooncake`). Skipped, returning False, for an endpoint
        in precise mode (its engine's events are the truth every replica
        receives), removed from the pool, or a completion when
        `confirm_on_complete` is off (a driver skips endpoints its pool
        does not have). `session` (tenant, session id) binds that session to
        `endpoint`, as this router's own decisions do (for session
        affinity). O(keys).
        """
        _check_now(now)
        if endpoint in self._removed:
            return False
        if session is not None:
            self.load.bind_session(session, endpoint)
        if endpoint in self._precise or not len(keys):
            return False
        if completed and not self.confirm_on_complete:
            return False
        index_keys = keys.tolist() if isinstance(self.index, PrefixIndex) else keys
        until = None if completed else now + self.speculative_ttl_s
        self.index.insert(endpoint, index_keys, speculative_until=until)
        return True

    def observe(self, event: IndexEvent) -> None:
        """Apply a KV-cache or endpoint event to the router's state."""
        match event:
            case BlockStored(endpoint=eid, keys=keys, tier=tier):
                if eid not in self._removed:  # a late event of a pod that is gone
                    self.index.insert(eid, keys, tier=tier)
            case BlockRemoved(endpoint=eid, keys=keys, tier=tier):
                self.index.remove(eid, keys, tier=tier)
            case AllBlocksCleared(endpoint=eid):
                self.index.clear_endpoint(eid)
            case ModeChanged(endpoint=eid, precise=precise):
                if precise != (eid in self._precise):
                    if precise:
                        self._precise.add(eid)
                    else:
                        self._precise.discard(eid)
                    self._capacity_seen.pop(eid, None)  # resized at the next route
                    self._table_of = None
            case EndpointRemoved(endpoint=eid):
                self.index.remove_endpoint(eid)
                self.load.forget(eid)
                self.latency.forget(eid)
                self._precise.discard(eid)
                self._block_sizes.pop(eid, None)
                self._capacity_seen.pop(eid, None)
                self._table_of = None
                self._generations.pop(eid, None)
                self._removed[eid] = None
                self._removed.move_to_end(eid)
                if len(self._removed) > REMOVED_MEMORY:
                    self._removed.popitem(last=False)
            case _:
                raise TypeError(f"unknown index event {event!r}")
